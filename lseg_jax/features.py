"""The published recipes for LSeg's dense features, as presets of
`Segmenter.embed`, each reproducing its source line by line (commits read:
lseg_feature_extraction 60afac4, vlmaps 58060f9, distilled-feature-fields
798268f, feature-3dgs 59306f8; lang-seg's `LSeg_MultiEvalModule` underneath
all four):

- native: one forward of the image padded bottom/right to the model's
  multiple of 32 with the normalised black; head1's output L2-normalised,
  [ceil(H/2), ceil(W/2), D] (or x2-resized to H x W, renormalised).
- openscene (pengsongyou/lseg_feature_extraction, fusion_scannet.py): the
  image resized x2 (bilinear, align_corners=True: its long side to
  base = crop = 2 x long side), padded bottom/right to crop x crop (that
  side rounded up to a multiple of 32: the source would fail otherwise), one
  forward plus the mirrored one, their unit head1 maps SUMMED (not averaged,
  not renormalised: norms in [0, 2]), cropped to [:H, :W] of the half-
  resolution map: [H, W, D] at the image's size.
- vlmaps (vlmaps/utils/lseg_utils.py get_lseg_feat): the long side resized
  to 520 (short side int(x + 0.5)), padded to 480 where shorter, 480 px
  windows at stride 320 (the last ones shorter, padded); per window head1
  L2-normalised, cast to float16, times the logit scale 1/0.07 in float16,
  back to float32, resized x2 (align_corners=True); windows averaged where
  they overlap (not renormalised: norms up to 14.29); no flip, one scale, no
  resize back: [h, w, D] at the resized size (long side 520).
- dff (pfnet-research/distilled-feature-fields encode_images.py): an
  image wider than 480 first resized to
  exactly 360 x 480 (aspect not kept, align_corners=True on the normalised
  image); scales 0.75, 1, 1.25, 1.75 of base 520, 480 px windows at stride
  320; per window head1 resized x2 then L2-normalised (eps 1e-12), the
  mirrored window's added and the pair halved; windows averaged, each
  scale's map resized to the (pre-resized) image size (align_corners=True),
  the scales SUMMED, resized to 360 x 480 (align_corners=False: the identity
  when the image was pre-resized) and L2-normalised: [360, 480, D].
- feature3dgs (ShijieZhou-UCLA/feature-3dgs encoders/lseg_encoder/
  encode_images.py, the file it saves, `*_fmap_CxHxW.pt`): dff's pre-resize,
  windows, flips and merges, but its network returns head1 x2 NOT
  normalised (lseg_net.py comments the normalisation out), and the file is
  written before the final resize and normalisation: the sum of the four
  scales' raw maps, [h, w, D] at the (pre-resized) image's size.

Every resize is bilinear without antialiasing, as PyTorch's interpolate.
Their storage is the caller's (openscene, dff and feature-3dgs save float16
[D, h, w], vlmaps returns float32 [1, D, h, w]): `embed` returns float32
[h, w, D].

Two implementations: `preset_features`, the host transcription (one window
at a time, merged in numpy as the sources merge); and `Segmenter.embed`,
which states each recipe's merge as an `inference.MultiScale` (`merge_rule`)
and runs it as the multi-scale segmenter runs logits: windows cut, run and
folded into the output map on the devices, where the per-window maps (a
480 px window's x2 map is 472 MB in float32) stay; only the finished
features reach the host.
"""

from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import inference
from lseg_jax.models.layers import resize_bilinear, resize_bilinear_np, upsample2x

LOGIT_SCALE = 1 / 0.07  # lang-seg's constant logit_scale (never loaded from a checkpoint)
DFF_SIZE = (360, 480)  # encode_images.py: (h, w) outside Replica / ScanNet


@dataclasses.dataclass(frozen=True)
class Preset:
  """One recipe (see the module docstring). `feature` names the per-window map
  (WINDOW_FEATURES); `flip` "none", "sum" or "mean"."""
  name: str
  feature: str = "unit"
  base_size: int = 520
  crop_size: int = 480
  scales: tuple[float, ...] = (1.0,)
  flip: str = "none"
  pre_size: tuple[int, int] | None = None  # dff: resize an image wider than this (h, w) to it first
  resize_back: bool = False  # each scale's map to the image size, then summed
  out_size: tuple[int, int] | None = None  # the final map's (h, w) (align_corners=False)
  renormalize: bool = False


PRESETS = {
    "native": Preset("native"),
    "openscene": Preset("openscene", flip="sum"),
    "vlmaps": Preset("vlmaps", feature="vlmaps"),
    "dff": Preset("dff", feature="dff", scales=(0.75, 1.0, 1.25, 1.75), flip="mean", pre_size=DFF_SIZE,
                  resize_back=True, out_size=DFF_SIZE, renormalize=True),
    "feature3dgs": Preset("feature3dgs", feature="x2", scales=(0.75, 1.0, 1.25, 1.75), flip="mean",
                          pre_size=DFF_SIZE, resize_back=True),
}


def _normalized(x: jax.Array, eps: float = 0.0) -> jax.Array:
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / (jnp.maximum(norm, eps) if eps else norm)


def _vlmaps_feature(head1: jax.Array) -> jax.Array:
  """LSegEnc.forward: logit_scale * normalised.half() (a float16 product), back to float32, x2."""
  product = _normalized(head1).astype(jnp.float16) * jnp.float16(LOGIT_SCALE)
  return upsample2x(product.astype(jnp.float32))


# head1's output [K, c/2, c/2, D] -> the recipe's window map
WINDOW_FEATURES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "unit": _normalized,  # [K, c/2, c/2, D]
    "vlmaps": _vlmaps_feature,  # [K, c, c, D]
    "dff": lambda head1: _normalized(upsample2x(head1), eps=1e-12),  # [K, c, c, D]
    "x2": upsample2x,  # [K, c, c, D], not normalised (feature3dgs)
}

