"""How an image becomes model inputs: the input geometry and normalisation.

The model sees inputs like the ones it was trained and validated on, and
every result is at the image's own size:
- a training run whose eval transform is "resize" (the demo, the zero-shot
  runs: the whole image squashed to crop x crop) -> "square": the image is
  resized (PIL bilinear, as those runs do) to base_size x base_size,
  base_size defaulting to the run's crop size, and the result resized back;
- any other run ("val": short side -> crop, centre crop) and converted
  models -> sliding windows (lseg_jax.inference, the official multi-scale
  evaluation): the long side resized to base_size * scale and crop x crop
  windows. The sizes default to the run's base_size / crop_size, and to the
  official demo's 520 / 480 (lseg_app.py) for a converted model.
The normalisation is the run's, else the official one for the backbone.

What decides both is a run's `RECORDED` input settings (`recorded_input`):
a workdir has them in its config, and `lseg_jax.export` writes them into the
artifact, so a checkpoint and its export see an image the same way.
"""

import dataclasses
from collections.abc import Mapping

import ml_collections
import numpy as np
from PIL import Image

# lseg_app.py: LSeg_MultiEvalModule with LSegModule's base_size and crop_size.
OFFICIAL_BASE_SIZE, OFFICIAL_CROP_SIZE = 520, 480
RECORDED = ("eval_mode", "base_size", "crop_size", "normalization")  # of a run's config.input


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How an image becomes model inputs (see the module docstring)."""
  square: bool  # resize the whole image to base_size x base_size first
  base_size: int
  crop_size: int


def recorded_input(run: ml_collections.ConfigDict | None) -> dict:
  """The RECORDED input settings of a training run config ({} for none: a
  converted model)."""
  run_input = run.get("input", {}) if run is not None else {}
  return {k: run_input[k] for k in RECORDED if run_input.get(k) is not None}


def input_geometry(recorded: Mapping, square: bool | None, base_size: int | None, crop_size: int | None) -> Geometry:
  """Explicit values win; else the recorded run's transform and sizes, else
  the official demo's windows."""
  if square is None:
    square = recorded.get("eval_mode") == "resize"
  if crop_size is None:
    crop_size = recorded.get("crop_size") or OFFICIAL_CROP_SIZE
  if base_size is None:
    base_size = crop_size if square else recorded.get("base_size") or OFFICIAL_BASE_SIZE
  return Geometry(square, base_size, crop_size)


def input_normalization(recorded: Mapping, model_config: ml_collections.ConfigDict) -> str:
  """The normalisation the model was trained with: the recorded run's own,
  else the official one for the backbone (ImageNet statistics for the ResNet,
  CLIP's 0.5 / 0.5 for the ViTs)."""
  if recorded.get("normalization"):
    return recorded["normalization"]
  return "imagenet" if model_config.kind == "resnet" else "clip"


def check_geometry(geometry: Geometry) -> None:
  """ValueError naming the size that cannot be used."""
  if geometry.crop_size <= 0 or geometry.crop_size % 32:
    raise ValueError(f"--crop_size {geometry.crop_size} is not a positive multiple of 32")
  if geometry.base_size <= 0:
    raise ValueError(f"--base_size {geometry.base_size} is not positive")


def square_input(image: np.ndarray, side: int) -> np.ndarray:
  """[S, S, 3] uint8: the whole image resized as the "resize" runs do (PIL bilinear)."""
  return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
