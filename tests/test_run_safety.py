"""A run is sacred: what train.py does to a workdir on mistakes and faults.

Each fault is produced the way it happens (a changed command line on an
existing workdir, another demo variant, a launch that fails, a full disk,
Ctrl-C), and every earlier finished checkpoint must still restore afterwards.
The user's mistakes end in one `error:` line and exit status 2.
"""

import json
from pathlib import Path
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, cpu_env, fill_disk, flag_args, restorable_steps, run_script, tiny_config
from lseg_jax import checkpoint, config_lib, workdir as workdir_lib


def run(args: list[str], timeout: int = 600) -> tuple[int, str, str]:
  """train.py in a subprocess (one device, the tests' compilation cache):
  (exit status, stdout, stderr)."""
  env = cpu_env(1)
  proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env)
  return proc.returncode, proc.stdout, proc.stderr


def error_line(stderr: str) -> str:
  """The one line a user error prints (absl/XLA chatter on stderr aside)."""
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len([l for l in lines if l.startswith("error:")]) == 1 and "Traceback" not in stderr, stderr[-2000:]
  return next(l for l in lines if l.startswith("error:"))


def with_flags(args: list[str], extra: list[str]) -> list[str]:
  """`args` + `extra`, where a --config= in `extra` replaces the one in `args`
  (it must come before the --config.KEY overrides)."""
  if extra[0].startswith("--config="):
    return [extra[0], *(a for a in args if not a.startswith("--config=")), *extra[1:]]
  return [*args, *extra]


@pytest.fixture
def copy_of(finished_run, tmp_path) -> Path:
  """A copy of conftest's finished 6-step run (checkpoints 2, 4, 6)."""
  assert restorable_steps(finished_run) == [2, 4, 6]
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  return workdir


@pytest.mark.parametrize("change,field", [
    (["--config.model.arch_option=1"], "model.arch_option"),
    (["--config.grad_clip_norm=1.0"], "grad_clip_norm"),
    (["--config=configs/demo.py"], "model.backbone"),  # the other demo variant on this workdir
], ids=["arch_option", "grad_clip", "demo_variant"])
def test_a_changed_config_is_refused_and_the_run_kept(shapes_config, copy_of, change, field):
  before = (copy_of / "config.json").read_bytes()
  code, out, err = run(["--workdir", str(copy_of), *with_flags(flag_args(shapes_config), change)])
  assert code == 2, (out + err)[-3000:]
  line = error_line(err)
  assert str(copy_of) in line and field in line and "--allow_config_change" in line, line
  assert restorable_steps(copy_of) == [2, 4, 6]
  assert (copy_of / "config.json").read_bytes() == before


def test_allow_config_change_resumes_but_never_onto_another_tree(shapes_config, copy_of):
  code, out, err = run(["--workdir", str(copy_of), *flag_args(shapes_config, lr=1e-3, total_steps=8),
                        "--allow_config_change"])
  assert code == 0, (out + err)[-3000:]
  assert "resumed from step 6" in out and "lr: 0.003 -> 0.001" in out
  assert json.loads((copy_of / "config.json").read_text())["lr"] == 1e-3
  # A changed optimizer tree cannot be restored: refused, never taken for a corrupt checkpoint.
  code, out, err = run(["--workdir", str(copy_of), *flag_args(shapes_config, lr=1e-3, total_steps=8),
                        "--config.grad_clip_norm=1.0", "--allow_config_change"])
  assert code == 2 and "does not fit" in error_line(err), (out + err)[-3000:]
  assert restorable_steps(copy_of) == [4, 6, 8]
  assert not list((copy_of / "checkpoints").glob("*.unreadable*"))


@pytest.mark.parametrize("bad,message", [
    (["--config.input.batch_size=0"], r"input\.batch_size=0 must be positive"),  # config_lib.validate
    (["--config.batch_size=8"], "input.batch_size"),  # flag parsing: a misplaced key
    (["--config=configs/demo.py:backbone=huge"], "unknown backbone 'huge'"),  # the config file's own error
], ids=["validate", "misplaced_key", "config_arg"])
def test_a_failed_launch_is_one_line_and_touches_nothing(shapes_config, copy_of, bad, message):
  before = {p: p.read_bytes() for p in copy_of.glob("*.json")}
  code, out, err = run(["--workdir", str(copy_of), *with_flags(flag_args(shapes_config), bad)])
  assert code == 2, (out + err)[-3000:]
  assert message in error_line(err) or re.search(message, error_line(err)), error_line(err)
  assert {p: p.read_bytes() for p in copy_of.glob("*.json")} == before
  assert restorable_steps(copy_of) == [2, 4, 6]


def test_a_workdir_that_is_a_file_is_refused(tmp_path, shapes_config):
  path = tmp_path / "not_a_dir"
  path.write_text("x")
  code, out, err = run(["--workdir", str(path), *flag_args(shapes_config)])
  assert code == 2 and "is a file" in error_line(err)


