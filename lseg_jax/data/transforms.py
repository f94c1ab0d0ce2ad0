"""Image/mask transforms of the official LSeg training, as grain transforms.

LSeg trains and validates with PyTorch-Encoding's `_sync_transform` and
`_val_sync_transform` (LSEG_REFERENCE.md section 4.1); these functions give the
same numbers, written from that description:
- train: horizontal flip (p=0.5); the LONG side drawn as an integer in
  [int(0.5*base), int(2.0*base)] inclusive, the short side scaled with
  int(x + 0.5); PIL BILINEAR for the image, NEAREST for the mask; if the short
  side is below the crop, pad bottom/right with image 0 and mask ignore; a
  random crop x crop window;
- val: the SHORT side resized to the crop (the long side truncated with
  int()), then a centre crop (offsets rounded with Python's round);
- none: the image keeps its size (full-image / multi-scale evaluation);
- resize: both sides resized to crop x crop, as the few-shot loaders do
  (torchvision `Resize((480, 480))`, i.e. PIL bilinear / nearest).
Then `(x / 255 - mean) / std` in float32, as ToTensor + Normalize.

Masks here are already in "label position" space (int32, -1 = ignore): the
dataset-specific mapping runs before these transforms, so padding writes the
ignore value directly. Randomness comes only from the numpy Generator that
grain's `random_map` passes in, so a pipeline is reproducible from its seed.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image

from lseg_jax.data import fewshot
from lseg_jax.losses import IGNORE

# (mean, std) per channel, on images scaled to [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the ViT models
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # zero-shot ResNet-101
}
EVAL_MODES = ("val", "none", "resize")
# "scale_crop": the official ADE20K augmentation (`sync_train`); "resize": the
# zero-shot loaders' plain square resize, no augmentation (`fewshot_resize`).
TRAIN_MODES = ("scale_crop", "resize")


def normalization_stats(name: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std), float32 [3] each, of a named normalisation."""
  if name not in NORMALIZATION:
    raise ValueError(f"Unknown normalization {name!r}; known: {sorted(NORMALIZATION)}.")
  mean, std = NORMALIZATION[name]
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [H, W, 3]: (x / 255 - mean) / std, in float32
  in the same order as torchvision's ToTensor then Normalize.

  Computed once per uint8 value into a [256, 3] table, then looked up: the
  same float32 results, 4x faster than the arithmetic on every pixel.
  """
  table = (np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0) - mean) / std  # [256, 3]
  out = np.empty(image.shape, np.float32)
  for c in range(image.shape[-1]):
    out[..., c] = table[:, c][image[..., c]]
  return out


def ensure_rgb(image: np.ndarray) -> np.ndarray:
  """Any decoded image -> uint8 [H, W, 3], as PIL's `convert("RGB")`.

  Grayscale ([H, W], [H, W, 1]) is repeated, gray+alpha keeps the gray,
  RGBA drops the alpha (no compositing, like PIL). Real datasets contain such
  files (ADE20K has grayscale JPEGs) and TFDS only fixes up the grayscale case.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"Expected a uint8 image, got {image.dtype}.")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f"Cannot read an image of shape {image.shape} as RGB.")
  c = image.shape[-1]
  if c in (1, 2):
    return np.repeat(image[..., :1], 3, axis=-1)
  return image[..., :3] if c == 4 else image


def _resize(image: np.ndarray, mask: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """PIL resize to (height, width): BILINEAR (antialiased as in PIL) for the
  uint8 image, NEAREST for the int32 mask (a PIL "I" image)."""
  img = Image.fromarray(image).resize((width, height), Image.BILINEAR)
  msk = Image.fromarray(mask.astype(np.int32)).resize((width, height), Image.NEAREST)
  return np.asarray(img), np.asarray(msk)


def sync_train(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *,
               base_size: int, crop_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The official training augmentation (see module docstring).

  image: uint8 [H, W, 3]; mask: int32 [H, W] (-1 = ignore).
  Returns uint8 [crop, crop, 3] and int32 [crop, crop].
  """
  if rng.random() < 0.5:
    image, mask = image[:, ::-1], mask[:, ::-1]
  h, w = mask.shape
  long_size = int(rng.integers(int(base_size * 0.5), int(base_size * 2.0) + 1))
  if h > w:
    oh, ow = long_size, int(1.0 * w * long_size / h + 0.5)
  else:  # w >= h: the width is the long side (also for squares, as official)
    ow, oh = long_size, int(1.0 * h * long_size / w + 0.5)
  image, mask = _resize(np.ascontiguousarray(image), np.ascontiguousarray(mask), oh, ow)
  if min(oh, ow) < crop_size:
    pad_h, pad_w = max(crop_size - oh, 0), max(crop_size - ow, 0)
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
    mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
  h, w = mask.shape
  x1 = int(rng.integers(0, w - crop_size + 1))
  y1 = int(rng.integers(0, h - crop_size + 1))
  return (image[y1:y1 + crop_size, x1:x1 + crop_size],
          mask[y1:y1 + crop_size, x1:x1 + crop_size])


def sync_val(image: np.ndarray, mask: np.ndarray, *, crop_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The official validation transform: short side -> crop, centre crop.

  image: uint8 [H, W, 3]; mask: int32 [H, W]. Returns [crop, crop(, 3)].
  """
  h, w = mask.shape
  if w > h:
    oh, ow = crop_size, int(1.0 * w * crop_size / h)
  else:
    ow, oh = crop_size, int(1.0 * h * crop_size / w)
  image, mask = _resize(image, mask, oh, ow)
  x1 = int(round((ow - crop_size) / 2.0))
  y1 = int(round((oh - crop_size) / 2.0))
  return (image[y1:y1 + crop_size, x1:x1 + crop_size],
          mask[y1:y1 + crop_size, x1:x1 + crop_size])


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """`sync_train` (or, in mode "resize", `fewshot_resize`) then normalisation,
  on an example dict's "image" and "mask"; other keys pass through."""
  base_size: int = 520
  crop_size: int = 480
  normalization: str = "clip"
  mode: str = "scale_crop"

  def __post_init__(self):
    if self.mode not in TRAIN_MODES:
      raise ValueError(f"Unknown train mode {self.mode!r}; known: {TRAIN_MODES}.")

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if self.mode == "resize":
      image, mask = fewshot.fewshot_resize(element["image"], element["mask"], self.crop_size)
    else:
      image, mask = sync_train(element["image"], element["mask"], rng,
                               base_size=self.base_size, crop_size=self.crop_size)
    mean, std = normalization_stats(self.normalization)
    return {**element, "image": normalize(image, mean, std), "mask": mask.astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """Deterministic evaluation transform: mode "val" (official
  `_val_sync_transform`), "resize" (square crop_size resize as the zero-shot
  evaluation, `fewshot_resize`) or "none"
  (full image); then normalisation."""
  mode: str = "val"
  crop_size: int = 480
  normalization: str = "clip"

  def __post_init__(self):
    if self.mode not in EVAL_MODES:
      raise ValueError(f"Unknown eval mode {self.mode!r}; known: {EVAL_MODES}.")

  def map(self, element: Mapping[str, Any]) -> dict[str, Any]:
    image, mask = element["image"], element["mask"]
    if self.mode == "val":
      image, mask = sync_val(image, mask, crop_size=self.crop_size)
    elif self.mode == "resize":
      image, mask = fewshot.fewshot_resize(image, mask, self.crop_size)
    mean, std = normalization_stats(self.normalization)
    return {**element, "image": normalize(image, mean, std), "mask": np.asarray(mask, np.int32)}
