"""Label sets -> text embeddings, computed once per label set.

The text tower is frozen, so a label set's embeddings never change during
training or evaluation: they are computed once (jitted) and kept, instead of
re-running CLIP every step as the official code does. Prompt templates
("a photo of a {}.") are averaged as CLIP's prompt ensembling does: normalise
each template's embedding, average, renormalise. The default template "{}"
feeds the raw label, as LSeg does. The label count is padded up to a
multiple of LABEL_BUCKET (repeats of the first label, dropped after), so a
server answering label sets of every size compiles once per bucket.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import tokenizer
from lseg_jax.models import LSeg

LABEL_BUCKET = 8


def padded_label_count(n: int) -> int:
  """n rounded up to a multiple of LABEL_BUCKET."""
  return -(-n // LABEL_BUCKET) * LABEL_BUCKET


def parse_labels(text: str) -> list[str]:
  """'dog, grass,other' -> ['dog', 'grass', 'other'] (as the official demo app).

  Empty labels and duplicates are errors: two labels that CLIP's text cleanup
  makes equal ('dog', 'Dog', 'big  dog' and 'big dog') get the same
  embedding, and the first would win every pixel.
  """
  labels = [l.strip() for l in text.split(",")]
  if not any(labels):
    raise ValueError(f"empty label list {text!r}: give comma-separated labels, e.g. 'dog,grass,other'")
  if not all(labels):
    raise ValueError(f"label list {text!r} has an empty label")
  first: dict[str, str] = {}  # CLIP-cleaned text -> the label that gave it
  for label in labels:
    key = tokenizer.clean_text(label)
    if key in first:
      same = "" if first[key] == label else f" (the same to CLIP as {first[key]!r})"
      raise ValueError(f"duplicate label {label!r}{same} in {text!r}: give each label once")
    first[key] = label
  return labels


_ENCODERS: dict[int, tuple[object, object]] = {}  # id(model) -> (model, its jitted text tower)


def _encoder(model):
  """The jitted text tower of `model` (a Flax LSeg or an export artifact),
  one per model: ids [..., 77] -> [..., D]. Flax modules do not hash, hence
  the id (the model is kept with it, so the id is never reused)."""
  if id(model) not in _ENCODERS:
    _ENCODERS[id(model)] = (model, jax.jit(lambda params, ids: model.apply({"params": {"text_encoder": params}}, ids,
                                                                         method=LSeg.encode_text)))
  return _ENCODERS[id(model)][1]


def encode_labels(model: LSeg, text_params, labels: Sequence[str], templates: Sequence[str] = ("{}",)
                  ) -> jax.Array:
  """[len(labels), D] text embeddings of `labels` (normalised when ensembling)."""
  if len(labels) == 0:
    raise ValueError("the label list is empty: give at least one label")
  if not templates or any("{}" not in t for t in templates):
    raise ValueError(f"prompt templates must each contain '{{}}': {list(templates)}")
  padded = [*labels, *[labels[0]] * (padded_label_count(len(labels)) - len(labels))]
  ids = np.stack([tokenizer.tokenize([t.format(l) for l in padded]) for t in templates])  # [T, N', 77]
  features = _encoder(model)(text_params, ids)[:, :len(labels)]  # [T, N, D]
  if len(templates) == 1:
    return features[0]
  features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
  mean = features.mean(0)
  return mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)
