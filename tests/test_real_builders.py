"""Real-dataset builders (ADE20K, PASCAL-5i, COCO-20i, FSS-1000) on tiny fake trees.

Each test writes a few 40x60 images in the real folder layout (fake_trees.py),
prepares the builder with file_format="array_record" into a temporary
data_dir and reads it back with `tfds.data_source`, offline and without
TensorFlow. The label tables are checked against the official lang-seg label
files shipped in `lseg_jax/data/label_files/` (pinned to the official bytes by
sha256) and HSNet's FSS-1000 split lists shipped in `tests/data/`. The
registered pascal5i dataset is read back through the input pipeline too:
training episodes (support, query) as the official zero-shot module,
evaluation on the queries.
"""

import ast
import hashlib
import pickle

from etils import epath
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from fake_trees import H, PASCAL_TRN, PASCAL_VAL0, W, ade_tree, pascal_tree, pil_rgb, rgb, save_image
from helpers import pascal_fold  # noqa: F401  (a session fixture)

from lseg_jax import data
from lseg_jax.data import ade20k
from lseg_jax.data import coco20i
from lseg_jax.data import fewshot
from lseg_jax.data import fewshot_builder
from lseg_jax.data import files
from lseg_jax.data import fss1000
from lseg_jax.data import pascal5i
from lseg_jax.data import tfds_utils
from lseg_jax.data import transforms

LABEL_DIR = files.LABEL_FILES_DIR
HERE = epath.Path(__file__).parent


# ---------------------------------------------------------------------------
# Helpers.


