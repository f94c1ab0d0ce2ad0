"""Launching: joining a cluster's processes, profiling on demand, and the
launch mistakes that must be one line.

- distributed.start: JAX's cluster detection on simulated environments
  (monkeypatched os.environ), no `jax.distributed.initialize` on a plain
  machine, flags over the environment, and two real processes joined from a
  simulated SLURM step (the flag form: tests/test_train.py, test_eval_sharded.py);
- profiling.StepProfiler: the trace of a tiny jitted loop holds exactly the
  window's steps;
- the mistakes, through the command where the command was what broke
  (a misspelt --config.KEY with the default config, a missing config file,
  a read-only workdir), in-process otherwise.
"""

import datetime
import glob
import json
import os
from pathlib import Path
import resource
import shutil
import socket
import subprocess
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import config_lib, distributed, files, profiling, workdir as workdir_lib
from helpers import ROOT, cpu_env, demo, eval_cli, losses_by_step, train


# Every variable a JAX cluster environment is detected by (jax._src.clusters).
CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def slurm_env(tasks: int, proc: int) -> dict[str, str]:
  """What `srun --ntasks=N` sets for task `proc` on one node."""
  return {"SLURM_JOB_ID": "4321", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(tasks),
          "SLURM_PROCID": str(proc), "SLURM_LOCALID": str(proc)}


@pytest.fixture
def plain_machine(monkeypatch):
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  return monkeypatch


# --- processes ----------------------------------------------------------------------------------


def test_jax_cluster_detection_on_simulated_environments(plain_machine):
  assert distributed.detected_cluster() is None
  for var, value in slurm_env(1, 0).items():
    plain_machine.setenv(var, value)
  assert distributed.detected_cluster() == "slurm"  # one task is still a SLURM step
  plain_machine.delenv("SLURM_STEP_NODELIST")  # salloc's shell, outside any srun step
  assert distributed.detected_cluster() is None
  plain_machine.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
  assert distributed.detected_cluster() == "ompi"


def parsed_flags(*args: str) -> flags.FlagValues:
  fv = flags.FlagValues()
  distributed.define_flags(fv)
  fv(["prog", *args])
  return fv


@pytest.fixture
def initialize_calls(plain_machine):
  """The calls distributed.start makes to jax.distributed.initialize (recorded, not made)."""
  calls = []
  plain_machine.setattr(jax.distributed, "initialize", lambda *a: calls.append(a))
  plain_machine.setattr(jax.distributed, "is_initialized", lambda: False)
  collectives = jax.config.jax_cpu_collectives_implementation
  yield calls
  jax.config.update("jax_cpu_collectives_implementation", collectives)


def test_start_joins_a_cluster_or_the_flags_never_a_plain_machine(initialize_calls, plain_machine):
  assert distributed.start(parsed_flags()) == "processes: 1 process x 8 local cpu devices = 8 devices"
  assert initialize_calls == []  # a plain machine: initialize() would wait for a coordinator

  for var, value in slurm_env(2, 0).items():
    plain_machine.setenv(var, value)
  assert distributed.start(parsed_flags()).endswith(" (slurm)")
  assert initialize_calls == [(None, None, None)]  # JAX reads the cluster's environment
  assert jax.config.jax_cpu_collectives_implementation == "gloo"

  distributed.start(parsed_flags("--coordinator_address=h:1", "--num_processes=4", "--process_id=3"))
  assert initialize_calls[-1] == ("h:1", 4, 3)  # the flags override the environment
  for var in slurm_env(2, 0):
    plain_machine.delenv(var)
  distributed.start(parsed_flags("--process_id=1"))  # flags alone: JAX fills nothing in
  assert initialize_calls[-1] == (None, None, 1)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


JOIN_SCRIPT = """
import sys
from absl import flags
import jax
from jax.experimental import multihost_utils
from lseg_jax import distributed
fv = flags.FlagValues()
distributed.define_flags(fv)
fv(sys.argv)
print(distributed.start(fv), flush=True)
ids = multihost_utils.process_allgather(jax.numpy.int32(jax.process_index()))
print("joined", jax.process_index(), jax.process_count(), jax.device_count(), ids.tolist(), flush=True)
"""


