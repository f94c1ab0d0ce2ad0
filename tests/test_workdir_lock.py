"""One run per workdir (`workdir.RunLock`): a live run's workdir is refused
before anything is written, a dead run's lock is taken over, readers
(eval.py) need no lock."""

import json
import os
from pathlib import Path
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

from helpers import ROOT, cpu_env, flag_args, run_script
from lseg_jax import checkpoint, predict, workdir as workdir_lib

DEAD_PID = 2 ** 22 + 12345  # above Linux's pid_max default (4194304): never a live process


def write_lock(workdir: Path, age_s: float = 0.0, **holder) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / workdir_lib.LOCK
  path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "earlier", **holder}))
  os.utime(path, (time.time() - age_s,) * 2)


def test_a_live_holder_is_refused_naming_it(tmp_path):
  held = workdir_lib.RunLock(tmp_path)
  assert held.acquire() is None
  with pytest.raises(workdir_lib.WorkdirError, match=rf"in use by another train.py \(host {socket.gethostname()}, "
                                                     rf"pid {os.getpid()}, since "):
    workdir_lib.RunLock(tmp_path).acquire()
  held.release()
  assert not (tmp_path / workdir_lib.LOCK).exists()
  again = workdir_lib.RunLock(tmp_path)
  assert again.acquire() is None
  again.release()


@pytest.mark.parametrize("holder,age_s,taken", [
    (dict(pid=DEAD_PID), 0.0, True),  # this host, the process is gone (kill -9)
    (dict(pid_start="0"), 0.0, True),  # this host, our pid recycled by another process
    (dict(host="lost-host", pid=1), workdir_lib.LOCK_STALE_S + 5, True),  # another host, no heartbeat
    (dict(host="other-host", pid=1), 1.0, False),  # another host, alive (touched a second ago)
], ids=["dead_pid", "recycled_pid", "lost_host", "live_other_host"])
def test_a_dead_runs_lock_is_taken_over_and_a_live_ones_is_not(tmp_path, holder, age_s, taken):
  write_lock(tmp_path, age_s, **holder)
  lock = workdir_lib.RunLock(tmp_path)
  if taken:
    note = lock.acquire()
    assert note and "no longer alive" in note and str(holder.get("pid", os.getpid())) in note, note
    assert json.loads((tmp_path / workdir_lib.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
  else:
    with pytest.raises(workdir_lib.WorkdirError, match="other-host"):
      lock.acquire()
    assert json.loads((tmp_path / workdir_lib.LOCK).read_text())["host"] == "other-host"


def test_the_holder_keeps_its_lock_fresh(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, "LOCK_HEARTBEAT_S", 0.05)
  lock = workdir_lib.RunLock(tmp_path)
  lock.acquire()
  path = tmp_path / workdir_lib.LOCK
  os.utime(path, (time.time() - 1000,) * 2)
  time.sleep(0.5)
  assert time.time() - path.stat().st_mtime < 1.0
  lock.release()


def run_eval(workdir: Path) -> subprocess.CompletedProcess:
  env = cpu_env(1, compile_cache=False)
  return subprocess.run([sys.executable, str(ROOT / "eval.py"), "--workdir", str(workdir), "--out",
                         str(workdir.parent / "scores.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def test_a_second_run_on_a_live_workdir_is_refused_and_readers_are_not(shapes_config, tmp_path):
  """train.py twice on one workdir: the second exits 2 with one line naming
  the first (host, pid, since) and writes nothing; eval.py reads the newest
  finished checkpoint meanwhile; the first run goes on and ends normally."""
  workdir = tmp_path / "run"
  args = flag_args(shapes_config, total_steps=10000, ckpt_every=3, log_every=1)
  first = run_script(["--workdir", str(workdir), *args])
  deadline = time.time() + 400
  for line in first.stdout:
    if line.startswith("[4/"):
      break
    assert time.time() < deadline and first.poll() is None
  while not checkpoint.finished_steps(workdir):
    time.sleep(0.05)
  before = {p.name: p.read_bytes() for p in workdir.glob("*.json")}
  second = run_script(["--workdir", str(workdir), *args])
  out, _ = second.communicate(timeout=300)
  errors = [l for l in out.splitlines() if l.startswith("error:")]
  assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
  assert f"pid {first.pid}" in errors[0] and socket.gethostname() in errors[0] and "since" in errors[0], errors
  assert {p.name: p.read_bytes() for p in workdir.glob("*.json")} == before

  newest = checkpoint.latest_step(workdir)
  scored = run_eval(workdir)
  assert scored.returncode == 0, (scored.stdout + scored.stderr)[-3000:]
  scores = json.loads((tmp_path / "scores.json").read_text())
  assert scores["step"] >= newest and scores["mIoU"] >= 0.0, scores  # the newest finished checkpoint
  image = tmp_path / "photo.png"
  PIL.Image.fromarray(np.full((40, 56, 3), 200, np.uint8)).save(image)
  assert predict.main(["--checkpoint", str(workdir), "--labels", "background,circle", "--out",
                       str(tmp_path / "predicted"), str(image)]) == 0
  assert np.load(tmp_path / "predicted" / "photo.png_ids.npy").shape == (40, 56)

  first.terminate()
  first.communicate(timeout=300)
  assert first.returncode == 143 and not (workdir / workdir_lib.LOCK).exists()


def test_two_runs_started_at_once_one_trains_one_is_refused(shapes_config, tmp_path):
  args = ["--workdir", str(tmp_path / "run"), *flag_args(shapes_config, total_steps=4, ckpt_every=2)]
  procs = [run_script(args), run_script(args)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert sorted(p.returncode for p in procs) == [0, 2], [o[-2000:] for o in outs]
  refused = outs[[p.returncode for p in procs].index(2)]
  assert "in use by another train.py" in refused and "Traceback" not in refused
  assert checkpoint.finished_steps(tmp_path / "run") == [4, 2]
