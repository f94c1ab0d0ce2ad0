"""Model checkpoints on disk: converted official weights and trained models.

A model directory holds `model_config.json` (the model ConfigDict) and an
orbax `variables/` item ({'params', 'batch_stats'}). It is written into a
temporary sibling and renamed into place, so a crash never leaves a
half-written model behind.

A training workdir (train.py) holds `model_config.json`, the frozen text tower
once in `text_encoder/`, and a CheckpointManager under `checkpoints/` whose
`state` items hold the trained params and BatchNorm statistics. `load_model`
reads both kinds, on any device topology.
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
RUN_CONFIG = "config.json"  # a training workdir's whole config (train.py)


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


def read_run_config(directory: str | os.PathLike) -> ml_collections.ConfigDict | None:
  """The training config train.py wrote into a workdir; None for a directory
  without one (a converted model)."""
  path = Path(directory) / RUN_CONFIG
  return ml_collections.ConfigDict(json.loads(path.read_text())) if path.is_file() else None


def _restore_on_host(path: Path) -> dict:
  """Any orbax StandardSave item, restored onto the first local device
  whatever the topology it was saved from."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return ckptr.restore(path, target)


def save_text_encoder(workdir: str | os.PathLike, text_params) -> None:
  """The frozen text tower of a training run, written once (collective call)."""
  path = Path(workdir).absolute() / "text_encoder"
  if not path.exists():
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, text_params)


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The newest finalised training checkpoint in a workdir (orbax renames a
  checkpoint into its step directory only once it is complete)."""
  root = Path(workdir) / "checkpoints"
  steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
  return max(steps, default=None)


def load_model(path: str | os.PathLike, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """(model_config, {'params', 'batch_stats'}) from a model directory or a
  training workdir (its latest checkpoint, or `step`)."""
  path = Path(path).absolute()
  config = read_model_config(path)
  if (path / "variables").is_dir():
    with ocp.StandardCheckpointer() as ckptr:
      return config, ckptr.restore(path / "variables", abstract_variables(config))
  step = latest_step(path) if step is None else step
  if step is None or not (path / "text_encoder").is_dir():
    raise FileNotFoundError(f"{path} holds no model: neither variables/ (a converted model) nor a "
                            "finished training checkpoint with text_encoder/")
  state = _restore_on_host(path / "checkpoints" / str(step) / "state")
  params = dict(state["params"], text_encoder=_restore_on_host(path / "text_encoder"))
  return config, {"params": params, "batch_stats": state["batch_stats"]}
