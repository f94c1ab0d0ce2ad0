"""Build the CLIP BPE tokenizer files (``vocab.json`` + ``merges.txt``) offline.

Origin and licence
------------------
The input is ``bpe_simple_vocab_16e6.txt.gz``, the byte-pair-encoding merge
list of OpenAI CLIP (https://github.com/openai/CLIP, MIT licence,
"Copyright (c) 2021 OpenAI").  An identical copy ships inside the MIT-licensed
``open_clip_torch`` wheel as ``open_clip/bpe_simple_vocab_16e6.txt.gz``, which is
where we take it from so that no network access beyond the package index is
needed::

  pip download --no-deps open_clip_torch -d /tmp/oc
  cd /tmp/oc && unzip -o open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz
  python tools/make_clip_vocab.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

Construction
------------
This reproduces the vocabulary that OpenAI's ``simple_tokenizer.SimpleTokenizer``
builds in memory, and writes it in the two-file layout that Hugging Face's
``CLIPTokenizer`` reads:

* merges: lines ``1 .. 49152 - 256 - 2`` of the file (line 0 is a header), i.e.
  48,894 merges, each a pair ``"a b"``;
* vocab, id = position: the 256 byte-level symbols (GPT-2 ``bytes_to_unicode``
  order), the same 256 with ``</w>`` appended, every merge joined without the
  space, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407):
  49,408 entries.

``merges.txt`` starts with a ``#version: 0.2`` header line, as HF expects.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from lseg_jax.tokenizer import bytes_to_unicode

NUM_MERGES = 49152 - 256 - 2  # 48,894, as in OpenAI's simple_tokenizer
VOCAB_SIZE = 49408
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "lseg_jax" / "assets" / "clip_bpe"


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
  """Read the merge pairs from the gzipped OpenAI BPE file."""
  lines = gzip.open(bpe_gz, "rb").read().decode("utf-8").split("\n")
  selected = lines[1 : NUM_MERGES + 1]
  merges: list[tuple[str, str]] = []
  for i, line in enumerate(selected, start=1):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{bpe_gz}: line {i} is not a merge pair: {line!r}")
    merges.append((parts[0], parts[1]))
  if len(merges) != NUM_MERGES:
    raise ValueError(f"{bpe_gz}: expected {NUM_MERGES} merges, found {len(merges)}")
  return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
  """Token -> id, in the order OpenAI's SimpleTokenizer uses."""
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols]
  tokens += ["".join(m) for m in merges]
  tokens += [SOT_TOKEN, EOT_TOKEN]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
    raise ValueError(
      f"vocab has {len(tokens)} tokens ({len(vocab)} distinct), expected {VOCAB_SIZE}"
    )
  return vocab


def write_files(bpe_gz: Path, out_dir: Path) -> tuple[Path, Path]:
  """Write ``vocab.json`` and ``merges.txt`` into ``out_dir``; return their paths."""
  merges = read_merges(bpe_gz)
  vocab = build_vocab(merges)
  out_dir.mkdir(parents=True, exist_ok=True)
  vocab_path = out_dir / "vocab.json"
  merges_path = out_dir / "merges.txt"
  with open(vocab_path, "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    f.write("\n")
  with open(merges_path, "w", encoding="utf-8", newline="\n") as f:
    f.write("#version: 0.2\n")
    for a, b in merges:
      f.write(f"{a} {b}\n")
  return vocab_path, merges_path


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
  parser.add_argument(
    "--out-dir", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
  )
  args = parser.parse_args(argv)
  vocab_path, merges_path = write_files(args.bpe_gz, args.out_dir)
  print(f"wrote {vocab_path} and {merges_path}")


if __name__ == "__main__":
  main()
