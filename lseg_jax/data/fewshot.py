"""The zero-/few-shot protocol of LSeg (PASCAL-5i, COCO-20i, FSS-1000).

The three benchmarks follow one protocol, HSNet's (`fewshot_data/` in
isl-org/lang-seg, a copy of juhongm999/hsnet):
- fold class sets: PASCAL fold f holds out classes 5f..5f+4, COCO fold f the
  interleaved classes {f + 4k} (0-based ids into the benchmark's label table);
- episodes: the evaluation's (query image, class) list with a fixed seed,
  reproducing the official sampling order exactly (`make_episodes`);
- the per-episode label set `("others", <class name>)` fed to the text
  encoder, and the binary episode mask (1 = the class, 0 = others,
  `STORED_IGNORE` (255) in the stored PNG = ignored PASCAL boundary);
- training and evaluation read those masks differently: the evaluation
  ignores the boundary (target `losses.IGNORE`), the official zero-shot
  training folds it into "others" (`extract_ignore_idx` sets every pixel
  that is not the class, boundary included, to 0 in the query and support
  masks): `episode_example` vs `episode_train_example`. Training pairs each
  query with a support of its class (`pairs.py`, through the registry);
- `fewshot_resize`: every image is resized to 480x480 for zero-shot, as
  torchvision's `Resize((480, 480))` on a PIL image (bilinear) and the mask as
  `F.interpolate(mode='nearest')` (PyTorch's floor-index convention, which is
  not PIL's nearest).

For a pipeline that speaks "label ids into a table", `episode_label_table`
(= ("others",) + names) and `episode_example` turn an episode record into
table ids [0, class + 1] and a mask over them.

Pure Python/numpy/PIL: the TFDS builders' shared pieces are in
`fewshot_builder`, the file readers in `files`.
"""

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from lseg_jax.losses import IGNORE

OTHERS = "others"  # the background prompt of every zero-shot episode
N_FOLDS = 4
# A file encoding, not a target: ignored pixels (PASCAL object boundaries) in
# the stored episode-mask PNGs. Targets in memory use losses.IGNORE (-1).
STORED_IGNORE = 255
ZS_IMAGE_SIZE = 480  # the zero-shot input size of the official evaluation

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


def binary_class_mask(mask: np.ndarray, class_id: int, *, ignore_value: int | None = STORED_IGNORE) -> np.ndarray:
  """uint8 episode mask from a class-id mask whose value k+1 is class k.

  1 where the mask is class `class_id`, STORED_IGNORE (255) where the mask is
  `ignore_value` (kept as "ignore", as PASCAL's boundary), 0 elsewhere. With
  `ignore_value=None` every other value becomes 0, as HSNet's COCO loader.
  """
  out = (mask == class_id + 1).astype(np.uint8)
  if ignore_value is not None:
    out[mask == ignore_value] = STORED_IGNORE
  return out


def episode_mask_map(mask: np.ndarray, ignore_boundary: bool = True) -> np.ndarray:
  """Stored episode mask (uint8 0/1/255) -> int32 targets: 0 others, 1 class, IGNORE (-1).

  `ignore_boundary=False` maps 255 to 0 instead, as the official zero-shot
  training (`extract_ignore_idx`): its loss has no ignore index and sees
  PASCAL boundaries as "others"; the evaluation excludes them (the default).
  Any shape.
  """
  mask = np.asarray(mask)
  bad = np.setdiff1d(np.unique(mask), [0, 1, STORED_IGNORE])
  if bad.size:
    raise ValueError(f"episode mask holds values {bad.tolist()}; expected 0, 1 or {STORED_IGNORE}")
  out = mask.astype(np.int32)
  out[mask == STORED_IGNORE] = IGNORE if ignore_boundary else 0
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
  IGNORE = ignored PASCAL boundary (0 with ignore_boundary=False); label_ids:
  int32 [0, class_id + 1], i.e. the prompts ("others", name) in this order.
  """
  c = int(record["class_id"])
  target = episode_mask_map(record["mask"], ignore_boundary)
  if target.ndim == 3:  # [H, W, 1] as TFDS decodes the PNG
    target = target[..., 0]
  return {"image": record["image"], "mask": np.where(target == 1, c + 1, target).astype(np.int32),
          "label_ids": np.array([0, c + 1], np.int32)}


def episode_train_example(record: Mapping[str, Any]) -> dict[str, Any]:
  """`episode_example` as the official zero-shot training reads it: PASCAL
  boundaries become "others" (0), so no pixel is ignored.

  With no ignored pixel, the project's ignore-aware cross-entropy
  (`losses.pixel_cross_entropy`, the mean over non-ignored pixels) is exactly
  the official plain `nn.CrossEntropyLoss()` (the mean over all pixels).
  """
  return episode_example(record, ignore_boundary=False)


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
