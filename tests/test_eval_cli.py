"""eval.py as a user meets it: bad command lines and damaged checkpoints give
one `error:` line and exit code 2 before anything compiles; a damaged latest
checkpoint is skipped (and left on disk) for the previous one; scores are
printed before they are written, atomically, never into a model directory.

The training workdir is written here with orbax as train.py lays it out
(config.json, model_config.json, text_encoder/, checkpoints/<step>/state with
optimizer state), so these tests do not depend on train.py.
"""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import flax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from helpers import DEMO, ROOT, demo, eval_cli, random_variables
from lseg_jax import checkpoint
from lseg_jax.models import get_model_config


def save_steps(workdir: Path, steps: dict[int, dict]) -> None:
  """checkpoints/<step>/state as train.py's CheckpointManager writes it."""
  handlers = {"state": ocp.StandardCheckpointHandler()}
  with ocp.CheckpointManager(workdir / "checkpoints", item_handlers=handlers) as manager:
    for step, variables in steps.items():
      params = {k: v for k, v in variables["params"].items() if k != "text_encoder"}
      state = {"params": params, "batch_stats": variables["batch_stats"],
               "opt": optax.adam(1e-3).init(params), "step": np.int32(step)}
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))


def truncate_files(directory: Path) -> None:
  """Cuts every file under `directory` to a third (a damaged disk)."""
  for f in directory.rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def snapshot(directory: Path) -> dict[Path, tuple[int, int]]:
  """(size, mtime) of everything under `directory`: equal snapshots mean
  nothing was written, moved or deleted."""
  return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


@pytest.fixture(scope="module")
def run_config(shapes_config):
  config = demo.get_config("backbone=tiny")
  config.input.update(shapes_config)
  config.evals.batch_size = 8  # a multiple of the 8 test devices
  return config


@pytest.fixture(scope="module")
def steps(run_config) -> dict[int, dict]:
  return {2: random_variables(run_config.model, 2), 4: random_variables(run_config.model, 4)}


@pytest.fixture(scope="module")
def workdir(run_config, steps, tmp_path_factory) -> Path:
  """A training workdir with finished checkpoints 2 and 4."""
  workdir = tmp_path_factory.mktemp("workdir")
  (workdir / checkpoint.RUN_CONFIG).write_text(run_config.to_json_best_effort(indent=2))
  (workdir / checkpoint.MODEL_CONFIG).write_text(run_config.model.to_json(indent=2))
  checkpoint.save_text_encoder(workdir, steps[2]["params"]["text_encoder"])
  save_steps(workdir, steps)
  return workdir


def run_main(capsys, *args) -> tuple[int, str, str]:
  rc = eval_cli.main(["eval.py", *map(str, args)])
  out, err = capsys.readouterr()
  return rc, out, err


def assert_same(a, b):
  for path, x in flax.traverse_util.flatten_dict(a).items():
    np.testing.assert_array_equal(flax.traverse_util.flatten_dict(b)[path], x, err_msg=str(path))


# --- load_model: read-only fallback, partial restore, short mismatch message ------------------


def test_load_model_skips_a_damaged_latest_step_and_leaves_it(workdir, steps, tmp_path, capsys):
  damaged = shutil.copytree(workdir, tmp_path / "w")
  truncate_files(damaged / "checkpoints" / "4")
  before = snapshot(damaged)
  config, variables = checkpoint.load_model(damaged)
  assert config.backbone == "tiny"
  assert_same(variables, steps[2])  # step 2's params and BN statistics, the shared text tower
  assert "warning: checkpoint 4 in" in capsys.readouterr().err
  assert snapshot(damaged) == before


def test_load_model_explicit_step(workdir, steps):
  assert_same(checkpoint.load_model(workdir, step=2)[1], steps[2])
  assert_same(checkpoint.load_model(workdir)[1]["params"]["backbone"], steps[4]["params"]["backbone"])
  with pytest.raises(FileNotFoundError, match=r"no finished checkpoint 3 \(it has 4, 2\)"):
    checkpoint.load_model(workdir, step=3)


