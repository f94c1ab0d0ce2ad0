"""A training workdir: one run's config, checkpoints and metrics, kept safe.

What train.py promises about a workdir (README "Workdirs and resuming"):
- nothing but orbax's own `max_to_keep` deletes a finished checkpoint;
- a checkpoint that cannot be read (truncated or missing files) is moved
  aside as `checkpoints/<step>.unreadable` (kept for inspection, invisible to
  orbax) and the previous one is restored;
- a workdir holding checkpoints of another config is refused before any
  heavy work, naming the fields that differ, unless the run is resumed on
  purpose (`--allow_config_change`); a checkpoint whose tree does not fit the
  model is refused whatever the flag, naming the arrays;
- `config.json` and `model_config.json` are written atomically, and only
  once the config is valid and the restore decision is made.
"""

import errno
import getpass
import json
import os
from pathlib import Path
import re
import shutil
import tempfile
import uuid

import jax
import ml_collections
import orbax.checkpoint as ocp

from lseg_jax import checkpoint, config_lib

UNREADABLE_SUFFIX = ".unreadable"


class WorkdirError(config_lib.UserError):
  """A workdir that this run must not use as it is (a user error, exit 2)."""


def default_workdir(config_spec: str) -> Path:
  """A temp workdir named after the user, the config file and its argument,
  so two users of a machine, two configs or two variants of one never share
  a default workdir: configs/demo.py -> /tmp/lseg_jax_alice_demo,
  configs/demo.py:backbone=tiny -> /tmp/lseg_jax_alice_demo_backbone-tiny."""
  path, _, arg = config_spec.partition(":")
  try:
    user = getpass.getuser()
  except (KeyError, OSError):  # no login name and no passwd entry (some containers)
    user = f"uid{os.getuid()}"
  safe = lambda s: re.sub(r"[^A-Za-z0-9.,_-]+", "-", s)
  name = "_".join(filter(None, ["lseg_jax", safe(user), Path(path).stem, safe(arg)]))
  return Path(tempfile.gettempdir()) / name


def write_text_atomic(path: Path, text: str) -> None:
  """Writes `path` through a temp file and a rename: readers see the old file
  or the new one, never a half-written one. The file's mode is the usual
  0666 less the umask (mkstemp's would be 0600)."""
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
  try:
    with open(tmp, "x") as f:  # O_EXCL, mode 0666 & ~umask
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def config_differences(saved: dict, current: dict) -> list[str]:
  """'key: saved -> current' for every leaf field that differs, except those
  a resumed run may change (config_lib.RESUMABLE_CHANGES)."""
  a, b = dict(config_lib.flatten(saved)), dict(config_lib.flatten(current))
  keep = lambda k: not any(k == r or k.startswith(r + ".") for r in config_lib.RESUMABLE_CHANGES)
  norm = lambda v: json.loads(json.dumps(v, default=str))  # tuples vs lists, as config.json holds them
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if keep(k) and norm(a.get(k)) != norm(b.get(k))]


def check_workdir(workdir: Path, config: ml_collections.ConfigDict, allow_config_change: bool) -> list[str]:
  """Refuses a workdir this config must not resume; returns the (allowed)
  config changes of a resumed run. Reads only: nothing is created."""
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory")
  saved = checkpoint.read_run_config(workdir) if (workdir / checkpoint.RUN_CONFIG).is_file() else None
  if saved is None or not checkpoint.finished_steps(workdir):
    return []  # a new run, or a launch that failed before its first checkpoint: nothing to protect
  diff = config_differences(saved.to_dict(), json.loads(config.to_json_best_effort()))
  if diff and not allow_config_change:
    shown = "; ".join(diff[:6]) + (f"; ... ({len(diff)} fields)" if len(diff) > 6 else "")
    raise WorkdirError(
        f"{workdir} holds checkpoints (up to step {checkpoint.latest_step(workdir)}) of a run with another "
        f"config ({shown}): give a new --workdir, or pass --allow_config_change to resume that run with these changes")
  return diff


