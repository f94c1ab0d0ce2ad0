"""`fss1000_lseg`: FSS-1000 as LSeg's zero-shot evaluation reads it (HSNet's protocol).

Why our own builder: FSS-1000 is a folder per class (`FSS-1000/<class>/{1..10}.jpg`
with `.png` masks), split by HSNet into 520 train / 240 val / 240 test classes
(`data/splits/fss/{trn,val,test}.txt`). The split is known by rule here:
lang-seg's `label_files/fewshot_fss.txt` (shipped in `label_files/`, the names
fed to the text encoder) lists sorted(trn) + sorted(val) + sorted(test), so a
class's id (its line, 0-based) fixes its split: 0..519 train, 520..759
validation, 760..999 test, exactly HSNet's class ids. If `split_dir` (or
`<manual_dir>/splits`) holds HSNet's `fss/*.txt`, the builder checks them
against that rule.

Splits "train", "validation", "test": every image (*.jpg) of the split's
classes, class by class in id order, images in sorted file-name order as
HSNet's glob ("1.jpg", "10.jpg", "2.jpg", ...); record i is entry i. The
zero-shot test (`--nshot 0`) runs all 2400 test images. Each record: the
RGB image, the binary mask (HSNet: grayscale >= 128 -> 1, else 0), the class
id into `FSS_LABELS` and the path relative to `FSS-1000/`.
"""

from collections.abc import Sequence
import os

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from lseg_jax.data import fewshot
from lseg_jax.data import fewshot_builder
from lseg_jax.data import files
from lseg_jax.data import tfds_utils

LABEL_FILE = files.LABEL_FILES_DIR / "fewshot_fss.txt"
FSS_LABELS: tuple[str, ...] = files.read_label_file(LABEL_FILE)  # 1000 names, underscores kept
# Class-id ranges of HSNet's splits (`DatasetFSS.build_class_ids`).
SPLIT_CLASS_RANGES = {"train": range(0, 520), "validation": range(520, 760), "test": range(760, 1000)}
_HSNET_SPLIT_FILES = {"train": "trn", "validation": "val", "test": "test"}

INSTRUCTIONS = """\
FSS-1000 (HSNet's Datasets_HSN layout) under the manual dir:
  <manual_dir>/
    FSS-1000/<class>/<k>.jpg, <k>.png   the 1000 class folders (abacus/ ... zucchini/), 10
                                        images and masks each: the FSS-1000 archive linked
                                        from the juhongm999/hsnet README (Google Drive), or
                                        https://github.com/HKUSTCV/FSS-1000
    splits/fss/{trn,val,test}.txt       optional: HSNet's class lists, checked if present
"""


def fss_class_ids(split: str) -> range:
  """0-based class ids (lines of fewshot_fss.txt) of "train", "validation" or "test"."""
  if split not in SPLIT_CLASS_RANGES:
    raise ValueError(f"FSS-1000 split must be one of {list(SPLIT_CLASS_RANGES)}, got {split!r}")
  return SPLIT_CLASS_RANGES[split]


def fss_entries(root: os.PathLike | str, split: str) -> list[tuple[str, int]]:
  """(path relative to FSS-1000/, class id) of every image of a split, in HSNet's order.

  root: the manual dir (holding FSS-1000/). A missing class folder raises a
  FileNotFoundError naming it.
  """
  base = epath.Path(root) / "FSS-1000"
  entries = []
  for c in fss_class_ids(split):
    folder = base / FSS_LABELS[c]
    if not folder.is_dir():
      raise FileNotFoundError(f"FSS-1000 class folder {folder} is missing ({split} class {c}).\n{INSTRUCTIONS}")
    # HSNet keeps the paths whose first extension is "jpg", in sorted order.
    names = sorted(p.name for p in folder.iterdir() if p.name.split(".")[1:2] == ["jpg"])
    entries.extend((f"{FSS_LABELS[c]}/{n}", c) for n in names)
  return entries


