"""CLIP byte-pair-encoding tokenizer for LSeg's text tower, fully offline.

LSeg encodes its label set with OpenAI CLIP's text transformer, which takes the
ids produced by ``clip.tokenize``: ``[SOT] + BPE(text) + [EOT]`` padded with 0
to a context of 77.  This module reproduces those ids exactly, using Hugging
Face's ``CLIPTokenizer`` (a Rust BPE) built from vocabulary files packaged with
this library (``lseg_jax/assets/clip_bpe/``, generated from OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` by ``tools/make_clip_vocab.py``; see the
``NOTICE.md`` there), so nothing is downloaded at run time.

Text cleanup follows OpenAI's ``simple_tokenizer``: HTML entities are unescaped
(twice), runs of whitespace collapse to one space, the ends are stripped and the
text is lower-cased.  OpenAI additionally runs ``ftfy.fix_text`` (repair of
mojibake); that is not applied here, so only text that is already broken
unicode could tokenize differently.

Padding is 0 (as ``clip.tokenize`` pads), not the ``<|endoftext|>`` id that HF
uses as its pad token; the CLIP text tower reads the feature at the EOT
position (``argmax`` of the ids), so the padding value must not be 49407.
"""

from __future__ import annotations

import functools
import html
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
  "CONTEXT_LENGTH",
  "SOT_TOKEN_ID",
  "EOT_TOKEN_ID",
  "VOCAB_SIZE",
  "ASSET_DIR",
  "clean_text",
  "get_tokenizer",
  "tokenize",
]

CONTEXT_LENGTH = 77
SOT_TOKEN_ID = 49406  # <|startoftext|>
EOT_TOKEN_ID = 49407  # <|endoftext|>
SOT = SOT_TOKEN_ID
EOT = EOT_TOKEN_ID
VOCAB_SIZE = 49408
NUM_MERGES = 48894
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "clip_bpe"

_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
  """Normalise a label the way OpenAI CLIP does before BPE.

  Unescapes HTML entities twice (``&amp;amp;`` -> ``&``), collapses whitespace
  runs to one space, strips the ends and lower-cases.
  """
  text = html.unescape(html.unescape(text)).strip()
  text = _WHITESPACE.sub(" ", text).strip()
  return text.lower()


@functools.lru_cache(maxsize=1)
def get_tokenizer():
  """Return the (cached) HF ``CLIPTokenizer`` built from the packaged BPE files.

  The tokenizer is constructed from the in-memory vocab and merge list rather
  than ``CLIPTokenizer(vocab_file=..., merges_file=...)``: in transformers v5
  the latter keywords are silently ignored and yield a 3-entry placeholder
  vocabulary.  The result is checked (vocabulary size, merge count and the
  ids of a known sentence) so that a broken build fails loudly here instead
  of producing wrong text features later.
  """
  from transformers import CLIPTokenizer

  vocab_path = ASSET_DIR / "vocab.json"
  merges_path = ASSET_DIR / "merges.txt"
  if not vocab_path.is_file() or not merges_path.is_file():
    raise FileNotFoundError(
      f"CLIP BPE files not found in {ASSET_DIR}; regenerate them with "
      "tools/make_clip_vocab.py (see NOTICE.md there)"
    )
  with open(vocab_path, encoding="utf-8") as f:
    vocab: dict[str, int] = json.load(f)
  with open(merges_path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  if not lines or not lines[0].startswith("#version"):
    raise ValueError(f"{merges_path}: missing '#version' header line")
  # Only the first line is a header: some real merges start with '#' too.
  merges = [tuple(line.split(" ")) for line in lines[1:] if line]

  tok = CLIPTokenizer(vocab=vocab, merges=merges)

  if len(vocab) != VOCAB_SIZE or len(tok) != VOCAB_SIZE:
    raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}")
  if len(merges) != NUM_MERGES:
    raise RuntimeError(f"CLIP tokenizer has {len(merges)} merges, expected {NUM_MERGES}")
  probe = tok("a photo of a cat", add_special_tokens=True)["input_ids"]
  if list(probe) != [SOT, 320, 1125, 539, 320, 2368, EOT]:
    raise RuntimeError(f"CLIP tokenizer self-check failed: got {probe}")
  return tok


def tokenize(texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """Tokenize labels exactly as OpenAI's ``clip.tokenize``.

  Args:
      texts: the label strings (a bare ``str`` is not accepted, to avoid
    silently tokenizing it character by character elsewhere; wrap it in a
    list).
      context_length: the text tower's context (77 for every CLIP model).

  Returns:
      int32 array ``[len(texts), context_length]``: ``SOT, bpe..., EOT`` then
      zeros.

  Raises:
      ValueError: for an empty list, a non-string, an empty or whitespace-only
    label, or a label whose ids (with SOT and EOT) exceed ``context_length``
    (OpenAI raises too rather than truncating).
  """
  if isinstance(texts, str):
    raise ValueError(f"tokenize expects a sequence of strings, got a single str {texts!r}")
  texts = list(texts)
  if not texts:
    raise ValueError("tokenize needs at least one label, got an empty list")
  if context_length < 2:
    raise ValueError(f"context_length must be >= 2, got {context_length}")
  cleaned: list[str] = []
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"label {i} is not a string: {text!r} ({type(text).__name__})")
    c = clean_text(text)
    if not c:
      raise ValueError(f"label {i} is empty or whitespace-only: {text!r}")
    cleaned.append(c)

  tok = get_tokenizer()
  encoded = tok(cleaned, add_special_tokens=False)["input_ids"]
  out = np.zeros((len(texts), context_length), dtype=np.int32)
  for i, (text, ids) in enumerate(zip(texts, encoded)):
    row = [SOT, *ids, EOT]
    if len(row) > context_length:
      raise ValueError(
        f"label {i} is too long for context length {context_length} "
        f"({len(row)} tokens with SOT/EOT): {text!r}"
      )
    out[i, : len(row)] = row
  return out