def write_run_files(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """config.json and model_config.json, atomically (process 0 only)."""
  if jax.process_index() == 0:
    write_text_atomic(workdir / checkpoint.RUN_CONFIG, config.to_json_best_effort(indent=2))
    write_text_atomic(workdir / checkpoint.MODEL_CONFIG, config.model.to_json(indent=2))


def tree_mismatch(metadata_tree, abstract_tree) -> list[str]:
  """'path: saved shape vs expected shape' for the arrays of a checkpoint that
  do not fit the state this config builds (missing, extra or reshaped)."""
  flat = lambda t: {_path_str(p): tuple(getattr(v, "shape", ())) for p, v in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  saved, expected = flat(metadata_tree), flat(abstract_tree)
  out = [f"{k}: in the checkpoint, not in this model" for k in saved if k not in expected]
  out += [f"{k}: missing from the checkpoint" for k in expected if k not in saved]
  out += [f"{k}: {list(saved[k])} in the checkpoint, {list(expected[k])} here"
          for k in expected if k in saved and saved[k] != expected[k]]
  return out


def check_free_space(workdir: Path, state_bytes: int) -> None:
  """OSError (ENOSPC) when the disk of `workdir` cannot hold one more
  checkpoint of `state_bytes` (+10% and 1 MB for metadata and the data
  iterator)."""
  needed = int(state_bytes * 1.1) + (1 << 20)
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise OSError(errno.ENOSPC, f"No space left on device: a checkpoint needs ~{needed / 1e6:.1f} MB, "
                  f"{free / 1e6:.1f} MB are free on the disk of {workdir}")


def _path_str(path) -> str:
  """'opt/inner_states/base/0/mu/...': one spelling for the dict keys, tuple
  indices and NamedTuple fields of a state and of its orbax metadata (which
  stores NamedTuples as dicts)."""
  part = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return "/".join(part(k) for k in path)


def move_aside(workdir: Path, step: int) -> Path:
  """checkpoints/<step> -> checkpoints/<step>.unreadable[.N] (process 0):
  orbax no longer sees it, the user still can."""
  src = workdir / "checkpoints" / str(step)
  dst = src.with_name(f"{step}{UNREADABLE_SUFFIX}")
  n = 0
  while dst.exists():
    n += 1
    dst = src.with_name(f"{step}{UNREADABLE_SUFFIX}.{n}")
  if jax.process_index() == 0:
    src.rename(dst)
  return dst


def restore_latest(manager_fn, workdir: Path, abstract_state, data_restore_args):
  """(manager, restored state or None, restored data or None, step or None).

  Tries the finished checkpoints newest first. One whose metadata tree does
  not fit `abstract_state` is a config mismatch: WorkdirError, nothing
  touched. One that cannot be read is moved aside with a warning, and the
  previous one is tried. `manager_fn()` makes a fresh CheckpointManager (the
  manager caches its step list, so it is rebuilt after a move).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  manager = manager_fn()
  for step in checkpoint.finished_steps(workdir):
    try:
      metadata = manager.item_metadata(step)["state"]
      tree = metadata.tree if hasattr(metadata, "tree") else metadata
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many types for damaged files
      error = e
    else:
      mismatch = tree_mismatch(tree, abstract_state)
      if mismatch:
        raise WorkdirError(f"checkpoint {step} in {workdir} does not fit this config's model/optimizer "
                           f"({'; '.join(mismatch[:4])}{'; ...' if len(mismatch) > 4 else ''}): give a new "
                           "--workdir, or the config it was trained with")
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=data_restore_args))
        return manager, restored["state"], restored["data"], step
      except Exception as e:  # pylint: disable=broad-except
        error = e
    manager.close()
    dst = move_aside(workdir, step)
    multihost_utils.sync_global_devices(f"lseg_move_aside_{step}")
    print(f"warning: checkpoint {step} is unreadable ({type(error).__name__}: {str(error)[:200]}); "
          f"moved it to {dst.name} and trying the previous one", flush=True)
    manager = manager_fn()
  return manager, None, None, None
