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

Input geometry: the model sees inputs like the ones it was trained and
validated on, and the label map is always at the image's own size.
- A training workdir whose eval transform is "resize" (the demo, the
  zero-shot runs: the whole image squashed to crop x crop) -> "square": the
  image is resized (PIL bilinear, as those runs do) to base_size x base_size,
  base_size defaulting to the run's crop size, segmented, and the logits are
  resized back to the image size.
- Any other workdir ("val": short side -> crop, centre crop) and converted
  models -> sliding windows (lseg_jax.inference, the official multi-scale
  evaluation): the long side resized to base_size * scale and crop x crop
  windows, the logits mapped back to the image size. The sizes default to the
  run's base_size / crop_size, and to the official demo's 520 / 480
  (lseg_app.py) for a converted model.
--square / --no-square, --base_size and --crop_size override these; the
normalisation is the run's (else the official one for the backbone).
--scales / --flip give the multi-scale protocol; several --template values are
averaged (prompt ensembling). The images run in groups, one per device, on
the on-device path of `lseg_jax.inference.MultiScaleSegmenter`: the [H, W, N]
logits never reach the host (unless --save_logits), only the label map does.

Images of every PIL mode are read as RGB: 16-bit and 32-bit gray (I;16, I, F)
are scaled to 0..255, not clipped; transparent images are composited over
white; EXIF orientation is applied. An unreadable image is reported and
skipped, as is one whose logits would need more than --max_logits_gb of device
memory (checked from its header before any work).

Exit codes: 0 all images segmented; 1 some images failed (each named on
stderr, the others written); 2 a usage error (one `error:` line, nothing
segmented).
"""

import argparse
from collections.abc import Sequence
import dataclasses
import functools
import math
from pathlib import Path
import sys
import tempfile

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from lseg_jax import checkpoint, data, export, inference, labels as labels_lib, sharding
from lseg_jax.data import transforms
from lseg_jax.models import build_model, presets

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# lseg_app.py: LSeg_MultiEvalModule with LSegModule's base_size and crop_size.
OFFICIAL_BASE_SIZE, OFFICIAL_CROP_SIZE = 520, 480
WIDE_GRAY_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Tried in order for each legend label (Pillow searches the system font folders).
FONT_FILES = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf",
              "Arial Unicode.ttf", "Arial.ttf", "arial.ttf")
MAX_LEGEND_COLUMNS = 6
WINDOWS_PER_DEVICE = 4  # windows each device runs per step


class ImageError(Exception):
  """One image cannot be segmented; the others still are."""


# ------------------------------------------------------------------ images

def _gray_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
  """Gray levels of a wide-range mode on 0..255. 16-bit modes divide by 257;
  `I` and `F` (whose range the mode does not say) by the first range their
  values fit in ([0, 1] for F, [0, 255], [0, 65535]), else min..max."""
  x = np.nan_to_num(values.astype(np.float32))  # [H, W]
  lo, hi = float(x.min()), float(x.max())
  if mode.startswith("I;16"):
    top = 65535.0
  else:
    tops = ((1.0,) if mode == "F" else ()) + (255.0, 65535.0)
    top = next((t for t in tops if lo >= 0 and hi <= t), None)
    if top is None:
      x, top = x - lo, max(hi - lo, 1e-12)
  return np.clip(np.round(x * (255.0 / top)), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> np.ndarray:
  """uint8 RGB [H, W, 3] of a PIL image of any mode: wide gray modes scaled
  (PIL's convert would clip I;16 to 0/255), transparency composited over
  white, everything else by PIL's convert."""
  if im.mode in WIDE_GRAY_MODES:
    return np.repeat(_gray_to_uint8(np.asarray(im), im.mode)[..., None], 3, axis=-1)
  if im.mode == "La":
    im = im.convert("LA")  # Pillow converts premultiplied gray only to LA
  if im.mode in ALPHA_MODES or "transparency" in im.info:
    white = Image.new("RGBA", im.size, "white")
    im = Image.alpha_composite(white, im.convert("RGBA"))
  return np.asarray(im.convert("RGB"))


def read_image(path: Path) -> np.ndarray:
  """uint8 RGB [H, W, 3], upright (EXIF orientation applied); ImageError
  naming the file if it cannot be decoded."""
  try:
    with Image.open(path) as im:
      return to_rgb(ImageOps.exif_transpose(im))
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f"cannot read image {path}: {e}") from e


