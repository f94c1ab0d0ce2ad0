"""Whole-image inference: the official multi-scale, flipped, sliding-window
evaluation (PyTorch-Encoding's `MultiEvalModule` as lang-seg runs it).

For each scale s: the LONG side becomes ceil(base_size * s) and the short side
follows with int(x + 0.5); the image is resized (bilinear, align_corners=True).
If the long side fits the crop, the image is padded bottom/right to
crop x crop with the normalised value of black (-mean/std) and run once;
otherwise crop x crop windows slide with stride int(crop * 2/3), each padded
the same way, their logits summed and divided by the per-pixel window count.
With `flip`, every window also runs mirrored and the mirrored-back logits are
added (a sum, not a mean). Each scale's map is resized back to the image size
(align_corners=True) and the raw logits are summed over scales.

The network therefore only ever sees crop x crop inputs: one compiled forward
serves every image size. Resizes, padding and sums run on the host in numpy.
"""

from collections.abc import Callable, Sequence
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax.models import LSeg
from lseg_jax.models.layers import resize_bilinear_np

# (K, crop, crop, 3) windows -> (K, crop, crop, N) logits
WindowForward = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class MultiScale:
  scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  flip: bool = True
  base_size: int = 520
  crop_size: int = 480
  stride_rate: float = 2.0 / 3.0


def scaled_size(h: int, w: int, long_size: int) -> tuple[int, int]:
  """(height, width) with the long side = long_size, as the official code rounds."""
  if h > w:
    return long_size, int(1.0 * w * long_size / h + 0.5)
  return int(1.0 * h * long_size / w + 0.5), long_size


def pad_to(image: np.ndarray, size: int, value: np.ndarray) -> np.ndarray:
  """Pads [H, W, C] bottom/right to at least size x size with `value` per channel."""
  h, w = image.shape[:2]
  out = np.empty((max(h, size), max(w, size), image.shape[2]), image.dtype)
  out[...] = value
  out[:h, :w] = image
  return out


def window_grid(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
  """(h0, h1, w0, w1) of the sliding windows over an h x w (>= crop) image."""
  rows = int(math.ceil((h - crop) / stride)) + 1
  cols = int(math.ceil((w - crop) / stride)) + 1
  return [(i * stride, min(i * stride + crop, h), j * stride, min(j * stride + crop, w))
          for i in range(rows) for j in range(cols)]


def _run_windows(forward: WindowForward, windows: list[np.ndarray], flip: bool) -> list[np.ndarray]:
  """Logits of each window (+ the mirrored window's, mirrored back)."""
  batch = np.stack(windows + ([w[:, ::-1] for w in windows] if flip else []))
  logits = forward(batch)
  n = len(windows)
  return [logits[i] + (logits[n + i][:, ::-1] if flip else 0) for i in range(n)]


def multiscale_logits(forward: WindowForward, image: np.ndarray, num_labels: int, ms: MultiScale,
                      pad_value: np.ndarray) -> np.ndarray:
  """Summed logits [H, W, N] of a normalised image [H, W, 3] of any size."""
  h, w = image.shape[:2]
  crop, stride = ms.crop_size, int(ms.crop_size * ms.stride_rate)
  scores = np.zeros((h, w, num_labels), np.float32)
  for scale in ms.scales:
    long_size = int(math.ceil(ms.base_size * scale))
    height, width = scaled_size(h, w, long_size)
    resized = resize_bilinear_np(image[None], (height, width), align_corners=True)[0]
    padded = pad_to(resized, crop, pad_value)
    if long_size <= crop:
      out = _run_windows(forward, [padded[:crop, :crop]], ms.flip)[0]
    else:
      ph, pw = padded.shape[:2]
      grid = window_grid(ph, pw, crop, stride)
      windows = [pad_to(padded[h0:h1, w0:w1], crop, pad_value) for h0, h1, w0, w1 in grid]
      out = np.zeros((ph, pw, num_labels), np.float32)
      count = np.zeros((ph, pw, 1), np.float32)
      for (h0, h1, w0, w1), logits in zip(grid, _run_windows(forward, windows, ms.flip)):
        out[h0:h1, w0:w1] += logits[:h1 - h0, :w1 - w0]
        count[h0:h1, w0:w1] += 1
      out = out / count
    scores += resize_bilinear_np(out[None, :height, :width], (h, w), align_corners=True)[0]
  return scores


def make_window_forward(model: LSeg, variables: dict, text_features: jax.Array, chunk: int,
                        sharding: jax.sharding.Sharding | None = None) -> WindowForward:
  """A WindowForward running `model` in fixed chunks of `chunk` windows (one
  compilation), the chunk's batch axis laid out by `sharding`."""
  apply = jax.jit(lambda v, x, t: model.apply(v, x, t), out_shardings=sharding)

  def forward(batch: np.ndarray) -> np.ndarray:
    outs = []
    for start in range(0, len(batch), chunk):
      part = batch[start:start + chunk]
      n = len(part)
      if n < chunk:
        part = np.concatenate([part, np.zeros((chunk - n, *part.shape[1:]), part.dtype)])
      x = jax.device_put(part, sharding) if sharding is not None else jnp.asarray(part)
      outs.append(np.asarray(apply(variables, x, text_features))[:n])
    return np.concatenate(outs)

  return forward
