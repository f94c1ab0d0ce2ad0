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

Two implementations share one geometry (`scale_geometry`):
- `multiscale_logits`: the host transcription, loop by loop as the official
  module (numpy resizes and sums); the reference the tests hold the other to.
- `MultiScaleSegmenter`: everything heavy on the devices. Every step after
  the network is linear, and the window grid is a product of row and column
  intervals (so the window count is too), so a window's share of the final
  [H, W, N] map is a separable two-tap resample of its logits whose weights
  (bilinear taps / window counts, flip as reversed column indices) the host
  computes once per window. Each device owns whole images and runs a fixed
  batch of their windows (any scales, flipped or not) per step, adding each
  window's share into its images' [H, W, N] sums, which never leave it; the
  argmax and the confusion matrix (or the label map) end the pipeline. The
  window pixels are cut on the device too, from the image and per-window
  bilinear taps: only the image and a few small index arrays travel.

Compilation is bounded: image sides are padded up to `size_bucket` (four
sizes per octave: ..., 384, 448, 512, 640, 768, ...), windows run in fixed
batches, so a stream of differently sized images compiles once per distinct
(bucket(H), bucket(W)) pair, whatever the sizes inside it.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from lseg_jax import losses
from lseg_jax.models.layers import interpolation_taps, resize_bilinear_np

# (K, crop, crop, 3) windows -> (K, crop, crop, N) logits, on the host
WindowForward = Callable[[np.ndarray], np.ndarray]
# (params, windows [K, c, c, 3], *per-window inputs) -> maps [K, c / map_stride, c / map_stride, C],
# traceable: the segmenter's inputs are (text [K, N, D], label_mask [K, N]) and its maps the logits
DeviceForward = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class MultiScale:
  scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  flip: bool = True
  base_size: int = 520
  crop_size: int = 480
  stride_rate: float = 2.0 / 3.0
  # How the dense-feature recipes (`lseg_jax.features`) merge instead: the
  # mirrored pair averaged, not summed; each scale's map left at its resized
  # size, not resized back; window maps at 1/map_stride of the window's
  # resolution (one window only: head1's own output).
  flip_mean: bool = False
  resize_back: bool = True
  map_stride: int = 1


# ------------------------------------------------------------------ geometry (shared)

def scaled_size(h: int, w: int, long_size: int) -> tuple[int, int]:
  """(height, width) with the long side = long_size, as the official code rounds."""
  if h > w:
    return long_size, int(1.0 * w * long_size / h + 0.5)
  return int(1.0 * h * long_size / w + 0.5), long_size