def probe_image(path: Path) -> tuple[int, int]:
  """(height, width) from the file's header, without decoding the pixels."""
  if not path.exists():
    raise ImageError(f"image {path} does not exist")
  try:
    with Image.open(path) as im:
      return im.height, im.width
  except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
    raise ImageError(f"cannot read image {path}: {e}") from e


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
  """Files as given, and the image files of folders (sorted); each file once."""
  paths, seen = [], set()
  for item in map(Path, inputs):
    found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if item.is_dir() else [item]
    for p in found:
      if p.resolve() not in seen:
        seen.add(p.resolve())
        paths.append(p)
  if not paths:
    raise ValueError(f"no images found in {', '.join(inputs)}")
  return paths


def output_names(paths: Sequence[Path]) -> list[str]:
  """A distinct output prefix per image: its file name (suffix kept), then
  NAME-2, NAME-3... for repeats (compared case-blind, as macOS and Windows
  file systems do)."""
  used, names = set(), []
  for path in paths:
    name, k = path.name, 1
    while name.casefold() in used:
      k += 1
      name = f"{path.name}-{k}"
    used.add(name.casefold())
    names.append(name)
  return names


# ------------------------------------------------------------------ geometry

@dataclasses.dataclass(frozen=True)
class Geometry:
  """How an image becomes model inputs (see the module docstring)."""
  square: bool  # resize the whole image to base_size x base_size first
  base_size: int
  crop_size: int


def input_geometry(run: ml_collections.ConfigDict | None, square: bool | None, base_size: int | None,
                   crop_size: int | None) -> Geometry:
  """Explicit flags win; else a training run's own transform and sizes, else
  the official demo's windows."""
  run_input = run.get("input", {}) if run is not None else {}
  if square is None:
    square = run_input.get("eval_mode") == "resize"
  if crop_size is None:
    crop_size = run_input.get("crop_size") or OFFICIAL_CROP_SIZE
  if base_size is None:
    base_size = crop_size if square else run_input.get("base_size") or OFFICIAL_BASE_SIZE
  return Geometry(square, base_size, crop_size)


def logits_gb(h: int, w: int, num_labels: int, geometry: Geometry, ms: inference.MultiScale) -> float:
  """Peak device memory, in GB, of one image's float32 logits: the summed
  [H, W, N] map on the bucketed size, one window's share of it being added
  (and, square, the map resized back), the window logits of a step and
  their row resample; the image's copies count as 3 more labels."""
  src_h, src_w = (geometry.base_size, geometry.base_size) if geometry.square else (h, w)
  src = inference.size_bucket(src_h) * inference.size_bucket(src_w)
  full = inference.size_bucket(h) * inference.size_bucket(w) if geometry.square else 0
  crop = ms.crop_size
  windows = WINDOWS_PER_DEVICE * crop * crop + inference.size_bucket(src_h) * crop
  return 4 * (num_labels + 3) * (2 * src + 2 * full + windows) / 1e9


def square_input(image: np.ndarray, side: int) -> np.ndarray:
  """[S, S, 3] uint8: the whole image resized as the "resize" runs do (PIL bilinear)."""
  return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))


@functools.partial(jax.jit, static_argnums=1)
def _resize_back(sums: jax.Array, out_hw: tuple[int, int], rows: tuple, cols: tuple) -> jax.Array:
  """[G, S, S, N] square logits -> [G, *out_hw, N], per-image taps."""
  del out_hw  # in the taps' shapes; static for the cache key only
  return jax.vmap(inference.resample)(sums, rows[0], rows[1], cols[0], cols[1])