def test_load_model_never_reads_the_optimizer_state(workdir, steps, tmp_path):
  """Saved without OCDBT every array has its own chunk files: with the
  optimizer moments' chunks overwritten by garbage (which a full restore
  fails on), the model still loads, so they are never read."""
  w = tmp_path / "w"
  shutil.copytree(workdir, w, ignore=shutil.ignore_patterns("checkpoints"))
  params = {k: v for k, v in steps[2]["params"].items() if k != "text_encoder"}
  state = {"params": params, "batch_stats": steps[2]["batch_stats"], "opt": optax.adam(1e-3).init(params),
           "step": np.int32(2)}
  with ocp.PyTreeCheckpointer(use_ocdbt=False) as ckptr:
    ckptr.save(w / "checkpoints" / "2" / "state", state)
  chunks = [p for p in (w / "checkpoints" / "2" / "state").glob("opt.*/*") if not p.name.startswith(".")]
  assert len(chunks) > 100
  for p in chunks:
    p.write_bytes(b"garbage")
  assert_same(checkpoint.load_model(w)[1], steps[2])


def test_weights_of_another_backbone_are_one_short_message(steps, tmp_path):
  model_dir = checkpoint.save_model(tmp_path / "m", steps[2], get_model_config("tiny"))
  (model_dir / checkpoint.MODEL_CONFIG).write_text(get_model_config("tiny_resnet").to_json())
  with pytest.raises(checkpoint.CheckpointMismatch) as e:
    checkpoint.load_model(model_dir)
  message = str(e.value)
  assert "backbone tiny_resnet; the weights look like tiny" in message
  assert "params/fusion/layer1_rn/kernel is [3, 3, 8, 16], the model's [3, 3, 16, 16]" in message
  assert "\n" not in message and len(message) < 500


# --- eval.py: one line and exit code 2 for every user mistake ---------------------------------


def bad_inputs(tmp: Path, workdir: Path, steps: dict) -> dict[str, tuple[list, str]]:
  """case -> (arguments, what the error line must say); files made in `tmp`."""
  (tmp / "file.txt").write_text("x")
  (tmp / "outdir").mkdir()
  bare = tmp / "bare"  # configs but no checkpoint
  bare.mkdir()
  for name in (checkpoint.RUN_CONFIG, checkpoint.MODEL_CONFIG):
    shutil.copy(workdir / name, bare / name)
  all_damaged = shutil.copytree(workdir, tmp / "damaged")
  truncate_files(all_damaged / "checkpoints")
  model_dir = checkpoint.save_model(tmp / "model", steps[2], get_model_config("tiny"))
  garbage = checkpoint.save_model(tmp / "garbage", steps[2], get_model_config("tiny"))
  truncate_files(garbage / "variables")
  other = checkpoint.save_model(tmp / "other", steps[2], get_model_config("tiny"))
  (other / checkpoint.MODEL_CONFIG).write_text(get_model_config("tiny_resnet").to_json())
  w = ["--workdir", workdir]
  return {
      "no_model": ([], "give --workdir"),
      "workdir_is_a_file": (["--workdir", tmp / "file.txt"], f"--workdir {tmp / 'file.txt'} is a file"),
      "missing_workdir": (["--workdir", tmp / "nope"], f"--workdir {tmp / 'nope'} does not exist"),
      "missing_checkpoint_dir": (["--checkpoint", tmp / "nope", "--config", DEMO], "does not exist"),
      "no_finished_checkpoint": (["--workdir", bare], f"{bare} holds no model"),
      "every_checkpoint_damaged": (["--workdir", all_damaged], "no readable checkpoint in"),
      "garbage_model_dir": (["--checkpoint", garbage, "--config", DEMO], f"{garbage / 'variables'} is unreadable"),
      "model_of_another_backbone": (["--checkpoint", other, "--config", DEMO],
                                    "(backbone tiny_resnet; the weights look like tiny)"),
      "model_dir_without_config": (["--checkpoint", model_dir], f"give --config: {model_dir} holds no config.json"),
      "config_typo": ([*w, "--config", DEMO, "--config.evals.splitt=x"],
                      "unknown config key 'evals.splitt'; did you mean evals.split, input.split?"),
      "config_argument_typo": ([*w, "--config", f"{ROOT / 'configs' / 'demo.py'}:backbon=tiny"], "backbon=tiny"),
      "missing_config_file": ([*w, "--config", tmp / "nope.py"], "nope.py"),
      "unknown_protocol": ([*w, "--protocol", "dense"], "--protocol=dense"),
      "fewshot_on_a_segmentation_set": ([*w, "--protocol", "fewshot"], "needs a few-shot dataset"),
      "unknown_flag": ([*w, "--ouput", "x.json"], "ouput"),
      "positional_argument": ([*w, "extra"], "unexpected argument 'extra'"),
      "out_is_a_directory": ([*w, "--out", tmp / "outdir"], f"--out {tmp / 'outdir'} is a directory"),
      "out_under_a_file": ([*w, "--out", tmp / "file.txt" / "s.json"], f"{tmp / 'file.txt'} is a file"),
  }


