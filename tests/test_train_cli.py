"""train.py's promises beyond test_train.py and test_run_safety.py, through
its command line: pre-trained initialisation (`init.*`) is what the first
step starts from, a resume may change how the run goes (log_every,
ckpt_every, keep_ckpts) without a flag, and two faults (a non-finite loss, a
background save that fails mid-write) end with exit status 1, one line, and
the earlier checkpoints kept. The runs that use conftest's finished run's
flags compile nothing (the shared compilation cache).
"""

import json
import re
import shutil

import flax
import numpy as np

from helpers import flag_args, losses_by_step, random_variables, restorable_steps, run_script, tiny_config
from lseg_jax import checkpoint
from lseg_jax.convert import rules as R


def run_train(workdir, shapes_config, prelude: str | None = None, **overrides) -> tuple[int, str]:
  """(exit status, output) of train.py on `workdir` with the tiny flags and
  `overrides`, in a subprocess. With the flags of conftest's finished run
  (lr, total_steps, the optimizer) it compiles nothing: the compilations are
  in the shared cache."""
  proc = run_script(["--workdir", str(workdir), *flag_args(shapes_config, **overrides)], prelude=prelude)
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def official_arrays(variables: dict, rules) -> dict[str, np.ndarray]:
  """The arrays of `variables` that `rules` name, under their official
  (PyTorch) keys and in their layouts: a pre-trained checkpoint's file."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(variables, sep="/").items():
    if (hit := R.official_name(rules, path)) is not None:
      name, rule = hit
      out[name] = rule.to_official(np.asarray(value))
  return out


def assert_same(got: dict, expected: dict) -> None:
  flat = flax.traverse_util.flatten_dict(expected, sep="/")
  assert flax.traverse_util.flatten_dict(got, sep="/").keys() == flat.keys()
  for path, value in flax.traverse_util.flatten_dict(got, sep="/").items():
    np.testing.assert_array_equal(value, flat[path], err_msg=path)


def first_step_start(workdir) -> dict:
  """The parameters step 1 started from: checkpoint 1's, since the demo's
  warmup gives step 1 a zero learning rate (asserted: no update)."""
  logged = losses_by_step(workdir)[1]
  assert logged["lr"] == 0.0 and logged["update_norm"] == 0.0, logged
  return checkpoint.load_model(workdir, step=1)[1]["params"]  # the text tower too (text_encoder/)


# Every step saved (and kept): checkpoint 1 exists.
EVERY_STEP = dict(ckpt_every=1, keep_ckpts=6)


def test_init_model_dir_is_what_the_first_step_starts_from(finished_run, shapes_config, tmp_path):
  model = tiny_config(shapes_config).model
  weights = random_variables(model, 11)
  init = checkpoint.save_model(tmp_path / "init", weights, model)
  code, out = run_train(tmp_path / "run", shapes_config, **EVERY_STEP, **{"init.model_dir": init})
  assert code == 0, out[-3000:]
  assert_same(first_step_start(tmp_path / "run"), weights["params"])


def test_init_vit_and_clip_text_are_what_the_first_step_starts_from(finished_run, shapes_config, tmp_path):
  """A timm ViT state dict and OpenAI CLIP text weights (.npz): the backbone
  and the text tower start from them, the decoder at random."""
  weights = random_variables(tiny_config(shapes_config).model, 12)
  np.savez(tmp_path / "vit.npz", **official_arrays(weights, list(R.vit_rules(prefix=""))))
  np.savez(tmp_path / "clip.npz", **official_arrays(weights, list(R.clip_text_rules(prefix=""))))
  code, out = run_train(tmp_path / "run", shapes_config, **EVERY_STEP,
                        **{"init.vit": tmp_path / "vit.npz", "init.clip_text": tmp_path / "clip.npz"})
  assert code == 0, out[-3000:]
  start = first_step_start(tmp_path / "run")
  for part in ("backbone", "text_encoder"):
    assert_same(start[part], weights["params"][part])
  fusion = flax.traverse_util.flatten_dict(weights["params"]["fusion"])
  assert not any(np.array_equal(v, fusion[k]) for k, v in flax.traverse_util.flatten_dict(start["fusion"]).items())


def test_a_resume_may_change_how_the_run_goes_without_a_flag(finished_run, shapes_config, tmp_path):
  """From checkpoint 4 of conftest's run with other log_every, ckpt_every and
  keep_ckpts (no --allow_config_change): step 6 has the loss of the
  uninterrupted run, the config records the new values."""
  workdir = shutil.copytree(finished_run, tmp_path / "run")
  shutil.rmtree(workdir / "checkpoints" / "6")  # as if stopped after checkpoint 4
  lines = len((workdir / "metrics.jsonl").read_text().splitlines())
  code, out = run_train(workdir, shapes_config, log_every=2, ckpt_every=3, keep_ckpts=5)
  assert code == 0, out[-3000:]
  assert "resumed from step 4" in out and "config changes" not in out, out[-3000:]
  resumed = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()[lines:]]
  assert [m["step"] for m in resumed if "loss" in m] == [6]  # log_every 2
  assert [m["loss"] for m in resumed if "loss" in m] == [losses_by_step(finished_run)[6]["loss"]]
  assert checkpoint.finished_steps(workdir) == [6, 4, 2]  # 6 saved at the end; keep_ckpts 5 keeps 2
  assert json.loads((workdir / "config.json").read_text())["log_every"] == 2


def error_lines(out: str) -> list[str]:
  return [line for line in out.splitlines() if line.startswith("error:")]


def test_a_non_finite_loss_exits_1_and_keeps_the_checkpoints(shapes_config, tmp_path):
  code, out = run_train(tmp_path, shapes_config, optax_name="sgd", lr=1e12, total_steps=20, ckpt_every=2)
  assert code == 1, out[-3000:]
  errors = error_lines(out)
  assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
  assert errors[0].startswith("error: loss is ") and "the checkpoints before it are kept" in errors[0], errors
  step = int(re.search(r"at step (\d+)", errors[0]).group(1))
  assert step > 2 and restorable_steps(tmp_path) == list(range(2, step, 2)), out[-3000:]  # none at or after it


# Fault injection, run in train.py's process: the background write of
# checkpoint 4's state fails once its arrays are written, before its metadata
# (orbax's pytree handler writes the metadata after the array commits).
FAIL_SAVE_4 = """
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler as handler
write_metadata = handler.BasePyTreeCheckpointHandler._write_metadata_file
async def fail_at_step_4(self, directory, **kwargs):
  if directory.parent.name.startswith("4."):
    raise OSError(28, "No space left on device (injected)")
  return await write_metadata(self, directory, **kwargs)
handler.BasePyTreeCheckpointHandler._write_metadata_file = fail_at_step_4
"""


def test_a_background_save_failing_mid_write_exits_1_naming_the_last_good_checkpoint(finished_run, shapes_config,
                                                                                       tmp_path):
  code, out = run_train(tmp_path, shapes_config, prelude=FAIL_SAVE_4)
  assert code == 1, out[-3000:]
  errors = error_lines(out)
  assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
  assert "No space left on device (injected)" in errors[0], errors
  assert f"the last good checkpoint is step 2 in {tmp_path / 'checkpoints'}" in errors[0], errors
  assert "saving checkpoint 4 failed" in errors[0], errors
  assert restorable_steps(tmp_path) == [2]  # the half-written step 4 is no step
