"""Golden parity: our port against outputs of the official PyTorch LSeg.

For every fixture `*.json` + `*.npz` in $LSEG_GOLDEN_DIR (default
`../shared/golden` beside the repository): regenerate the official state_dict
from the fixture's weight recipe, convert it with our converter, run our model
on the fixture's input and labels, and compare every stored array within the
README's relative tolerances (max|ours - ref| / max|ref|).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golden_utils import GOLDEN_DIR, check_fixtures_present, fixtures, regenerate_state_dict
from lseg_jax import convert, tokenizer
from lseg_jax.models import build_model

FIXTURES = fixtures(GOLDEN_DIR, "*.json")
# README "Tolerances": float32 arrays 1e-4; the float16-stored arrays 5e-3.
TOLERANCE = {np.dtype("float32"): 1e-4, np.dtype("float16"): 5e-3}
INPUTS = ("input", "token_ids", "class_info")


def labels_of(fixture: dict) -> list[list[str]] | list[str]:
  """One label list for LSegNet; per image ['others', class] for the zero-shot nets."""
  if "label_list" in fixture:
    return [["others", fixture["label_list"][c]] for c in fixture["class_info"]]
  return fixture["labels"]


def nchw(x: jax.Array) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def run_port(fixture: dict, ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our model's versions of the fixture's arrays, in the fixture's layouts."""
  config = convert.model_config_from_official(**fixture["config"])
  variables = convert.convert_lseg(regenerate_state_dict(fixture), config)
  model = build_model(config)
  labels = labels_of(fixture)
  token_ids = (np.stack([tokenizer.tokenize(l) for l in labels]) if isinstance(labels[0], list)
               else tokenizer.tokenize(labels))
  np.testing.assert_array_equal(token_ids, ref["token_ids"])
  images = jnp.asarray(ref["input"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  with jax.default_matmul_precision("highest"):
    text = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(variables, token_ids)
    logits, state = jax.jit(lambda v, x, t: model.apply(v, x, t, mutable=["intermediates"]))(
        variables, images, text)
  inter = state["intermediates"]
  ours = {
      "text_features": text,
      "text_features_norm": text / jnp.linalg.norm(text, axis=-1, keepdims=True),
      "path_1_stride4": nchw(inter["path_1"][0][:, ::4, ::4]),
      "head1_stride4": nchw(inter["head"]["pixel_embeddings"][0][:, ::4, ::4]),
      "logits_lowres_pre_block": nchw(inter["head"]["logits_lowres_pre_block"][0]),
      "logits_lowres": nchw(inter["head"]["logits_lowres"][0]),
      "logits": nchw(logits),
  }
  for k in range(1, 5):
    ours[f"layer{k}"] = nchw(inter[f"layer{k}"][0])
    if f"hook{k}_tokens" in inter:
      ours[f"hook{k}_tokens"] = inter[f"hook{k}_tokens"][0]
  return {k: np.asarray(v) for k, v in ours.items()}


def test_golden_fixtures_are_present():
  check_fixtures_present(FIXTURES, GOLDEN_DIR, "*.json")


@pytest.mark.parametrize("fixture_path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_golden_parity(fixture_path: Path, capsys):
  fixture = json.loads(fixture_path.read_text())
  with np.load(fixture_path.with_suffix(".npz")) as z:
    ref = dict(z)
  ours = run_port(fixture, ref)
  errors = {}
  for name, expected in ref.items():
    if name in INPUTS:
      continue
    assert name in ours, f"{fixture_path.name}: the port produces no array for {name!r}"
    assert ours[name].shape == expected.shape, (name, ours[name].shape, expected.shape)
    expected = expected.astype(np.float64)
    errors[name] = np.abs(ours[name] - expected).max() / np.abs(expected).max()
  with capsys.disabled():
    print(f"\n{fixture_path.stem}: relative error max|ours-ref|/max|ref|")
    for name, err in errors.items():
      print(f"  {name:26s} {err:.2e}  (tol {TOLERANCE[ref[name].dtype]:.0e})")
  bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[ref[n].dtype]}
  assert not bad, f"{fixture_path.name}: out of tolerance: {bad}"
