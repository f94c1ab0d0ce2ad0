"""The zero-/few-shot protocol of LSeg (PASCAL-5i, COCO-20i, FSS-1000), and the
file handling shared by the real-dataset TFDS builders (ADE20K included).

Why one module: the three few-shot benchmarks follow one protocol, HSNet's
(`fewshot_data/` in isl-org/lang-seg, a copy of juhongm999/hsnet), and their
builders need the same pieces:
- fold class sets: PASCAL fold f holds out classes 5f..5f+4, COCO fold f the
  interleaved classes {f + 4k} (0-based ids into the benchmark's label table);
- episodes: the evaluation's (query image, class) list with a fixed seed,
  reproducing the official sampling order exactly (`make_episodes`);
- the per-episode label set `("others", <class name>)` fed to the text
  encoder, and the binary episode mask (1 = the class, 0 = others, -1 =
  ignored PASCAL boundary);
- `fewshot_resize`: every image is resized to 480x480 for zero-shot, as
  torchvision's `Resize((480, 480))` on a PIL image (bilinear) and the mask as
  `F.interpolate(mode='nearest')` (PyTorch's floor-index convention, which is
  not PIL's nearest).

The file helpers (`read_rgb_image`, `read_label_png`, `require_dirs`, ...) make
every builder behave the same on bad input: grayscale/RGBA/CMYK images become
RGB, label ids out of range raise a ValueError naming the file, and a missing
manual_dir raises a FileNotFoundError that says what to download and where.

For a pipeline that speaks "label ids into a table", `episode_label_table`
(= ("others",) + names) and `episode_example` turn an episode record into
table ids [0, class + 1] and a mask over them.

The protocol functions are pure Python/numpy/PIL; TFDS appears only in the
builder pieces (`FewShotConfig`, `episode_features`, `TfFreePrepareMixin`),
and nothing needs TensorFlow.
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
import contextlib
import dataclasses
import importlib.util
import io
import os
import pickle
import sys
from typing import Any

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

OTHERS = "others"  # the background prompt of every zero-shot episode
N_FOLDS = 4
IGNORE_VALUE = 255  # stored value of ignored pixels (PASCAL object boundaries)
ZS_IMAGE_SIZE = 480  # the zero-shot input size of the official evaluation
LABEL_FILES_DIR = epath.Path(__file__).parent / "label_files"  # lang-seg's label_files/, shipped

# Number of classes of each fold-based benchmark.
_NUM_CLASSES = {"pascal": 20, "coco": 80}


# ---------------------------------------------------------------------------
# Fold class sets and labels.


def fold_class_ids(benchmark: str, fold: int, split: str = "test") -> tuple[int, ...]:
  """The 0-based class ids of `fold` for `split` ("test"/"val" or "train"/"trn").

  PASCAL-5i: fold f tests classes 5f..5f+4 (contiguous); COCO-20i: fold f
  tests {f, f+4, ..., f+76} (HSNet's interleaved split). Training uses the
  other classes of the benchmark.
  """
  if benchmark not in _NUM_CLASSES:
    raise ValueError(f"unknown fold-based benchmark {benchmark!r}: expected one of {sorted(_NUM_CLASSES)}")
  if fold not in range(N_FOLDS):
    raise ValueError(f"fold must be in 0..{N_FOLDS - 1}, got {fold}")
  n = _NUM_CLASSES[benchmark]
  per_fold = n // N_FOLDS
  if benchmark == "pascal":
    test = tuple(fold * per_fold + i for i in range(per_fold))
  else:
    test = tuple(fold + N_FOLDS * k for k in range(per_fold))
  if split in ("test", "val"):
    return test
  if split in ("train", "trn"):
    return tuple(c for c in range(n) if c not in test)
  raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def episode_labels(labels: Sequence[str], class_id: int) -> tuple[str, str]:
  """The two prompts of an episode: index 0 = "others", index 1 = the class.

  The official zero-shot net tokenizes `['others', name]` per class
  (`lseg_net_zs.py`), with the raw label-file name and no prompt template; the
  episode mask's 1s are index 1.
  """
  return (OTHERS, labels[class_id])


def read_label_file(path: os.PathLike | str) -> tuple[str, ...]:
  """Class names of a lang-seg `label_files/fewshot_*.txt`: one per line, stripped."""
  return tuple(line.strip() for line in epath.Path(path).read_text().splitlines() if line.strip())


# ---------------------------------------------------------------------------
# Episodes.


@dataclasses.dataclass(frozen=True)
class Episode:
  """One evaluation episode.

  query: the query image key as it appears in the split list (PASCAL: the
    VOC name "2007_000033"; COCO: "val2014/COCO_val2014_....jpg"; FSS: the
    path relative to FSS-1000/).
  class_id: 0-based id into the benchmark's label table.
  support: support image keys (empty for zero-shot).
  """
  query: str
  class_id: int
  support: tuple[str, ...] = ()


def group_by_class(entries: Iterable[tuple[str, int]]) -> dict[int, list[str]]:
  """{class_id: [image keys in entry order]}, the classwise lists HSNet samples from."""
  out: dict[int, list[str]] = {}
  for name, c in entries:
    out.setdefault(int(c), []).append(name)
  return out


def _sample_support(rng: np.random.RandomState, pool: Sequence[str], query: str, shot: int) -> tuple[str, ...]:
  """`shot` support keys of the query's class, drawn as HSNet does.

  One `choice(pool, 1, replace=False)` per draw (a permutation of the pool on
  the legacy RandomState), redrawing when it hits the query; duplicates among
  the supports are allowed, as in the official loop.
  """
  if shot and not any(p != query for p in pool):
    raise ValueError(f"cannot sample a support for {query!r}: its class has no other image")
  support: list[str] = []
  while len(support) < shot:
    name = pool[int(rng.choice(len(pool), 1, replace=False)[0])]
    if name != query:
      support.append(name)
  return tuple(support)


def make_episodes(fold: int, n_episodes: int = 1000, seed: int = 0, *, benchmark: str,
                  entries: Sequence[tuple[str, int]], shot: int = 0) -> list[Episode]:
  """The evaluation episodes of a fold, deterministic for a given seed.

  Args:
    fold: 0..3.
    n_episodes: 1000 in the official evaluation.
    seed: the official test calls `fix_randseed(0)` (numpy's global
      RandomState) right before iterating; a `RandomState(seed)` consumed in
      the same order reproduces its episodes exactly.
    benchmark: "pascal" or "coco".
    entries: the fold's test list as (image key, 0-based class id) pairs, in
      file order. PASCAL: `splits/pascal/val/fold{f}.txt` lines; COCO: the
      classwise lists of `splits/coco/val/fold{f}.pkl`, class by class, each
      list in pickle order (the order matters for COCO's sampling).
    shot: support images per episode (0 for LSeg's zero-shot protocol).

  Returns:
    `n_episodes` Episodes. PASCAL: episode i is entries[i % len(entries)]
    (HSNet cycles through the list, so images repeat; with shot=0 the seed
    plays no role, as in the official code). COCO: each episode draws a class
    uniformly from the fold's test classes, then a query from that class's
    list (then the supports), with `RandomState.choice(..., 1,
    replace=False)` exactly as HSNet's `DatasetCOCO.load_frame`.
  """
  if n_episodes < 0 or shot < 0:
    raise ValueError(f"n_episodes and shot must be >= 0, got {n_episodes}, {shot}")
  test_classes = fold_class_ids(benchmark, fold, "test")
  if not entries:
    raise ValueError(f"{benchmark} fold {fold}: the episode list is empty")
  bad = sorted({int(c) for _, c in entries} - set(test_classes))
  if bad:
    raise ValueError(f"{benchmark} fold {fold}: entries hold classes {bad} outside the fold's test classes "
                     f"{list(test_classes)}: wrong fold or split file?")
  classwise = group_by_class(entries)
  rng = np.random.RandomState(seed)
  episodes = []
  if benchmark == "pascal":
    for i in range(n_episodes):
      name, c = entries[i % len(entries)]
      episodes.append(Episode(name, int(c), _sample_support(rng, classwise[int(c)], name, shot)))
  elif benchmark == "coco":
    empty = [c for c in test_classes if not classwise.get(c)]
    if empty:
      raise ValueError(f"coco fold {fold}: no images listed for test classes {empty}")
    for _ in range(n_episodes):
      c = test_classes[int(rng.choice(len(test_classes), 1, replace=False)[0])]
      pool = classwise[c]
      name = pool[int(rng.choice(len(pool), 1, replace=False)[0])]
      episodes.append(Episode(name, c, _sample_support(rng, pool, name, shot)))
  else:
    raise ValueError(f"make_episodes handles 'pascal' and 'coco', got {benchmark!r} "
                     "(FSS-1000 enumerates all its test images: see fss1000.fss_episodes)")
  return episodes


# ---------------------------------------------------------------------------
# Masks.


def binary_class_mask(mask: np.ndarray, class_id: int, *, ignore_value: int | None = IGNORE_VALUE) -> np.ndarray:
  """uint8 episode mask from a class-id mask whose value k+1 is class k.

  1 where the mask is class `class_id`, `ignore_value` (255) where the mask is
  `ignore_value` (kept as "ignore", as PASCAL's boundary), 0 elsewhere. With
  `ignore_value=None` every other value becomes 0, as HSNet's COCO loader.
  """
  out = (mask == class_id + 1).astype(np.uint8)
  if ignore_value is not None:
    out[mask == ignore_value] = IGNORE_VALUE
  return out


def episode_mask_map(mask: np.ndarray, ignore_boundary: bool = True) -> np.ndarray:
  """Stored episode mask (uint8 0/1/255) -> int32 targets: 0 others, 1 class, -1 ignore.

  `ignore_boundary=False` maps 255 to 0 instead: the official zero-shot
  training loss has no ignore index and sees PASCAL boundaries as "others"
  (the evaluation excludes them, so keep the default there). Any shape.
  """
  mask = np.asarray(mask)
  bad = np.setdiff1d(np.unique(mask), [0, 1, IGNORE_VALUE])
  if bad.size:
    raise ValueError(f"episode mask holds values {bad.tolist()}; expected 0, 1 or {IGNORE_VALUE}")
  out = mask.astype(np.int32)
  out[mask == IGNORE_VALUE] = -1 if ignore_boundary else 0
  return out


def episode_label_table(labels: Sequence[str]) -> tuple[str, ...]:
  """("others",) + labels: one table holding every episode's two prompts.

  Episode of class c = table ids [0, c + 1] (`episode_example`), so a
  pipeline that works with "label ids into a table" serves few-shot data too.
  """
  return (OTHERS,) + tuple(labels)


def episode_example(record: Mapping[str, Any], ignore_boundary: bool = True) -> dict[str, Any]:
  """A few-shot record -> {"image", "mask", "label_ids"} over `episode_label_table`.

  mask: int32 [H, W] of table ids: 0 = others, class_id + 1 = the class,
  -1 = ignore (PASCAL boundary; 0 with ignore_boundary=False); label_ids:
  int32 [0, class_id + 1], i.e. the prompts ("others", name) in this order.
  """
  c = int(record["class_id"])
  target = episode_mask_map(record["mask"], ignore_boundary)
  if target.ndim == 3:
    target = target[..., 0]
  return {"image": record["image"], "mask": np.where(target == 1, c + 1, target).astype(np.int32),
          "label_ids": np.array([0, c + 1], np.int32)}


def check_label_ids(mask: np.ndarray, path: os.PathLike | str, max_id: int,
                    extra: Sequence[int] = (IGNORE_VALUE,)) -> None:
  """Raises a ValueError naming `path` if `mask` holds an id > max_id not in `extra`."""
  ids = np.unique(mask)
  bad = [int(v) for v in ids if v > max_id and int(v) not in extra]
  if bad:
    allowed = f"0..{max_id}" + "".join(f" or {e}" for e in extra)
    raise ValueError(f"{os.fspath(path)}: label id(s) {bad} out of range (expected {allowed}); "
                     "is this the right annotation folder (class-id PNGs, not colour PNGs)?")


# ---------------------------------------------------------------------------
# Zero-shot resize.


def torch_nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """Source rows of `F.interpolate(size=n_out, mode='nearest')`: floor(i * in/out).

  PyTorch computes the scale and the product in float32 and clamps to n_in-1
  (`upsample_nearest2d`); PIL's NEAREST samples pixel centres instead, and
  picks different rows for most size pairs.
  """
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, n_in - 1)


def fewshot_resize(image: np.ndarray, mask: np.ndarray | None = None,
                   size: int | tuple[int, int] = ZS_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray | None]:
  """Resizes an episode to `size` (480x480) as the official zero-shot loader.

  image: uint8 [H, W, 3] -> [h, w, 3] by PIL bilinear (torchvision
    `Resize((480, 480))` on a PIL image, which is exactly this call, including
    PIL's antialiasing when shrinking).
  mask: [H', W'] or [H', W', 1], any dtype -> [h, w(, 1)] by PyTorch's
    nearest rule (`torch_nearest_indices`). The mask is resized on its own,
    as the official code does, so it may differ in size from the image.
  """
  h, w = (size, size) if isinstance(size, int) else size
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
  resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  if mask is None:
    return resized, None
  mask = np.asarray(mask)
  rows = torch_nearest_indices(mask.shape[0], h)
  cols = torch_nearest_indices(mask.shape[1], w)
  return resized, mask[rows[:, None], cols[None, :]]


# ---------------------------------------------------------------------------
# File helpers shared by the real builders.


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


def read_label_png(path: os.PathLike | str, max_id: int, extra: Sequence[int] = (IGNORE_VALUE,)) -> np.ndarray:
  """uint8 [H, W] class-id mask of a label PNG, validated against `max_id`.

  Accepts single-channel PNGs ("L", palette "P" read as indices, 16-bit "I");
  a colour-coded RGB mask or an id > max_id (not in `extra`) raises a
  ValueError that names the file.
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


def benchmark_split_dir(split_dir: os.PathLike | str, benchmark: str) -> epath.Path | None:
  """`split_dir/<benchmark>` or `split_dir` itself, whichever holds `val/`; else None."""
  base = epath.Path(split_dir)
  for cand in (base / benchmark, base):
    if (cand / "val").is_dir():
      return cand
  return None


def resolve_split_dir(split_dir: os.PathLike | str | None, root: epath.Path, benchmark: str,
                      instructions: str, dataset: str) -> epath.Path:
  """The folder holding HSNet's `trn/` and `val/` lists of `benchmark`.

  `split_dir` may be HSNet's `data/splits` (with `pascal/`, `coco/` inside)
  or the benchmark folder itself; by default `<manual_dir>/splits`.
  """
  base = epath.Path(split_dir) if split_dir is not None else root / "splits"
  found = benchmark_split_dir(base, benchmark)
  if found is not None:
    return found
  raise FileNotFoundError(
      f"{dataset}: no HSNet split lists under {base} (looked for {base / benchmark / 'val'} and "
      f"{base / 'val'}). Copy `data/splits` of juhongm999/hsnet (the same files are in "
      f"isl-org/lang-seg `fewshot_data/data/splits`) to <manual_dir>/splits, or pass split_dir=.\n"
      f"{instructions}")


class _PlainUnpickler(pickle.Unpickler):
  """Unpickles plain containers only (dict/list/str/int): split files carry
  nothing else, and refusing globals means a tampered file cannot run code."""

  def find_class(self, module: str, name: str):
    raise pickle.UnpicklingError(f"split file refers to {module}.{name}; only plain lists/dicts are allowed")


def load_plain_pickle(path: os.PathLike | str):
  """Loads a pickle of builtin containers (HSNet's COCO split lists)."""
  with epath.Path(path).open("rb") as f:
    return _PlainUnpickler(f).load()


def ordered_key(i: int, n: int) -> int:
  """An integer TFDS key that keeps record i at position i (with
  `disable_shuffling=True`) and spreads the keys over TFDS's 1000 on-disk
  shuffle buckets (used with TensorFlow for splits over 1 GB), so such a
  split is not sorted in one bucket in RAM."""
  return i * ((1 << 128) // max(n, 1))


@contextlib.contextmanager
def in_memory_shuffle_without_tf() -> Iterator[None]:
  """Lets TFDS prepare a split over 1 GB without TensorFlow.

  TFDS's writer keeps a split in memory up to 1 GB, then spills it to
  on-disk buckets that it writes with `tf.io.gfile`: without TensorFlow a
  large split (ADE20K train, PASCAL-5i/COCO-20i train) fails there with
  "No module named 'tensorflow'". Without TensorFlow this lifts the limit for
  the duration, so the split is sorted in RAM (about its encoded size: ~1 GB
  for ADE20K train, ~15 GB for a COCO-20i train fold). With TensorFlow
  installed it does nothing.
  """
  if importlib.util.find_spec("tensorflow") is not None:
    yield
    return
  from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top
  old = shuffle.MAX_MEM_BUFFER_SIZE
  shuffle.MAX_MEM_BUFFER_SIZE = sys.maxsize
  try:
    yield
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = old


class TfFreePrepareMixin:
  """Builder mixin: `download_and_prepare` under `in_memory_shuffle_without_tf`."""

  def download_and_prepare(self, *args, **kwargs):
    with in_memory_shuffle_without_tf():
      return super().download_and_prepare(*args, **kwargs)


@dataclasses.dataclass(eq=False)
class FewShotConfig(tfds.core.BuilderConfig):
  """One fold of a fold-based few-shot benchmark (PASCAL-5i, COCO-20i).

  n_episodes and seed default to the official evaluation (1000 episodes,
  `fix_randseed(0)`); other values give a differently named config.
  """
  fold: int = 0
  n_episodes: int = 1000
  seed: int = 0


def fold_configs(benchmark: str, title: str) -> list[FewShotConfig]:
  """The four standard fold configs `fold0`..`fold3` of "pascal" or "coco"."""
  return [FewShotConfig(name=f"fold{f}", fold=f,
                        description=f"{title} fold {f}: test classes {list(fold_class_ids(benchmark, f))} (0-based).")
          for f in range(N_FOLDS)]


def episode_features(labels: Sequence[str]) -> tfds.features.FeaturesDict:
  """Features of a few-shot record: one (image, class) sample of an episode.

  image: uint8 [H, W, 3] at the original size (`fewshot_resize` makes it
    480x480); mask: uint8 [H, W, 1], 1 = the class, 0 = others, 255 = ignore
    (`episode_mask_map` -> int32 with -1); class_id: 0-based id into the
    label table (`features["class_id"].names`), the episode's prompts are
    `episode_labels(names, class_id)`; file_name: the query key of the split
    list.
  """
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
      "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
      "class_id": tfds.features.ClassLabel(names=list(labels)),
      "file_name": tfds.features.Text(),
  })


def check_splits(splits: Iterable[str], allowed: Sequence[str], dataset: str) -> tuple[str, ...]:
  """Validates a builder's `splits` argument."""
  splits = tuple(splits)
  bad = [s for s in splits if s not in allowed]
  if bad or not splits:
    raise ValueError(f"{dataset}: splits must be a non-empty subset of {list(allowed)}, got {list(splits)}")
  return splits


class FoldEpisodesBuilder(TfFreePrepareMixin, tfds.core.GeneratorBasedBuilder):
  """What the fold benchmarks (PASCAL-5i, COCO-20i) share: versions, fold
  configs, the split selection and the features/metadata. Subclasses set
  BENCHMARK, LABELS, MASK_VALUES, BUILDER_CONFIGS and the manual-download text,
  and write the split generators (abstract here, so TFDS registers only them)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DEFAULT_CONFIG_NAME = "fold0"
  MASK_MAP = staticmethod(episode_mask_map)  # stored mask -> int32 target, -1 = ignore
  SPLITS = ("train", "test")
  BENCHMARK: str
  LABELS: Sequence[str]
  MASK_VALUES: dict[str, str]

  def __init__(self, *, split_dir: os.PathLike | str | None = None, splits: Sequence[str] = SPLITS, **kwargs):
    """split_dir: HSNet's `data/splits` (default `<manual_dir>/splits`); splits:
    which splits to prepare (only used by `download_and_prepare`)."""
    self._split_dir = split_dir
    self._splits = check_splits(splits, self.SPLITS, self.name)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=episode_features(self.LABELS),
        supervised_keys=("image", "mask"),
        homepage="https://github.com/juhongm999/hsnet",
        disable_shuffling=True,  # record i of "test" is episode i
        metadata=tfds.core.MetadataDict(
            benchmark=self.BENCHMARK, fold=cfg.fold, n_episodes=cfg.n_episodes, seed=cfg.seed,
            test_class_ids=list(fold_class_ids(self.BENCHMARK, cfg.fold, "test")),
            train_class_ids=list(fold_class_ids(self.BENCHMARK, cfg.fold, "train")),
            mask_values=self.MASK_VALUES),
    )
