"""`coco20i_lseg`: COCO-20i as LSeg's zero-shot evaluation reads it (HSNet's protocol).

Why our own builder: COCO-20i is COCO 2014 with HSNet's class-id masks and
per-fold classwise image lists (`splits/coco/{trn,val}/fold{f}.pkl`: a dict
{0-based class: [image keys such as "val2014/COCO_val2014_000000000042.jpg"]}),
none of which TFDS's `coco` provides. The lists are arbitrary, so they are
read from `<manual_dir>/splits` or `split_dir=` (loaded with an unpickler that
accepts only plain dicts/lists/strings/ints).

Fold f tests the interleaved classes {f, f+4, ..., f+76} (0-based, HSNet's
split; `fewshot.fold_class_ids`). Configs `fold0`..`fold3`; splits:
- "test": the official evaluation, 1000 episodes in order (record i =
  episode i). Each episode draws a class uniformly, then a query from that
  class's list, with numpy's legacy RandomState seeded 0, as HSNet's
  `DatasetCOCO` after `fix_randseed(0)` does; `coco_episodes` gives the list.
- "train": every (image, class) pair of `trn/fold{f}.pkl`, class by class.
  This is large (about 95k records, ~15 GB per fold): prepare it only when
  needed (`splits=("test",)` skips it).
Each record: the image (RGB), the binary mask of the class (1 = class, 0 =
others; COCO has no ignore label: a stored 255 would be "others", as in the
official loader), the class id into `COCO_LABELS`, and the image key.
"""

from collections.abc import Sequence
import os

from etils import epath

from lseg_jax.data import fewshot
from lseg_jax.data import fewshot_builder
from lseg_jax.data import files
from lseg_jax.data import tfds_utils

# lang-seg `label_files/fewshot_coco.txt`, the names fed to the text encoder
# (COCO category order; mask value k+1 is class k).
COCO_LABELS: tuple[str, ...] = files.read_label_file(files.LABEL_FILES_DIR / "fewshot_coco.txt")
NUM_CLASSES = len(COCO_LABELS)

INSTRUCTIONS = """\
COCO-20i (HSNet's Datasets_HSN layout) under the manual dir:
  <manual_dir>/
    COCO2014/train2014/COCO_train2014_*.jpg   COCO 2014 images:
    COCO2014/val2014/COCO_val2014_*.jpg         http://images.cocodataset.org/zips/train2014.zip
                                                http://images.cocodataset.org/zips/val2014.zip
    COCO2014/annotations/train2014/*.png      HSNet's class-id masks (0 = background, k = class k-1,
    COCO2014/annotations/val2014/*.png          same file stems as the images): train2014.zip and
                                                val2014.zip linked from the juhongm999/hsnet README
    splits/coco/trn/fold{0,1,2,3}.pkl         HSNet's split lists: copy data/splits of
    splits/coco/val/fold{0,1,2,3}.pkl         juhongm999/hsnet (or fewshot_data/data/splits of
                                                isl-org/lang-seg), or pass split_dir=
"""


def read_coco_split(split_dir: os.PathLike | str, split: str, fold: int) -> list[tuple[str, int]]:
  """(image key, 0-based class) pairs of HSNet's `{trn,val}/fold{fold}.pkl`,
  class by class in increasing id, each class's list in pickle order.

  split_dir: HSNet's `data/splits` or its `coco/` folder.
  """
  path = (fewshot_builder.benchmark_split_dir(split_dir, "coco") or epath.Path(split_dir)) / split / f"fold{fold}.pkl"
  if not path.exists():
    raise FileNotFoundError(f"COCO-20i split list {path} not found.\n{INSTRUCTIONS}")
  data = files.load_plain_pickle(path)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a dict {{class id: [image keys]}}, got {type(data).__name__}")
  entries = []
  for c in sorted(data):
    names = data[c]
    if not isinstance(c, int) or not 0 <= c < NUM_CLASSES or not isinstance(names, list):
      raise ValueError(f"{path}: bad entry {c!r}: expected class ids 0..{NUM_CLASSES - 1} -> lists of image keys")
    entries.extend((str(n), c) for n in names)
  return entries


def coco_entries(split_dir: os.PathLike | str, fold: int, split: str = "test") -> list[tuple[str, int]]:
  """The (image key, class) samples of a fold: "test" = val/fold{f}.pkl, "train" = trn/fold{f}.pkl."""
  fewshot.fold_class_ids("coco", fold, split)  # validates fold and split
  return read_coco_split(split_dir, "val" if split in ("test", "val") else "trn", fold)


def coco_episodes(split_dir: os.PathLike | str, fold: int, n_episodes: int = 1000, seed: int = 0,
                  shot: int = 0) -> list[fewshot.Episode]:
  """The official evaluation episodes of a fold (see `fewshot.make_episodes`)."""
  return fewshot.make_episodes(fold, n_episodes, seed, benchmark="coco",
                               entries=coco_entries(split_dir, fold, "test"), shot=shot)


def coco_mask_path(root: epath.Path, key: str) -> epath.Path:
  """HSNet's mask of an image key: COCO2014/annotations/<key minus .jpg>.png."""
  stem = key[:key.index(".jpg")] if ".jpg" in key else os.path.splitext(key)[0]
  return root / "COCO2014" / "annotations" / f"{stem}.png"


class Coco20iLseg(fewshot_builder.FoldEpisodesBuilder):
  """COCO-20i episodes (HSNet splits) for LSeg's zero-shot protocol."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  BUILDER_CONFIGS = fewshot_builder.fold_configs("coco", "COCO-20i")
  BENCHMARK = "coco"
  LABELS = COCO_LABELS
  MASK_VALUES = {"0": fewshot.OTHERS, "1": "class"}

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    root = files.manual_root(dl_manager, INSTRUCTIONS, "coco20i_lseg")
    files.require_dirs(root, ["COCO2014/annotations"], INSTRUCTIONS, "coco20i_lseg")
    split_dir = fewshot_builder.resolve_split_dir(self._split_dir, root, "coco", INSTRUCTIONS, "coco20i_lseg")
    out = {}
    if "test" in self._splits:
      episodes = coco_episodes(split_dir, cfg.fold, cfg.n_episodes, cfg.seed)
      out["test"] = self._generate_examples(root, [(e.query, e.class_id) for e in episodes])
    if "train" in self._splits:
      entries = coco_entries(split_dir, cfg.fold, "train")
      bad = sorted({c for _, c in entries} - set(fewshot.fold_class_ids("coco", cfg.fold, "train")))
      if bad:
        raise ValueError(f"coco20i_lseg fold {cfg.fold}: trn list holds test classes {bad}: wrong split file?")
      out["train"] = self._generate_examples(root, entries)
    return out

  def _generate_examples(self, root: epath.Path, samples: Sequence[tuple[str, int]]):
    for i, (key, class_id) in enumerate(samples):
      image_path = root / "COCO2014" / key
      mask_path = coco_mask_path(root, key)
      image, size = files.read_rgb_image(image_path)
      raw = files.read_label_png(mask_path, NUM_CLASSES, extra=(fewshot.STORED_IGNORE,))
      files.check_same_size(size, raw, image_path, mask_path)
      # HSNet: mask != class+1 -> 0, so there is no ignore value.
      mask = fewshot.binary_class_mask(raw, class_id, ignore_value=None)
      yield tfds_utils.ordered_key(i, len(samples)), {
          "image": image, "mask": files.encode_png(mask), "class_id": class_id, "file_name": key}
