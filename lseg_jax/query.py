r"""Label maps from stored dense features, with any labels, without rerunning
the image tower.

  python -m lseg_jax.embed --checkpoint models/lseg --out feats/ frames/
  python -m lseg_jax.query --features feats/ --labels "chair,table,other" --out maps/

Reads the features `python -m lseg_jax.embed` wrote (native resolution:
--full_size features cannot be scored as the model scores them) and the
model named in their manifest (or --checkpoint / --exported), encodes the
labels with its text tower and finishes the head on them (`LSeg.score`:
the logit scale, the spatial regularisation blocks, the x2 upsampling).
The label map equals what predict gives for the same image when predict's
single forward is embed's (one window, no resize: the image's long side as
--base_size, a crop that covers it padded to the model's multiple).

Outputs per frame NAME, as predict writes them: NAME_labels.png,
NAME_overlay.png (when the frame's source image can still be read),
NAME_ids.png and NAME_ids.npy. Exit codes as predict's.
"""

import argparse
import json
from pathlib import Path
import sys

import numpy as np

from lseg_jax import cli, embed as embed_cli, images as images_lib, labels as labels_lib, pictures
from lseg_jax.segmenter import Segmenter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser("python -m lseg_jax.query", __doc__)
  p.add_argument("--features", required=True, help="a folder written by python -m lseg_jax.embed")
  p.add_argument("--labels", required=True, help="comma-separated labels, e.g. 'chair,table,other'")
  p.add_argument("--template", action="append", help="prompt template with {} (repeat to ensemble)")
  p.add_argument("--out", required=True, help="output folder")
  model = p.add_mutually_exclusive_group()
  model.add_argument("--checkpoint", help="the model (default: the one the manifest names)")
  model.add_argument("--exported", help="an artifact of the same model")
  return p.parse_args(argv)


def read_features_manifest(folder: Path) -> dict:
  path = folder / embed_cli.MANIFEST
  if not path.is_file():
    raise ValueError(f"--features {folder}: no {embed_cli.MANIFEST} (not written by python -m lseg_jax.embed)")
  manifest = json.loads(path.read_text())
  if manifest["preset"] != "native" or manifest["options"].get("full_size"):
    raise ValueError(f"--features {folder} holds {manifest['preset']}{' --full_size' * bool(manifest['options'].get('full_size'))}"
                     " features: query scores the native preset's (the model's own resolution)")
  return manifest


def main(argv: list[str] | None = None) -> int:
  cli.quiet_libraries()
  try:
    args = parse_args(argv)
    features, out = Path(args.features), Path(args.out)
    names = labels_lib.parse_labels(args.labels)
    manifest = read_features_manifest(features)
    source = args.checkpoint or args.exported or manifest["model"]
    Segmenter.peek(source)
    images_lib.prepare_out_dir(out)
    seg = Segmenter.load(source)
    text = seg.encode_labels(names, args.template or ("{}",))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  labels, _ = pictures.legend_labels(names)
  colours = pictures.palette(len(names))
  failed = written = 0
  for name, record in manifest["frames"].items():
    try:
      f = np.load(features / f"{name}.npy")
      ids, _ = seg.score(f, tuple(record["image_size"]), text)
    except (OSError, ValueError) as e:
      print(f"error: frame {name}: {e}", file=sys.stderr)
      failed += 1
      continue
    try:
      image = images_lib.read_image(Path(record["source"]))
    except images_lib.ImageError:
      image = None  # a video frame or a moved image: no overlay
    pictures.write_label_maps(out, name, image, ids, None, labels, colours)
    written += 1
  print(f"wrote the label maps of {written} frames to {out}")
  return 0 if not failed else 1 if written else 2


if __name__ == "__main__":
  sys.exit(main())
