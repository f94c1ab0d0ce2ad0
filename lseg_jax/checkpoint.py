"""Model checkpoints on disk: converted official weights and trained models.

A model directory holds `model_config.json` (the model ConfigDict) and an
orbax `variables/` item ({'params', 'batch_stats'}). It is written into a
temporary sibling and renamed into place, so a crash never leaves a
half-written model behind.

A training workdir (train.py) holds `model_config.json`, the frozen text tower
once in `text_encoder/`, and a CheckpointManager under `checkpoints/` whose
`state` items hold the trained params and BatchNorm statistics. `load_model`
reads both kinds, on any device topology, without writing anything: it reads
only the params and BatchNorm statistics (not the optimizer moments), checks
their shapes against the model config first, and skips an unreadable latest
training checkpoint for the previous one.
"""

import contextlib
import json
import os
from pathlib import Path
import shutil
import sys
import tempfile

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lseg_jax.models import BACKBONES, abstract_variables, get_model_config

MODEL_CONFIG = "model_config.json"
RUN_CONFIG = "config.json"  # a training workdir's whole config (train.py)
TEXT_EMBEDDING = "params/text_encoder/token_embedding/embedding"


class CheckpointMismatch(ValueError):
  """Saved weights whose tree or shapes do not fit the model config beside them."""


class UnreadableCheckpoint(ValueError):
  """A damaged checkpoint (truncated or garbage files); its cause is the reader's error."""


def save_model(directory: str | os.PathLike, variables: dict, model_config: ml_collections.ConfigDict,
               overwrite: bool = False) -> Path:
  """Writes a model directory atomically; refuses to replace one unless
  `overwrite`, and never replaces anything that is not a model directory."""
  directory = Path(directory).absolute()
  check_destination(directory, overwrite)
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


def check_writable(path: Path) -> None:
  """Raises (one line naming `path`) unless `path` could be created: its
  nearest existing ancestor must be a writable directory."""
  parent = path.parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise NotADirectoryError(f"cannot create {path}: {parent} is a file, not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"cannot create {path}: {parent} is not writable")


def check_destination(directory: Path, overwrite: bool) -> None:
  """The checks `save_model` makes before any work, for CLIs to run early."""
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"{directory} is a file, not a model directory")
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} already exists; choose another destination or pass --overwrite")
  if directory.exists() and not (directory / MODEL_CONFIG).is_file() and any(directory.iterdir()):
    raise FileExistsError(f"{directory} is a non-empty directory without {MODEL_CONFIG}; refusing to replace it")
  check_writable(directory)


def existing_directory(path: Path, flag: str | None = None) -> Path:
  """`path`, or an error naming it (and the command-line `flag` it came from)."""
  what = f"--{flag} {path}" if flag else f"{path}"
  if not path.exists():
    raise FileNotFoundError(f"{what} does not exist")
  if not path.is_dir():
    raise NotADirectoryError(f"{what} is a file, not a directory")
  return path


def read_model_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
  """The model config of a model directory or training workdir."""
  path = existing_directory(Path(directory)) / MODEL_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {directory} is not a model directory written by "
                            "`python -m lseg_jax.convert` or train.py")
  return ml_collections.ConfigDict(_read_json(path))


def read_run_config(directory: str | os.PathLike) -> ml_collections.ConfigDict | None:
  """The training config train.py wrote into a workdir; None for a directory
  without one (a converted model)."""
  path = Path(directory) / RUN_CONFIG
  return ml_collections.ConfigDict(_read_json(path)) if path.is_file() else None


def _read_json(path: Path) -> dict:
  """A JSON object from `path`; anything else is a ValueError naming the file."""
  try:
    tree = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(tree, dict):
    raise ValueError(f"{path} holds a JSON {type(tree).__name__}, not a config object")
  return tree


def save_text_encoder(workdir: str | os.PathLike, text_params) -> None:
  """The frozen text tower of a training run, written once (collective call)."""
  path = Path(workdir).absolute() / "text_encoder"
  if not path.exists():
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, text_params)


def finished_steps(workdir: str | os.PathLike) -> list[int]:
  """The finalised training checkpoints of a workdir, newest first (orbax
  renames a checkpoint into its step directory only once it is complete)."""
  root = Path(workdir) / "checkpoints"
  steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
  return sorted(steps, reverse=True)


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The newest finalised training checkpoint in a workdir."""
  return next(iter(finished_steps(workdir)), None)


def _flat_shapes(tree) -> dict[str, tuple]:
  return {"/".join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _stem(config: ml_collections.ConfigDict) -> tuple[str, tuple]:
  """The first image kernel's path and shape: what tells backbones apart."""
  if config.kind == "vit":
    p = config.vit.patch_size
    return "params/backbone/patch_embed/kernel", (p, p, 3, config.vit.width)
  return "params/backbone/conv1/kernel", (7, 7, 3, config.resnet.width)


