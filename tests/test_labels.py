"""lseg_jax.labels.encode_labels: one template feeds the text tower's raw
embeddings, several are CLIP's prompt ensemble (normalise each template's
embedding, average, renormalise), checked against numpy on the tiny tower."""

import jax
import numpy as np
import pytest

from helpers import random_variables
from lseg_jax import labels as labels_lib, tokenizer
from lseg_jax.models import LSeg, build_model, get_model_config

LABELS = ["dog", "big cat", "sky"]
TEMPLATES = ["a photo of a {}.", "{}", "a {} in the picture"]


@pytest.fixture(scope="module")
def tower():
  """(model, text-tower params, [T, N, D] raw embeddings of every template's
  prompts, each encoded on its own)."""
  config = get_model_config("tiny")
  model, params = build_model(config), random_variables(config, 5)["params"]["text_encoder"]
  encode = jax.jit(lambda ids: model.apply({"params": {"text_encoder": params}}, ids, method=LSeg.encode_text))
  raw = np.stack([np.asarray(encode(tokenizer.tokenize([t.format(l) for l in LABELS]))) for t in TEMPLATES])
  return model, params, raw.astype(np.float64)


def test_one_template_gives_the_raw_embeddings(tower):
  model, params, raw = tower
  got = np.asarray(labels_lib.encode_labels(model, params, LABELS, TEMPLATES[:1]))
  np.testing.assert_allclose(got, raw[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-2)  # not normalised: LSeg feeds them as is


def test_templates_are_averaged_as_unit_vectors_then_renormalised(tower):
  model, params, raw = tower
  unit = raw / np.linalg.norm(raw, axis=-1, keepdims=True)  # [T, N, D]
  mean = unit.mean(0)
  expected = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
  got = np.asarray(labels_lib.encode_labels(model, params, LABELS, TEMPLATES))
  assert got.shape == (len(LABELS), raw.shape[-1])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # The plain mean of the raw embeddings points elsewhere: the norms differ.
  plain = raw.mean(0) / np.linalg.norm(raw.mean(0), axis=-1, keepdims=True)
  assert np.abs(plain - expected).max() > 1e-3


@pytest.mark.parametrize("labels, templates, message", [
    ([], ["{}"], "the label list is empty"),
    (["dog"], [], "prompt templates must each contain"),
    (["dog"], ["{}", "a photo"], "prompt templates must each contain"),
])
def test_bad_label_sets_are_refused(tower, labels, templates, message):
  model, params, _ = tower
  with pytest.raises(ValueError, match=message):
    labels_lib.encode_labels(model, params, labels, templates)