def window_grid(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
  """(h0, h1, w0, w1) of the sliding windows over an h x w (>= crop) image."""
  rows = int(math.ceil((h - crop) / stride)) + 1
  cols = int(math.ceil((w - crop) / stride)) + 1
  return [(i * stride, min(i * stride + crop, h), j * stride, min(j * stride + crop, w))
          for i in range(rows) for j in range(cols)]


@dataclasses.dataclass(frozen=True)
class ScaleGeometry:
  """One scale of one image: the resized size, the padded canvas and its windows."""
  height: int
  width: int
  canvas: tuple[int, int]  # (max(height, crop), max(width, crop)): padded bottom/right
  windows: list[tuple[int, int, int, int]]  # (h0, h1, w0, w1) over the canvas


def scale_geometry(h: int, w: int, scale: float, ms: MultiScale) -> ScaleGeometry:
  """The official sizes for an h x w image at `scale` (a long side that fits
  the crop gives the one window (0, crop, 0, crop))."""
  crop, stride = ms.crop_size, int(ms.crop_size * ms.stride_rate)
  height, width = scaled_size(h, w, int(math.ceil(ms.base_size * scale)))
  canvas = (max(height, crop), max(width, crop))
  return ScaleGeometry(height, width, canvas, window_grid(*canvas, crop, stride))


def size_bucket(n: int, multiple: int = 32) -> int:
  """n rounded up to one of four sizes per octave (a multiple of `multiple`):
  the padded side length that bounds recompilation."""
  step = max(multiple, 2 ** max((n - 1).bit_length() - 3, 0))
  return -(-n // step) * step


# ------------------------------------------------------------------ host reference

def pad_to(image: np.ndarray, size: int, value: np.ndarray) -> np.ndarray:
  """Pads [H, W, C] bottom/right to at least size x size with `value` per channel."""
  h, w = image.shape[:2]
  out = np.empty((max(h, size), max(w, size), image.shape[2]), image.dtype)
  out[...] = value
  out[:h, :w] = image
  return out


def _run_windows(forward: WindowForward, windows: list[np.ndarray], flip: bool) -> list[np.ndarray]:
  """Logits of each window (+ the mirrored window's, mirrored back)."""
  batch = np.stack(windows + ([w[:, ::-1] for w in windows] if flip else []))
  logits = forward(batch)
  n = len(windows)
  return [logits[i] + (logits[n + i][:, ::-1] if flip else 0) for i in range(n)]


def multiscale_logits(forward: WindowForward, image: np.ndarray, num_labels: int, ms: MultiScale,
                      pad_value: np.ndarray) -> np.ndarray:
  """Summed logits [H, W, N] of a normalised image [H, W, 3] of any size, on the host."""
  h, w = image.shape[:2]
  crop = ms.crop_size
  scores = np.zeros((h, w, num_labels), np.float32)
  for scale in ms.scales:
    g = scale_geometry(h, w, scale, ms)
    resized = resize_bilinear_np(image[None], (g.height, g.width), align_corners=True)[0]
    padded = pad_to(resized, crop, pad_value)  # [*g.canvas, 3]
    windows = [pad_to(padded[h0:h1, w0:w1], crop, pad_value) for h0, h1, w0, w1 in g.windows]
    out = np.zeros((*g.canvas, num_labels), np.float32)
    count = np.zeros((*g.canvas, 1), np.float32)
    for (h0, h1, w0, w1), logits in zip(g.windows, _run_windows(forward, windows, ms.flip)):
      out[h0:h1, w0:w1] += logits[:h1 - h0, :w1 - w0]
      count[h0:h1, w0:w1] += 1
    out = out / count
    scores += resize_bilinear_np(out[None, :g.height, :g.width], (h, w), align_corners=True)[0]
  return scores


def make_window_forward(model, variables: dict, text_features: jax.Array, chunk: int,
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


# ------------------------------------------------------------------ the device path: per-window plans

def resample_taps(n_in: int, n_out: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear (align_corners=True) taps from n_in to n_out samples as
  (index [n_rows, 2], weight [n_rows, 2] float32) for `resample`, rows past
  n_out zero."""
  lo, hi, frac = interpolation_taps(n_in, n_out, align_corners=True)
  frac = frac.astype(np.float32)
  idx, wgt = np.zeros((n_rows, 2), np.int32), np.zeros((n_rows, 2), np.float32)
  idx[:n_out] = np.stack([lo, hi], -1)
  wgt[:n_out] = np.stack([1 - frac, frac], -1)  # float32 as resize_bilinear_np
  return idx, wgt


def _cover(starts: Sequence[int], crop: int, size: int) -> np.ndarray:
  """[size] float32: how many of the intervals [s, s + crop) cover each index."""
  count = np.zeros(size, np.float32)
  for s in starts:
    count[s:s + crop] += 1
  return count


def _window_side(in_taps, out_taps, n_valid: int, start: int, count: np.ndarray, crop: int, flip: bool,
                 map_stride: int = 1, weight: float = 1.0) -> dict[str, np.ndarray]:
  """One axis of one window: the taps that cut its pixels from the image
  (`cut_*`, `ok`: inside the resized image) and those that spread its map
  (side crop / map_stride) over the output (`put_*`: map index, tap weight
  x `weight` / window count)."""
  pos = start + (np.arange(crop)[::-1] if flip else np.arange(crop))  # canvas index of each window pixel
  ok = pos < n_valid
  cut_idx, cut_w = in_taps[0][np.minimum(pos, n_valid - 1)], in_taps[1][np.minimum(pos, n_valid - 1)]
  src, w = out_taps
  side = crop // map_stride
  local = src - start // map_stride  # [n_out, 2] index within the window's map
  inside = (local >= 0) & (local < side) & (w != 0)
  put_w = np.where(inside, w * np.float32(weight) / count[np.minimum(src, len(count) - 1)], 0).astype(np.float32)
  local = np.clip(local, 0, side - 1)
  return {"cut_idx": cut_idx, "cut_w": cut_w, "ok": ok,
          "put_idx": (side - 1 - local if flip else local).astype(np.int32), "put_w": put_w}


def target_size(h: int, w: int, ms: MultiScale) -> tuple[int, int]:
  """The size the merged map of an h x w image has: the image's, or
  (resize_back False: one scale) its resized size at the maps' resolution."""
  if ms.resize_back:
    return h, w
  if len(ms.scales) != 1:
    raise ValueError(f"scales {ms.scales}: summing several scales needs resize_back")
  g = scale_geometry(h, w, ms.scales[0], ms)
  return g.height // ms.map_stride, g.width // ms.map_stride


def window_plans(h: int, w: int, ms: MultiScale, out_hw: tuple[int, int], slot: int) -> list[dict[str, np.ndarray]]:
  """Per-window arrays of an h x w image whose summed maps go to an
  out_hw-padded map: every window of every scale, then its mirror."""
  crop, stride, plans = ms.crop_size, ms.map_stride, []
  weight = 0.5 if ms.flip and ms.flip_mean else 1.0
  for scale in ms.scales:
    g = scale_geometry(h, w, scale, ms)
    if stride != 1 and len(g.windows) != 1:
      raise ValueError(f"maps at 1/{stride} of the window need one window per scale; {len(g.windows)} at {scale}")
    th, tw = target_size(h, w, ms)
    in_r, in_c = resample_taps(h, g.height, g.height), resample_taps(w, g.width, g.width)
    out_r = resample_taps(g.height // stride, th, out_hw[0])
    out_c = resample_taps(g.width // stride, tw, out_hw[1])
    row_count = _cover(sorted({h0 // stride for h0, *_ in g.windows}), crop // stride, g.canvas[0] // stride)
    col_count = _cover(sorted({w0 // stride for _, _, w0, _ in g.windows}), crop // stride, g.canvas[1] // stride)
    for flip in (False, True) if ms.flip else (False,):
      for h0, _, w0, _ in g.windows:
        rows = _window_side(in_r, out_r, g.height, h0, row_count, crop, False, stride, weight)
        cols = _window_side(in_c, out_c, g.width, w0, col_count, crop, flip, stride)
        plans.append({"slot": np.int32(slot), **{f"row_{k}": v for k, v in rows.items()},
                      **{f"col_{k}": v for k, v in cols.items()}})
  return plans


def _empty_plan(crop: int, out_hw: tuple[int, int]) -> dict[str, np.ndarray]:
  """A window that adds nothing (fills a device's last batch)."""
  side = lambda n: {"cut_idx": np.zeros((crop, 2), np.int32), "cut_w": np.zeros((crop, 2), np.float32),
                    "ok": np.zeros(crop, bool), "put_idx": np.zeros((n, 2), np.int32),
                    "put_w": np.zeros((n, 2), np.float32)}
  return {"slot": np.int32(0), **{f"row_{k}": v for k, v in side(out_hw[0]).items()},
          **{f"col_{k}": v for k, v in side(out_hw[1]).items()}}


# ------------------------------------------------------------------ the device path: kernels

def resample(x: jax.Array, row_idx: jax.Array, row_w: jax.Array, col_idx: jax.Array, col_w: jax.Array
             ) -> jax.Array:
  """Separable two-tap resample of x [h, w, C]: rows then columns (the
  order and arithmetic of `resize_bilinear_np`) -> [len(row_idx), len(col_idx), C]."""
  x = x[row_idx[:, 0]] * row_w[:, 0, None, None] + x[row_idx[:, 1]] * row_w[:, 1, None, None]
  return x[:, col_idx[:, 0]] * col_w[None, :, 0, None] + x[:, col_idx[:, 1]] * col_w[None, :, 1, None]


def _cut_window(image: jax.Array, plan: dict, pad_value: jax.Array) -> jax.Array:
  """[crop, crop, 3] window pixels: the resized image, black (pad_value) outside it."""
  x = resample(image, plan["row_cut_idx"], plan["row_cut_w"], plan["col_cut_idx"], plan["col_cut_w"])
  ok = plan["row_ok"][:, None] & plan["col_ok"][None, :]
  return jnp.where(ok[..., None], x, pad_value)


def _window_step(forward: DeviceForward, pad_value: np.ndarray, params, sums: jax.Array, images: jax.Array,
                 per_slot: tuple, plan: dict) -> jax.Array:
  """One device's step: cut its K windows, run them (with their images'
  `per_slot` inputs), add each one's share into its image's sums [b, H, W, C]."""
  slot = plan["slot"]  # [K]
  windows = jax.vmap(lambda p: _cut_window(images[p["slot"]], p, jnp.asarray(pad_value)))(plan)  # [K, c, c, 3]
  maps = forward(params, windows, *(x[slot] for x in per_slot))  # [K, s, s, C]

  def add(i, sums):
    p = jax.tree.map(lambda a: a[i], plan)
    share = resample(maps[i], p["row_put_idx"], p["row_put_w"], p["col_put_idx"], p["col_put_w"])  # [H, W, C]
    return sums.at[p["slot"]].add(share)

  return jax.lax.fori_loop(0, len(slot), add, sums)


def _positions(sums: jax.Array, label_mask: jax.Array) -> jax.Array:
  """Label position per pixel [b, H, W] of summed logits, padded labels excluded."""
  return jnp.argmax(losses.mask_padded_labels(sums, label_mask), axis=-1)


# ------------------------------------------------------------------ the device path: driver

def replicate(tree, mesh: Mesh):
  """Every leaf replicated over `mesh`, built from host copies: works when the
  mesh spans processes (a device_put of arrays already on a device would be a
  cross-host transfer). A leaf already replicated there is kept, not copied."""
  replicated = NamedSharding(mesh, P())

  def one(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(replicated, x.ndim):
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])

  return jax.tree.map(one, tree)


def _process_max(values: Sequence[int]) -> np.ndarray:
  """Element-wise max over processes (every process must run the same programs)."""
  values = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return values
  return multihost_utils.process_allgather(values).reshape(-1, len(values)).max(0)


class MultiScaleSegmenter:
  """Multi-scale, flipped, sliding-window inference with every [H, W, N]
  tensor on the devices of `mesh` (any mesh: its axes together split the
  images, device d being the d-th of `mesh.devices.flat`).

  Each call takes one group of `slots` images of this process (None = an
  empty slot, so that every process runs the same steps): device d of the
  process owns slots [d * images_per_device, (d + 1) * images_per_device).
  The network runs under `shard_map`, each device on its own windows with
  the parameters replicated: XLA partitions nothing of the model here, so
  there is no layout to declare (`sharding.activation_layout` is for the
  jitted steps that split one batch over the mesh).
  `forward(params, windows, *per_slot)` is the network (`model_forward`, an
  exported artifact's, or a dense-feature recipe's window map); `pad_value`
  the normalised black.
  """

  def __init__(self, forward: DeviceForward, params, mesh: Mesh, ms: MultiScale, pad_value: np.ndarray, *,
               windows_per_device: int = 4, images_per_device: int = 1):
    self.ms, self.mesh = ms, mesh
    self.windows_per_device, self.images_per_device = windows_per_device, images_per_device
    self.local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    self.slots = len(self.local_devices) * images_per_device
    split = P(mesh.axis_names)  # the leading axis over every device
    self._data = NamedSharding(mesh, split)
    self.params = replicate(params, mesh)
    shard = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    step = functools.partial(_window_step, forward, np.asarray(pad_value, np.float32))
    self.step = jax.jit(shard(step, in_specs=(P(), *(split,) * 4), out_specs=split), donate_argnums=1)
    self.positions = jax.jit(shard(_positions, in_specs=(split, split), out_specs=split))
    self._zeros = jax.jit(jnp.zeros, static_argnums=0, out_shardings=self._data)

  def _global(self, local: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self._data, np.asarray(local))

  def out_size(self, *sizes: Sequence[tuple[int, int] | None]) -> tuple[int, ...]:
    """The padded [H, W] of a group: its largest sides over all processes,
    bucketed; of several size lists, each one's [H, W] after the other (one
    exchange between processes)."""
    local = [max([s[i] for s in group if s] or [1]) for group in sizes for i in (0, 1)]
    return tuple(size_bucket(int(n)) for n in _process_max(local))

  def logit_sums(self, images: Sequence[np.ndarray | None], text: np.ndarray, label_mask: np.ndarray
                 ) -> tuple[jax.Array, tuple[int, int]]:
    """Summed multi-scale logits of one group, on the devices: ([G, H, W, N]
    split over the mesh's devices, padded (H, W)). images: `slots` normalised [h, w, 3]
    or None; text [slots, N, D]; label_mask [slots, N]."""
    sizes = [None if x is None else x.shape[:2] for x in images]
    return self.window_sums(images, (text, label_mask), text.shape[1], sizes)

  def window_sums(self, images: Sequence[np.ndarray | None], per_slot: tuple[np.ndarray, ...], channels: int,
                  targets: Sequence[tuple[int, int] | None]) -> tuple[jax.Array, tuple[int, int]]:
    """`logit_sums` of any forward: its maps' sums [G, H, W, channels], H x W
    the bucket of the largest of `targets` (each image's `target_size`);
    per_slot: the forward's per-image inputs, each [slots, ...]."""
    if len(images) != self.slots:
      raise ValueError(f"a group holds {self.slots} images (None for an empty slot), got {len(images)}")
    in_h, in_w, *out_hw = self.out_size([None if x is None else x.shape[:2] for x in images], targets)
    out_hw = tuple(out_hw)
    batch = np.zeros((self.slots, in_h, in_w, 3), np.float32)
    per_device = [[] for _ in self.local_devices]
    for i, image in enumerate(images):
      if image is not None:
        h, w = image.shape[:2]
        batch[i, :h, :w] = image
        per_device[i // self.images_per_device] += window_plans(h, w, self.ms, out_hw, i % self.images_per_device)
    # Windows per device per step: windows_per_device, or the power of two
    # that holds this group's windows when fewer (a one-window image runs one
    # forward, not one and three of padding): at most log2 + 1 compiles.
    most = int(_process_max([max(len(p) for p in per_device)])[0])
    k = min(self.windows_per_device, 1 << max(most - 1, 0).bit_length())
    steps = -(-most // k)
    empty = _empty_plan(self.ms.crop_size, out_hw)
    sums = self._zeros((self.slots * jax.process_count(), *out_hw, channels))
    images_g, per_slot_g = self._global(batch), tuple(self._global(x) for x in per_slot)
    for t in range(steps):
      chunk = [plans[t * k:(t + 1) * k] + [empty] * (k - len(plans[t * k:(t + 1) * k])) for plans in per_device]
      plan = {key: self._global(np.stack([p[key] for c in chunk for p in c])) for key in empty}
      sums = self.step(self.params, sums, images_g, per_slot_g, plan)
    return sums, out_hw


def model_forward(model) -> DeviceForward:
  """The Flax model as a DeviceForward (params = its variables, sans text tower)."""
  return lambda variables, windows, text, label_mask: model.apply(variables, windows, text, label_mask)
