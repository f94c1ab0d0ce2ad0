"""Test-wide settings and fixtures.

JAX gets 8 virtual CPU devices for the sharding tests, set before any test
touches a backend (the option only acts then), and XLA:CPU compiles with its
backend optimisations off (helpers.FAST_XLA_FLAGS). The session fixtures
are built once for both xdist workers (helpers.built_once).
"""

import os
import subprocess

# Before jax is imported (its flags read the environment then), and inherited
# by every subprocess: helpers.FAST_XLA_FLAGS says why.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)


def pytest_configure(config):
  """Refuse to run when the 8 devices did not come: the mesh tests would test something else."""
  del config
  if len(jax.devices("cpu")) != 8:
    raise pytest.UsageError(f"the sharding tests need 8 CPU devices; JAX gave {len(jax.devices('cpu'))} "
                            "(a CPU backend initialised before conftest.py set jax_num_cpu_devices?)")


@pytest.fixture(scope="session")
def shapes_config(tmp_path_factory) -> dict:
  """Input config of the "tiny" lseg_shapes build (64 train / 16 validation
  images), prepared once per session in a temp dir."""
  from helpers import built_once  # pylint: disable=g-import-not-at-top
  from lseg_jax import data
  cfg = dict(dataset="lseg_shapes", builder_config="tiny", crop_size=64, base_size=80, num_threads=2)
  data_dir = built_once(tmp_path_factory, "tfds_shapes",
                        lambda path: data.num_examples({**cfg, "data_dir": str(path)}, "train"))
  cfg["data_dir"] = str(data_dir)
  assert data.num_examples(cfg, "train") == 64
  return cfg


@pytest.fixture(scope="session")
def finished_run(shapes_config, tmp_path_factory):
  """An uninterrupted 6-step train.py run of the tiny demo on one device, in a
  subprocess, with checkpoints 2, 4 and 6: the reference losses of the resume
  tests and the workdir the run-safety tests copy. Read it, never write it."""
  from helpers import built_once, flag_args, run_script  # pylint: disable=g-import-not-at-top

  def build(workdir):
    proc = run_script(["--workdir", str(workdir), *flag_args(shapes_config)])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]

  return built_once(tmp_path_factory, "finished_run", build)


@pytest.fixture(scope="session")
def trained(shapes_config, tmp_path_factory):
  """The demo's recipe (small_resnet, square "resize" transform) at 64 px on
  the tiny build: 250 steps learn its 64 training images (train pixel
  accuracy ~0.95; too few images to generalise to the validation split).
  The workdir predict's and the web demo's end-to-end tests read."""
  from helpers import built_once, tiny_config, train  # pylint: disable=g-import-not-at-top
  from lseg_jax.models import get_model_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(shapes_config, total_steps=250, ckpt_every=0, log_every=250, lr=1e-2)
  config.model = get_model_config("small_resnet")  # replaced, not merged into the tiny ViT's fields
  return built_once(tmp_path_factory, "trained", lambda workdir: train.train_and_evaluate(config, workdir))


@pytest.fixture
def small_disk(tmp_path):
  """A 12 MB tmpfs (the tiny run needs ~7 MB before its first checkpoint):
  a disk that fills up under a test."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True).returncode:
    pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN) on this machine")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)