def test_two_processes_join_from_a_simulated_slurm_step():
  """What `srun --ntasks=2` gives each task, and no flags: both processes join
  one run of 2 x 2 CPU devices and exchange their ids through a collective."""
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
  env |= {k: v for k, v in cpu_env(2, compile_cache=False).items() if k in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env |= {"JAX_COORDINATOR_PORT": str(free_port())}  # JAX's port from the job id might be taken here
  procs = [subprocess.Popen([sys.executable, "-c", JOIN_SCRIPT], cwd=ROOT, env=env | slurm_env(2, i),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  for out in outs:
    assert "processes: 2 processes x 2 local cpu devices = 4 devices (slurm)" in out, out
  for i, out in enumerate(outs):
    assert f"joined {i} 2 4 [0, 1]" in out, out


def test_a_mesh_larger_than_the_devices_is_one_line_naming_both():
  config = demo.get_config("backbone=tiny")
  config.mesh = (("data", 4), ("fsdp", 4), ("tensor", 1))
  with pytest.raises(ValueError) as e:
    config_lib.validate(config)
  assert str(e.value) == ("mesh {'data': 4, 'fsdp': 4, 'tensor': 1} needs 16 devices, 8 are available: "
                          "this process sees 1 process x 8 local cpu devices = 8 devices")


# --- profiling ----------------------------------------------------------------------------------


def traced_steps(tb: Path) -> list[int]:
  """The step numbers of the "train" step annotations in the trace under `tb`."""
  files = glob.glob(str(tb / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(files) == 1, files
  steps = []
  for plane in jax.profiler.ProfileData.from_file(files[0]).planes:
    for line in plane.lines:
      steps += [dict(ev.stats)["step_num"] for ev in line.events if ev.name == "train"]
  return sorted(steps)


def test_the_profile_holds_exactly_its_window(tmp_path, capsys):
  update = jax.jit(lambda x: jnp.tanh(x @ x.T) * 0.5)
  profiler = profiling.StepProfiler(tmp_path / "tb", start_step=2, num_steps=2)
  x = expected = jnp.eye(16) + 0.1
  for step in range(1, 6):
    x = profiler.step(step, update, x)
    expected = update(expected)
  np.testing.assert_array_equal(x, expected)  # the profiler runs the step as it is
  assert [profiler.in_window(s) for s in range(1, 6)] == [False, True, True, False, False]
  assert traced_steps(tmp_path / "tb") == [2, 3]
  assert f"profile of steps 2..3 written to {tmp_path / 'tb'}" in capsys.readouterr().out


def test_a_run_ending_inside_the_window_closes_its_trace_and_off_writes_nothing(tmp_path):
  update = jax.jit(lambda x: x + 1)
  profiler = profiling.StepProfiler(tmp_path / "tb", start_step=3, num_steps=10)
  x = jnp.zeros(())
  for step in range(1, 5):
    x = profiler.step(step, update, x)
  profiler.stop()
  assert traced_steps(tmp_path / "tb") == [3, 4]

  off = profiling.StepProfiler.from_config(config_lib.base_config().profile, tmp_path / "off")
  assert not off.enabled and off.step(5, update, x) == 5.0 and not (tmp_path / "off").exists()


def test_profile_config_is_validated_and_resumable():
  config = demo.get_config("backbone=tiny")
  assert config.profile.to_dict() == {"start_step": 5, "num_steps": 0, "all_processes": False}
  saved = config.to_dict()
  config.profile.num_steps = 3  # profiling a resumed run does not change what is trained
  assert workdir_lib.config_differences(saved, config.to_dict()) == []
  config.profile.num_steps = -1
  with pytest.raises(ValueError, match=r"profile\.num_steps=-1 must be >= 0"):
    config_lib.validate(config)


# --- launch mistakes through the command ---------------------------------------------------------


def train_command(args: list[str], tmp_path: Path, prefix: tuple[str, ...] = ()) -> tuple[int, str, float, float]:
  """train.py as a user runs it (TMPDIR in tmp_path, so the default workdir
  lands there): (status, stderr, wall seconds, CPU seconds)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp_path)}
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t = time.time()
  proc = subprocess.run([*prefix, sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
  return proc.returncode, proc.stderr, time.time() - t, cpu


@pytest.mark.parametrize("args,line", [
    (["--config.lr_typo=1"], "error: unknown config key 'lr_typo'; did you mean lr?"),
    (["--config", "configs/nope.py"],
     "error: config configs/nope.py: FileNotFoundError: config file configs/nope.py does not exist"),
    (["--num_processes=2"], "error: cannot join the run's processes (coordinator_address should be defined.): "
     "give all of --coordinator_address, --num_processes and --process_id, or launch under a cluster"),
], ids=["typo", "missing_file", "processes_flag"])
def test_a_mistake_with_the_default_config_is_one_line_in_seconds(tmp_path, args, line):
  code, err, wall, cpu = train_command(args, tmp_path)
  assert (code, err) == (2, line + "\n")
  assert cpu < 10, cpu  # the imports and the flags only (wall time on a loaded machine: {wall:.0f}s)
  assert wall < 60, wall
  assert list(tmp_path.iterdir()) == []  # not even the default workdir


@pytest.mark.parametrize("override,line", [
    ("--config.optim.lr_typo=1", "unknown config key 'optim.lr_typo'; did you mean lr?"),
    ("--config.batch_size=abc", "unknown config key 'batch_size'; did you mean evals.batch_size, input.batch_size?"),
    ("--config.input.batch_size=abc", "flag --config.input.batch_size=abc: invalid literal for int()"),
], ids=["nested_typo", "misplaced", "bad_value"])
def test_the_other_override_mistakes_take_the_same_path(override, line):
  """eval.py's flag parsing, in-process: the function train.py's reports with."""
  argv = ["eval.py", f"--config={train.DEFAULT_CONFIG}", override]
  with pytest.raises(ValueError) as e:
    eval_cli.parse_flags(eval_cli.define_flags(argv), argv)
  assert str(e.value).startswith(line), e.value


def test_a_read_only_workdir_is_refused_before_any_work(tmp_path):
  """A read-only file system (a tmpfs mounted ro in a private mount namespace)."""
  if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode:
    pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a read-only file system")
  ro = tmp_path / "ro"
  ro.mkdir()
  script = (f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} {ROOT / 'train.py'} "
            f"--workdir {ro / 'run'} --config={ROOT / 'configs' / 'demo.py'}:backbone=tiny")
  code, err, wall, cpu = train_command([], tmp_path, prefix=("unshare", "-rm", "sh", "-c", script, "--"))
  assert (code, err) == (2, f"error: --workdir {ro / 'run'}: cannot create {ro / 'run' / 'config.json'}: "
                            f"{ro} is not writable\n")
  assert cpu < 10, cpu  # before the data, the model or any compile


# --- launch mistakes in-process ------------------------------------------------------------------


def test_run_files_honour_the_umask(tmp_path):
  previous = os.umask(0o022)
  try:
    files.write_text_atomic(tmp_path / "config.json", "{}")
    os.umask(0o077)
    files.write_text_atomic(tmp_path / "private.json", "{}")
  finally:
    os.umask(previous)
  assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644
  assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "private.json"]  # no temp file left


def test_eval_scores_are_strict_json(tmp_path):
  scores = {"protocol": "single", "step": 4, "loss": float("nan"), "mIoU": 0.25,
            "IoU": {"cat": 0.5, "dog": float("inf")}, "per_fold": [float("-inf"), 1.0]}
  out = tmp_path / "scores.json"
  eval_cli.write_scores(out, scores)
  strict = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
  assert strict == {"protocol": "single", "step": 4, "loss": None, "mIoU": 0.25,
                    "IoU": {"cat": 0.5, "dog": None}, "per_fold": [None, 1.0]}


def test_every_metrics_line_names_its_launch(tmp_path):
  """Two launches log step 2 (a resume after a checkpoint at 1): each line says
  which launch wrote it, and the later one wins in losses_by_step."""
  for loss in (1.0, 0.5):
    writer = train.MetricWriter(tmp_path, enabled=True)
    writer.write(2, {"loss": loss})
    writer.close()
    time.sleep(0.01)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  launches = [datetime.datetime.fromisoformat(line["launch"]) for line in lines]
  assert launches[0] < launches[1] and all(t.tzinfo is not None for t in launches)
  assert losses_by_step(tmp_path)[2]["loss"] == 0.5