def predict_images(segmenter: inference.MultiScaleSegmenter, images: Sequence[np.ndarray], text: np.ndarray,
                   geometry: Geometry, mean: np.ndarray, std: np.ndarray, save_logits: bool
                   ) -> list[tuple[np.ndarray, np.ndarray | None]]:
  """(label ids [h, w], logits [h, w, N] with save_logits, else None) of up
  to `segmenter.slots` uint8 images, by `geometry`: the logits are summed,
  resized back (square) and reduced to labels on the devices."""
  inputs = [square_input(im, geometry.base_size) if geometry.square else im for im in images]
  slots = [transforms.normalize(x, mean, std) for x in inputs] + [None] * (segmenter.slots - len(images))
  label_mask = np.ones((segmenter.slots, len(text)), bool)
  sums, _ = segmenter.logit_sums(slots, np.broadcast_to(text, (segmenter.slots, *text.shape)), label_mask)
  if geometry.square:
    out_hw = segmenter.out_size([im.shape[:2] for im in images])
    sizes = [im.shape[:2] for im in images] + [(1, 1)] * (segmenter.slots - len(images))
    taps = lambda axis: tuple(np.stack(t) for t in zip(*[inference.resample_taps(geometry.base_size, hw[axis],
                                                                                 out_hw[axis]) for hw in sizes]))
    sums = _resize_back(sums, out_hw, taps(0), taps(1))  # [G, H, W, N]
  ids = np.asarray(segmenter.positions(sums, label_mask))
  logits = np.asarray(sums) if save_logits else None  # the only [H, W, N] copy to the host, when asked
  return [(ids[i, :h, :w], None if logits is None else logits[i, :h, :w])
          for i, (h, w) in enumerate(im.shape[:2] for im in images)]


# ------------------------------------------------------------------ model

def input_normalization(run: ml_collections.ConfigDict | None, model_config: ml_collections.ConfigDict) -> str:
  """The normalisation the model was trained with: a training run's own, else
  the official one for the backbone (ImageNet statistics for the ResNet,
  CLIP's 0.5 / 0.5 for the ViTs)."""
  if run is not None and run.get("input", {}).get("normalization"):
    return run.input.normalization
  return "imagenet" if model_config.kind == "resnet" else "clip"


def text_tower_note(model_config: ml_collections.ConfigDict, run: ml_collections.ConfigDict | None) -> str | None:
  """One `note:` line when the label embeddings do not come from CLIP (a test
  tower, or a run that initialised its text tower at random): then only the
  labels the model was trained on mean anything."""
  official = [t for name, t in presets.CLIP_TEXT.items() if name != "tiny"]
  init = run.get("init", {}) if run is not None else {}
  if model_config.text.to_dict() not in official:
    why = f"a {model_config.text.width}-wide test tower"
  elif run is not None and not init.get("clip_text") and not init.get("model_dir"):
    why = "initialised at random: the run set neither init.clip_text nor init.model_dir"
  else:
    return None
  trained = ""
  dataset = run.get("input", {}).get("dataset") if run is not None else None
  if dataset:
    names = data.label_names(dataset)
    trained = f" ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
  return (f"note: this model's text tower is not CLIP ({why}): only the labels it was trained on{trained} are "
          "meaningful; other words give arbitrary maps")


# ------------------------------------------------------------------ legend

