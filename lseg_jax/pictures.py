"""Pictures of results: the label palette, the legend, the overlay, and
PCA colours of dense features.

The legend draws every label in a font that has its glyphs (searched in the
system font folders), in columns no taller than the image.
"""

from collections.abc import Sequence
import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lseg_jax import files

# Tried in order for each legend label (Pillow searches the system font folders).
FONT_FILES = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf",
              "Arial Unicode.ttf", "Arial.ttf", "arial.ttf")
MAX_LEGEND_COLUMNS = 6


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
  present = np.unique(ids)
  legend = draw_legend([(*labels[i], tuple(int(c) for c in colours[i])) for i in present], image.shape[0])
  canvas = Image.new("RGB", (image.shape[1] + legend.width, max(image.shape[0], legend.height)), "white")
  canvas.paste(Image.fromarray(blend(image, ids, colours)), (0, 0))
  canvas.paste(legend, (image.shape[1], 0))
  return canvas


def blend(image: np.ndarray, ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3]: the label colours half over the image."""
  return (0.5 * image + 0.5 * colours[ids]).astype(np.uint8)


def heatmap(values: np.ndarray) -> np.ndarray:
  """uint8 RGB [H, W, 3] of values in [0, 1] [H, W]: black, red, yellow, white."""
  v = np.clip(values, 0.0, 1.0)[..., None]
  return np.round(255 * np.clip(3 * v - np.array([0.0, 1.0, 2.0]), 0, 1)).astype(np.uint8)


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


def write_label_maps(out: Path, name: str, image: np.ndarray | None, ids: np.ndarray, logits: np.ndarray | None,
                  labels: Sequence[tuple[str, str | None]], colours: np.ndarray) -> None:
  """The label map, overlay (when the image is given), ids (and logits, when
  given) of one image, named NAME_*: NAME_labels.png, NAME_overlay.png,
  NAME_ids.png, NAME_ids.npy, NAME_logits.npy; each written whole or not at all."""
  png = lambda kind, im: files.write_atomic(out / f"{name}_{kind}.png", lambda f: im.save(f, format="PNG"))
  npy = lambda kind, x: files.write_atomic(out / f"{name}_{kind}.npy", lambda f: np.save(f, x))
  png("labels", Image.fromarray(colours[ids]))
  if image is not None:
    png("overlay", overlay_with_legend(image, ids, labels, colours))
  png("ids", Image.fromarray(ids.astype(np.uint8 if len(labels) < 256 else np.uint16)))
  npy("ids", ids.astype(np.int32))
  if logits is not None:
    npy("logits", logits)


def fit_pca(features: np.ndarray, samples: int = 20000, seed: int = 0) -> dict:
  """mean [D], components [3, D] and the 1st/99th percentiles [3] of the
  projection, fitted on (a sample of) one frame's features [h, w, D]."""
  x = features.reshape(-1, features.shape[-1]).astype(np.float64)
  if len(x) > samples:
    x = x[np.random.default_rng(seed).choice(len(x), samples, replace=False)]
  mean = x.mean(0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  projected = (x - mean) @ vt[:3].T
  lo, hi = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)
  return {"mean": mean.tolist(), "components": vt[:3].tolist(), "low": lo.tolist(), "high": hi.tolist()}


def pca_picture(features: np.ndarray, pca: dict) -> np.ndarray:
  """uint8 RGB [h, w, 3]: the features on the fitted directions, scaled to 0..255."""
  projected = (features.astype(np.float64) - np.asarray(pca["mean"])) @ np.asarray(pca["components"]).T
  lo, hi = np.asarray(pca["low"]), np.asarray(pca["high"])
  return np.clip(np.round(255 * (projected - lo) / np.maximum(hi - lo, 1e-12)), 0, 255).astype(np.uint8)