# (windows [K, c, c, 3] normalised) -> the recipe's window maps, on the devices
WindowFeatures = Callable[[np.ndarray], np.ndarray]


def _with_flip(forward: WindowFeatures, window: np.ndarray, flip: str) -> np.ndarray:
  """The window's map, plus (flip "sum") or averaged with ("mean") its mirror's, mirrored back."""
  if flip == "none":
    return forward(window[None])[0]
  pair = forward(window[None])[0] + forward(window[None, :, ::-1])[0][:, ::-1]
  return pair / 2 if flip == "mean" else pair


def openscene_crop(h: int, w: int, multiple: int = 32) -> int:
  """The openscene window side: 2 x the long side, rounded up to `multiple`."""
  return -(-2 * max(h, w) // multiple) * multiple


def pre_resized_size(h: int, w: int, preset: Preset) -> tuple[int, int]:
  """dff's first step: an image wider than pre_size becomes pre_size (h, w)."""
  return preset.pre_size if preset.pre_size is not None and w > preset.pre_size[1] else (h, w)


def pre_resize(image: np.ndarray, preset: Preset) -> np.ndarray:
  """`pre_resized_size` of a normalised image [H, W, 3] (align_corners=True)."""
  size = pre_resized_size(*image.shape[:2], preset)
  if size != image.shape[:2]:
    return resize_bilinear_np(image[None], size, align_corners=True)[0]
  return image


def merge_rule(h: int, w: int, preset: Preset) -> inference.MultiScale:
  """How the recipe windows, flips and merges an h x w (pre-resized) image,
  as the multi-scale segmenter states it. openscene: one window of the
  image resized x2, head1's half-resolution map cropped to h x w."""
  flip, mean = preset.flip != "none", preset.flip == "mean"
  if preset.name == "openscene":
    return inference.MultiScale(scales=(1.0,), flip=flip, flip_mean=mean, base_size=2 * max(h, w),
                                crop_size=openscene_crop(h, w), resize_back=False, map_stride=2)
  return inference.MultiScale(scales=preset.scales, flip=flip, flip_mean=mean, base_size=preset.base_size,
                              crop_size=preset.crop_size, resize_back=preset.resize_back)


def finish(features: jax.Array, preset: Preset) -> jax.Array:
  """The merged map [h, w, D] -> the recipe's output: resized to out_size
  (align_corners=False) and renormalised, where the recipe does."""
  if preset.out_size is not None and features.shape[:2] != preset.out_size:
    features = resize_bilinear(features[None], preset.out_size, align_corners=False)[0]
  return _normalized(features, eps=1e-12) if preset.renormalize else features


def preset_features(forward: WindowFeatures, image: np.ndarray, preset: Preset, pad_value: np.ndarray
                    ) -> np.ndarray:
  """The recipe's features [h, w, D] float32 of a normalised image [H, W, 3]
  (float32) on the host, as the source loops: `forward` runs one window
  (the preset's crop, or openscene's `openscene_crop`), then its mirror."""
  h, w = image.shape[:2]
  if preset.name == "openscene":
    crop = openscene_crop(h, w)
    resized = resize_bilinear_np(image[None], inference.scaled_size(h, w, 2 * max(h, w)), align_corners=True)[0]
    return _with_flip(forward, inference.pad_to(resized, crop, pad_value), preset.flip)[:h, :w]
  image = pre_resize(image, preset)
  h, w = image.shape[:2]
  ms = inference.MultiScale(scales=preset.scales, flip=False, base_size=preset.base_size, crop_size=preset.crop_size)
  crop = preset.crop_size
  scores = None
  for scale in preset.scales:
    g = inference.scale_geometry(h, w, scale, ms)
    resized = resize_bilinear_np(image[None], (g.height, g.width), align_corners=True)[0]
    padded = inference.pad_to(resized, crop, pad_value)  # [*g.canvas, 3]
    out, count = None, np.zeros((*g.canvas, 1), np.float32)
    for h0, h1, w0, w1 in g.windows:
      m = _with_flip(forward, inference.pad_to(padded[h0:h1, w0:w1], crop, pad_value), preset.flip)
      if out is None:
        out = np.zeros((*g.canvas, m.shape[-1]), np.float32)
      out[h0:h1, w0:w1] += m[:h1 - h0, :w1 - w0]
      count[h0:h1, w0:w1] += 1
    out = (out / count)[:g.height, :g.width]
    if preset.resize_back:
      out = resize_bilinear_np(out[None], (h, w), align_corners=True)[0]
      scores = out if scores is None else scores + out
    else:
      if len(preset.scales) != 1:
        raise ValueError(f"preset {preset.name}: several scales need resize_back")
      scores = out
  if preset.out_size is not None and scores.shape[:2] != preset.out_size:
    scores = resize_bilinear_np(scores[None], preset.out_size, align_corners=False)[0]
  if preset.renormalize:
    scores = scores / np.maximum(np.linalg.norm(scores, axis=-1, keepdims=True), 1e-12)
  return scores.astype(np.float32)


def output_size(h: int, w: int, preset: Preset, full_size: bool = False) -> tuple[int, int]:
  """(h', w') of the features `Segmenter.embed` gives an h x w image."""
  if preset.name == "native":
    return (h, w) if full_size else (-(-h // 2), -(-w // 2))
  if preset.out_size is not None:
    return preset.out_size
  h, w = pre_resized_size(h, w, preset)
  return inference.target_size(h, w, merge_rule(h, w, preset))  # the merged map's size, as embed sums it