CASES = ["no_model", "workdir_is_a_file", "missing_workdir", "missing_checkpoint_dir", "no_finished_checkpoint",
         "every_checkpoint_damaged", "garbage_model_dir", "model_of_another_backbone", "model_dir_without_config",
         "config_typo", "config_argument_typo", "missing_config_file", "unknown_protocol",
         "fewshot_on_a_segmentation_set", "unknown_flag", "positional_argument", "out_is_a_directory",
         "out_under_a_file"]


@pytest.fixture(scope="module")
def bad(workdir, steps, tmp_path_factory) -> dict[str, tuple[list, str]]:
  return bad_inputs(tmp_path_factory.mktemp("bad"), workdir, steps)


@pytest.mark.parametrize("case", CASES)
def test_eval_user_mistake_is_one_line_and_exit_2(bad, case, capsys):
  args, expected = bad[case]
  rc, out, err = run_main(capsys, *args)
  lines = [line for line in err.splitlines() if line.strip()]
  errors = [line for line in lines if not line.startswith("warning: checkpoint")]  # damaged steps are named
  assert rc == 2 and out == ""
  assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], err


@pytest.mark.parametrize("args, expected", [(["--workdir", "file.txt"], "is a file, not a directory"),
                                            (["--workdir", ".", "--protocol", "dense"], "--protocol=dense")],
                         ids=["bad_workdir", "bad_flag"])
def test_eval_error_reaches_the_terminal_without_a_traceback(tmp_path, args, expected):
  (tmp_path / "file.txt").write_text("x")
  proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert expected in lines[0]


# --- eval.py end to end -----------------------------------------------------------------------


def test_damaged_latest_checkpoint_is_skipped_read_only(workdir, steps, shapes_config, tmp_path, monkeypatch,
                                                       capsys):
  """The damaged workdir gives the scores of step 2 (as its converted model
  does), keeps step 4 on disk, and a --checkpoint run writes into the current
  directory, not into the model directory."""
  damaged = shutil.copytree(workdir, tmp_path / "w")
  truncate_files(damaged / "checkpoints" / "4")
  before = snapshot(damaged)
  rc, out, err = run_main(capsys, "--workdir", damaged)
  assert rc == 0, err
  assert "warning: checkpoint 4 in" in err and "(JSONDecodeError)" in err
  result = damaged / "eval_single_validation.json"
  assert {p: v for p, v in snapshot(damaged).items() if p != result} == before  # only the scores written
  from_workdir = json.loads(result.read_text())
  assert out.index("lseg_shapes validation (single): ") < out.index("wrote ")  # scores, then the file

  model_dir = checkpoint.save_model(tmp_path / "m", steps[2], get_model_config("tiny"))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  rc, _, err = run_main(capsys, "--checkpoint", model_dir, "--config", DEMO, "--config.evals.batch_size=8",
                        *(f"--config.input.{k}={v}" for k, v in shapes_config.items()))
  assert rc == 0, err
  assert sorted(p.name for p in model_dir.iterdir()) == [checkpoint.MODEL_CONFIG, "variables"]
  from_model = json.loads((cwd / "eval_m_single_validation.json").read_text())
  assert (from_workdir["step"], from_model["step"]) == (2, None)  # the step scored, after the fallback
  assert from_workdir["model"] == str(damaged) and from_model["model"] == str(model_dir)
  drop = lambda scores: {k: v for k, v in scores.items() if k not in ("model", "step")}
  assert drop(from_model) == drop(from_workdir) and 0.0 <= from_model["mIoU"] <= 1.0


def test_scores_are_printed_when_writing_them_fails(workdir, tmp_path, monkeypatch, capsys):
  out_file = tmp_path / "scores.json"

  def read_only_fs(*_):
    raise OSError(30, "Read-only file system")

  monkeypatch.setattr(os, "replace", read_only_fs)
  rc, out, err = run_main(capsys, "--workdir", workdir, "--out", out_file)
  assert rc == 2
  assert "lseg_shapes validation (single): pixAcc=" in out and "wrote" not in out
  assert err.strip() == f"error: cannot write scores to {out_file}: Read-only file system"
  assert list(tmp_path.iterdir()) == []  # no half-written or temporary file left