def _matching_backbones(saved: dict[str, tuple]) -> list[str]:
  """The presets whose stem (and text width, when saved) fit saved shapes."""
  out = []
  for name in BACKBONES:
    config = get_model_config(name)
    key, shape = _stem(config)
    text = saved.get(TEXT_EMBEDDING)
    if saved.get(key) == shape and (text is None or text[1] == config.text.width):
      out.append(name)
  return out


def _check_shapes(saved_tree, expected: dict, config: ml_collections.ConfigDict, where: Path) -> None:
  """Raises CheckpointMismatch naming the first differing arrays (and the
  backbone the saved weights look like) unless the saved params and
  batch_stats are exactly the arrays of `expected`."""
  saved = _flat_shapes({k: v for k, v in saved_tree.items() if k in expected})  # not the optimizer state
  want = _flat_shapes(expected)
  diffs = [f"{k} is {list(saved[k])}, the model's {list(want[k])}" for k in want if k in saved and saved[k] != want[k]]
  diffs += [f"{k} missing" for k in want if k not in saved]
  diffs += [f"{k} not in the model" for k in saved if k not in want]
  if not diffs:
    return
  looks = _matching_backbones(saved)
  other = f"; the weights look like {' or '.join(looks)}" if looks and config.backbone not in looks else ""
  raise CheckpointMismatch(
      f"{where} does not fit {MODEL_CONFIG} (backbone {config.backbone}{other}): {len(diffs)} arrays differ: "
      + ", ".join(diffs[:3]) + (", ..." if len(diffs) > 3 else ""))


def short_reason(e: Exception) -> str:
  """An exception as one short line: its type and the start of its message
  (orbax and tensorstore messages run to kilobytes)."""
  first = next(iter(str(e).strip().splitlines()), "")[:200]
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


@contextlib.contextmanager
def _reading(path: Path):
  """Any failure inside as one UnreadableCheckpoint line naming `path`:
  tensorstore and orbax raise many types for damaged files."""
  try:
    yield
  except Exception as e:
    raise UnreadableCheckpoint(f"{path} is unreadable ({short_reason(e)})") from e


def _restore(path: Path, expected: dict, config: ml_collections.ConfigDict) -> dict:
  """Only the arrays of `expected` from an orbax PyTree item (a partial
  restore: an optimizer state saved beside them is never read), on the first
  local device whatever the topology they were saved from; their shapes are
  checked first, from the metadata."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), expected)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    with _reading(path):
      saved = handler.metadata(path).tree
    _check_shapes(saved, expected, config, path)
    with _reading(path):
      return handler.restore(path, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  finally:
    handler.close()


def _model_config(directory: Path) -> tuple[ml_collections.ConfigDict, dict]:
  """The model config and its abstract variables; an invalid config is a ValueError."""
  config = read_model_config(directory)
  try:
    return config, abstract_variables(config)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{directory / MODEL_CONFIG} is not a valid model config ({short_reason(e)})") from None


def _restore_training_state(workdir: Path, steps: list[int], expected: dict,
                            config: ml_collections.ConfigDict) -> tuple[int, dict]:
  """(step, {'params', 'batch_stats'}) of the newest readable step of
  `steps`; a damaged one is skipped with a warning (and left on disk)."""
  for step in steps:
    try:
      return step, _restore(workdir / "checkpoints" / str(step) / "state", expected, config)
    except UnreadableCheckpoint as e:
      print(f"warning: checkpoint {step} in {workdir} is unreadable ({type(e.__cause__).__name__}); "
            "trying the previous one", file=sys.stderr, flush=True)
  raise ValueError(f"no readable checkpoint in {workdir / 'checkpoints'} (tried steps "
                   f"{', '.join(map(str, steps))})")


def load_model(path: str | os.PathLike, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """(model_config, {'params', 'batch_stats'}) from a model directory or a
  training workdir (its newest readable checkpoint, or `step`). Read-only."""
  config, variables, _ = load_model_step(path, step)
  return config, variables


def load_model_step(path: str | os.PathLike, step: int | None = None
                    ) -> tuple[ml_collections.ConfigDict, dict, int | None]:
  """`load_model`, and the training step it read (None for a model
  directory): after a fallback past a damaged checkpoint, an older one."""
  path = Path(path).absolute()
  config, expected = _model_config(path)
  if (path / "variables").is_dir():
    return config, _restore(path / "variables", expected, config), None
  text_expected = expected["params"].pop("text_encoder")
  steps = finished_steps(path)
  if not steps or not (path / "text_encoder").is_dir():
    raise FileNotFoundError(f"{path} holds no model: neither variables/ (a converted model) nor a "
                            "finished training checkpoint with text_encoder/")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"{path} has no finished checkpoint {step} (it has {', '.join(map(str, steps))})")
  step, state = _restore_training_state(path, [step] if step is not None else steps, expected, config)
  text = _restore(path / "text_encoder", text_expected, config)
  return config, {"params": dict(state["params"], text_encoder=text),
                  "batch_stats": state.get("batch_stats", {})}, step
