"""train.py end to end: the tiny model on the tiny lseg_shapes build, on CPU.

In-process runs use the 8 virtual devices of conftest.py; subprocess runs get
their device count from XLA_FLAGS.
"""

import json
import time

import jax
import numpy as np
import pytest

from helpers import flag_args, losses_by_step, run_script, tiny_config, train
from lseg_jax import checkpoint, data, losses
from lseg_jax.segmenter import Segmenter


@pytest.fixture(scope="module")
def reference(finished_run) -> dict[int, dict]:
  """The losses of an uninterrupted 6-step run on one device (conftest)."""
  return losses_by_step(finished_run)


def own_and_other_masks_loss(workdir, config) -> tuple[float, float]:
  """The trained model's validation loss on 16 images against their own masks,
  and against the next image's masks. A model that ignores the image, even
  one that learnt where shapes tend to lie, scores both the same."""
  seg = Segmenter.load(workdir)
  batch = next(iter(data.make_loader(config.input, "validation", global_batch_size=16, seed=0, train=False,
                                     shard_index=0, shard_count=1)))  # images normalised, masks label positions
  text = seg.encode_labels(data.label_names(config.input), config.prompt_templates)[batch["label_ids"]]  # [B, N, D]
  logits = jax.jit(seg.model.apply)(seg.params, batch["image"], text, batch["label_mask"])  # [B, H, W, N]
  own = losses.pixel_cross_entropy(logits, batch["mask"], batch["label_mask"])[0]
  other = losses.pixel_cross_entropy(logits, np.roll(batch["mask"], 1, axis=0), batch["label_mask"])[0]
  return float(own), float(other)


def test_loss_falls_and_the_run_leaves_a_checkpoint(shapes_config, tmp_path):
  """60 steps at the demo's learning rate, after a 5-step warmup. The tiny
  ViT still predicts background almost everywhere then (measured: the label
  maps of a 150-step run are 0.11 mIoU, background everywhere is 0.104), so
  what it must show is that it reads the image: its validation loss against
  each image's own masks is below its loss against another image's. (A
  validation loss below the class-frequency entropy is not enough: the same
  run fed zeros for images, learning only where shapes tend to lie, beat it.)"""
  config = tiny_config(shapes_config, total_steps=60, log_every=5, ckpt_every=0, lr=1e-2)
  config.schedule.warmup_steps = 5
  scores = train.train_and_evaluate(config, tmp_path)
  logged = losses_by_step(tmp_path)
  assert logged[60]["loss"] < 0.7 * logged[5]["loss"], {s: m["loss"] for s, m in logged.items()}
  own, other = own_and_other_masks_loss(tmp_path, config)
  assert abs(own - scores["loss"]) < 1e-4, (own, scores)  # the 16 images are the validation split
  assert own < other - 0.01, (own, other)  # measured 0.953 against 0.976; the zero-image run: equal
  assert (tmp_path / "checkpoints" / "60").is_dir()
  assert json.loads((tmp_path / "model_config.json").read_text())["backbone"] == "tiny"
  assert list((tmp_path / "tb").iterdir())  # TensorBoard events


def test_resume_is_exact_after_kill_9_and_after_a_corrupt_checkpoint(shapes_config, reference, tmp_path):
  # The evaluation at step 4 compiles its step (seconds): the kill lands in
  # it, after checkpoint 4 and before step 5. eval_every does not change
  # the losses, so the reference run is comparable.
  proc = run_script(["--workdir", str(tmp_path), *flag_args(shapes_config, eval_every=4)])
  deadline = time.time() + 300
  while not (tmp_path / "checkpoints" / "4").is_dir():  # a finalised checkpoint (orbax renames at the end)
    assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
    time.sleep(0.05)
  proc.kill()  # SIGKILL: no chance to save
  proc.communicate()
  assert checkpoint.finished_steps(tmp_path)[0] == 4, "the kill landed after step 4's evaluation"
  resumed = run_script(["--workdir", str(tmp_path), *flag_args(shapes_config)])
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out[-3000:]
  assert "resumed from step 4" in out and "took over" in out  # the killed run's lock: its pid is gone
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


def test_nonfinite_loss_stops_naming_the_step(shapes_config, tmp_path):
  config = tiny_config(shapes_config, total_steps=20, ckpt_every=0, optax_name="sgd", lr=1e12)
  with pytest.raises(train.NonFiniteLoss, match=r"at step \d+"):
    train.train_and_evaluate(config, tmp_path)
