r"""Segment images with any labels: colour map, overlay with legend, label ids.

  python -m lseg_jax.predict --checkpoint models/lseg_demo --labels "dog,grass,other" --out out/ img1.jpg imgs/
  python -m lseg_jax.predict --checkpoint /tmp/lseg_jax_demo --labels "background,circle,star" \
      --template "a photo of a {}." --template "a picture of a {}." --save_logits --out out/ img.png

For each image: NAME_labels.png (colour label map), NAME_overlay.png (the map
over the image, with a legend), NAME_ids.png and NAME_ids.npy (label index per
pixel, in --labels order), and with --save_logits NAME_logits.npy [H, W, N].
Images of any size: the long side is resized to --base_size and padded to
--crop_size windows (sliding when larger), and the logits are mapped back to
the image size (lseg_jax.inference); --scales/--flip give the multi-scale
protocol. Several --template values are averaged (prompt ensembling).
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
import sys

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from lseg_jax import checkpoint, inference, labels as labels_lib
from lseg_jax.data import transforms
from lseg_jax.models import build_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def palette(n: int) -> np.ndarray:
  """n distinct RGB colours (the PASCAL VOC bit-interleaving scheme)."""
  colours = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i + 1, 0, 0, 0
    for bit in range(8):
      r |= ((c >> 0) & 1) << (7 - bit)
      g |= ((c >> 1) & 1) << (7 - bit)
      b |= ((c >> 2) & 1) << (7 - bit)
      c >>= 3
    colours[i] = (r, g, b)
  return colours


def read_image(path: Path) -> np.ndarray:
  """uint8 RGB [H, W, 3]; grayscale, palette and RGBA images are converted."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
  paths = []
  for item in map(Path, inputs):
    if item.is_dir():
      paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif item.exists():
      paths.append(item)
    else:
      raise FileNotFoundError(f"image {item} does not exist")
  if not paths:
    raise ValueError(f"no images found in {list(inputs)}")
  return paths


def overlay_with_legend(image: np.ndarray, ids: np.ndarray, names: Sequence[str], colours: np.ndarray) -> Image.Image:
  """Blend the colour map over the image and draw a legend of the labels present."""
  blend = (0.5 * image + 0.5 * colours[ids]).astype(np.uint8)
  present = [i for i in range(len(names)) if (ids == i).any()]
  canvas = Image.new("RGB", (image.shape[1] + 160, max(image.shape[0], 20 * len(present) + 10)), "white")
  canvas.paste(Image.fromarray(blend), (0, 0))
  draw = ImageDraw.Draw(canvas)
  for row, i in enumerate(present):
    y = 6 + 20 * row
    draw.rectangle([image.shape[1] + 8, y, image.shape[1] + 22, y + 14], fill=tuple(int(c) for c in colours[i]))
    draw.text((image.shape[1] + 28, y), names[i], fill="black")
  return canvas


def input_normalization(checkpoint_path: str, model_config) -> str:
  """The normalisation the model was trained with: a training run's own
  (its config.json), else the official one for the backbone (ImageNet
  statistics for the ResNet, CLIP's 0.5 / 0.5 for the ViTs)."""
  run = checkpoint.read_run_config(checkpoint_path)
  if run is not None:
    return run.input.normalization
  return "imagenet" if model_config.kind == "resnet" else "clip"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m lseg_jax.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("images", nargs="+", help="image files or folders")
  p.add_argument("--checkpoint", required=True, help="model directory or training workdir")
  p.add_argument("--labels", required=True, help="comma-separated labels, e.g. 'dog,grass,other'")
  p.add_argument("--template", action="append", help="prompt template with {} (repeat to ensemble)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--base_size", type=int, default=480, help="long side of the image at scale 1")
  p.add_argument("--crop_size", type=int, default=480, help="window size (a multiple of 32)")
  p.add_argument("--scales", default="1.0", help="comma-separated scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
  p.add_argument("--flip", action="store_true", help="add mirrored predictions")
  p.add_argument("--save_logits", action="store_true", help="also write NAME_logits.npy")
  args = p.parse_args(argv)
  try:
    names = labels_lib.parse_labels(args.labels)
    paths = expand_inputs(args.images)
    if args.crop_size <= 0 or args.crop_size % 32:
      raise ValueError(f"--crop_size {args.crop_size} is not a positive multiple of 32")
    if args.base_size <= 0:
      raise ValueError(f"--base_size {args.base_size} is not positive")
    try:
      scales = tuple(float(s) for s in args.scales.split(","))
    except ValueError:
      raise ValueError(f"--scales {args.scales!r} is not a comma-separated list of numbers") from None
    if any(s <= 0 for s in scales):
      raise ValueError(f"--scales {args.scales!r} must be positive")
    config, variables = checkpoint.load_model(args.checkpoint)
    model = build_model(config)
    text = labels_lib.encode_labels(model, variables["params"]["text_encoder"], names, args.template or ("{}",))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  forward = inference.make_window_forward(model, variables, text, chunk=2)
  ms = inference.MultiScale(scales=scales, flip=args.flip, base_size=args.base_size, crop_size=args.crop_size)
  mean, std = transforms.normalization_stats(input_normalization(args.checkpoint, config))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  colours = palette(len(names))
  for path in paths:
    try:
      image = read_image(path)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    logits = inference.multiscale_logits(forward, transforms.normalize(image, mean, std), len(names), ms,
                                         -mean / std)  # [H, W, N]
    ids = np.argmax(logits, axis=-1)
    Image.fromarray(colours[ids]).save(out / f"{path.stem}_labels.png")
    overlay_with_legend(image, ids, names, colours).save(out / f"{path.stem}_overlay.png")
    Image.fromarray(ids.astype(np.uint8 if len(names) < 256 else np.uint16)).save(out / f"{path.stem}_ids.png")
    np.save(out / f"{path.stem}_ids.npy", ids.astype(np.int32))
    if args.save_logits:
      np.save(out / f"{path.stem}_logits.npy", logits)
    print(f"{path} -> {out / path.stem}_*.png ({image.shape[1]}x{image.shape[0]})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
