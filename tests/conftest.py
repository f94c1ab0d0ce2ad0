"""Test-wide settings and fixtures.

JAX gets 8 virtual CPU devices for the sharding tests, set before any test
touches a backend (the option only acts then), and XLA:CPU compiles with its
backend optimisations off (helpers.FAST_XLA_FLAGS).
"""

import os

# Before jax is imported (its flags read the environment then), and inherited
# by every subprocess: helpers.FAST_XLA_FLAGS says why.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  jax.config.update("jax_num_cpu_devices", 8)
except (AttributeError, RuntimeError):  # an older jax, or a backend already initialised
  pass


@pytest.fixture(scope="session")
def shapes_config(tmp_path_factory) -> dict:
  """Input config of the "tiny" lseg_shapes build (64 train / 16 validation
  images), prepared once per session in a temp dir."""
  from lseg_jax import data
  cfg = dict(dataset="lseg_shapes", builder_config="tiny", crop_size=64, base_size=80,
             data_dir=str(tmp_path_factory.mktemp("tfds_shapes")), num_threads=2)
  assert data.num_examples(cfg, "train") == 64
  return cfg


@pytest.fixture(scope="session")
def finished_run(shapes_config, tmp_path_factory):
  """An uninterrupted 6-step train.py run of the tiny demo on one device, in a
  subprocess, with checkpoints 2, 4 and 6: the reference losses of the resume
  tests and the workdir the run-safety tests copy. Read it, never write it."""
  from helpers import flag_args, run_script  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("finished_run")
  proc = run_script(["--workdir", str(workdir), *flag_args(shapes_config)])
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return workdir


@pytest.fixture(scope="session")
def trained(shapes_config, tmp_path_factory):
  """The demo's recipe (small_resnet, square "resize" transform) at 64 px on
  the tiny build: 250 steps learn its 64 training images (train pixel
  accuracy ~0.95; too few images to generalise to the validation split).
  The workdir predict's and the web demo's end-to-end tests read."""
  from helpers import tiny_config, train  # pylint: disable=g-import-not-at-top
  from lseg_jax.models import get_model_config  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("trained")
  config = tiny_config(shapes_config, total_steps=250, ckpt_every=0, log_every=250, lr=1e-2)
  config.model = get_model_config("small_resnet")  # replaced, not merged into the tiny ViT's fields
  train.train_and_evaluate(config, workdir)
  return workdir
