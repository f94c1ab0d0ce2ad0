"""`python -m lseg_jax.export`: the deserialized artifact gives the logits
and text embeddings of the Flax model for any batch and label count, and
eval.py and predict use it as they use the checkpoint."""

import json

import jax
import numpy as np
from PIL import Image
import pytest

from helpers import DEMO, eval_cli, random_variables
from lseg_jax import checkpoint, export, predict, tokenizer
from lseg_jax.models import LSeg, build_model, get_model_config

pytest.importorskip("flatbuffers", reason="jax.export serialization needs the flatbuffers package")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(model config, variables, model dir, artifact path): the tiny model exported at 64 px."""
  tmp = tmp_path_factory.mktemp("export")
  config = get_model_config("tiny")
  variables = random_variables(config, 3)
  model_dir = checkpoint.save_model(tmp / "model", variables, config)
  assert export.main(["--checkpoint", str(model_dir), "--out", str(tmp / "tiny.jaxexport"), "--window", "64"]) == 0
  return config, variables, model_dir, tmp / "tiny.jaxexport"


@pytest.mark.parametrize("batch, labels", [(1, 2), (3, 5)])
def test_artifact_gives_the_logits_of_the_model(exported, batch, labels):
  config, variables, _, path = exported
  artifact, model = export.load(path), build_model(config)
  rng = np.random.default_rng(batch)
  images = rng.normal(size=(batch, 64, 64, 3)).astype(np.float32)
  text = rng.normal(size=(batch, labels, config.text.embed_dim)).astype(np.float32)
  label_mask = np.ones((batch, labels), bool)
  label_mask[0, -1] = batch == 1  # a padded label in the second case
  image_vars = {"params": {k: v for k, v in variables["params"].items() if k != "text_encoder"},
                "batch_stats": variables["batch_stats"]}
  expected = np.asarray(jax.jit(model.apply)(image_vars, images, text, label_mask))  # jitted: eager is slow
  got = np.asarray(artifact.segment.call(images, text, label_mask))
  assert got.shape == (batch, 64, 64, labels)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())

  ids = tokenizer.tokenize([f"label {i}" for i in range(labels)])
  text_expected = jax.jit(lambda p, i: model.apply(p, i, method=LSeg.encode_text))(
      {"params": {"text_encoder": variables["params"]["text_encoder"]}}, ids)
  np.testing.assert_allclose(artifact.encode_text.call(ids), text_expected, rtol=1e-5, atol=1e-5)


def test_artifact_carries_what_a_user_needs(exported):
  *_, path = exported
  artifact = export.load(path)
  assert artifact.window == 64 and artifact.meta["platforms"] == ["cpu", "cuda", "tpu"]
  assert artifact.meta["normalization"] == "clip" and artifact.meta["mean"] == [0.5, 0.5, 0.5]
  assert artifact.meta["context_length"] == 77 and artifact.meta["model"]["backbone"] == "tiny"
  assert set(artifact.segment.platforms) == {"cpu", "cuda", "tpu"}


def test_eval_scores_the_artifact_as_the_checkpoint(exported, shapes_config, tmp_path, capsys):
  _, _, model_dir, path = exported
  common = ["--config", DEMO, "--config.evals.batch_size=8", "--config.input.crop_size=64",
            *(f"--config.input.{k}={v}" for k, v in shapes_config.items() if k != "crop_size")]
  assert eval_cli.main(["eval.py", "--checkpoint", str(model_dir), *common, "--out", str(tmp_path / "a.json")]) == 0
  assert eval_cli.main(["eval.py", "--exported", str(path), *common, "--out", str(tmp_path / "b.json")]) == 0
  a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
  assert b["mIoU"] == pytest.approx(a["mIoU"], abs=1e-6) and b["pixAcc"] == pytest.approx(a["pixAcc"], abs=1e-6)
  assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
  capsys.readouterr()


@pytest.mark.parametrize("args, expected", [
    (["--window", "50"], "--window 50 is not a positive multiple of 32"),
    (["--platforms", "cpu,gpu"], "--platforms 'cpu,gpu'"),
])
def test_export_user_errors_are_one_line(exported, tmp_path, capsys, args, expected):
  _, _, model_dir, _ = exported
  rc = export.main(["--checkpoint", str(model_dir), "--out", str(tmp_path / "x"), *args])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith("error: ") and expected in err and "\n" not in err


def test_eval_refuses_an_artifact_of_another_window(exported, capsys):
  *_, path = exported
  rc = eval_cli.main(["eval.py", "--exported", str(path), "--config", DEMO])  # the demo's crop is 96
  err = capsys.readouterr().err
  assert rc == 2 and "runs 64 px windows, input.crop_size is 96: export with --window 96" in err


def test_predict_exported_gives_the_labels_of_the_checkpoint(exported, tmp_path, capsys):
  """python -m lseg_jax.predict --exported FILE writes the label ids (and
  logits) --checkpoint writes for the model it was exported from: 64 px
  windows without the square resize, two images of other sizes, a prompt
  ensemble (the artifact's text tower)."""
  _, _, model_dir, path = exported
  rng = np.random.default_rng(0)
  for name, hw in (("a.png", (50, 90)), ("b.png", (64, 40))):
    Image.fromarray(rng.integers(0, 255, (*hw, 3), np.uint8)).save(tmp_path / name)
  common = ["--labels", "dog,cat,grass", "--template", "a photo of a {}.", "--template", "{}", "--no-square",
            "--base_size", "64", "--crop_size", "64", "--save_logits", str(tmp_path / "a.png"), str(tmp_path / "b.png")]
  assert predict.main(["--checkpoint", str(model_dir), "--out", str(tmp_path / "ckpt"), *common]) == 0
  assert predict.main(["--exported", str(path), "--out", str(tmp_path / "exp"), *common]) == 0
  capsys.readouterr()
  for name in ("a.png", "b.png"):
    ids = {kind: np.load(tmp_path / kind / f"{name}_ids.npy") for kind in ("ckpt", "exp")}
    logits = {kind: np.load(tmp_path / kind / f"{name}_logits.npy") for kind in ("ckpt", "exp")}
    np.testing.assert_allclose(logits["exp"], logits["ckpt"], rtol=1e-5, atol=1e-5 * np.abs(logits["ckpt"]).max())
    np.testing.assert_array_equal(ids["exp"], ids["ckpt"])


def test_an_artifact_sees_images_as_its_run_does(finished_run, tmp_path, capsys):
  """A training run's artifact records the run's input settings: the demo
  run squashes whole images to 64 x 64 ("resize"), and predict --exported
  without a geometry flag gives predict --checkpoint's labels (an artifact
  that did not record it fell back to 480 px windows: 42-84% agreement)."""
  path = tmp_path / "run.jaxexport"
  assert export.main(["--checkpoint", str(finished_run), "--out", str(path), "--platforms", "cpu"]) == 0
  assert export.load(path).meta["input"] == {"eval_mode": "resize", "base_size": 80, "crop_size": 64,
                                              "normalization": "clip"}
  rng = np.random.default_rng(1)
  for name, hw in (("a.png", (70, 120)), ("b.png", (130, 90))):
    Image.fromarray(rng.integers(0, 255, (*hw, 3), np.uint8)).save(tmp_path / name)
  common = ["--labels", "background,circle,square", "--save_logits", str(tmp_path / "a.png"), str(tmp_path / "b.png")]
  assert predict.main(["--checkpoint", str(finished_run), "--out", str(tmp_path / "ckpt"), *common]) == 0
  assert predict.main(["--exported", str(path), "--out", str(tmp_path / "exp"), *common]) == 0
  capsys.readouterr()
  for name in ("a.png", "b.png"):
    logits = {kind: np.load(tmp_path / kind / f"{name}_logits.npy") for kind in ("ckpt", "exp")}
    np.testing.assert_allclose(logits["exp"], logits["ckpt"], rtol=1e-5, atol=1e-5 * np.abs(logits["ckpt"]).max())
    np.testing.assert_array_equal(*(np.load(tmp_path / kind / f"{name}_ids.npy") for kind in ("ckpt", "exp")))
