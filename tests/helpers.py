"""What the test files share, so that none imports another: the repository's
scripts as modules, the tiny train.py run (as a config, as flags, in a
subprocess), random weights, what a workdir holds, and a fake PASCAL-5i fold
prepared once per session.

pytest loads fixtures from conftest.py only; a test module takes the ones
here by importing them: `from helpers import pascal_fold  # noqa: F401`.
"""

from collections.abc import Callable
import fcntl
import importlib.util
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import fake_trees
from lseg_jax import checkpoint, data
from lseg_jax.models import abstract_variables

ROOT = Path(__file__).resolve().parents[1]


def load_module(path: Path, name: str):
  """The Python file at `path` as module `name`, executed once per session:
  train.py defines absl flags, which a second execution would define twice."""
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


def load_config(name: str, arg: str | None = None):
  """(get_config(arg), the file's docstring) of configs/`name`."""
  module = load_module(ROOT / "configs" / name, f"lseg_config_{Path(name).stem}")
  return module.get_config(arg), module.__doc__


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
  """The folder `name`, filled by `build` once per test session, not once per
  xdist worker (session fixtures are per worker): the first worker to ask
  builds it under a lock in the temp root the workers share, the others wait
  for it and read it. Read it, never write it."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # pytest-of-USER/pytest-N/popen-gwK -> pytest-of-USER/pytest-N
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      if path.exists():  # a build that failed in the other worker: its assertion is reported there
        raise RuntimeError(f"building {name} failed in another worker")
      path.mkdir()
      build(path)
      done.touch()
  return path


train = load_module(ROOT / "train.py", "lseg_train")
eval_cli = load_module(ROOT / "eval.py", "lseg_eval")
demo = load_module(ROOT / "configs" / "demo.py", "lseg_config_demo")

# The demo config with the tiny ViT (its transformer exercises the FSDP and
# tensor sharding rules), and flags that shrink it to a few-second run.
DEMO_ARG = "backbone=tiny"
DEMO = f"{ROOT / 'configs' / 'demo.py'}:{DEMO_ARG}"  # as eval.py's --config
TINY = dict(total_steps=6, log_every=1, ckpt_every=2, keep_ckpts=3, lr=3e-3)


def tiny_config(shapes_config: dict, **overrides):
  """The tiny run on conftest's lseg_shapes build, as a config."""
  config = demo.get_config(DEMO_ARG)
  config.input.update({k: v for k, v in shapes_config.items()})
  config.input.batch_size = 8
  config.evals.batch_size = 8
  config.update({**TINY, **overrides})
  return config


def flag_args(shapes_config: dict, **overrides) -> list[str]:
  """The same tiny config as command-line overrides of configs/demo.py."""
  args = {**{f"input.{k}": v for k, v in shapes_config.items()}, "input.batch_size": 8,
          "evals.batch_size": 8, **TINY, **overrides}
  return [f"--config=configs/demo.py:{DEMO_ARG}", *(f"--config.{k}={v}" for k, v in args.items())]


# Subprocesses share compiled executables through JAX's persistent cache.
COMPILE_CACHE = tempfile.mkdtemp(prefix="lseg_jax_test_xla_cache_")
# Compiling is what the suite spends its time on: with XLA:CPU's backend
# optimisations off (conftest.py sets JAX_DISABLE_MOST_OPTIMIZATIONS for this
# process and its children) the tiny models compile 2-4x faster.
FAST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def cpu_env(devices: int = 1, compile_cache: bool = True) -> dict[str, str]:
  """The environment of a test's subprocess: `devices` CPU devices, the fast
  compile flags, the shared compilation cache unless `compile_cache` is False."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_XLA_FLAGS}",
         "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  if compile_cache:
    env |= {"JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return env


def run_script(args: list[str], devices: int = 1, prelude: str | None = None, compile_cache: bool = True,
               **popen) -> subprocess.Popen:
  """train.py `args` in a subprocess on `devices` CPU devices, stdout and
  stderr merged; `prelude` is Python run in that process before train.py
  (a test's fault injection); `compile_cache` False compiles afresh."""
  env = cpu_env(devices, compile_cache)
  script = str(ROOT / "train.py")
  command = [script] if prelude is None else [
      "-c", f"{prelude}\nimport runpy, sys\nsys.argv[0] = {script!r}\nrunpy.run_path({script!r}, run_name='__main__')"]
  return subprocess.Popen([sys.executable, *command, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def losses_by_step(workdir: Path) -> dict[int, dict]:
  """The last logged train metrics of every step (a resumed run logs some twice)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    if "loss" in m:
      out[m["step"]] = m
  return out


def restorable_steps(workdir: Path) -> list[int]:
  """Finished steps whose `state` restores completely (every array read and finite)."""
  steps = []
  for step in checkpoint.finished_steps(workdir):
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(workdir / "checkpoints" / str(step) / "state")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)), f"step {step} is not finite"
    steps.append(step)
  return sorted(steps)


def fill_disk(disk: Path, leave: int = 0) -> Path:
  """Fills the file system of `disk` with one file, then frees `leave` bytes
  of it: the next writes there fail with ENOSPC once those are used. The
  file is written unbuffered: a buffered one would keep the tail of its last
  short write and raise ENOSPC again when closed."""
  filler = disk / "filler"
  with open(filler, "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * (1 << 16))
    except OSError:
      pass
    f.truncate(max(0, f.tell() - leave))
  return filler


def random_variables(model_config, seed: int) -> dict:
  """Finite random weights of the model's shapes (BatchNorm variances positive),
  without compiling the model's init."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    if path[-1].key == "var":
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract_variables(model_config))


@pytest.fixture(scope="session")
def pascal_fold(tmp_path_factory) -> dict:
  """The registered pascal5i dataset, fold 0, on fake_trees.pascal_tree,
  prepared once: {"input": its input-config fields, "manual": the tree,
  "masks": image name -> mask}. Read it, never write it."""
  root = tmp_path_factory.mktemp("pascal")
  manual = epath.Path(root / "manual")
  masks = fake_trees.pascal_tree(manual)
  fields = dict(dataset="pascal5i", builder_config="fold0", data_dir=str(root / "data"), manual_dir=str(manual))
  assert data.num_examples(fields, "test") == 1000  # prepares every split
  return {"input": fields, "manual": manual, "masks": masks}