def _prepare(builder_cls, data_dir, manual_dir, **kwargs):
  builder = builder_cls(data_dir=str(data_dir), file_format="array_record", **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _by_name(source) -> dict:
  out = {}
  for i in range(len(source)):
    ex = source[i]
    out[ex["file_name"].decode()] = ex
  return out


# ---------------------------------------------------------------------------
# Module structure.


def _data_imports(module) -> set[str]:
  """The lseg_jax modules that `module` imports (its source, parsed)."""
  tree = ast.parse(epath.Path(module.__file__).read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module.startswith("lseg_jax"):
      out |= {node.module} if node.module != "lseg_jax.data" else {f"lseg_jax.data.{a.name}" for a in node.names}
  return out


def test_data_modules_depend_one_way():
  """File readers and TFDS helpers know no benchmark; ADE20K needs no few-shot code."""
  assert _data_imports(files) == set() and _data_imports(tfds_utils) == set()
  assert _data_imports(fewshot) == {"lseg_jax.losses"}
  assert _data_imports(fewshot_builder) == {"lseg_jax.data.fewshot", "lseg_jax.data.tfds_utils"}
  assert _data_imports(ade20k) == {"lseg_jax.data.files", "lseg_jax.data.tfds_utils"}
  for module in (pascal5i, coco20i, fss1000):
    assert _data_imports(module) == {"lseg_jax.data.fewshot", "lseg_jax.data.fewshot_builder",
                                     "lseg_jax.data.files", "lseg_jax.data.tfds_utils"}, module.__name__


# ---------------------------------------------------------------------------
# Label tables.


def test_ade20k_labels_are_the_official_strings():
  labels = ade20k.ADE20K_LABELS
  assert len(labels) == 150
  assert labels[:5] == ("wall", "building", "sky", "floor", "tree")
  assert labels.count("screen") == 2 and [i for i, x in enumerate(labels) if x == "screen"] == [58, 130]
  assert "coffee" in labels and "coffee table" not in labels
  assert labels[-3:] == ("glass", "clock", "flag")
  official = (LABEL_DIR / "ade20k_objectInfo150.txt").read_text()
  assert labels == ade20k.labels_from_object_info(official)
  # The official loop: readlines, strip, split(',')[-1].split(';')[0], drop the header.
  assert labels == tuple(l.strip().split(",")[-1].split(";")[0] for l in official.splitlines(True)[1:])


# sha256 of lang-seg's label_files/* at bb00b219f82dc1a18a01f9b0b647bae1d41f3aeb
# (label_files/README.md), computed from that commit's blobs.
OFFICIAL_SHA256 = {
    "ade20k_objectInfo150.txt": "5a2c5061143dd3fe55a360960eb71d92ed018fc72e000aa2e7e3fb0399f7a348",
    "fewshot_pascal.txt": "7d877f185c807bc51b4cfb4f4202fc0b4e1c6724b782ba245fe36f8d254f0ad7",
    "fewshot_coco.txt": "3ccf800c20ccafc41fb0954368d338bd2cd11f9191978763fda565129ba1657a",
    "fewshot_fss.txt": "016a9a5b5356f1c60357cbfc2067bad487dd24e86266b1697fb6182fecfd090d",
}


@pytest.mark.parametrize("name", list(OFFICIAL_SHA256))
def test_shipped_label_files_are_the_official_bytes(name):
  assert hashlib.sha256((LABEL_DIR / name).read_bytes()).hexdigest() == OFFICIAL_SHA256[name]


def test_fewshot_label_tables_are_the_official_strings():
  # lang-seg's fewshot_*.txt: VOC and COCO category order, spaces removed.
  assert pascal5i.PASCAL_LABELS[:3] == ("aeroplane", "bicycle", "bird")
  assert pascal5i.PASCAL_LABELS[-3:] == ("sofa", "train", "tvmonitor")
  assert coco20i.COCO_LABELS[:3] == ("person", "bicycle", "car")
  assert coco20i.COCO_LABELS[9] == "trafficlight" and coco20i.COCO_LABELS[-1] == "toothbrush"
  assert len(pascal5i.PASCAL_LABELS) == 20 and len(coco20i.COCO_LABELS) == 80
  assert len(fss1000.FSS_LABELS) == 1000 == len(set(fss1000.FSS_LABELS))
  assert fss1000.FSS_LABELS[0] == "ac_wall" and fss1000.FSS_LABELS[-1] == "wooden_spoon"
  assert fewshot.episode_labels(pascal5i.PASCAL_LABELS, 10) == ("others", "diningtable")
  # What a pipeline registry needs, on each builder class.
  for cls, labels in ((ade20k.Ade20kLseg, ade20k.ADE20K_LABELS), (pascal5i.Pascal5iLseg, pascal5i.PASCAL_LABELS),
                      (coco20i.Coco20iLseg, coco20i.COCO_LABELS), (fss1000.Fss1000Lseg, fss1000.FSS_LABELS)):
    assert cls.LABELS is labels
    assert cls.MASK_MAP(np.zeros((2, 2, 1), np.uint8)).dtype == np.int32


@pytest.mark.parametrize("split, fname", [("train", "trn"), ("validation", "val"), ("test", "test")])
def test_fss_split_rule_matches_hsnet_lists(split, fname):
  """fewshot_fss.txt = sorted(trn) + sorted(val) + sorted(test) (HSNet's class
  ids): the lists of lang-seg's fewshot_data/data/splits/fss, shipped in tests/data."""
  names = sorted(x for x in (HERE / "data" / "hsnet_fss_splits" / f"{fname}.txt").read_text().split("\n") if x)
  assert names == [fss1000.FSS_LABELS[c] for c in fss1000.fss_class_ids(split)]


# ---------------------------------------------------------------------------
# Fold classes, episodes, masks, resize (pure functions).


def test_fold_class_sets():
  # 1-based class numbers held out (tested) by each fold.
  pascal = {0: {1, 2, 3, 4, 5}, 1: {6, 7, 8, 9, 10}, 2: {11, 12, 13, 14, 15}, 3: {16, 17, 18, 19, 20}}
  coco = {
      0: {1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73, 77},
      1: {2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62, 66, 70, 74, 78},
      2: {3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63, 67, 71, 75, 79},
      3: {4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80},
  }
  for benchmark, table, n in (("pascal", pascal, 20), ("coco", coco, 80)):
    for f, expected in table.items():
      test = fewshot.fold_class_ids(benchmark, f)
      assert {c + 1 for c in test} == expected and len(test) == n // 4
      assert {c + 1 for c in fewshot.fold_class_ids(benchmark, f, "train")} == set(range(1, n + 1)) - expected
  assert [pascal5i.PASCAL_LABELS[c] for c in fewshot.fold_class_ids("pascal", 2)] == [
      "diningtable", "dog", "horse", "motorbike", "person"]
  assert [coco20i.COCO_LABELS[c] for c in fewshot.fold_class_ids("coco", 0)][:3] == ["person", "aeroplane", "boat"]
  with pytest.raises(ValueError):
    fewshot.fold_class_ids("pascal", 4)


def _official_coco_sampling(classwise: dict, fold: int, n: int, seed: int) -> list[tuple[str, int]]:
  """HSNet `DatasetCOCO.load_frame` with shot=0 after `fix_randseed(seed)`, on the global RNG."""
  class_ids = [fold + 4 * v for v in range(20)]
  np.random.seed(seed)
  out = []
  for _ in range(n):
    c = np.random.choice(class_ids, 1, replace=False)[0]
    q = np.random.choice(classwise[c], 1, replace=False)[0]
    out.append((str(q), int(c)))
  return out


def test_make_episodes_is_deterministic():
  coco = [(f"val2014/img{k}_{c}.jpg", c) for c in fewshot.fold_class_ids("coco", 1) for k in range(c % 5 + 1)]
  a = fewshot.make_episodes(1, 50, 0, benchmark="coco", entries=coco)
  assert a == fewshot.make_episodes(1, 50, 0, benchmark="coco", entries=coco)
  assert a != fewshot.make_episodes(1, 50, 1, benchmark="coco", entries=coco)
  assert [(e.query, e.class_id) for e in a] == _official_coco_sampling(fewshot.group_by_class(coco), 1, 50, 0)
  assert all(e.class_id in fewshot.fold_class_ids("coco", 1) and not e.support for e in a)

  pascal = [(f"2008_{i:06d}", i % 5) for i in range(7)]
  p = fewshot.make_episodes(0, 20, 0, benchmark="pascal", entries=pascal)
  assert [(e.query, e.class_id) for e in p] == [pascal[i % 7] for i in range(20)]  # HSNet: idx % len
  assert p == fewshot.make_episodes(0, 20, 5, benchmark="pascal", entries=pascal)  # zero-shot: no randomness
  pascal2 = pascal + [(f"2009_{i:06d}", i % 5) for i in range(7)]
  s0 = fewshot.make_episodes(0, 20, 0, benchmark="pascal", entries=pascal2, shot=1)
  assert s0 == fewshot.make_episodes(0, 20, 0, benchmark="pascal", entries=pascal2, shot=1)
  assert s0 != fewshot.make_episodes(0, 20, 3, benchmark="pascal", entries=pascal2, shot=1)
  assert all(len(e.support) == 1 and e.support[0] != e.query for e in s0)
  with pytest.raises(ValueError, match="outside the fold"):
    fewshot.make_episodes(1, 5, 0, benchmark="pascal", entries=pascal)


def test_episode_and_ade_mask_maps():
  m = np.array([[0, 1, 255]], np.uint8)
  np.testing.assert_array_equal(fewshot.episode_mask_map(m), [[0, 1, -1]])
  np.testing.assert_array_equal(fewshot.episode_mask_map(m, ignore_boundary=False), [[0, 1, 0]])
  assert fewshot.episode_mask_map(m).dtype == np.int32
  raw = np.array([[0, 3, 4, 255, 21]], np.uint8)
  np.testing.assert_array_equal(fewshot.binary_class_mask(raw, 2), [[0, 1, 0, 255, 0]])
  np.testing.assert_array_equal(fewshot.binary_class_mask(raw, 2, ignore_value=None), [[0, 1, 0, 0, 0]])
  ex = fewshot.episode_example({"image": rgb(0), "mask": m[..., None], "class_id": 7})
  np.testing.assert_array_equal(ex["mask"], [[0, 8, -1]])
  np.testing.assert_array_equal(ex["label_ids"], [0, 8])
  table = fewshot.episode_label_table(pascal5i.PASCAL_LABELS)
  assert [table[i] for i in ex["label_ids"]] == list(fewshot.episode_labels(pascal5i.PASCAL_LABELS, 7))
  ade = np.array([[[0], [1], [150]]], np.uint8)
  out = ade20k.ade20k_mask_map(ade)
  assert out.dtype == np.int32 and out.shape == ade.shape
  np.testing.assert_array_equal(out[..., 0], [[-1, 0, 149]])
  with pytest.raises(ValueError, match="151"):
    ade20k.ade20k_mask_map(np.array([151], np.uint8))


def test_fewshot_resize():
  image = rgb(0)
  mask = np.arange(H * W, dtype=np.int32).reshape(H, W)
  out, m = fewshot.fewshot_resize(image, mask)
  assert out.shape == (480, 480, 3) and out.dtype == np.uint8 and m.shape == (480, 480)
  np.testing.assert_array_equal(out, np.asarray(Image.fromarray(image).resize((480, 480), Image.BILINEAR)))
  # PyTorch nearest: src = floor(dst * in / out), not PIL's pixel-centre rule.
  np.testing.assert_array_equal(fewshot.torch_nearest_indices(5, 3), [0, 1, 3])
  np.testing.assert_array_equal(fewshot.torch_nearest_indices(40, 480), np.arange(480) // 12)
  np.testing.assert_array_equal(m, mask[np.arange(480) // 12][:, np.arange(480) // 8])
  big = np.zeros((500, 700), np.uint8)
  assert fewshot.fewshot_resize(rgb(1), big[..., None])[1].shape == (480, 480, 1)


# ---------------------------------------------------------------------------
# ADE20K.


def test_ade20k_builder(tmp_path):
  masks = ade_tree(tmp_path / "manual")
  builder = _prepare(ade20k.Ade20kLseg, tmp_path / "data", tmp_path / "manual")
  assert builder.info.metadata["labels"] == list(ade20k.ADE20K_LABELS)
  sources = tfds.data_source("ade20k_lseg", data_dir=str(tmp_path / "data"))
  assert len(sources["train"]) == 3 and len(sources["validation"]) == 2
  images = tmp_path / "manual" / "ADEChallengeData2016" / "images"
  for split, folder in (("train", "training"), ("validation", "validation")):
    for stem, ex in _by_name(sources[split]).items():
      assert ex["image"].shape == (H, W, 3) and ex["image"].dtype == np.uint8
      assert ex["mask"].shape == (H, W, 1) and ex["mask"].dtype == np.uint8
      np.testing.assert_array_equal(ex["mask"][..., 0], masks[stem])
      target = ade20k.ade20k_mask_map(ex["mask"])
      np.testing.assert_array_equal(target[..., 0], masks[stem].astype(np.int32) - 1)
      assert target.min() == -1 and target.max() == 149
      assert ex["label_ids"].tolist() == sorted({int(v) - 1 for v in np.unique(masks[stem]) if v})
      np.testing.assert_array_equal(ex["image"], pil_rgb(images / folder / f"{stem}.jpg"))
  gray = _by_name(sources["train"])["ADE_train_00000002"]["image"]
  assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_ade20k_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="ADEChallengeData2016.zip"):
    _prepare(ade20k.Ade20kLseg, tmp_path / "data", tmp_path / "nowhere")
  (tmp_path / "half" / "ADEChallengeData2016" / "images" / "training").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="annotations/training"):
    _prepare(ade20k.Ade20kLseg, tmp_path / "data2", tmp_path / "half")
  ade_tree(tmp_path / "bad", bad_id=151)
  with pytest.raises(ValueError, match=r"ADE_train_00000001\.png.*151"):
    _prepare(ade20k.Ade20kLseg, tmp_path / "data3", tmp_path / "bad")


# ---------------------------------------------------------------------------
# PASCAL-5i.

def test_pascal5i_builder(tmp_path, pascal_fold):
  manual, masks = pascal_fold["manual"], pascal_fold["masks"]
  config = fewshot_builder.FewShotConfig(name="fold0_n6", fold=0, n_episodes=6, seed=0)
  _prepare(pascal5i.Pascal5iLseg, tmp_path / "data", manual, config=config)
  sources = tfds.data_source("pascal5i_lseg/fold0_n6", data_dir=str(tmp_path / "data"))
  test, train = sources["test"], sources["train"]
  episodes = pascal5i.pascal_episodes(manual / "splits" / "pascal", 0, n_episodes=6)
  assert len(test) == 6
  expected = [(l.split("__")[0], int(l.split("__")[1]) - 1) for l in PASCAL_VAL0]
  assert [(e.query, e.class_id) for e in episodes] == [expected[i % 4] for i in range(6)]
  for i, e in enumerate(episodes):  # record i is episode i
    ex = test[i]
    assert (ex["file_name"].decode(), int(ex["class_id"])) == (e.query, e.class_id)
    assert ex["image"].shape == (H, W, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (H, W, 1) and ex["mask"].dtype == np.uint8
    raw = masks[e.query]
    target = fewshot.episode_mask_map(ex["mask"])[..., 0]
    np.testing.assert_array_equal(target, np.where(raw == 255, -1, (raw == e.class_id + 1).astype(np.int32)))
    assert (target == 1).any() and (target == -1).sum() == (raw == 255).sum()
    np.testing.assert_array_equal(ex["image"], pil_rgb(manual / "VOC2012" / "JPEGImages" / f"{e.query}.jpg"))
  # train = trn lists of the other folds, in order.
  lines = [l for f in (1, 2, 3) for l in PASCAL_TRN[f]]
  got = [(train[i]["file_name"].decode(), int(train[i]["class_id"])) for i in range(len(train))]
  assert got == [(l.split("__")[0], int(l.split("__")[1]) - 1) for l in lines]
  info = tfds.builder("pascal5i_lseg/fold0_n6", data_dir=str(tmp_path / "data")).info
  assert info.features["class_id"].names == list(pascal5i.PASCAL_LABELS)
  assert info.metadata["test_class_ids"] == [0, 1, 2, 3, 4]


def test_pascal5i_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="VOCtrainval_11-May-2012.tar"):
    _prepare(pascal5i.Pascal5iLseg, tmp_path / "data", tmp_path / "nowhere")
  pascal_tree(tmp_path / "nosplits")
  (tmp_path / "nosplits" / "splits" / "pascal" / "val" / "fold0.txt").unlink()
  with pytest.raises(FileNotFoundError, match="hsnet"):
    _prepare(pascal5i.Pascal5iLseg, tmp_path / "data1", tmp_path / "nosplits", splits=("test",))
  pascal_tree(tmp_path / "bad", bad_id=21)
  with pytest.raises(ValueError, match=r"2007_000001\.png.*\[21\]"):
    _prepare(pascal5i.Pascal5iLseg, tmp_path / "data2", tmp_path / "bad", splits=("test",),
             config=fewshot_builder.FewShotConfig(name="fold0_n2", fold=0, n_episodes=2))


def _resized_mask(mask: np.ndarray) -> np.ndarray:
  return fewshot.fewshot_resize(np.zeros((H, W, 3), np.uint8), mask, W)[1]


def test_pascal5i_trains_on_support_query_episodes(pascal_fold):
  """As the official zero-shot module: a batch of 4 images is 2 episodes, each
  a support then a query of one class from two different images; boundaries
  are "others" (0) in training and ignored (-1) in evaluation. The images keep
  their width (the zero-shot square resize to crop_size)."""
  masks = pascal_fold["masks"]
  cfg = dict(pascal_fold["input"], crop_size=W, train_mode="resize", eval_mode="resize", normalization="imagenet",
             max_labels=2, num_threads=1)
  kw = dict(global_batch_size=4, seed=0, train=True, num_epochs=1)
  batches = list(iter(data.make_loader(cfg, "train", shard_index=0, shard_count=1, **kw)))
  records = [(l.split("__")[0], int(l.split("__")[1]) - 1) for f in (1, 2, 3) for l in PASCAL_TRN[f]]
  assert len(batches) == len(records) // 2 == 5 and data.num_examples(cfg, "train", train=True) == 20
  stats = transforms.normalization_stats("imagenet")
  voc = pascal_fold["manual"] / "VOC2012" / "JPEGImages"
  expected = {name: transforms.normalize(fewshot.fewshot_resize(pil_rgb(voc / f"{name}.jpg"), None, W)[0], *stats)
              for name in masks}
  rows = []  # (image name, class, mask) of every row, in order
  for b in batches:
    assert b["image"].shape == (4, W, W, 3) and b["label_mask"].all()
    for image, mask, ids in zip(b["image"], b["mask"], b["label_ids"]):
      rows.append((next(n for n, e in expected.items() if np.array_equal(e, image)), int(ids[1]) - 1, mask))
  queries = []
  for (s_name, s_class, s_mask), (q_name, q_class, q_mask) in zip(rows[0::2], rows[1::2]):
    assert s_class == q_class and s_name != q_name
    queries.append((q_name, q_class))
    for name, mask in ((s_name, s_mask), (q_name, q_mask)):
      resized = _resized_mask(masks[name])
      assert (resized == fewshot.STORED_IGNORE).any()
      np.testing.assert_array_equal(mask, (resized == q_class + 1).astype(np.int32))  # boundary -> 0
  assert sorted(queries) == sorted(records)  # every record is the query once per epoch
  parts = [list(iter(data.make_loader(cfg, "train", shard_index=i, shard_count=2, **kw))) for i in (0, 1)]
  for whole, p0, p1 in zip(batches, *parts, strict=True):
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([p0[key], p1[key]]))
  test = next(iter(data.make_loader(cfg, "test", global_batch_size=4, seed=0, train=False,
                                    shard_index=0, shard_count=1)))
  for i, (mask, ids) in enumerate(zip(test["mask"], test["label_ids"])):
    name, c = PASCAL_VAL0[i].split("__")
    resized = _resized_mask(masks[name])
    np.testing.assert_array_equal(ids, [0, int(c)])
    np.testing.assert_array_equal(mask, np.where(resized == fewshot.STORED_IGNORE, -1, resized == int(c)))


# ---------------------------------------------------------------------------
# COCO-20i.


def _coco_tree(root: epath.Path) -> dict:
  base = root / "COCO2014"
  masks = {}
  for split, n in (("val2014", 4), ("train2014", 2)):
    for i in range(n):
      key = f"{split}/COCO_{split}_{i + 1:012d}.jpg"
      image = rgb(200 + i + n)
      if i == 1:  # COCO has grayscale JPEGs
        save_image(base / key, image[..., 2])
      else:
        save_image(base / key, image)
      mask = np.zeros((H, W), np.uint8)
      mask[:, :15] = 1 + 4 * i  # classes 4i (0-based), in fold 0
      mask[:, 15:30] = 2  # class 1 (fold 1)
      mask[:5] = 80  # class 79 (fold 3)
      save_image(base / "annotations" / f"{key[:-4]}.png", mask)
      masks[key] = mask
  val = {c: [] for c in range(80)}
  trn = {c: [] for c in range(80)}
  for c in fewshot.fold_class_ids("coco", 0):
    val[c] = [f"val2014/COCO_val2014_{k + 1:012d}.jpg" for k in range(4) if (c + k) % 3]
  trn[1] = [f"train2014/COCO_train2014_{k + 1:012d}.jpg" for k in range(2)]
  trn[79] = ["train2014/COCO_train2014_000000000002.jpg"]
  (root / "hsnet_splits" / "coco" / "val").mkdir(parents=True)
  (root / "hsnet_splits" / "coco" / "trn").mkdir(parents=True)
  for name, d in (("val", val), ("trn", trn)):
    with open(root / "hsnet_splits" / "coco" / name / "fold0.pkl", "wb") as f:
      pickle.dump(d, f)
  return masks


def test_coco20i_builder(tmp_path):
  masks = _coco_tree(tmp_path / "manual")
  split_dir = tmp_path / "manual" / "hsnet_splits"  # HSNet's data/splits, given explicitly
  config = fewshot_builder.FewShotConfig(name="fold0_n9", fold=0, n_episodes=9, seed=0)
  _prepare(coco20i.Coco20iLseg, tmp_path / "data", tmp_path / "manual", config=config, split_dir=split_dir)
  sources = tfds.data_source("coco20i_lseg/fold0_n9", data_dir=str(tmp_path / "data"))
  episodes = coco20i.coco_episodes(split_dir, 0, n_episodes=9, seed=0)
  assert episodes == coco20i.coco_episodes(split_dir, 0, n_episodes=9, seed=0)
  assert episodes != coco20i.coco_episodes(split_dir, 0, n_episodes=9, seed=1)
  classwise = {c: names for c, names in pickle.load(open(split_dir / "coco" / "val" / "fold0.pkl", "rb")).items()}
  assert [(e.query, e.class_id) for e in episodes] == _official_coco_sampling(classwise, 0, 9, 0)
  test = sources["test"]
  assert len(test) == 9
  for i, e in enumerate(episodes):
    ex = test[i]
    assert (ex["file_name"].decode(), int(ex["class_id"])) == (e.query, e.class_id)
    assert ex["image"].shape == (H, W, 3) and ex["mask"].shape == (H, W, 1)
    target = fewshot.episode_mask_map(ex["mask"])[..., 0]
    np.testing.assert_array_equal(target, (masks[e.query] == e.class_id + 1).astype(np.int32))
    np.testing.assert_array_equal(ex["image"], pil_rgb(tmp_path / "manual" / "COCO2014" / e.query))
  train = sources["train"]
  assert [(train[i]["file_name"].decode(), int(train[i]["class_id"])) for i in range(len(train))] == [
      ("train2014/COCO_train2014_000000000001.jpg", 1), ("train2014/COCO_train2014_000000000002.jpg", 1),
      ("train2014/COCO_train2014_000000000002.jpg", 79)]
  assert fewshot.episode_labels(coco20i.COCO_LABELS, int(train[2]["class_id"])) == ("others", "toothbrush")


def test_coco20i_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="train2014.zip"):
    _prepare(coco20i.Coco20iLseg, tmp_path / "data", tmp_path / "nowhere")
  masks = _coco_tree(tmp_path / "manual")
  key = next(k for k in masks if k.startswith("val2014"))
  bad = masks[key].copy()
  bad[0, 0] = 81
  save_image(tmp_path / "manual" / "COCO2014" / "annotations" / f"{key[:-4]}.png", bad)
  with pytest.raises(ValueError, match=r"COCO_val2014_000000000001\.png.*\[81\]"):
    _prepare(coco20i.Coco20iLseg, tmp_path / "data2", tmp_path / "manual", splits=("test",),
             split_dir=tmp_path / "manual" / "hsnet_splits",
             config=fewshot_builder.FewShotConfig(name="fold0_n20", fold=0, n_episodes=20))
  evil = tmp_path / "evil" / "coco" / "val"
  evil.mkdir(parents=True)
  with open(evil / "fold0.pkl", "wb") as f:
    pickle.dump({0: [np.float64(1.0)]}, f)  # needs a global: refused
  with pytest.raises(pickle.UnpicklingError):
    coco20i.coco_episodes(tmp_path / "evil", 0)


# ---------------------------------------------------------------------------
# FSS-1000.


def test_fss1000_builder(tmp_path):
  base = tmp_path / "manual" / "FSS-1000"
  test_ids = list(fss1000.fss_class_ids("test"))
  assert (test_ids[0], test_ids[-1], len(test_ids)) == (760, 999, 240)
  for c in test_ids:
    for k in (1, 2):
      image = rgb(c * 10 + k)
      if c == 761 and k == 2:
        image = np.concatenate([image, np.zeros((H, W, 1), np.uint8)], -1)  # RGBA PNG as .jpg
        save_image(base / fss1000.FSS_LABELS[c] / f"{k}.jpg", image, fmt="PNG")
      else:
        save_image(base / fss1000.FSS_LABELS[c] / f"{k}.jpg", image)
      mask = np.zeros((H, W), np.uint8)
      mask[:, : 10 * k] = 255
      mask[0, 0] = 127  # below the threshold
      mask[1, 1] = 128
      save_image(base / fss1000.FSS_LABELS[c] / f"{k}.png", mask)
  _prepare(fss1000.Fss1000Lseg, tmp_path / "data", tmp_path / "manual", splits=("test",))
  test = tfds.data_source("fss1000_lseg", data_dir=str(tmp_path / "data"), split="test")
  assert len(test) == 480
  for i in (0, 1, 3, 479):
    ex = test[i]
    c, k = 760 + i // 2, i % 2 + 1
    assert ex["file_name"].decode() == f"{fss1000.FSS_LABELS[c]}/{k}.jpg" and int(ex["class_id"]) == c
    assert ex["image"].shape == (H, W, 3) and ex["mask"].shape == (H, W, 1)
    expected = np.zeros((H, W), np.int32)
    expected[:, : 10 * k] = 1
    expected[0, 0], expected[1, 1] = 0, 1
    np.testing.assert_array_equal(fewshot.episode_mask_map(ex["mask"])[..., 0], expected)
    np.testing.assert_array_equal(ex["image"], pil_rgb(base / ex["file_name"].decode()))
  entries = fss1000.fss_entries(tmp_path / "manual", "test")
  assert len(fss1000.fss_episodes(entries)) == 480
  one_shot = fss1000.fss_episodes(entries, shot=1)
  assert len(one_shot) == 240 and one_shot[0].support == (f"{fss1000.FSS_LABELS[760]}/1.jpg",)
  with pytest.raises(FileNotFoundError, match=fss1000.FSS_LABELS[0]):  # a missing class folder is named
    _prepare(fss1000.Fss1000Lseg, tmp_path / "data2", tmp_path / "manual", splits=("train",))
  with pytest.raises(FileNotFoundError, match="FSS-1000"):
    _prepare(fss1000.Fss1000Lseg, tmp_path / "data3", tmp_path / "nowhere")


def test_large_split_prepares_without_tensorflow(tmp_path, monkeypatch, pascal_fold):
  """Past TFDS's 1 GB in-memory limit its writer needs tf.io.gfile; the builders
  lift the limit while preparing. Forced here by lowering the limit to 2 kB."""
  from tensorflow_datasets.core import shuffle
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 2000)
  config = fewshot_builder.FewShotConfig(name="fold0_n30", fold=0, n_episodes=30)
  _prepare(pascal5i.Pascal5iLseg, tmp_path / "data", pascal_fold["manual"], config=config, splits=("test",))
  assert shuffle.MAX_MEM_BUFFER_SIZE == 2000  # restored
  test = tfds.data_source("pascal5i_lseg/fold0_n30", data_dir=str(tmp_path / "data"), split="test")
  episodes = pascal5i.pascal_episodes(pascal_fold["manual"] / "splits", 0, n_episodes=30)
  assert [(test[i]["file_name"].decode(), int(test[i]["class_id"])) for i in range(30)] == [
      (e.query, e.class_id) for e in episodes]
