"""Tests for lseg_jax.tokenizer: exact parity with OpenAI ``clip.tokenize``.

The golden fixtures (``LSEG_GOLDEN_DIR``, default ``<repo>/../shared/golden``)
store the ids that the official PyTorch code fed to CLIP; every fixture's ids
must be reproduced exactly.  An independent pure-Python BPE (written from the
published algorithm, on top of the packaged vocab/merges) cross-checks the HF
tokenizer on a wider set of strings.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
import pytest

from lseg_jax import tokenizer as T
from lseg_jax.tokenizer import CONTEXT_LENGTH, EOT, SOT, tokenize

GOLDEN_DIR = Path(
  os.environ.get(
    "LSEG_GOLDEN_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "golden"
  )
)
GOLDEN_FILES = sorted(GOLDEN_DIR.glob("*.json")) if GOLDEN_DIR.is_dir() else []


def _ids(text: str) -> list[int]:
  """The non-padding ids of one label."""
  row = tokenize([text])[0]
  return [int(x) for x in row[row != 0]]


# ---------------------------------------------------------------- basics


def test_constants():
  assert CONTEXT_LENGTH == 77
  assert SOT == 49406 and EOT == 49407


def test_photo_of_a_cat():
  out = tokenize(["a photo of a cat"])
  assert out.dtype == np.int32
  assert out.shape == (1, 77)
  expected = np.zeros(77, np.int32)
  expected[:7] = [49406, 320, 1125, 539, 320, 2368, 49407]
  np.testing.assert_array_equal(out[0], expected)


def test_batch_shape_and_custom_context():
  out = tokenize(["dog", "a photo of a cat", "sky"], context_length=10)
  assert out.shape == (3, 10) and out.dtype == np.int32
  assert all(row[0] == SOT for row in out)
  assert [int(np.argmax(row)) for row in out] == [2, 6, 2]  # EOT is the max id


def test_vocab_and_merges_sizes():
  vocab = json.loads((T.ASSET_DIR / "vocab.json").read_text(encoding="utf-8"))
  assert len(vocab) == 49408
  assert sorted(vocab.values()) == list(range(49408))
  assert vocab["<|startoftext|>"] == SOT and vocab["<|endoftext|>"] == EOT
  lines = (T.ASSET_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
  assert lines[0].startswith("#version")
  merges = [line for line in lines[1:] if line]
  assert len(merges) == 48894
  assert all(len(m.split(" ")) == 2 for m in merges)
  tok = T.get_tokenizer()
  assert len(tok) == 49408
  backend = json.loads(tok.backend_tokenizer.to_str())["model"]
  # Every merge reached the BPE model, including those starting with '#'.
  assert len(backend["merges"]) == 48894


def test_tokenizer_is_cached():
  assert T.get_tokenizer() is T.get_tokenizer()


# ---------------------------------------------------------------- cleanup


def test_lower_case():
  assert _ids("Dog") == _ids("dog") == _ids("DOG")
  assert _ids("A Photo Of A CAT") == _ids("a photo of a cat")


def test_whitespace_collapses():
  assert _ids("  a   photo\tof \n a cat  ") == _ids("a photo of a cat")


def test_html_entities_unescaped():
  assert _ids("cat &amp; dog") == _ids("cat & dog")
  assert _ids("cat &amp;amp; dog") == _ids("cat & dog")


def test_underscore_is_a_separate_token():
  ids = _ids("american_alligator")
  parts = _ids("american")[1:-1] + _ids("_")[1:-1] + _ids("alligator")[1:-1]
  assert ids == [SOT, *parts, EOT]
  assert ids != _ids("american alligator")


# ---------------------------------------------------------------- errors


def test_empty_list_raises():
  with pytest.raises(ValueError, match="empty"):
    tokenize([])


@pytest.mark.parametrize("bad", ["", "   ", "\t\n"])
def test_blank_label_raises(bad):
  with pytest.raises(ValueError, match="empty or whitespace"):
    tokenize(["dog", bad])


def test_non_string_raises():
  with pytest.raises(ValueError, match="not a string"):
    tokenize(["dog", 3])  # type: ignore[list-item]


def test_bare_string_raises():
  with pytest.raises(ValueError, match="single str"):
    tokenize("dog")  # type: ignore[arg-type]


def test_too_long_raises_and_names_text():
  fits = " ".join(["cat"] * 75)  # 75 + SOT + EOT = 77
  row = tokenize([fits])[0]
  assert row[0] == SOT and row[-1] == EOT and (row != 0).all()
  long_text = " ".join(["cat"] * 76)
  with pytest.raises(ValueError, match=r"too long for context length 77.*cat cat"):
    tokenize(["dog", long_text])


# ---------------------------------------------------------------- golden fixtures


def _fixture_ids(path: Path) -> tuple[np.ndarray, np.ndarray]:
  meta = json.loads(path.read_text(encoding="utf-8"))
  ref = np.asarray(meta["token_ids"], dtype=np.int64)
  if "labels" in meta:
    ours = tokenize(meta["labels"])
  elif str(meta.get("network", "")).startswith("LSegRNNetZS"):
    label_list, class_info = meta["label_list"], meta["class_info"]
    ours = np.stack([tokenize(["others", label_list[c]]) for c in class_info])
  else:
    pytest.fail(f"{path.name}: neither 'labels' nor a LSegRNNetZS label_list/class_info")
  return ours, ref


@pytest.mark.skipif(
  not GOLDEN_FILES, reason=f"no golden fixtures (*.json) in {GOLDEN_DIR}; set LSEG_GOLDEN_DIR"
)
@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_token_ids(path: Path):
  ours, ref = _fixture_ids(path)
  assert ours.shape == ref.shape
  np.testing.assert_array_equal(ours, ref)


# ---------------------------------------------------------------- independent BPE


@pytest.fixture(scope="module")
def reference_encode():
  """A small, slow BPE over the packaged files, following the published algorithm."""
  regex = pytest.importorskip("regex")
  vocab = json.loads((T.ASSET_DIR / "vocab.json").read_text(encoding="utf-8"))
  lines = (T.ASSET_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
  rank = {tuple(line.split(" ")): i for i, line in enumerate(l for l in lines[1:] if l)}
  # byte -> symbol: the first 256 vocab entries are the byte symbols, in byte-table order
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  order = printable + [b for b in range(256) if b not in printable]
  symbols = list(vocab)[:256]
  byte_sym = dict(zip(order, symbols))
  pattern = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
  )

  def bpe(word: str) -> list[str]:
    parts = [byte_sym[b] for b in word.encode("utf-8")]
    parts[-1] += "</w>"
    while len(parts) > 1:
      pairs = [(rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
      best, _ = min(pairs)
      if best == 1 << 30:
        break
      a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == best)
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
          merged.append(a + b)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def encode(text: str) -> list[int]:
    text = html.unescape(html.unescape(text)).strip()
    text = " ".join(text.split()).lower()
    ids = [SOT]
    for word in pattern.findall(text):
      ids += [vocab[p] for p in bpe(word)]
    return ids + [EOT]

  return encode


CROSS_CHECK = [
  "a photo of a cat",
  "other",
  "others",
  "aeroplane",
  "american_alligator",
  "pool table, billiard table, snooker table",
  "traffic light",
  "crt screen",
  "it's a dog's life, isn't it?",
  "ice-cream 3000 km/h",
  "#hashtag ... @user :)",
  "café naïve façade",
  "wall-e (2008)",
  "l'homme",
  "pneumonoultramicroscopicsilicovolcanoconiosis",
  "chest of drawers, chest, bureau, dresser",
  "数字 日本語",
  "emoji 🐱🐶",
]


@pytest.mark.parametrize("text", CROSS_CHECK)
def test_matches_independent_bpe(text: str, reference_encode):
  assert _ids(text) == reference_encode(text)
