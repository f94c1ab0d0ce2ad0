"""`pascal5i_lseg`: PASCAL-5i as LSeg's zero-shot evaluation reads it (HSNet's protocol).

Why our own builder: TFDS's `voc` has boxes only, and PASCAL-5i is defined by
HSNet's per-fold image lists, not by a download. The builder reads a local
VOC2012 + SBD (`SegmentationClassAug`) tree from the TFDS manual_dir, laid
out as HSNet's `Datasets_HSN/` (see `INSTRUCTIONS`), and HSNet's split lists
`splits/pascal/{trn,val}/fold{0..3}.txt` (lines "2007_000033__01": the VOC
image name and the 1-based class). Those lists are arbitrary (not derivable
by a rule), so they are read from `<manual_dir>/splits` or `split_dir=`.

Configs `fold0`..`fold3`; splits:
- "test": the official evaluation, 1000 episodes in order (record i =
  episode i): episode i is the i-th (image, class) line of
  `val/fold{f}.txt`, cycling (HSNet `idx % len`), so images repeat. Fold f
  tests classes 5f..5f+4 (0-based).
- "train": every line of `trn/fold{j}.txt` for the three other folds, in
  order (the official training images of fold f).
Each record is one (image, class) sample: the image, the binary mask of that
class (1 = class, 0 = others, 255 = VOC object boundary, kept as "ignore"),
the class id into `PASCAL_LABELS` and the VOC name.

Usage (no TensorFlow needed):
  from lseg_jax.data import pascal5i
  b = pascal5i.Pascal5iLseg(config="fold0", data_dir=d, file_format="array_record")
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=m))
  ds = tfds.data_source("pascal5i_lseg/fold0", data_dir=d, split="test")
  ex = ds[0]  # image uint8 [H, W, 3], mask uint8 [H, W, 1], class_id int
  target = fewshot.episode_mask_map(ex["mask"])  # int32, -1 = boundary
  prompts = fewshot.episode_labels(PASCAL_LABELS, ex["class_id"])  # ("others", name)
"""

from collections.abc import Sequence
import os

from etils import epath

from lseg_jax.data import fewshot
from lseg_jax.data import fewshot_builder
from lseg_jax.data import files
from lseg_jax.data import tfds_utils

# lang-seg `label_files/fewshot_pascal.txt`, the names fed to the text encoder
# (VOC order; mask value k+1 is class k).
PASCAL_LABELS: tuple[str, ...] = files.read_label_file(files.LABEL_FILES_DIR / "fewshot_pascal.txt")
NUM_CLASSES = len(PASCAL_LABELS)

INSTRUCTIONS = """\
PASCAL-5i (HSNet's Datasets_HSN layout) under the manual dir:
  <manual_dir>/
    VOC2012/JPEGImages/<name>.jpg            PASCAL VOC 2012 trainval images:
        http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar
        (extract VOCdevkit/VOC2012 to <manual_dir>/VOC2012)
    VOC2012/SegmentationClassAug/<name>.png  SBD-augmented class-id masks (0 = background,
        1..20 = classes, 255 = boundary), the "SegmentationClassAug" archive linked from
        the juhongm999/hsnet README (Google Drive)
    splits/pascal/trn/fold{0,1,2,3}.txt      HSNet's split lists: copy data/splits of
    splits/pascal/val/fold{0,1,2,3}.txt      juhongm999/hsnet (or fewshot_data/data/splits of
                                             isl-org/lang-seg), or pass split_dir=
"""


def read_pascal_split(split_dir: os.PathLike | str, split: str, fold: int) -> list[tuple[str, int]]:
  """(VOC name, 0-based class) pairs of HSNet's `{trn,val}/fold{fold}.txt`, in order.

  split_dir: HSNet's `data/splits` or its `pascal/` folder.
  """
  path = (fewshot_builder.benchmark_split_dir(split_dir, "pascal") or epath.Path(split_dir)) / split / f"fold{fold}.txt"
  if not path.exists():
    raise FileNotFoundError(f"PASCAL-5i split list {path} not found.\n{INSTRUCTIONS}")
  entries = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    name, sep, cls = line.strip().rpartition("__")
    if not sep or not name or not cls.isdigit() or not 1 <= int(cls) <= NUM_CLASSES:
      raise ValueError(f"{path}:{n}: expected '<voc name>__<class 01..20>', got {line!r}")
    entries.append((name, int(cls) - 1))
  return entries


def pascal_entries(split_dir: os.PathLike | str, fold: int, split: str = "test") -> list[tuple[str, int]]:
  """The (name, class) samples of a fold: "test" = val/fold{f}.txt, "train" =
  trn/fold{j}.txt of the other folds (HSNet `DatasetPASCAL.build_img_metadata`)."""
  fewshot.fold_class_ids("pascal", fold, split)  # validates fold and split
  if split in ("test", "val"):
    return read_pascal_split(split_dir, "val", fold)
  return [e for j in range(fewshot.N_FOLDS) if j != fold for e in read_pascal_split(split_dir, "trn", j)]


def pascal_episodes(split_dir: os.PathLike | str, fold: int, n_episodes: int = 1000, seed: int = 0,
                    shot: int = 0) -> list[fewshot.Episode]:
  """The official evaluation episodes of a fold (see `fewshot.make_episodes`)."""
  return fewshot.make_episodes(fold, n_episodes, seed, benchmark="pascal",
                               entries=pascal_entries(split_dir, fold, "test"), shot=shot)


class Pascal5iLseg(fewshot_builder.FoldEpisodesBuilder):
  """PASCAL-5i episodes (HSNet splits) for LSeg's zero-shot protocol."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  BUILDER_CONFIGS = fewshot_builder.fold_configs("pascal", "PASCAL-5i")
  BENCHMARK = "pascal"
  LABELS = PASCAL_LABELS
  MASK_VALUES = {"0": fewshot.OTHERS, "1": "class", str(fewshot.STORED_IGNORE): "ignore"}

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    root = files.manual_root(dl_manager, INSTRUCTIONS, "pascal5i_lseg")
    files.require_dirs(root, ["VOC2012/JPEGImages", "VOC2012/SegmentationClassAug"], INSTRUCTIONS,
                         "pascal5i_lseg")
    split_dir = fewshot_builder.resolve_split_dir(self._split_dir, root, "pascal", INSTRUCTIONS, "pascal5i_lseg")
    out = {}
    if "test" in self._splits:
      episodes = pascal_episodes(split_dir, cfg.fold, cfg.n_episodes, cfg.seed)
      out["test"] = self._generate_examples(root, [(e.query, e.class_id) for e in episodes])
    if "train" in self._splits:
      out["train"] = self._generate_examples(root, pascal_entries(split_dir, cfg.fold, "train"))
    return out

  def _generate_examples(self, root: epath.Path, samples: Sequence[tuple[str, int]]):
    for i, (name, class_id) in enumerate(samples):
      image_path = root / "VOC2012" / "JPEGImages" / f"{name}.jpg"
      mask_path = root / "VOC2012" / "SegmentationClassAug" / f"{name}.png"
      image, size = files.read_rgb_image(image_path)
      raw = files.read_label_png(mask_path, NUM_CLASSES, extra=(fewshot.STORED_IGNORE,))
      files.check_same_size(size, raw, image_path, mask_path)
      mask = fewshot.binary_class_mask(raw, class_id)  # boundary 255 stays 255
      yield tfds_utils.ordered_key(i, len(samples)), {
          "image": image, "mask": files.encode_png(mask), "class_id": class_id, "file_name": name}
