"""train.py over 2 processes x 4 CPU devices (gloo collectives on localhost):
a signal to ONE process stops every process at the same step, checkpoints
resume on any process count, and with the losses an uninterrupted run gives.

Runs are cut by signals rather than by total_steps, which sets the
schedule's horizon: every run here has the same config, so their steps are
comparable one by one.
"""

import json
import shutil
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import flag_args, losses_by_step, run_script, tiny_config, train
from lseg_jax import checkpoint

LONG = dict(total_steps=10000, ckpt_every=0, log_every=1)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir: Path, processes: int, args: list[str]) -> list:
  """`processes` train.py processes of one run, 8 CPU devices in all."""
  if processes == 1:
    return [run_script(["--workdir", str(workdir), *args], devices=8)]
  port = free_port()
  return [run_script(["--workdir", str(workdir), f"--coordinator_address=localhost:{port}",
                      f"--num_processes={processes}", f"--process_id={i}", *args], devices=8 // processes)
          for i in range(processes)]


def signal_when(procs: list, marker: str, targets: list[int], signum=signal.SIGTERM, timeout: float = 900) -> list[str]:
  """Reads process 0's output until `marker`, signals the `targets` (process
  indices), then waits for all; returns every process's whole output."""
  lines = []
  deadline = time.time() + timeout
  for line in procs[0].stdout:
    lines.append(line)
    if marker in line:
      break
    assert time.time() < deadline and procs[0].poll() is None, "".join(lines)[-3000:]
  for i in targets:
    procs[i].send_signal(signum)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  outs[0] = "".join(lines) + outs[0]
  return outs


def stopped_step(out: str) -> int:
  return int(out.split("saved step ")[1].split(",")[0])


@pytest.fixture(scope="module")
def reference(shapes_config, tmp_path_factory) -> tuple[dict[int, dict], Path]:
  """The losses of an uninterrupted 2-process run with checkpoints every 3
  steps, cut at step >= 20 by a SIGTERM to both processes, and its workdir
  (the tests below resume at most 12 steps in)."""
  workdir = tmp_path_factory.mktemp("two_process_reference")
  outs = signal_when(launch(workdir, 2, flag_args(shapes_config, **{**LONG, "ckpt_every": 3})), "[20/", [0, 1])
  assert stopped_step(outs[0]) >= 20, outs[0][-2000:]
  return losses_by_step(workdir), workdir


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(shapes_config, reference, tmp_path):
  """SIGTERM to process 1 only, mid-run: both save the same step and exit
  143. The resumed run is stopped by a SIGTERM to process 0 only during its
  first evaluation (it compiles, so it lasts): the evaluation is abandoned,
  its step saved. Every resumed step has exactly the uninterrupted loss."""
  losses, _ = reference
  procs = launch(tmp_path, 2, flag_args(shapes_config, **LONG))
  outs = signal_when(procs, "[4/", [1])
  assert [p.returncode for p in procs] == [143, 143], [o[-2000:] for o in outs]
  first = stopped_step(outs[0])
  assert checkpoint.finished_steps(tmp_path) == [first] and "Traceback" not in "".join(outs)

  evaluated = first + 3  # eval_every may change on resume: it changes no loss
  procs = launch(tmp_path, 2, flag_args(shapes_config, **{**LONG, "eval_every": evaluated}))
  outs = signal_when(procs, f"[{evaluated}/", [0])
  assert [p.returncode for p in procs] == [143, 143], [o[-2000:] for o in outs]
  assert f"resumed from step {first}" in outs[0] and stopped_step(outs[0]) == evaluated, outs[0][-2000:]
  assert checkpoint.latest_step(tmp_path) == evaluated
  assert "validation:" not in outs[0] and "validation/mIoU" not in (tmp_path / "metrics.jsonl").read_text()
  logged = losses_by_step(tmp_path)
  for step in range(1, evaluated + 1):
    assert logged[step]["loss"] == losses[step]["loss"], step


@pytest.mark.parametrize("processes", [1, pytest.param(4, marks=pytest.mark.slow)])  # 4: 80 s, in -m slow
def test_a_two_process_checkpoint_resumes_on_another_process_count(shapes_config, reference, tmp_path, processes):
  """The reference run's oldest kept checkpoint resumed by 1 and by 4
  processes (the 4-process run stopped by a SIGTERM to process 0 only)."""
  losses, reference_dir = reference
  workdir = tmp_path / "run"
  shutil.copytree(reference_dir, workdir)
  start = checkpoint.finished_steps(workdir)[-1]
  for step in checkpoint.finished_steps(workdir)[:-1]:
    shutil.rmtree(workdir / "checkpoints" / str(step))  # as if the run had stopped at `start`
  procs = launch(workdir, processes, flag_args(shapes_config, **{**LONG, "ckpt_every": 3}))
  outs = signal_when(procs, f"[{start + 3}/", [0])
  assert all(p.returncode == 143 for p in procs), [o[-2000:] for o in outs]
  assert f"resumed from step {start}" in outs[0]
  assert not list((workdir / "checkpoints").glob("*.unreadable*"))
  logged = losses_by_step(workdir)
  for step in range(start + 1, start + 4):
    np.testing.assert_allclose(logged[step]["loss"], losses[step]["loss"], rtol=1e-5, err_msg=str(step))


def test_a_checkpoint_resumes_on_another_mesh(shapes_config, finished_run, tmp_path):
  """conftest's 1-device run (checkpoints 2, 4, 6), cut back and resumed in
  turn: 1 device -> data2 x fsdp4 (8 devices), whose checkpoint 4 then
  resumes on 1 device. Every resumed step has the uninterrupted run's loss,
  gradient norm, parameter norm and pixel accuracy, and the final evaluation
  on data2 x fsdp4 the one-device run's mIoU (train.py's whole loop, sharded
  input included, on a mesh; every mesh's step is in test_mesh_table)."""
  reference = losses_by_step(finished_run)
  validation = [m for m in map(json.loads, (finished_run / "metrics.jsonl").read_text().splitlines())
                if "validation/mIoU" in m][-1]
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  fsdp, one = (("data", 2), ("fsdp", 4)), (("data", 1),)
  for keep, mesh in ((2, fsdp), (4, one)):  # from checkpoint `keep`, saved on the mesh before it
    for step in checkpoint.finished_steps(workdir):
      if step > keep:
        shutil.rmtree(workdir / "checkpoints" / str(step))  # as if the run had stopped after `keep`
    scores = train.train_and_evaluate(tiny_config(shapes_config, mesh=mesh), workdir)
    logged = losses_by_step(workdir)
    for step in range(keep + 1, 7):
      for key in ("loss", "grad_norm", "param_norm", "pixel_acc"):
        np.testing.assert_allclose(logged[step][key], reference[step][key], rtol=1e-5,
                                   err_msg=f"{key} at step {step} on {mesh}")
    assert validation["step"] == 6 and abs(scores["mIoU"] - validation["validation/mIoU"]) < 1e-6, (scores, mesh)
    assert checkpoint.latest_step(workdir) == 6
