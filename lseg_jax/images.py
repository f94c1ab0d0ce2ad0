"""Images in, as uint8 RGB: every PIL mode, EXIF orientation, files and folders.

Every front end (predict, embed, serve) reads images here, so one rule holds
for all of them: an image that cannot be decoded (a text file, a zero-byte
file, a truncated JPEG) raises ImageError naming it, and the caller reports
and skips it. 16-bit and 32-bit gray (I;16, I, F) are scaled to 0..255, not
clipped; transparent images are composited over white.
"""

from collections.abc import Sequence
import io
from pathlib import Path
import tempfile

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
WIDE_GRAY_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


class ImageError(Exception):
  """One image cannot be used; the others still are."""


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


def read_image(source: Path | bytes, name: str | None = None) -> np.ndarray:
  """uint8 RGB [H, W, 3], upright (EXIF orientation applied), of a file or
  of its bytes; ImageError naming it (`name`, else the path) if it cannot
  be decoded."""
  name = name or str(source)
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
      return to_rgb(ImageOps.exif_transpose(im))
  except _DECODE_ERRORS as e:
    raise ImageError(f"cannot read image {name}: {e}") from e


def probe_image(path: Path) -> tuple[int, int]:
  """(height, width) from the file's header, without decoding the pixels."""
  if not path.exists():
    raise ImageError(f"image {path} does not exist")
  try:
    with Image.open(path) as im:
      return im.height, im.width
  except _DECODE_ERRORS as e:
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


def prepare_out_dir(out: Path) -> None:
  """Creates --out and checks a file can be written there."""
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} is a file, not a folder")
  try:
    out.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=out).close()
  except OSError as e:
    raise ValueError(f"--out {out} is not a writable folder: {e.strerror or e}") from None
