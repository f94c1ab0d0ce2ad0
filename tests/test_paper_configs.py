"""The paper configs build, state their target, and train a few steps with
tiny overrides on fake ADE20K / PASCAL-5i trees (the real folder layouts)."""

import json
import subprocess

from etils import epath
import numpy as np
import pytest

from fake_trees import ade_tree
from helpers import ROOT, eval_cli, load_config, train
from helpers import pascal_fold  # noqa: F401  (a session fixture)
from lseg_jax import data, optim


def shrink(config, data_dir, manual_dir):
  """Tiny model, 64 px, batch 2 on one device, 2 steps; the rest as the paper config."""
  model = config.model
  config.model = train_tiny_model(model)
  config.input.update(dict(data_dir=str(data_dir), manual_dir=str(manual_dir), crop_size=64, base_size=72,
                           batch_size=2, worker_count=0))
  config.evals.batch_size = 2
  config.update(dict(total_epochs=0.0, total_steps=2, log_every=1, ckpt_every=0, mesh=(("data", 1),)))
  return config


def train_tiny_model(model):
  from lseg_jax.models import get_model_config
  return get_model_config("tiny" if model.kind == "vit" else "tiny_resnet", arch_option=model.arch_option,
                          block_depth=model.block_depth)


def test_ade20k_config_is_the_official_recipe_and_trains(tmp_path):
  config, doc = load_config("ade20k_lseg_vitl16.py")
  assert "47.3" in doc and "python train.py --config configs/ade20k_lseg_vitl16.py" in doc
  assert config.model.backbone == "clip_vitl16_384" and config.optax_name == "sgd"
  assert (config.momentum, config.wd, config.grad_accum_steps) == (0.9, 1e-4, 2)
  assert optim.base_learning_rate(config) == 0.001  # 0.004 / 16 x 4 per GPU (64 = 8 GPUs x 4 x 2 micro-batches)
  assert dict(config.lr_mults) == {"fusion": 10.0, "head": 10.0} and config.total_epochs == 240
  assert (config.input.crop_size, config.input.base_size) == (480, 520)
  ade_tree(epath.Path(tmp_path / "manual"))
  config = shrink(config, tmp_path / "tfds", tmp_path / "manual")
  config.grad_accum_steps = 2
  scores = train.train_and_evaluate(config, tmp_path / "run")
  assert 0.0 <= scores["mIoU"] <= 1.0


def test_fewshot_config_trains_on_episodes(tmp_path, pascal_fold, monkeypatch, capsys):
  config, doc = load_config("fewshot_lsegzs.py", "dataset=pascal5i,fold=0")
  assert config.paper_miou == 52.8 and config.model.backbone == "clip_resnet101"
  assert config.input.builder_config == "fold0" and config.input.normalization == "imagenet"
  # The official schedule: stop after 4 epochs, poly over max_epochs (200); the LR is the release's open point.
  assert (config.total_epochs, config.schedule.horizon_epochs) == (4.0, 200.0)
  assert config.input.batch_size == 16 and "lang-seg #36" in doc and "tools/lr_sweep.sh" in doc
  config = shrink(config, pascal_fold["input"]["data_dir"], pascal_fold["input"]["manual_dir"])
  config.input.update(dict(split="train", max_labels=2, batch_size=4))  # 2 episodes per step
  config.evals.split = "test"
  calls = []  # the loaders train.py builds
  make_loader = data.make_loader
  monkeypatch.setattr(data, "make_loader", lambda *a, **kw: calls.append((a, kw)) or make_loader(*a, **kw))
  scores = train.train_and_evaluate(config, tmp_path / "run")
  assert 0.0 <= scores["mIoU"] <= 1.0
  # The training batches, rebuilt from the same (deterministic) arguments:
  # 4 images = 2 (support, query) episodes of one class each, no ignored pixel.
  (args, kwargs), = [c for c in calls if c[1]["train"]]
  it = iter(make_loader(*args, **kwargs))
  for _ in range(config.total_steps):
    batch = next(it)
    assert batch["image"].shape[0] == 4
    np.testing.assert_array_equal(batch["label_ids"][0::2], batch["label_ids"][1::2])
    assert not np.array_equal(batch["image"][0], batch["image"][1]) and (batch["mask"] >= 0).all()
  # eval.py's zero-shot protocol on the same run: HSNet mIoU and FB-IoU over the fold's test classes.
  assert eval_cli.main(["eval.py", "--workdir", str(tmp_path / "run"), "--protocol", "fewshot"]) == 0, (
      capsys.readouterr().err[-3000:])
  result = json.loads((tmp_path / "run" / "eval_fewshot_test.json").read_text())
  assert 0.0 <= result["mIoU"] <= 100.0 and 0.0 <= result["FB-IoU"] <= 100.0
  assert set(result["IoU"]) == {"aeroplane", "bicycle", "bird", "boat", "bottle"}  # fold 0's test classes


@pytest.mark.parametrize("args", [[], ["configs/fewshot_lsegzs.py", "/tmp/sweep"],
                                  ["configs/fewshot_lsegzs.py", "/tmp/sweep", " "]], ids=["none", "no_lrs", "blank_lrs"])
def test_fewshot_lr_sweep_command_is_checked(args):
  """tools/lr_sweep.sh, the documented sweep: a wrong call is one error line and exit code 2."""
  proc = subprocess.run(["bash", str(ROOT / "tools" / "lr_sweep.sh"), *args], capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match="'folds=1'.*'fold'"):
    load_config("fewshot_lsegzs.py", "folds=1")
  with pytest.raises(ValueError, match="'fold'.*expected key=value"):
    load_config("fewshot_lsegzs.py", "fold")
  with pytest.raises(ValueError, match="backbone"):
    load_config("demo.py", "backbone=vit_huge")
  assert load_config("demo.py", "backbone=tiny")[0].model.kind == "vit"
  assert load_config("demo.py")[0].model.backbone == "small_resnet"
