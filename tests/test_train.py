"""train.py end to end: the tiny model on the tiny lseg_shapes build, on CPU.

In-process runs use the 8 virtual devices of conftest.py; subprocess runs get
their device count from XLA_FLAGS.
"""

import importlib.util
import json
import os
from pathlib import Path
import tempfile
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


train = _load(ROOT / "train.py", "lseg_train")
demo = _load(ROOT / "configs" / "demo.py", "lseg_demo_config")

# The demo config with the tiny ViT (its transformer exercises the FSDP and
# tensor sharding rules), and flags that shrink it to a few-second run.
DEMO_ARG = "backbone=tiny"
TINY = dict(total_steps=6, log_every=1, ckpt_every=2, keep_ckpts=3, lr=3e-3)


def tiny_config(shapes_config: dict, **overrides):
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


def losses_by_step(workdir: Path) -> dict[int, dict]:
  """The last logged train metrics of every step (a resumed run logs some twice)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    if "loss" in m:
      out[m["step"]] = m
  return out


# Subprocesses share compiled executables through JAX's persistent cache.
COMPILE_CACHE = tempfile.mkdtemp(prefix="lseg_jax_test_xla_cache_")


def run_script(args: list[str], devices: int = 1, **popen) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.fixture(scope="module")
def reference(finished_run) -> dict[int, dict]:
  """The losses of an uninterrupted 6-step run on one device (conftest)."""
  return losses_by_step(finished_run)


def test_loss_falls_and_the_run_leaves_a_checkpoint(shapes_config, tmp_path):
  config = tiny_config(shapes_config, total_steps=30, log_every=5, ckpt_every=0, lr=3e-3)
  scores = train.train_and_evaluate(config, tmp_path)
  logged = losses_by_step(tmp_path)
  assert logged[30]["loss"] < 0.7 * logged[5]["loss"], {s: m["loss"] for s, m in logged.items()}
  assert 0.0 <= scores["mIoU"] <= 1.0 and scores["pixAcc"] > 0.5
  assert (tmp_path / "checkpoints" / "30").is_dir()
  assert json.loads((tmp_path / "model_config.json").read_text())["backbone"] == "tiny"
  assert list((tmp_path / "tb").iterdir())  # TensorBoard events


@pytest.fixture(scope="module")
def single_device_run(shapes_config, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  scores = train.train_and_evaluate(tiny_config(shapes_config, total_steps=3, ckpt_every=0, mesh=(("data", 1),)),
                                    workdir)
  return scores, losses_by_step(workdir)


@pytest.mark.parametrize("mesh", [(("data", 8),), (("data", 2), ("fsdp", 4))], ids=["data8", "data2_fsdp4"])
def test_sharded_steps_equal_a_single_device(shapes_config, single_device_run, tmp_path, mesh):
  one, a = single_device_run
  many = train.train_and_evaluate(tiny_config(shapes_config, total_steps=3, ckpt_every=0, mesh=mesh), tmp_path)
  b = losses_by_step(tmp_path)
  for step in (1, 2, 3):
    for key in ("loss", "grad_norm", "param_norm", "pixel_acc"):
      np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, err_msg=f"{key} at step {step}")
  assert abs(one["mIoU"] - many["mIoU"]) < 1e-6


def test_resume_is_exact_after_kill_9_and_after_a_corrupt_checkpoint(shapes_config, reference, tmp_path):
  proc = run_script(["--workdir", str(tmp_path), *flag_args(shapes_config)])
  deadline = time.time() + 300
  while not (tmp_path / "checkpoints" / "4").is_dir():  # a finalised checkpoint (orbax renames at the end)
    assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
    time.sleep(0.05)
  proc.kill()  # SIGKILL: no chance to save
  proc.communicate()
  resumed = run_script(["--workdir", str(tmp_path), *flag_args(shapes_config)])
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out[-3000:]
  assert "resumed from step" in out
  logged = losses_by_step(tmp_path)
  for step in range(1, 7):
    assert logged[step]["loss"] == reference[step]["loss"], step

  # Now truncate every file of the latest checkpoint (6): the run warns,
  # moves it aside (kept, invisible to orbax), resumes from 4 and redoes
  # steps 5 and 6 exactly.
  for f in (tmp_path / "checkpoints" / "6").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  again = run_script(["--workdir", str(tmp_path), *flag_args(shapes_config)])
  out, _ = again.communicate(timeout=600)
  assert again.returncode == 0, out[-3000:]
  assert "checkpoint 6 is unreadable" in out and "moved it to 6.unreadable" in out and "resumed from step 4" in out
  assert (tmp_path / "checkpoints" / "6.unreadable").is_dir()
  logged = losses_by_step(tmp_path)
  for step in (5, 6):
    assert logged[step]["loss"] == reference[step]["loss"], step


def test_two_processes_give_the_losses_of_one(shapes_config, reference, tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [run_script(["--workdir", str(tmp_path), f"--coordinator_address=localhost:{port}",
                       "--num_processes=2", f"--process_id={i}", *flag_args(shapes_config)], devices=4)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  logged = losses_by_step(tmp_path)
  for step in range(1, 7):
    np.testing.assert_allclose(logged[step]["loss"], reference[step]["loss"], rtol=1e-5, err_msg=str(step))


def test_nonfinite_loss_stops_naming_the_step(shapes_config, tmp_path):
  config = tiny_config(shapes_config, total_steps=20, ckpt_every=0, optax_name="sgd", lr=1e12)
  with pytest.raises(train.NonFiniteLoss, match=r"at step \d+"):
    train.train_and_evaluate(config, tmp_path)