@functools.lru_cache(maxsize=None)
def _font(file: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
  """A TrueType font by file name (searched in the system font folders), or
  Pillow's built-in font for None."""
  return ImageFont.truetype(file, size) if file else ImageFont.load_default(size)


@functools.lru_cache(maxsize=1)
def available_fonts() -> tuple[str | None, ...]:
  """The FONT_FILES found on this system, then Pillow's built-in (Latin) font."""
  found = []
  for file in FONT_FILES:
    try:
      _font(file, 16)
      found.append(file)
    except OSError:
      pass
  return (*found, None)


def _glyph(font, char: str) -> tuple:
  mask = font.getmask(char)
  return mask.size, bytes(mask)


def covers(font, text: str) -> bool:
  """Whether `font` has a glyph for every visible character of `text`: a
  missing one renders as the font's .notdef box, exactly like U+FFFF."""
  notdef = _glyph(font, "\uffff")
  return all(c.isspace() or _glyph(font, c) != notdef for c in set(text))


def legend_labels(names: Sequence[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
  """(text, font file) to draw for each label, and the labels no font here
  covers: those are drawn as their \\u escapes with the first font."""
  fonts = available_fonts()
  out, missing = [], []
  for name in names:
    covering = [f for f in fonts if covers(_font(f, 16), name)]
    if covering:
      out.append((name, covering[0]))
    else:
      missing.append(name)
      out.append((name.encode("ascii", "backslashreplace").decode("ascii"), fonts[0]))
  return out, missing


def draw_legend(entries: Sequence[tuple[str, str | None, tuple[int, int, int]]], height: int) -> Image.Image:
  """A white panel of (colour swatch, text) rows, in columns so that it is no
  taller than `height` (up to MAX_LEGEND_COLUMNS columns, then taller); each
  column as wide as its longest text. The font grows with `height`."""
  size = max(12, min(40, height // 30))
  row, pad = round(1.6 * size), size // 2
  rows = max(1, (height - pad) // row, math.ceil(len(entries) / MAX_LEGEND_COLUMNS))
  columns = [entries[i:i + rows] for i in range(0, len(entries), rows)]
  widths = [pad + size + pad + math.ceil(max(_font(f, size).getlength(t) for t, f, _ in col)) + pad
            for col in columns]
  panel = Image.new("RGB", (sum(widths) + pad, pad + row * min(rows, len(entries))), "white")
  draw = ImageDraw.Draw(panel)
  x = 0
  for col, width in zip(columns, widths):
    for r, (text, file, colour) in enumerate(col):
      y = pad + r * row
      draw.rectangle([x + pad, y, x + pad + size, y + size], fill=colour, outline="black")
      draw.text((x + 2 * pad + size, y), text, fill="black", font=_font(file, size))
    x += width
  return panel


def overlay_with_legend(image: np.ndarray, ids: np.ndarray, labels: Sequence[tuple[str, str | None]],
                        colours: np.ndarray) -> Image.Image:
  """The colour map blended over the image, with a legend of the labels present at its right."""
  blend = (0.5 * image + 0.5 * colours[ids]).astype(np.uint8)  # [H, W, 3]
  present = np.unique(ids)
  legend = draw_legend([(*labels[i], tuple(int(c) for c in colours[i])) for i in present], image.shape[0])
  canvas = Image.new("RGB", (image.shape[1] + legend.width, max(image.shape[0], legend.height)), "white")
  canvas.paste(Image.fromarray(blend), (0, 0))
  canvas.paste(legend, (image.shape[1], 0))
  return canvas


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


# ------------------------------------------------------------------ command line

def parse_scales(text: str) -> tuple[float, ...]:
  """'0.5,1.0' -> (0.5, 1.0); each scale a positive finite number."""
  try:
    scales = tuple(float(s) for s in text.split(","))
  except ValueError:
    raise ValueError(f"--scales {text!r} is not a comma-separated list of numbers") from None
  if not all(math.isfinite(s) and s > 0 for s in scales):
    raise ValueError(f"--scales {text!r}: every scale must be a positive finite number")
  return scales


def check_sizes(geometry: Geometry, max_logits_gb: float) -> None:
  """The size flags, checked after the run's defaults filled them in."""
  if geometry.crop_size <= 0 or geometry.crop_size % 32:
    raise ValueError(f"--crop_size {geometry.crop_size} is not a positive multiple of 32")
  if geometry.base_size <= 0:
    raise ValueError(f"--base_size {geometry.base_size} is not positive")
  if not max_logits_gb > 0:
    raise ValueError(f"--max_logits_gb {max_logits_gb} is not positive")


def prepare_out_dir(out: Path) -> None:
  """Creates --out and checks a file can be written there."""
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} is a file, not a folder")
  try:
    out.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=out).close()
  except OSError as e:
    raise ValueError(f"--out {out} is not a writable folder: {e.strerror or e}") from None


def check_image(path: Path, num_labels: int, geometry: Geometry, ms: inference.MultiScale, max_gb: float) -> None:
  """Raises ImageError unless the header of `path` reads, no scale shrinks its
  short side to nothing and its logits fit in `max_gb`."""
  h, w = probe_image(path)
  scaled = [inference.scaled_size(h, w, math.ceil(ms.base_size * s)) for s in ms.scales]
  if not geometry.square and min(min(hw) for hw in scaled) < 1:
    raise ImageError(f"{path}: a {w}x{h} image is too thin for --base_size {ms.base_size} at scale {min(ms.scales):g} "
                     "(its short side would be 0 px): use a larger --base_size or --square")
  need = logits_gb(h, w, num_labels, geometry, ms)
  if need > max_gb:
    raise ImageError(f"{path}: its logits ({w}x{h} pixels x {num_labels} labels) need about {need:.1f} GB of "
                     f"host memory, over --max_logits_gb {max_gb:g}: use fewer labels or a smaller image, or "
                     "raise --max_logits_gb")


def preflight(paths: Sequence[Path], num_labels: int, geometry: Geometry, ms: inference.MultiScale,
              max_gb: float) -> list[Path]:
  """The images `check_image` accepts; the others are reported on stderr."""
  good = []
  for path in paths:
    try:
      check_image(path, num_labels, geometry, ms, max_gb)
      good.append(path)
    except ImageError as e:
      print(f"error: {e}", file=sys.stderr)
  return good


def write_outputs(out: Path, name: str, image: np.ndarray, ids: np.ndarray, logits: np.ndarray | None,
                  labels: Sequence[tuple[str, str | None]], colours: np.ndarray) -> None:
  """The label map, overlay, ids (and logits, when given) of one image, named NAME_*."""
  Image.fromarray(colours[ids]).save(out / f"{name}_labels.png")
  overlay_with_legend(image, ids, labels, colours).save(out / f"{name}_overlay.png")
  Image.fromarray(ids.astype(np.uint8 if len(labels) < 256 else np.uint16)).save(out / f"{name}_ids.png")
  np.save(out / f"{name}_ids.npy", ids.astype(np.int32))
  if logits is not None:
    np.save(out / f"{name}_logits.npy", logits)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m lseg_jax.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
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


def load_network(args: argparse.Namespace, names: Sequence[str]) -> tuple:
  """(forward, params, text [N, D], model config, normalisation) of
  --checkpoint or --exported (whose parameters are inside it)."""
  templates = args.template or ("{}",)
  if args.exported:
    model = export.load(args.exported)
    text = labels_lib.encode_labels(model, None, names, templates)
    return inference.model_forward(model), {}, text, ml_collections.ConfigDict(model.meta["model"]), \
        model.meta["normalization"]
  run = checkpoint.read_run_config(args.checkpoint)
  config, variables = checkpoint.load_model(args.checkpoint)
  model = build_model(config)
  text = labels_lib.encode_labels(model, variables["params"]["text_encoder"], names, templates)
  params = {"params": {k: v for k, v in variables["params"].items() if k != "text_encoder"},
            "batch_stats": variables["batch_stats"]}
  return inference.model_forward(model), params, text, config, input_normalization(run, config)


def run_geometry(args: argparse.Namespace) -> tuple[ml_collections.ConfigDict | None, Geometry]:
  """(the training run config or None, the input geometry), before any model is read."""
  if args.exported:
    window = export.load(args.exported).window
    if args.crop_size not in (None, window):
      raise ValueError(f"--crop_size {args.crop_size}: {args.exported} runs {window} px windows")
    return None, input_geometry(None, args.square, args.base_size, window)
  checkpoint.read_model_config(args.checkpoint)  # a model directory at all
  run = checkpoint.read_run_config(args.checkpoint)
  return run, input_geometry(run, args.square, args.base_size, args.crop_size)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  out = Path(args.out)
  try:
    names = labels_lib.parse_labels(args.labels)
    scales = parse_scales(args.scales)
    run, geometry = run_geometry(args)
    check_sizes(geometry, args.max_logits_gb)
    prepare_out_dir(out)
    ms = inference.MultiScale(scales=scales, flip=args.flip, base_size=geometry.base_size,
                              crop_size=geometry.crop_size)
    paths = expand_inputs(args.images)
    good = preflight(paths, len(names), geometry, ms, args.max_logits_gb)
    if not good:
      return 2
    forward, params, text, config, normalization = load_network(args, names)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  failed = len(paths) - len(good)
  note = text_tower_note(config, run)
  if note:
    print(note, file=sys.stderr)
  labels, unrenderable = legend_labels(names)
  if unrenderable:
    print(f"note: no font here renders the labels {unrenderable}: the legend writes them as \\u escapes "
          "(install a Noto font that covers them)", file=sys.stderr)
  mean, std = transforms.normalization_stats(normalization)
  segmenter = inference.MultiScaleSegmenter(forward, params, sharding.make_mesh([("data", -1)]), ms, -mean / std,
                                            windows_per_device=WINDOWS_PER_DEVICE)
  colours, text = palette(len(names)), np.asarray(text)
  named = list(zip(good, output_names(good)))
  for start in range(0, len(named), segmenter.slots):
    batch = []  # (path, name, image) read in this group
    for path, name in named[start:start + segmenter.slots]:
      try:
        batch.append((path, name, read_image(path)))
      except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        failed += 1
    if not batch:
      continue
    results = predict_images(segmenter, [image for *_, image in batch], text, geometry, mean, std, args.save_logits)
    for (path, name, image), (ids, logits) in zip(batch, results):
      try:
        write_outputs(out, name, image, ids, logits, labels, colours)
      except OSError as e:
        print(f"error: cannot write the outputs of {path}: {e}", file=sys.stderr)
        failed += 1
        continue
      print(f"{path} -> {out / name}_*.png ({image.shape[1]}x{image.shape[0]})")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
