"""Model checkpoints on disk: converted official weights and trained models.

A model directory holds `model_config.json` (the model ConfigDict) and an
orbax `variables/` item ({'params', 'batch_stats'}). It is written into a
temporary sibling and renamed into place, so a crash never leaves a
half-written model behind. Training runs (train.py) keep their own
CheckpointManager under `WORKDIR/checkpoints`; `load_model` reads both.
"""

import json
import os
from pathlib import Path
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lseg_jax.models import abstract_variables

MODEL_CONFIG = "model_config.json"


def save_model(directory: str | os.PathLike, variables: dict, model_config: ml_collections.ConfigDict,
               overwrite: bool = False) -> Path:
  """Writes a model directory atomically; refuses to replace one unless `overwrite`."""
  directory = Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} already exists; choose another destination or overwrite it")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  try:
    (tmp / MODEL_CONFIG).write_text(model_config.to_json(indent=2))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / "variables", jax.tree.map(np.asarray, variables))
    if directory.exists():
      shutil.rmtree(directory)
    tmp.rename(directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory


def read_model_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
  path = Path(directory) / MODEL_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {directory} is not a model directory written by "
                            "`python -m lseg_jax.convert` or train.py")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_model(directory: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict]:
  """(model_config, variables) from a model directory, as host numpy arrays."""
  directory = Path(directory).absolute()
  config = read_model_config(directory)
  if not (directory / "variables").is_dir():
    raise FileNotFoundError(f"{directory / 'variables'} not found: incomplete model directory")
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(directory / "variables", abstract_variables(config))
  return config, variables
