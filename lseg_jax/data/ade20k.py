"""`ade20k_lseg`: ADE20K (SceneParsing, ADEChallengeData2016) as LSeg trains on it.

Why not TFDS's `scene_parse150`: its builder lists files with `tf.io.gfile`,
so it cannot prepare without TensorFlow, and it downloads the 2017
*instance* challenge archives (`annotations_instance.tar`, RGB-coded
instances), not the 150-class semantic masks of ADEChallengeData2016 that
LSeg and PyTorch-Encoding use. This builder reads a local, extracted
`ADEChallengeData2016/` tree from the TFDS manual_dir (see `INSTRUCTIONS`).

Splits "train" (images/training, 20,210) and "validation" (images/validation,
2,000). Each record: the RGB image (grayscale/CMYK converted as
PyTorch-Encoding's `convert('RGB')`), the raw mask (uint8 [H, W, 1]: 0 =
unlabelled, k = class k-1), `label_ids` (the 0-based classes present) and the
file stem. `ade20k_mask_map` turns the mask into the training target: int32
with 0 -> -1 (ignored) and k -> k-1, ids into `ADE20K_LABELS`.

`ADE20K_LABELS` are the 150 strings the official code feeds the text encoder
(`get_labels('ade20k')`): for each line of `label_files/ade20k_objectInfo150.txt`
after the header, `line.strip().split(',')[-1].split(';')[0]`: the first
synonym, cut at the first ';', hence "coffee" (coffee table), "swimming",
"traffic", "crt", and "screen" twice (0-based ids 58 and 130: file Idx 59,
screen door, and 131, projection screen). Keep them as they are: the released
weights were trained with these exact strings.
"""

import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from lseg_jax.data import files
from lseg_jax.data import tfds_utils

OBJECT_INFO_FILE = files.LABEL_FILES_DIR / "ade20k_objectInfo150.txt"
NUM_CLASSES = 150


INSTRUCTIONS = """\
ADE20K (MIT SceneParsing, 150 classes) under the manual dir:
  download http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip
  (the archive PyTorch-Encoding and lang-seg's prepare_ade20k.py use) and unzip it:
  <manual_dir>/
    ADEChallengeData2016/               (or these two folders directly in <manual_dir>)
      images/training/ADE_train_*.jpg
      images/validation/ADE_val_*.jpg
      annotations/training/ADE_train_*.png     class-id masks: 0 = unlabelled, 1..150
      annotations/validation/ADE_val_*.png
"""

_SPLIT_DIRS = {"train": "training", "validation": "validation"}


def labels_from_object_info(text: str) -> tuple[str, ...]:
  """The official label strings from the text of `ade20k_objectInfo150.txt`
  (lang-seg `LSegModule.get_labels`): last comma field, cut at ';', header dropped."""
  return tuple(line.strip().split(",")[-1].split(";")[0] for line in text.splitlines(keepends=True))[1:]


ADE20K_LABELS: tuple[str, ...] = labels_from_object_info(OBJECT_INFO_FILE.read_text())
assert len(ADE20K_LABELS) == NUM_CLASSES, OBJECT_INFO_FILE


def ade20k_mask_map(mask: np.ndarray) -> np.ndarray:
  """uint8 ADE mask (any shape) -> int32 target: 0 -> -1 (ignored), k -> k-1.

  As PyTorch-Encoding's `_mask_transform` (`int64(mask) - 1`), whose -1 is
  the loss's ignore_index and the metric's "unlabelled". Ids above 150 raise
  a ValueError.
  """
  mask = np.asarray(mask)
  if mask.size and (mask.min() < 0 or mask.max() > NUM_CLASSES):
    bad = [int(v) for v in np.unique(mask) if not 0 <= v <= NUM_CLASSES]
    raise ValueError(f"ADE20K mask holds id(s) {bad} outside 0..{NUM_CLASSES}")
  return mask.astype(np.int32) - 1


def ade20k_root(manual_dir: os.PathLike | str) -> epath.Path:
  """`<manual_dir>/ADEChallengeData2016`, or manual_dir itself when it holds images/."""
  manual_dir = epath.Path(manual_dir)
  nested = manual_dir / "ADEChallengeData2016"
  return nested if nested.is_dir() or not (manual_dir / "images").is_dir() else manual_dir


class Ade20kLseg(tfds_utils.TfFreePrepareMixin, tfds.core.GeneratorBasedBuilder):
  """ADE20K / SceneParse150 semantic masks (ADEChallengeData2016), read from manual_dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  LABELS = ADE20K_LABELS
  MASK_MAP = staticmethod(ade20k_mask_map)  # stored mask -> int32 target, -1 = ignore


  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
            "label_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "mask"),
        homepage="http://sceneparsing.csail.mit.edu/",
        # Labels as metadata, not a ClassLabel: the official list repeats "screen".
        metadata=tfds.core.MetadataDict(labels=list(ADE20K_LABELS), ignore_value=0),
    )

  def _split_generators(self, dl_manager):
    root = ade20k_root(files.manual_root(dl_manager, INSTRUCTIONS, "ade20k_lseg"))
    dirs = [f"{kind}/{d}" for d in _SPLIT_DIRS.values() for kind in ("images", "annotations")]
    files.require_dirs(root, dirs, INSTRUCTIONS, "ade20k_lseg")
    return {split: self._generate_examples(root, d) for split, d in _SPLIT_DIRS.items()}

  def _generate_examples(self, root: epath.Path, split_dir: str):
    image_dir = root / "images" / split_dir
    names = sorted(p.name for p in image_dir.iterdir() if p.name.endswith(".jpg"))
    if not names:
      raise FileNotFoundError(f"ade20k_lseg: no .jpg images in {image_dir}.\n{INSTRUCTIONS}")
    for name in names:
      stem = name[:-len(".jpg")]
      image_path = image_dir / name
      mask_path = root / "annotations" / split_dir / f"{stem}.png"
      if not mask_path.exists():
        raise FileNotFoundError(f"ade20k_lseg: {image_path} has no mask {mask_path}")
      image, size = files.read_rgb_image(image_path)
      mask = files.read_label_png(mask_path, NUM_CLASSES)
      files.check_same_size(size, mask, image_path, mask_path)
      label_ids = np.unique(mask)
      yield stem, {
          "image": image,
          "mask": files.encode_png(mask),
          "label_ids": (label_ids[label_ids > 0] - 1).astype(np.int32),
          "file_name": stem,
      }
