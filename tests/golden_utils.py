"""What the golden tests share: where the fixtures are and how their weights
are regenerated from the recipe in each fixture's JSON (README there)."""

import os
from pathlib import Path
import zlib

import numpy as np
import pytest

GOLDEN_DIR = Path(os.environ.get("LSEG_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def fixtures(folder: Path, pattern: str) -> list[Path]:
  """The fixture files `pattern` in `folder`, sorted; none where it is no folder."""
  return sorted(folder.glob(pattern)) if folder.is_dir() else []


def check_fixtures_present(found: list[Path], folder: Path, pattern: str) -> None:
  """Fails when LSEG_GOLDEN_DIR is set and `folder` holds no `pattern` (an
  empty or misspelt folder must not pass as skipped parity tests); skips,
  saying so, when it is unset and the default folder holds none."""
  if found:
    return
  if "LSEG_GOLDEN_DIR" in os.environ:
    pytest.fail(f"LSEG_GOLDEN_DIR is set but {folder} holds no {pattern} fixture")
  pytest.skip(f"no golden fixtures ({pattern}) in {folder}; set LSEG_GOLDEN_DIR to the folder that holds them")


def regenerate_state_dict(fixture: dict) -> dict[str, np.ndarray]:
  """The fixture's weights from its recipe; the unused CLIP image tower is skipped."""
  recipe = fixture["weight_recipe"]
  scalars = dict(recipe["scalars"])
  sd = {}
  for entry in fixture["state_dict"]:
    key, shape = entry["key"], tuple(entry["shape"])
    if key.startswith("clip_pretrained.visual."):
      continue
    if not entry["dtype"].startswith("float"):
      sd[key] = np.zeros(shape, np.int64)
      continue
    rng = np.random.default_rng([recipe["seed"], zlib.crc32(key.encode("utf-8"))])
    if key.endswith("running_var"):
      value = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 1 and key.endswith(".weight"):
      value = 1.0 + 0.02 * rng.standard_normal(shape)
    elif len(shape) == 0:
      value = np.asarray(scalars[key])
    else:
      value = 0.02 * rng.standard_normal(shape)
    sd[key] = np.asarray(value, np.float32)
  return sd
