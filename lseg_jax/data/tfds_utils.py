"""What every real-dataset TFDS builder needs beyond reading files: preparing
without TensorFlow, record keys that keep the file order, split arguments.

Why: TensorFlow is not a dependency (`tfds.data_source` reads ArrayRecord
with numpy only), but TFDS's writer still reaches for `tf.io.gfile` once a
split is over 1 GB; `TfFreePrepareMixin` lifts that limit while preparing.
"""

from collections.abc import Iterable, Iterator, Sequence
import contextlib
import importlib.util
import sys


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


def check_splits(splits: Iterable[str], allowed: Sequence[str], dataset: str) -> tuple[str, ...]:
  """Validates a builder's `splits` argument (which splits to prepare)."""
  splits = tuple(splits)
  bad = [s for s in splits if s not in allowed]
  if bad or not splits:
    raise ValueError(f"{dataset}: splits must be a non-empty subset of {list(allowed)}, got {list(splits)}")
  return splits
