"""Reading the files of a manually downloaded dataset, the same way in every
real-dataset builder (ADE20K, PASCAL-5i, COCO-20i, FSS-1000).

Why shared: every builder must behave the same on bad input: grayscale,
RGBA or CMYK images become RGB (as the official loaders' `convert("RGB")`),
label ids out of range raise a ValueError naming the file, and a missing
manual_dir raises a FileNotFoundError that says what to download and where.

Plain Python/numpy/PIL: nothing here knows TFDS or a benchmark's protocol.
"""

from collections.abc import Iterable, Sequence
import io
import os
import pickle

from etils import epath
import numpy as np
from PIL import Image

LABEL_FILES_DIR = epath.Path(__file__).parent / "label_files"  # lang-seg's label_files/, shipped


def read_label_file(path: os.PathLike | str) -> tuple[str, ...]:
  """Class names of a lang-seg `label_files/fewshot_*.txt`: one per line, stripped."""
  return tuple(line.strip() for line in epath.Path(path).read_text().splitlines() if line.strip())


def encode_png(array: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 [H, W] (grayscale) or [H, W, 3] array."""
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def read_rgb_image(path: os.PathLike | str) -> tuple[bytes, tuple[int, int]]:
  """Encoded RGB image bytes for a TFDS `Image` feature, and the (H, W) size.

  An RGB JPEG/PNG is passed through byte for byte (no recompression: the
  stored pixels are what PIL decodes from the original file, as in the
  official loaders). Anything else (grayscale, palette, RGBA, CMYK, 16-bit)
  is converted with PIL's `convert("RGB")` (what the official loaders do) and
  stored as lossless PNG. Bytes, not arrays: TFDS cannot encode numpy images
  without TensorFlow.
  """
  path = epath.Path(path)
  with Image.open(path) as im:
    size = (im.height, im.width)
    if im.mode == "RGB" and im.format in ("JPEG", "PNG"):
      return path.read_bytes(), size
    return encode_png(np.asarray(im.convert("RGB"))), size


def check_label_ids(mask: np.ndarray, path: os.PathLike | str, max_id: int, extra: Sequence[int] = ()) -> None:
  """Raises a ValueError naming `path` if `mask` holds an id > max_id not in `extra`."""
  ids = np.unique(mask)
  bad = [int(v) for v in ids if v > max_id and int(v) not in extra]
  if bad:
    allowed = f"0..{max_id}" + "".join(f" or {e}" for e in extra)
    raise ValueError(f"{os.fspath(path)}: label id(s) {bad} out of range (expected {allowed}); "
                     "is this the right annotation folder (class-id PNGs, not colour PNGs)?")


def read_label_png(path: os.PathLike | str, max_id: int, extra: Sequence[int] = ()) -> np.ndarray:
  """uint8 [H, W] class-id mask of a label PNG, validated against `max_id`.

  Accepts single-channel PNGs ("L", palette "P" read as indices, 16-bit "I");
  a colour-coded RGB mask or an id > max_id (not in `extra`, e.g. a stored
  ignore value) raises a ValueError that names the file.
  """
  with Image.open(path) as im:
    if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
      raise ValueError(f"{os.fspath(path)}: expected a single-channel class-id PNG, got mode {im.mode!r} "
                       "(colour-coded masks must be converted to class ids first)")
    mask = np.asarray(im)
  if mask.size and mask.min() < 0:
    raise ValueError(f"{os.fspath(path)}: negative label id {int(mask.min())}")
  check_label_ids(mask, path, max_id, extra)
  return mask.astype(np.uint8)


def check_same_size(image_size: tuple[int, int], mask: np.ndarray, image_path, mask_path) -> None:
  """ValueError when an image and its mask differ in size (wrong pairing)."""
  if tuple(mask.shape[:2]) != tuple(image_size):
    raise ValueError(f"{os.fspath(image_path)} is {image_size[0]}x{image_size[1]} (HxW) but its mask "
                     f"{os.fspath(mask_path)} is {mask.shape[0]}x{mask.shape[1]}")


def manual_root(dl_manager, instructions: str, dataset: str) -> epath.Path:
  """The manual_dir of a TFDS download manager, or a FileNotFoundError saying
  what to download and where to put it (TFDS itself raises a bare AssertionError)."""
  path = getattr(dl_manager, "_manual_dir", None)
  try:
    return epath.Path(dl_manager.manual_dir)
  except AssertionError as e:
    raise FileNotFoundError(
        f"{dataset}: the manual directory {path} is missing or empty. {dataset} cannot be downloaded "
        f"automatically; download it yourself and lay it out there (or pass "
        f"download_config=tfds.download.DownloadConfig(manual_dir=...)):\n{instructions}") from e


def require_dirs(root: epath.Path, relative: Iterable[str], instructions: str, dataset: str) -> None:
  """FileNotFoundError listing the folders of the expected layout that are missing."""
  missing = [r for r in relative if not (root / r).is_dir()]
  if missing:
    raise FileNotFoundError(
        f"{dataset}: {root} lacks {', '.join(missing)}. Expected layout:\n{instructions}")


class _PlainUnpickler(pickle.Unpickler):
  """Unpickles plain containers only (dict/list/str/int): split files carry
  nothing else, and refusing globals means a tampered file cannot run code."""

  def find_class(self, module: str, name: str):
    raise pickle.UnpicklingError(f"split file refers to {module}.{name}; only plain lists/dicts are allowed")


def load_plain_pickle(path: os.PathLike | str):
  """Loads a pickle of builtin containers (HSNet's COCO split lists)."""
  with epath.Path(path).open("rb") as f:
    return _PlainUnpickler(f).load()
