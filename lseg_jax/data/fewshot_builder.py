"""The TFDS side of the few-shot benchmarks: record features, fold configs,
HSNet's split-list folder, and the builder base of PASCAL-5i and COCO-20i.

Why apart from `fewshot`: the protocol (folds, episodes, masks) is pure
numpy and serves the pipeline and eval.py; this module is what the builders
share on top of it. Dependencies point one way: fewshot_builder -> fewshot,
tfds_utils.
"""

from collections.abc import Sequence
import dataclasses
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from lseg_jax.data import fewshot
from lseg_jax.data import tfds_utils


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
                        description=f"{title} fold {f}: test classes {list(fewshot.fold_class_ids(benchmark, f))} "
                                    "(0-based).")
          for f in range(fewshot.N_FOLDS)]


def episode_features(labels: Sequence[str]) -> tfds.features.FeaturesDict:
  """Features of a few-shot record: one (image, class) sample of an episode.

  image: uint8 [H, W, 3] at the original size (`fewshot_resize` makes it
    480x480); mask: uint8 [H, W, 1], 1 = the class, 0 = others,
    `fewshot.STORED_IGNORE` (255) = ignore (`episode_mask_map` -> int32 with
    -1); class_id: 0-based id into the label table
    (`features["class_id"].names`), the episode's prompts are
    `episode_labels(names, class_id)`; file_name: the image key of the split
    list (a training support is never a record with the query's file_name).
  """
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
      "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
      "class_id": tfds.features.ClassLabel(names=list(labels)),
      "file_name": tfds.features.Text(),
  })


class FoldEpisodesBuilder(tfds_utils.TfFreePrepareMixin, tfds.core.GeneratorBasedBuilder):
  """What the fold benchmarks (PASCAL-5i, COCO-20i) share: versions, fold
  configs, the split selection and the features/metadata. Subclasses set
  BENCHMARK, LABELS, MASK_VALUES, BUILDER_CONFIGS and the manual-download text,
  and write the split generators (abstract here, so TFDS registers only them)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DEFAULT_CONFIG_NAME = "fold0"
  MASK_MAP = staticmethod(fewshot.episode_mask_map)  # stored mask -> int32 target, -1 = ignore
  SPLITS = ("train", "test")
  BENCHMARK: str
  LABELS: Sequence[str]
  MASK_VALUES: dict[str, str]

  def __init__(self, *, split_dir: os.PathLike | str | None = None, splits: Sequence[str] = SPLITS, **kwargs):
    """split_dir: HSNet's `data/splits` (default `<manual_dir>/splits`); splits:
    which splits to prepare (only used by `download_and_prepare`)."""
    self._split_dir = split_dir
    self._splits = tfds_utils.check_splits(splits, self.SPLITS, self.name)
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
            test_class_ids=list(fewshot.fold_class_ids(self.BENCHMARK, cfg.fold, "test")),
            train_class_ids=list(fewshot.fold_class_ids(self.BENCHMARK, cfg.fold, "train")),
            mask_values=self.MASK_VALUES),
    )