def test_default_workdirs_differ_by_user_config_and_argument(monkeypatch):
  monkeypatch.setenv("LOGNAME", "alice")  # getpass.getuser reads LOGNAME first
  a = workdir_lib.default_workdir(str(ROOT / "configs" / "demo.py"))
  b = workdir_lib.default_workdir("configs/demo.py:backbone=tiny")
  assert a.name == "lseg_jax_alice_demo" and b.name == "lseg_jax_alice_demo_backbone-tiny" and a.parent == b.parent
  assert workdir_lib.default_workdir("configs/fewshot_lsegzs.py:dataset=pascal5i,fold=1").name == (
      "lseg_jax_alice_fewshot_lsegzs_dataset-pascal5i,fold-1")
  monkeypatch.setenv("LOGNAME", "bob")
  assert workdir_lib.default_workdir("configs/demo.py").name == "lseg_jax_bob_demo"


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl_c", "sigterm"])
def test_a_signal_saves_and_exits_with_a_status_that_is_not_success(shapes_config, tmp_path, signum, status):
  proc = run_script(["--workdir", str(tmp_path), *flag_args(shapes_config, total_steps=10000, ckpt_every=0)])
  deadline = time.time() + 300
  for line in proc.stdout:
    if line.startswith("[3/"):
      break
    assert time.time() < deadline
  proc.send_signal(signum)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == status, out[-3000:]  # 128 + the signal: a scheduler tells it from success
  saved = restorable_steps(tmp_path)
  assert saved and min(saved) >= 3 and f"received signal {int(signum)}" in out and "Traceback" not in out


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(shapes_config, small_disk):
  # Saves 200 steps apart, so that the disk fills between two saves: a tiny
  # step takes milliseconds, and 40 apart the next save could start while the
  # filler was writing (the mid-write case of README "Known issues").
  workdir = small_disk / "run"
  proc = run_script(["--workdir", str(workdir), *flag_args(shapes_config, total_steps=10000, ckpt_every=200,
                                                            log_every=1000)])
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "200").is_dir():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
    time.sleep(0.05)
  filler = fill_disk(small_disk)  # the disk fills up under the run
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 1, out[-3000:]
  errors = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
  assert "saving checkpoint 400 failed" in errors[0] and "last good checkpoint is step 200" in errors[0], errors[0]
  filler.unlink()
  assert restorable_steps(workdir) == [200]  # nothing half-written is visible as a step


@pytest.mark.parametrize("argv,message", [
    (["--config.lr_typo=1"], "unknown config key 'lr_typo'; did you mean lr"),
    (["--config.batch_size=8"], "unknown config key 'batch_size'; did you mean evals.batch_size, input.batch_size"),
    (["--config.optim.lr=1"], "unknown config key 'optim.lr'; did you mean lr"),
    (["--config.input.crop_sise=64"], "unknown config key 'input.crop_sise'; did you mean input.crop_size"),
    (["--config.input.crop_size=64"], None),
])
def test_a_misspelt_override_names_the_key_and_the_nearest_ones(argv, message):
  error = config_lib.override_error(str(ROOT / "configs" / "demo.py"), argv)
  assert error == message if message is None else error.startswith(message), error


def test_a_config_file_that_does_not_load_is_named():
  with pytest.raises(FileNotFoundError, match="configs/nonexistent.py does not exist"):
    config_lib.load_config_file("configs/nonexistent.py")


def test_validate_names_the_field(shapes_config):
  cases = [
      (dict(input_batch=0), r"input\.batch_size=0 must be positive"),
      (dict(lr=None), "set exactly one of lr"),
      (dict(base_lr=0.004), "set exactly one of lr"),
      (dict(optax_name="adam"), "optax_name='adam' is not one of sgd, adamw"),
      (dict(loss_reduction="mean"), "loss_reduction='mean' is not one of pixels, replicas"),
      (dict(lr_mults={"decoder": 10.0}), "lr_mults has group 'decoder'"),
      (dict(keep_ckpts=0), "keep_ckpts=0 must be positive"),
      (dict(grad_accum_steps=0), "grad_accum_steps=0 must be positive"),
      (dict(grad_accum_steps=3), r"input\.batch_size=8 must be a multiple of 24"),
      (dict(loss_reduction="replicas", ddp_replicas=3), r"x ddp_replicas=3"),
      (dict(schedule_kind="step"), "schedule.kind='step'"),
      (dict(evals_batch=4), r"evals\.batch_size=4 must be a multiple of 8 \(the devices"),
      (dict(total_steps=0, total_epochs=0.0), "set total_steps or total_epochs"),
      (dict(init={"vit": "/nonexistent.npz"}), "init.vit=/nonexistent.npz does not exist"),
  ]
  for overrides, message in cases:
    config = tiny_config(shapes_config)
    config.unlock()
    if "input_batch" in overrides:
      config.input.batch_size = overrides.pop("input_batch")
    if "evals_batch" in overrides:
      config.evals.batch_size = overrides.pop("evals_batch")
    if "schedule_kind" in overrides:
      config.schedule.kind = overrides.pop("schedule_kind")
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
      config_lib.validate(config)
  config = tiny_config(shapes_config)
  config.unlock()
  config.gradclip_norm = 1.0  # a typo in a config file (the command line cannot add keys)
  with pytest.raises(ValueError, match="unknown config key 'gradclip_norm'; did you mean grad_clip_norm"):
    config_lib.validate(config)
  config_lib.validate(tiny_config(shapes_config))  # the valid one passes


def test_a_signal_during_the_first_compile_leaves_at_once(shapes_config, tmp_path):
  """Nothing is trained yet, so nothing is saved: the run leaves with 143
  without waiting for XLA (the compile runs in a worker thread, so the
  signal handler runs while it lasts). No compilation cache here, so the
  compile takes seconds."""
  proc = run_script(["--workdir", str(tmp_path), *flag_args(shapes_config, total_steps=100)], compile_cache=False)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("compiling the train step"):
      break
  proc.send_signal(signal.SIGTERM)
  out = "".join(lines) + proc.communicate(timeout=120)[0]
  assert proc.returncode == 143, out[-3000:]
  assert "compiled in" not in out and not checkpoint.finished_steps(tmp_path) and "Traceback" not in out
  assert not (tmp_path / workdir_lib.LOCK).exists()
