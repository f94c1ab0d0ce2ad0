"""CLIP byte-pair-encoding tokenizer for LSeg's text tower, fully offline.

LSeg encodes its label set with OpenAI CLIP's text transformer, which takes the
ids produced by ``clip.tokenize``: ``[SOT] + BPE(text) + [EOT]`` padded with 0
to a context of 77.  This module reproduces those ids exactly, every step as
OpenAI's ``simple_tokenizer`` does it:

1. cleanup: ``ftfy.fix_text`` (CLIP's own dependency: it straightens curly
   quotes, splits ligatures, narrows full-width forms, drops control characters
   and terminal escapes, repairs mojibake and NFC-normalises), HTML entities
   unescaped twice, runs of whitespace collapsed to one space, ends stripped,
   lower-cased;
2. words: CLIP's regex (``'s``, ``'t``, ... contractions, letter runs, single
   digits, runs of other symbols; the literal ``<|startoftext|>`` and
   ``<|endoftext|>`` are their special ids), with the ``regex`` package and
   its Unicode classes, as OpenAI uses it;
3. BPE: each word's UTF-8 bytes, as GPT-2 byte symbols, are merged by the Rust
   BPE model of Hugging Face's ``CLIPTokenizer`` (last symbol marked ``</w>``).

Steps 1-2 are ours rather than the HF tokenizer's own normaliser and
pre-tokeniser: those apply NFC after the HTML unescape (OpenAI does not), skip
ftfy, and split with a different regex engine.  The BPE files are packaged with
this library (``lseg_jax/assets/clip_bpe/``, generated from OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` by ``tools/make_clip_vocab.py``; see the
``NOTICE.md`` there), so nothing is downloaded at run time.

Padding is 0 (as ``clip.tokenize`` pads), not the ``<|endoftext|>`` id that HF
uses as its pad token; the CLIP text tower reads the feature at the EOT
position (``argmax`` of the ids), so the padding value must not be 49407.
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

__all__ = [
  "CONTEXT_LENGTH",
  "SOT_TOKEN_ID",
  "EOT_TOKEN_ID",
  "VOCAB_SIZE",
  "ASSET_DIR",
  "bytes_to_unicode",
  "clean_text",
  "split_words",
  "encode",
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

# The literal special tokens in a text map straight to their ids, as in OpenAI's BPE cache.
_SPECIAL_IDS = {"<|startoftext|>": SOT_TOKEN_ID, "<|endoftext|>": EOT_TOKEN_ID}
# The `regex` package, as OpenAI uses: `re` has no \p{L}/\p{N}, and its \s also matches U+001C..U+001F.
_WHITESPACE = regex.compile(r"\s+")
_WORD = regex.compile(
  r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
  regex.IGNORECASE,
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """Map every byte 0..255 to the printable character that stands for it in the BPE.

  GPT-2's scheme, which CLIP's vocabulary is written in: printable Latin-1
  bytes map to themselves; the remaining bytes map, in increasing byte order,
  to code points 256, 257, ...  The dict's insertion order (printable bytes
  first, then the others) is the vocabulary order.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  table = {b: chr(b) for b in printable}
  table.update({b: chr(256 + n) for n, b in enumerate(others)})
  return table


def clean_text(text: str) -> str:
  """Normalise a label the way OpenAI CLIP does before BPE.

  ``ftfy.fix_text`` (``don’t`` -> ``don't``, ``ﬁ`` -> ``fi``, ``ＡＢＣ`` ->
  ``ABC``, ``cafÃ©`` -> ``café``, control characters and ANSI escapes
  removed), HTML entities unescaped twice (``&amp;amp;`` -> ``&``), ends
  stripped, whitespace runs collapsed to one space, lower-cased.
  """
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  text = _WHITESPACE.sub(" ", text).strip()
  return text.lower()


def split_words(cleaned: str) -> list[str]:
  """Split cleaned text into CLIP's BPE words (``"don't"`` -> ``["don", "'t"]``)."""
  return _WORD.findall(cleaned)


@functools.lru_cache(maxsize=1)
def get_tokenizer():
  """Return the (cached) HF ``CLIPTokenizer`` built from the packaged BPE files.

  Only its BPE model is used (see the module docstring).  The tokenizer is
  constructed from the in-memory vocab and merge list rather than
  ``CLIPTokenizer(vocab_file=..., merges_file=...)``: in transformers v5 the
  latter keywords are silently ignored and yield a 3-entry placeholder
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


def _word_ids(word: str) -> list[int]:
  """BPE ids of one word from ``split_words`` (its last symbol carries ``</w>``)."""
  if word in _SPECIAL_IDS:
    return [_SPECIAL_IDS[word]]
  byte_symbol = bytes_to_unicode()
  symbols = "".join(byte_symbol[b] for b in word.encode("utf-8"))
  return [token.id for token in get_tokenizer().backend_tokenizer.model.tokenize(symbols)]


def encode(text: str) -> list[int]:
  """BPE ids of a raw text, without SOT/EOT: OpenAI's ``SimpleTokenizer.encode``."""
  return [i for word in split_words(clean_text(text)) for i in _word_ids(word)]


def tokenize(
  texts: Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False
) -> np.ndarray:
  """Tokenize labels exactly as OpenAI's ``clip.tokenize``.

  Args:
      texts: the label strings (a bare ``str`` is not accepted, to avoid
    silently tokenizing it character by character elsewhere; wrap it in a
    list).
      context_length: the text tower's context (77 for every CLIP model).
      truncate: as in ``clip.tokenize``: a label whose ids (with SOT and EOT)
    exceed ``context_length`` keeps its first ``context_length`` ids with the
    last one replaced by EOT, instead of raising.

  Returns:
      int32 array ``[len(texts), context_length]``: ``SOT, bpe..., EOT`` then
      zeros.

  Raises:
      ValueError: for an empty list, a non-string, a label that is empty after
    cleanup (``clip.tokenize`` would give ``[SOT, EOT]``, which is never a
    meaningful class name), or, without ``truncate``, a label too long for
    ``context_length`` (``clip.tokenize`` raises a RuntimeError there).
  """
  if isinstance(texts, str):
    raise ValueError(f"tokenize expects a sequence of strings, got a single str {texts!r}")
  texts = list(texts)
  if not texts:
    raise ValueError("tokenize needs at least one label, got an empty list")
  if context_length < 2:
    raise ValueError(f"context_length must be >= 2, got {context_length}")
  out = np.zeros((len(texts), context_length), dtype=np.int32)  # [N, context_length]
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"label {i} is not a string: {text!r} ({type(text).__name__})")
    ids = encode(text)
    if not ids:
      raise ValueError(f"label {i} is empty or whitespace-only after CLIP's text cleanup: {text!r}")
    row = [SOT, *ids, EOT]
    if len(row) > context_length:
      if not truncate:
        raise ValueError(
          f"label {i} is too long for context length {context_length} "
          f"({len(row)} tokens with SOT/EOT); shorten it: {text!r}"
        )
      row = [*row[: context_length - 1], EOT]
    out[i, : len(row)] = row
  return out
