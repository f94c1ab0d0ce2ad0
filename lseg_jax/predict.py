r"""Segment images with any labels: colour map, overlay with legend, label ids.

  python -m lseg_jax.predict --checkpoint models/lseg_demo --labels "dog,grass,other" --out out/ img1.jpg imgs/
  python -m lseg_jax.predict --checkpoint /tmp/lseg_jax_demo --labels "background,circle,star" \
      --template "a photo of a {}." --template "a picture of a {}." --save_logits --out out/ img.png
  python -m lseg_jax.predict --exported lseg.jaxexport --labels "dog,grass,other" --out out/ img.jpg

The model: --checkpoint (a model directory or training workdir) or --exported
(a `python -m lseg_jax.export` artifact: its window is the crop size, its
normalisation the one it was exported with).

Outputs. For each image NAME (its file name, suffix kept, so x.jpg and x.png
never share outputs; the same name from two folders gets NAME-2, NAME-3, ...
in input order): NAME_labels.png (colour label map), NAME_overlay.png (the map
over the image, with a legend of the labels present), NAME_ids.png and
NAME_ids.npy (label index per pixel, in --labels order), and with
--save_logits NAME_logits.npy [H, W, N]. Within one call no two images share
outputs; a later call writing to the same --out replaces the files of the same
NAMEs (re-running replaces its own results).

Input geometry and normalisation are the run's (`lseg_jax.geometry`): a run
trained on whole images resized to a square sees them so, others (and
converted models) by sliding windows; an artifact records its run's.
--square / --no-square, --base_size and --crop_size override these; the
normalisation is the run's (else the official one for the backbone).
--scales / --flip give the multi-scale protocol; several --template values are
averaged (prompt ensembling). The images run in groups, one per device, on
`lseg_jax.segmenter.Segmenter` (the [H, W, N] logits never reach the host
unless --save_logits; only the label map does).

Images of every PIL mode are read as RGB: 16-bit and 32-bit gray (I;16, I, F)
are scaled to 0..255, not clipped; transparent images are composited over
white; EXIF orientation is applied (`lseg_jax.images`). An image that
cannot be used (unreadable however it fails, or whose logits would need more
than --max_logits_gb of device memory: checked from its header before any
work) is reported in one `error:` line and skipped.

Exit codes: 0 every image segmented; 1 some images failed (each named on
stderr, the others written); 2 nothing segmented: a usage error (one `error:`
line, before the model is loaded) or no usable image.
"""

import argparse
import math
from pathlib import Path
import sys

from lseg_jax import cli, geometry as geometry_lib, images as images_lib, inference, labels as labels_lib, pictures
from lseg_jax.segmenter import Segmenter, size_problem


def parse_scales(text: str) -> tuple[float, ...]:
  """'0.5,1.0' -> (0.5, 1.0); each scale a positive finite number."""
  try:
    scales = tuple(float(s) for s in text.split(","))
  except ValueError:
    raise ValueError(f"--scales {text!r} is not a comma-separated list of numbers") from None
  if not all(math.isfinite(s) and s > 0 for s in scales):
    raise ValueError(f"--scales {text!r}: every scale must be a positive finite number")
  return scales


def check_image(path: Path, num_labels: int, geometry: geometry_lib.Geometry, ms: inference.MultiScale,
                max_gb: float) -> None:
  """ImageError unless the header of `path` reads and the image fits (`size_problem`)."""
  h, w = images_lib.probe_image(path)
  if problem := size_problem(h, w, num_labels, geometry, ms, max_gb):
    raise images_lib.ImageError(f"{path}: {problem}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser("python -m lseg_jax.predict", __doc__)
  p.add_argument("images", nargs="+", help="image files or folders")
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument("--checkpoint", help="model directory or training workdir")
  model.add_argument("--exported", help="an artifact of python -m lseg_jax.export (no model code needed)")
  p.add_argument("--labels", required=True, help="comma-separated labels, e.g. 'dog,grass,other'")
  p.add_argument("--template", action="append", help="prompt template with {} (repeat to ensemble)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--square", action=argparse.BooleanOptionalAction, default=None,
                 help="resize the whole image to base_size x base_size first (default: a run trained that way)")
  p.add_argument("--base_size", type=int, help="long side (square side with --square) at scale 1; "
                 "default: the run's (its crop size when square), else 520")
  p.add_argument("--crop_size", type=int, help="window size, a multiple of 32; default: the run's, else 480")
  p.add_argument("--scales", default="1.0", help="comma-separated scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
  p.add_argument("--flip", action="store_true", help="add mirrored predictions")
  p.add_argument("--save_logits", action="store_true", help="also write NAME_logits.npy")
  p.add_argument("--max_logits_gb", type=float, default=4.0,
                 help="skip images whose logits need more device memory than this (GB)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  cli.quiet_libraries()
  try:
    args = parse_args(argv)
    out, source = Path(args.out), args.checkpoint or args.exported
    names = labels_lib.parse_labels(args.labels)
    scales = parse_scales(args.scales)
    recorded, window = Segmenter.peek(source)
    if window is not None and args.crop_size not in (None, window):
      raise ValueError(f"--crop_size {args.crop_size}: {source} runs {window} px windows")
    geometry = geometry_lib.input_geometry(recorded, args.square, args.base_size,
                                           window if args.crop_size is None else args.crop_size)
    geometry_lib.check_geometry(geometry)
    if not args.max_logits_gb > 0:
      raise ValueError(f"--max_logits_gb {args.max_logits_gb} is not positive")
    images_lib.prepare_out_dir(out)
    ms = inference.MultiScale(scales=scales, flip=args.flip, base_size=geometry.base_size,
                              crop_size=geometry.crop_size)
    paths = images_lib.expand_inputs(args.images)
    for path in paths:
      if not path.exists():
        raise ValueError(f"image {path} does not exist")
    good = []
    for path in paths:
      try:
        check_image(path, len(names), geometry, ms, args.max_logits_gb)
        good.append(path)
      except images_lib.ImageError as e:
        print(f"error: {e}", file=sys.stderr)
    if not good:
      return 2
    seg = Segmenter.load(source)
    text = seg.encode_labels(names, args.template or ("{}",))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if seg.note:
    print(seg.note, file=sys.stderr)
  labels, unrenderable = pictures.legend_labels(names)
  if unrenderable:
    print(f"note: no font here renders the labels {unrenderable}: the legend writes them as \\u escapes "
          "(install a Noto font that covers them)", file=sys.stderr)
  colours = pictures.palette(len(names))
  failed, written = len(paths) - len(good), 0
  named = list(zip(good, images_lib.output_names(good)))
  group = len(seg.mesh.devices.flat)  # one image per device per call: read a group at a time
  for start in range(0, len(named), group):
    batch = []  # (path, name, image) read in this group
    for path, name in named[start:start + group]:
      try:
        batch.append((path, name, images_lib.read_image(path)))
      except images_lib.ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        failed += 1
    results = seg.segment([image for *_, image in batch], text, geometry=geometry, scales=scales, flip=args.flip,
                          return_logits=args.save_logits)
    for (path, name, image), (ids, logits) in zip(batch, results):
      try:
        pictures.write_label_maps(out, name, image, ids, logits, labels, colours)
      except OSError as e:
        print(f"error: cannot write the outputs of {path}: {e}", file=sys.stderr)
        failed += 1
        continue
      written += 1
      print(f"{path} -> {out / name}_*.png ({image.shape[1]}x{image.shape[0]})")
  return 0 if not failed else 1 if written else 2


if __name__ == "__main__":
  sys.exit(main())