def fss_episodes(entries: Sequence[tuple[str, int]], shot: int = 0, seed: int = 0) -> list[fewshot.Episode]:
  """Episodes over a split's entries: every image is a query (HSNet's FSS `__len__`).

  shot=0 (LSeg's protocol): all entries. shot=1 on the test split follows
  HSNet's fixed rule: the first file of each folder ("1.jpg") is the support
  and is not a query. shot>1 draws supports from "1.jpg".."10.jpg" with a
  `RandomState(seed)`, as HSNet's `np.random.choice(range(1, 11))`.
  """
  if shot == 0:
    return [fewshot.Episode(q, c) for q, c in entries]
  rng = np.random.RandomState(seed)
  episodes = []
  for q, c in entries:
    folder, name = q.rsplit("/", 1)
    if shot == 1:
      if name == "1.jpg":
        continue
      episodes.append(fewshot.Episode(q, c, (f"{folder}/1.jpg",)))
      continue
    support: list[str] = []
    while len(support) < shot:
      s = f"{folder}/{int(rng.choice(range(1, 11), 1, replace=False)[0])}.jpg"
      if s != q:
        support.append(s)
    episodes.append(fewshot.Episode(q, c, tuple(support)))
  return episodes


def read_fss_mask(path: os.PathLike | str) -> np.ndarray:
  """uint8 [H, W] binary mask: grayscale >= 128 -> 1 (HSNet `DatasetFSS.read_mask`)."""
  with Image.open(path) as im:
    gray = np.asarray(im.convert("L"))
  return (gray >= 128).astype(np.uint8)


def check_split_files(split_dir: epath.Path) -> None:
  """Checks HSNet's fss/{trn,val,test}.txt (if present) against the label-file rule."""
  for split, fname in _HSNET_SPLIT_FILES.items():
    path = split_dir / f"{fname}.txt"
    if not path.exists():
      continue
    names = sorted(line for line in path.read_text().split("\n") if line)
    expected = [FSS_LABELS[c] for c in fss_class_ids(split)]
    if names != expected:
      raise ValueError(f"{path} does not match classes {fss_class_ids(split)} of {LABEL_FILE}: "
                       "not HSNet's FSS-1000 split?")


class Fss1000Lseg(tfds_utils.TfFreePrepareMixin, tfds.core.GeneratorBasedBuilder):
  """FSS-1000 (HSNet class splits) for LSeg's zero-shot protocol."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  LABELS = FSS_LABELS
  MASK_MAP = staticmethod(fewshot.episode_mask_map)  # stored mask -> int32 target, -1 = ignore
  SPLITS = ("train", "validation", "test")

  def __init__(self, *, split_dir: os.PathLike | str | None = None, splits: Sequence[str] = SPLITS, **kwargs):
    """split_dir: optional HSNet `data/splits` to cross-check (default
    `<manual_dir>/splits` if present); splits: which splits to prepare."""
    self._split_dir = split_dir
    self._splits = tfds_utils.check_splits(splits, self.SPLITS, "fss1000_lseg")
    super().__init__(**kwargs)


  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=fewshot_builder.episode_features(FSS_LABELS),
        supervised_keys=("image", "mask"),
        homepage="https://github.com/HKUSTCV/FSS-1000",
        disable_shuffling=True,  # record i is entry i
        metadata=tfds.core.MetadataDict(
            benchmark="fss", split_class_ranges={k: [r.start, r.stop] for k, r in SPLIT_CLASS_RANGES.items()},
            mask_values={"0": fewshot.OTHERS, "1": "class"}),
    )

  def _split_generators(self, dl_manager):
    root = files.manual_root(dl_manager, INSTRUCTIONS, "fss1000_lseg")
    files.require_dirs(root, ["FSS-1000"], INSTRUCTIONS, "fss1000_lseg")
    base = epath.Path(self._split_dir) if self._split_dir is not None else root / "splits"
    for cand in (base / "fss", base):
      if (cand / "test.txt").exists():
        check_split_files(cand)
        break
    else:
      if self._split_dir is not None:
        raise FileNotFoundError(f"fss1000_lseg: no fss/test.txt under split_dir={self._split_dir}")
    return {s: self._generate_examples(root, fss_entries(root, s)) for s in self._splits}

  def _generate_examples(self, root: epath.Path, samples: Sequence[tuple[str, int]]):
    for i, (rel, class_id) in enumerate(samples):
      image_path = root / "FSS-1000" / rel
      mask_path = image_path.with_name(rel.rsplit("/", 1)[1].split(".")[0] + ".png")
      image, size = files.read_rgb_image(image_path)
      mask = read_fss_mask(mask_path)
      files.check_same_size(size, mask, image_path, mask_path)
      yield tfds_utils.ordered_key(i, len(samples)), {
          "image": image, "mask": files.encode_png(mask), "class_id": class_id, "file_name": rel}
