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
  once the config is valid and the restore decision is made;
- one run at a time: `RunLock` (`run.lock`, held by process 0 for the whole
  run) refuses a second train.py on a live run's workdir before anything is
  written, and takes over the lock of a dead run (kill -9, a lost host).
"""

import datetime
import errno
import getpass
import json
import os
from pathlib import Path
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lseg_jax import checkpoint, config_lib, files

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
    files.write_text_atomic(workdir / checkpoint.RUN_CONFIG, config.to_json_best_effort(indent=2))
    files.write_text_atomic(workdir / checkpoint.MODEL_CONFIG, config.model.to_json(indent=2))


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


def restore_latest(manager_fn, workdir: Path, abstract_state):
  """(manager, restored state or None, step or None).

  Tries the finished checkpoints newest first. One whose metadata tree does
  not fit `abstract_state` is a config mismatch: WorkdirError, nothing
  touched. One that cannot be read is moved aside with a warning, and the
  previous one is tried. `manager_fn()` makes a fresh CheckpointManager (the
  manager caches its step list, so it is rebuilt after a move).
  """
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
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return manager, restored["state"], step
      except Exception as e:  # pylint: disable=broad-except
        error = e
    manager.close()
    dst = move_aside(workdir, step)
    multihost_utils.sync_global_devices(f"lseg_move_aside_{step}")
    print(f"warning: checkpoint {step} is unreadable ({type(error).__name__}: {str(error)[:200]}); "
          f"moved it to {dst.name} and trying the previous one", flush=True)
    manager = manager_fn()
  return manager, None, None


LOCK = "run.lock"
LOCK_HEARTBEAT_S = 10.0  # the holder touches the lock this often
LOCK_STALE_S = 120.0  # a lock of another host untouched this long is a lost host's


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` (Linux /proc, in clock ticks since
  boot), so that a recycled pid is not taken for the lock's holder; None
  where the process does not exist."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    if not Path("/proc").is_dir():  # no procfs: only the pid's existence is known
      try:
        os.kill(pid, 0)
        return "unknown"
      except ProcessLookupError:
        return None
      except PermissionError:
        return "unknown"
    return None


class RunLock:
  """`WORKDIR/run.lock`: one training run per workdir.

  The holder (process 0 of a run) writes {host, pid, pid_start, since} with
  an atomic link (never a half-written lock) and touches the file every
  LOCK_HEARTBEAT_S while it runs. A second run refuses, naming the holder.
  The lock of a dead holder is taken over, with a note: on the same host
  when its pid is gone (or recycled), from another host when the file was
  not touched for LOCK_STALE_S (its host was lost). Taking over renames the
  stale lock first, which only one of several racing runs can do.
  """

  def __init__(self, workdir: Path):
    self.path = Path(workdir) / LOCK
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _holder(self) -> dict:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}

  def _stale(self, holder: dict) -> bool:
    try:
      age = time.time() - self.path.stat().st_mtime
    except FileNotFoundError:
      return True
    if holder.get("host") == socket.gethostname() and "pid" in holder:
      start = _process_start(int(holder["pid"]))
      return start is None or start not in ("unknown", holder.get("pid_start"))
    return age > LOCK_STALE_S

  @staticmethod
  def describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('since', '?')}")

  def acquire(self) -> str | None:
    """Takes the lock (creating the workdir); returns a note when it took over
    a dead run's lock. WorkdirError (nothing written) when a live run holds it."""
    if self.path.parent.exists() and not self.path.parent.is_dir():
      raise WorkdirError(f"--workdir {self.path.parent} is a file, not a directory")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
          "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    note = None
    for _ in range(5):
      fd, tmp = tempfile.mkstemp(prefix=f".{LOCK}.", dir=self.path.parent)
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      os.chmod(tmp, 0o644)  # other users of a shared disk may read who holds it
      try:
        os.link(tmp, self.path)  # atomic, fails if the lock exists
        self._start_heartbeat()
        return note
      except FileExistsError:
        pass
      finally:
        os.unlink(tmp)
      holder = self._holder()
      if not self._stale(holder):
        raise WorkdirError(f"{self.path.parent} is in use by another train.py ({self.describe(holder)}): wait "
                           f"for it to end or stop it, or give another --workdir")
      aside = self.path.with_name(f"{LOCK}.stale.{uuid.uuid4().hex}")
      try:
        os.rename(self.path, aside)  # only one of several racing runs succeeds
      except FileNotFoundError:
        continue
      aside.unlink()
      note = f"note: took over {self.path} from a run that is no longer alive ({self.describe(holder)})"
    raise WorkdirError(f"could not take {self.path}: other runs keep taking it")

  def _start_heartbeat(self) -> None:
    def beat():
      while not self._stop.wait(LOCK_HEARTBEAT_S):
        try:
          os.utime(self.path)
        except OSError:
          pass
    self._thread = threading.Thread(target=beat, name="lseg_run_lock", daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Removes the lock if this process holds it (idempotent)."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread = None
    if self._holder().get("pid") == os.getpid() and self._holder().get("host") == socket.gethostname():
      self.path.unlink(missing_ok=True)


def lock_run(workdir: Path) -> tuple[RunLock, str | None]:
  """(the run's lock, a take-over note or None): taken by process 0 for all
  the processes of a run; every process raises the same WorkdirError when a
  live run holds it."""
  lock, note, error = RunLock(workdir), None, None
  if jax.process_index() == 0:
    try:
      note = lock.acquire()
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
    error = error or WorkdirError(f"{workdir} is in use by another train.py (process 0 says which)")
  if error is not None:
    raise error
  return lock, note
