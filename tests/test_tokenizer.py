"""Tests for lseg_jax.tokenizer: exact parity with OpenAI ``clip.tokenize``.

The expected ids come from OpenAI's own tokenizer (stored below as reference
data, see ``OPENAI_IDS``), over hard strings that exercise every cleanup step:
curly quotes, ligatures, full-width forms, control characters, HTML entities,
mojibake, emoji, CJK, combining marks, over-long text.  The golden fixtures
(``LSEG_GOLDEN_DIR``, default ``<repo>/../shared/golden``) store the ids that
the official PyTorch code fed to CLIP; every fixture's ids must be reproduced
exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from golden_utils import GOLDEN_DIR, check_fixtures_present, fixtures
from lseg_jax import tokenizer as T
from lseg_jax.tokenizer import CONTEXT_LENGTH, EOT, SOT, clean_text, split_words, tokenize

GOLDEN_FILES = fixtures(GOLDEN_DIR, "*.json")


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
  # The byte table the BPE input is written in is the vocabulary's first 256 entries.
  assert list(vocab)[:256] == list(T.bytes_to_unicode().values())
  assert sorted(T.bytes_to_unicode()) == list(range(256))
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


def test_golden_token_fixtures_are_present():
  check_fixtures_present(GOLDEN_FILES, GOLDEN_DIR, "*.json")


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_token_ids(path: Path):
  ours, ref = _fixture_ids(path)
  assert ours.shape == ref.shape
  np.testing.assert_array_equal(ours, ref)


# ---------------------------------------------------------------- OpenAI reference ids

# Produced with OpenAI's code, not this package's: openai/CLIP at d05afc4
# (clip/simple_tokenizer.py and the `tokenize` function of clip/clip.py, run
# verbatim; clip/__init__ is skipped because it imports torchvision; the same
# tokenizer code as 04f4dc2, the commit lang-seg pins, apart from the int dtype), its
# bpe_simple_vocab_16e6.txt.gz (sha256 924691ac...8d6804a, the same file as in
# open_clip_torch 3.3.0), torch 2.13.0+cpu, ftfy 6.3.1, regex 2026.5.9:
#   git clone https://github.com/openai/CLIP && cd CLIP && git checkout d05afc4
#   pip install torch==2.13.0 ftfy==6.3.1 regex packaging
#   python - <<'PY'
#   import ast, sys, typing, torch; from packaging import version
#   sys.path.insert(0, "clip"); import simple_tokenizer
#   fn = next(n for n in ast.parse(open("clip/clip.py").read()).body if getattr(n, "name", "") == "tokenize")
#   ns = dict(torch=torch, version=version, Union=typing.Union, List=typing.List,
#             _tokenizer=simple_tokenizer.SimpleTokenizer())
#   exec(compile(ast.Module([fn], []), "clip.py", "exec"), ns)
#   row = ns["tokenize"](["don\u2019t"])[0].tolist()
#   print(row[: len(row) - row[::-1].index(49407)])  # up to the last EOT
#   PY
OPENAI_IDS = {
  # typographic quotes
  "don\u2019t": [49406, 847, 713, 49407],
  "It\u2019s a dog\u2019s life": [49406, 585, 568, 320, 1929, 568, 970, 49407],
  "\u201ccurly\u201d \u2018quotes\u2019": [49406, 257, 20795, 257, 262, 5808, 262, 49407],
  "\u201eGerman\u201c \xabguillemets\xbb": [
    49406, 257, 4710, 257, 14434, 5008, 534, 9633, 7599, 49407,
  ],
  # ligatures
  "\ufb01sh \ufb02ower o\ufb03ce": [49406, 2759, 4055, 2171, 49407],
  # full-width
  "\uff21\uff22\uff23\uff11\uff12\uff13": [49406, 5334, 272, 273, 274, 49407],
  "\uff48\uff45\uff4c\uff4c\uff4f\u3000\uff57\uff4f\uff52\uff4c\uff44": [49406, 3306, 1002, 49407],
  # C0 controls and ANSI escapes
  "bell\x07 cat": [49406, 3718, 2368, 49407],
  "\x1b[31mred\x1b[0m apple": [49406, 736, 3055, 49407],
  "nul\x00byte": [49406, 29358, 42798, 49407],
  "tab\x09here\x0d\x0anewline": [49406, 14724, 763, 1218, 1148, 49407],
  "\x1c\x1d\x1e\x1f sep": [49406, 10434, 49407],
  # C1 controls and invisible characters
  "next\x85line": [49406, 1131, 959, 1148, 49407],
  "a\x9dcat": [49406, 320, 126, 507, 2368, 49407],
  "soft\xadhyphen": [49406, 3773, 22618, 1441, 745, 576, 49407],
  "zero\u200bwidth": [49406, 5848, 9844, 23571, 49407],
  "\ufeffbom": [49406, 19469, 49407],
  "line\u2028sep": [49406, 1148, 10434, 49407],
  "nb\xa0sp": [49406, 6813, 4393, 49407],
  # HTML entities
  "cat &amp;amp; dog": [49406, 2368, 261, 1929, 49407],
  "&lt;b&gt;bold&lt;/b&gt;": [49406, 283, 321, 285, 8911, 34308, 321, 285, 49407],
  "<b>bold</b> &amp; co": [49406, 283, 321, 285, 8911, 34308, 321, 285, 261, 1320, 49407],
  "don&#8217;t": [49406, 847, 713, 49407],
  "don&amp;#8217;t": [49406, 847, 713, 49407],
  "&amp;amp;amp;": [49406, 261, 49407],
  "&nbsp;x&nbsp;": [49406, 343, 49407],
  # mojibake
  "caf\xc3\xa9": [49406, 15304, 49407],
  "don\xe2\u20ac\u2122t": [49406, 847, 713, 49407],
  "\xc3\xa9l\xc3\xa8ve": [49406, 3459, 75, 12138, 563, 49407],
  "\xe2\u20ac\u0153quoted\xe2\u20ac\x9d": [49406, 257, 27706, 257, 49407],
  # emoji
  "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family": [
    49406, 26304, 26304, 48938, 4244, 964, 355, 1315, 49407,
  ],
  "\U0001f3f3\ufe0f\u200d\U0001f308 flag": [49406, 32610, 4859, 49407],
  "thumbs \U0001f44d\U0001f3fd": [49406, 17599, 43722, 49407],
  "emoji \U0001f431\U0001f436": [49406, 16327, 35710, 10631, 49407],
  # CJK and other scripts
  "\u6570\u5b57 \u65e5\u672c\u8a9e": [
    49406, 162, 243, 108, 35751, 501, 39121, 44353, 34002, 508, 49407,
  ],
  "\u6f22\u5b57\u304b\u306a\u30ab\u30ca": [
    49406, 162, 120, 95, 35751, 245, 4813, 233, 29104, 37367, 2429, 488, 49407,
  ],
  "\ud55c\uad6d\uc5b4": [49406, 15197, 250, 31871, 255, 31625, 368, 49407],
  "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22": [
    49406, 1777, 254, 12330, 102, 11529, 31718, 245, 33091, 49407,
  ],
  "\u0939\u093f\u0928\u094d\u0926\u0940": [49406, 29446, 26721, 26090, 19389, 29552, 25751, 49407],
  "\u0627\u0644\u0639\u0631\u0628\u064a\u0629": [
    49406, 12973, 18843, 10948, 16378, 12046, 20915, 49407,
  ],
  # combining accents and normalisation
  "cafe\u0301": [49406, 15304, 49407],
  "e&#769;t&#233;": [49406, 3459, 39694, 49407],
  # ftfy leaves entities alone in text with '<'; HF's own normaliser would NFC-compose these two
  "<i>e&#769;</i>": [49406, 283, 328, 285, 324, 136, 223, 34308, 328, 285, 49407],
  "<i>&#4352;&#4449;</i>": [
    49406, 283, 328, 285, 157, 226, 222, 157, 227, 350, 34308, 328, 285, 49407,
  ],
  "\u1100\u1161": [49406, 21122, 478, 49407],
  # case and digits
  "\u0130stanbul": [49406, 328, 16384, 11231, 49407],
  "\u039f\u0394\u039f\u03a3": [49406, 138, 123, 138, 112, 138, 123, 139, 480, 49407],
  "Stra\xdfe": [49406, 1894, 127, 253, 324, 49407],
  "IT'S WE'LL I'D": [49406, 585, 568, 649, 1342, 328, 1896, 49407],
  "\xbd cup x\xb2 \u2163": [49406, 33613, 1937, 343, 41175, 158, 227, 367, 49407],
  # special-token text
  "<|endoftext|> cat": [49406, 49407, 2368, 49407],
  "<|StartOfText|>dog": [49406, 49406, 1929, 49407],
  # plain labels
  "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
  "other": [49406, 1010, 49407],
  "others": [49406, 3326, 49407],
  "american_alligator": [49406, 2151, 318, 28574, 49407],
  "pool table, billiard table, snooker table": [
    49406, 2831, 2175, 267, 7693, 746, 2175, 267, 25657, 2175, 49407,
  ],
  "it's a dog's life, isn't it?": [
    49406, 585, 568, 320, 1929, 568, 970, 267, 2923, 713, 585, 286, 49407,
  ],
  "ice-cream 3000 km/h": [49406, 733, 268, 3867, 274, 271, 271, 271, 4590, 270, 327, 49407],
  "#hashtag ... @user :)": [49406, 258, 9238, 678, 287, 7031, 1408, 49407],
  "caf\xe9 na\xefve fa\xe7ade": [49406, 15304, 1097, 35689, 563, 778, 10067, 1928, 49407],
  "wall-e (2008)": [49406, 2569, 268, 324, 263, 273, 271, 271, 279, 264, 49407],
  "l'homme": [49406, 331, 262, 26193, 49407],
  "pneumonoultramicroscopicsilicovolcanoconiosis": [
    49406, 28714, 749, 20253, 9800, 535, 532, 1065, 901, 1556, 13697, 9916, 78, 39031, 13903,
    49407,
  ],
  "chest of drawers, chest, bureau, dresser": [
    49406, 10563, 539, 38975, 267, 10563, 267, 15400, 267, 26346, 49407,
  ],
}


@pytest.mark.parametrize("text", OPENAI_IDS, ids=ascii)
def test_matches_openai_clip_tokenize(text: str):
  assert _ids(text) == OPENAI_IDS[text]


def test_typographic_apostrophe_is_one_contraction():
  # The reproduction: without ftfy, "don\u2019t" was 4 word tokens.
  assert split_words(clean_text("don\u2019t")) == ["don", "'t"]
  assert _ids("don\u2019t") == _ids("don't") == [SOT, 847, 713, EOT]


@pytest.mark.parametrize(
  "raw, cleaned",
  [
    ("\ufb01sh \ufb02ower", "fish flower"),  # ligatures split
    ("\uff21\uff22\uff23\uff11\uff12\uff13", "abc123"),  # full-width narrowed
    ("\x1b[31mred\x1b[0m apple", "red apple"),  # ANSI escapes removed
    ("bell\x07 cat", "bell cat"),  # C0 control removed
    ("caf\xc3\xa9", "caf\xe9"),  # mojibake repaired
    ("cafe\u0301", "caf\xe9"),  # NFC before the HTML unescape
    ("<i>e&#769;</i>", "<i>e\u0301</i>"),  # ... and none after it (ftfy leaves HTML to html.unescape)
    ("  A &amp;amp;\u3000B\n", "a & b"),
  ],
)
def test_clean_text(raw: str, cleaned: str):
  assert clean_text(raw) == cleaned


def test_special_token_text_maps_to_special_ids():
  assert split_words(clean_text("<|EndOfText|> cat")) == ["<|endoftext|>", "cat"]
  assert _ids("<|EndOfText|> cat") == [SOT, EOT, 2368, EOT]


@pytest.mark.parametrize("bad", ["\x07", "&nbsp;", "\x1b[0m", "&amp;nbsp; \t"])
def test_empty_after_cleanup_raises(bad):
  # clip.tokenize gives [SOT, EOT] here; a class name with no text is a user error.
  with pytest.raises(ValueError, match="empty or whitespace"):
    tokenize(["dog", bad])


# ---------------------------------------------------------------- truncate


LONG_TEXT = " ".join(["cat"] * 80)
# 20 family emoji: one BPE word of 6 ids each, so the cut falls inside a word.
FAMILIES = "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 " * 20


def test_too_long_without_truncate_raises_value_error():
  # clip.tokenize raises RuntimeError; callers turn ValueErrors into one-line user errors.
  with pytest.raises(ValueError, match=r"label 0 is too long for context length 77 \(82 tokens.*'cat cat"):
    tokenize([LONG_TEXT])


@pytest.mark.parametrize(
  "text, expected",
  [
    # OpenAI reference ids (command above, with truncate=True)
    (LONG_TEXT, [SOT, *[2368] * 75, EOT]),
    (FAMILIES, [SOT, *[26304, 26304, 48938, 4244, 964, 355] * 12, 26304, 26304, 48938, EOT]),
  ],
  ids=["cat x80", "family emoji x20"],
)
def test_truncate_matches_openai(text: str, expected: list[int]):
  row = tokenize([text], truncate=True)[0]
  assert row.tolist() == expected


def test_truncate_leaves_short_labels_alone():
  out = tokenize(["a photo of a cat", LONG_TEXT], truncate=True)
  np.testing.assert_array_equal(out[0], tokenize(["a photo of a cat"])[0])
  assert out[1, -1] == EOT and (out[1] != 0).all()
  short = tokenize([LONG_TEXT], context_length=5, truncate=True)[0]
  assert short.tolist() == [SOT, 2368, 2368, 2368, EOT]
