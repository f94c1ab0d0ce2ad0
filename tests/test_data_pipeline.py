"""Input pipeline: the official transform numbers, the batch format, the
dataset registry, determinism, sharding and checkpointable iterators."""

import hashlib

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from lseg_jax import data
from lseg_jax.data import fewshot
from lseg_jax.data import pipeline
from lseg_jax.data import shapes
from lseg_jax.data import transforms


@pytest.fixture
def fake_dataset():
  """Registers throw-away in-memory datasets, removed after the test."""
  names = []

  def make(name, records, labels, **kw):
    data.register(name, source=lambda cfg, split: records, labels=labels, overwrite=True, **kw)
    names.append(name)
    return name
  yield make
  for n in names:
    data.unregister(n)


def _batches(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _record_resizes(monkeypatch) -> list[tuple[int, int]]:
  """Records the (height, width) every transform resizes to."""
  sizes = []
  real = transforms._resize

  def spy(image, mask, height, width):
    sizes.append((height, width))
    return real(image, mask, height, width)
  monkeypatch.setattr(transforms, "_resize", spy)
  return sizes


# ---------------------------------------------------------------- transforms


def test_train_long_side_range_and_rounding(monkeypatch):
  sizes = _record_resizes(monkeypatch)
  image = np.full((100, 150, 3), 7, np.uint8)  # w is the long side
  mask = np.zeros((100, 150), np.int32)
  rng = np.random.default_rng(0)
  for _ in range(600):
    transforms.sync_train(image, mask, rng, base_size=20, crop_size=8)
  longs = np.array([w for _, w in sizes])
  assert set(longs.tolist()) == set(range(10, 41))  # [int(0.5*20), int(2.0*20)], inclusive
  for oh, ow in sizes:
    assert oh == int(100 * ow / 150 + 0.5)
  sizes.clear()
  tall = np.full((150, 100, 3), 7, np.uint8)
  transforms.sync_train(tall, mask.T.copy(), np.random.default_rng(1), base_size=520, crop_size=480)
  (oh, ow), = sizes
  assert 260 <= oh <= 1040 and ow == int(100 * oh / 150 + 0.5)


def test_train_pads_bottom_right_then_crops(monkeypatch):
  sizes = _record_resizes(monkeypatch)
  image = np.full((30, 40, 3), 200, np.uint8)
  mask = np.full((30, 40), 2, np.int32)
  for seed in range(5):
    sizes.clear()
    out_img, out_mask = transforms.sync_train(image, mask, np.random.default_rng(seed),
                                              base_size=40, crop_size=100)
    (oh, ow), = sizes  # long side <= 80 < 100: padded in both directions, crop at (0, 0)
    assert out_img.shape == (100, 100, 3) and out_mask.shape == (100, 100)
    assert (out_img[:oh, :ow] == 200).all() and (out_mask[:oh, :ow] == 2).all()
    assert (out_img[oh:] == 0).all() and (out_img[:, ow:] == 0).all()
    assert (out_mask[oh:] == -1).all() and (out_mask[:, ow:] == -1).all()


def test_train_transform_crop_and_normalisation():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
  image[0, 0], image[0, 1] = 0, 255
  mask = rng.integers(-1, 3, (90, 120)).astype(np.int32)
  t = transforms.TrainTransform(base_size=120, crop_size=96)
  for seed in range(4):
    out = t.random_map({"image": image, "mask": mask, "extra": 1}, np.random.default_rng(seed))
    assert out["image"].shape == (96, 96, 3) and out["image"].dtype == np.float32
    assert out["mask"].shape == (96, 96) and out["mask"].dtype == np.int32
    assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0
    assert set(np.unique(out["mask"])) <= {-1, 0, 1, 2}
    assert out["extra"] == 1
  x = np.array([[[0, 128, 255]]], np.uint8)
  np.testing.assert_array_equal(transforms.normalize(x, *transforms.normalization_stats("clip")),
                                (x.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5))
  assert transforms.normalize(x, *transforms.normalization_stats("clip"))[0, 0, 0] == -1.0
  mean, std = transforms.normalization_stats("imagenet")
  np.testing.assert_allclose(transforms.normalize(x, mean, std)[0, 0],
                             (x[0, 0] / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-6)


@pytest.mark.parametrize("hw", [(200, 301), (301, 200), (150, 150)])
def test_val_transform_short_side_then_centre_crop(hw):
  h, w = hw
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  mask = rng.integers(-1, 5, (h, w)).astype(np.int32)
  out_img, out_mask = transforms.sync_val(image, mask, crop_size=100)
  assert out_img.shape == (100, 100, 3) and out_mask.shape == (100, 100)
  # Official: short side -> crop, long side truncated with int(), centre by round().
  oh, ow = (100, int(w * 100 / h)) if w > h else (int(h * 100 / w), 100)
  ref_img = np.asarray(Image.fromarray(image).resize((ow, oh), Image.BILINEAR))
  ref_mask = np.asarray(Image.fromarray(mask).resize((ow, oh), Image.NEAREST))
  y1, x1 = int(round((oh - 100) / 2)), int(round((ow - 100) / 2))
  np.testing.assert_array_equal(out_img, ref_img[y1:y1 + 100, x1:x1 + 100])
  np.testing.assert_array_equal(out_mask, ref_mask[y1:y1 + 100, x1:x1 + 100])


def test_flip_keeps_image_and_mask_aligned():
  """Left half class 1 (dark), right half class 2 (bright): after any draw,
  the mask and the image still agree, and both flip outcomes occur."""
  image = np.zeros((60, 80, 3), np.uint8)
  image[:, 40:] = 200
  mask = np.ones((60, 80), np.int32)
  mask[:, 40:] = 2
  left_classes = set()
  for seed in range(12):
    out_img, out_mask = transforms.sync_train(image, mask, np.random.default_rng(seed),
                                              base_size=80, crop_size=40)
    bright = out_img[..., 0] > 100
    valid = out_mask >= 0
    agree = (bright == (out_mask == 2))[valid].mean()
    assert agree > 0.95, (seed, agree)
    cols = out_mask[:, 0]
    if (cols >= 0).any():
      left_classes.add(int(cols[cols >= 0][0]))
  assert left_classes == {1, 2}  # flipped and not flipped both seen


def test_ensure_rgb():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  assert transforms.ensure_rgb(gray).shape == (3, 4, 3)
  assert transforms.ensure_rgb(gray[..., None]).shape == (3, 4, 3)
  rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.ensure_rgb(rgba), rgba[..., :3])
  with pytest.raises(ValueError, match="uint8"):
    transforms.ensure_rgb(gray.astype(np.float32))


# ------------------------------------------------------------ batch format


def test_shapes_train_batch_format(shapes_config):
  loader = data.make_loader(shapes_config, "train", global_batch_size=4, seed=0, train=True,
                            shard_index=0, shard_count=1)
  b = next(iter(loader))
  assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.float32
  assert b["mask"].shape == (4, 64, 64) and b["mask"].dtype == np.int32
  assert b["label_ids"].shape == (4, 7) and b["label_ids"].dtype == np.int32
  assert b["label_mask"].dtype == bool and b["label_mask"].all()
  np.testing.assert_array_equal(b["label_ids"], np.tile(np.arange(7), (4, 1)))
  assert b["image"].min() >= -1 and b["image"].max() <= 1
  assert b["mask"].min() >= -1 and b["mask"].max() < len(shapes.LABELS)
  assert data.label_names("lseg_shapes") == shapes.LABELS


def test_eval_modes(shapes_config):
  val = next(iter(data.make_loader(shapes_config, "validation", global_batch_size=3, seed=0,
                                   train=False, shard_index=0, shard_count=1)))
  assert val["image"].shape == (3, 64, 64, 3)
  cfg = dict(shapes_config, eval_mode="none")
  full = list(iter(data.make_loader(cfg, "validation", global_batch_size=3, seed=0, train=False,
                                    shard_index=0, shard_count=1)))
  assert [len(b["image"]) for b in full] == [3] * 6  # 16 examples, in order, then 2 padding
  assert (full[-1]["mask"][1:] == -1).all() and (full[-1]["mask"][0] >= 0).any()
  ds = tfds.data_source("lseg_shapes/tiny", split="validation", data_dir=shapes_config["data_dir"])
  ex = ds[0]
  b = full[0]
  h, w = ex["mask"].shape[:2]
  np.testing.assert_array_equal(b["mask"][0, :h, :w], ex["mask"][..., 0])
  np.testing.assert_allclose(b["image"][0, :h, :w], ex["image"] / 255 * 2 - 1, atol=1e-6)
  assert (b["mask"][0, h:] == -1).all() and (b["mask"][0, :, w:] == -1).all()
  assert (b["image"][0, h:] == -1).all() and (b["image"][0, :, w:] == -1).all()
  cfg = dict(shapes_config, eval_mode="resize", crop_size=48)
  sq = next(iter(data.make_loader(cfg, "validation", global_batch_size=2, seed=0, train=False,
                                  shard_index=0, shard_count=1)))
  assert sq["image"].shape == (2, 48, 48, 3)


# ------------------------------------------- determinism, sharding, state


def test_same_seed_same_batches(shapes_config):
  kw = dict(global_batch_size=4, train=True, shard_index=0, shard_count=1)
  a = _batches(data.make_loader(shapes_config, "train", seed=1, **kw), 3)
  b = _batches(data.make_loader(shapes_config, "train", seed=1, **kw), 3)
  c = _batches(data.make_loader(shapes_config, "train", seed=2, **kw), 1)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_a_loader_resumes_at_a_global_batch_on_any_process_count(shapes_config):
  """start_batch=s continues the stream at global batch s, past an epoch
  boundary, and 2 processes' rows of it concatenate to 1 process's batch: a
  run saved by any number of processes resumes on any other."""
  kw = dict(global_batch_size=4, seed=0, train=True)
  it = iter(data.make_loader(shapes_config, "train", shard_index=0, shard_count=1, **kw))
  for _ in range(17):  # past the first epoch (16 batches): reshuffled epoch 2
    next(it)
  expected = [next(it) for _ in range(2)]
  resumed = iter(data.make_loader(shapes_config, "train", shard_index=0, shard_count=1, start_batch=17, **kw))
  _assert_batches_equal(expected, [next(resumed) for _ in range(2)])
  halves = [iter(data.make_loader(shapes_config, "train", shard_index=i, shard_count=2, start_batch=17, **kw))
            for i in range(2)]
  for want in expected:
    got = [next(h) for h in halves]
    for key in want:
      np.testing.assert_array_equal(want[key], np.concatenate([g[key] for g in got]))


def _index_records(n: int, size: int = 64) -> list[dict]:
  """Constant images whose value identifies the record (1..n): resize and
  crop keep a constant image constant, so train batches reveal their sources."""
  return [{"image": np.full((size, size, 3), i + 1, np.uint8), "mask": np.zeros((size, size), np.uint8)}
          for i in range(n)]


def _ids(batches) -> list[int]:
  return [int(round((img[0, 0, 0] + 1) / 2 * 255)) for b in batches for img in b["image"]]


def test_shards_are_disjoint_and_shuffled(fake_dataset):
  name = fake_dataset("index_ds", _index_records(21), labels=("x",))
  cfg = dict(dataset=name, crop_size=32, base_size=64)  # long side >= 32: never padded
  seen = []
  for shard in (0, 1):
    loader = data.make_loader(cfg, "train", global_batch_size=4, seed=0, train=True,
                              shard_index=shard, shard_count=2, num_epochs=1)
    ids = _ids(list(iter(loader)))
    assert len(ids) == 10 and len(set(ids)) == 10  # 5 global batches of 4, 2 rows each
    seen.append(set(ids))
    assert ids != sorted(ids)  # shuffled
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] <= set(range(1, 22))
  # 2 epochs: the second is another order of the same 20 examples
  loader = data.make_loader(cfg, "train", global_batch_size=2, seed=0, train=True,
                            shard_index=0, shard_count=1, num_epochs=2)
  ids = _ids(list(iter(loader)))
  assert sorted(ids[:20]) == sorted(ids[20:]) and ids[:20] != ids[20:]
  with pytest.raises(ValueError, match="divisible"):
    data.make_loader(cfg, "train", global_batch_size=3, seed=0, train=True, shard_index=0, shard_count=2)


def test_global_batches_do_not_depend_on_the_process_count(fake_dataset):
  """What training relies on for 2 processes x 4 devices == 1 process x 8."""
  name = fake_dataset("index_ds2", _index_records(24), labels=("x",))
  cfg = dict(dataset=name, crop_size=32, base_size=64)
  kw = dict(global_batch_size=4, seed=3, train=True, num_epochs=2)
  whole = list(iter(data.make_loader(cfg, "train", shard_index=0, shard_count=1, **kw)))
  parts = [list(iter(data.make_loader(cfg, "train", shard_index=i, shard_count=2, **kw))) for i in (0, 1)]
  assert len(whole) == len(parts[0]) == len(parts[1]) == 12
  for w, p0, p1 in zip(whole, *parts):
    for key in w:  # augmentation included: images are compared exactly
      np.testing.assert_array_equal(w[key], np.concatenate([p0[key], p1[key]]))


def test_eval_shards_cover_every_example_once(fake_dataset):
  """21 examples on 2 processes, 4 per batch: 11 + 10 real examples, padded
  to 3 full batches each; padding is all-ignore and every id occurs once."""
  name = fake_dataset("index_eval", _index_records(21, size=8), labels=("x",))
  cfg = dict(dataset=name, eval_mode="none")
  real = []
  for shard in (0, 1):
    batches = list(iter(data.make_loader(cfg, "validation", global_batch_size=8, seed=0, train=False,
                                         shard_index=shard, shard_count=2)))
    assert [len(b["image"]) for b in batches] == [4, 4, 4]
    ids = _ids(batches)
    padding = np.concatenate([(b["mask"] == -1).all(axis=(1, 2)) for b in batches])
    assert padding.sum() == (1 if shard == 0 else 2)
    real.extend(i for i, p in zip(ids, padding) if not p)
  assert sorted(real) == list(range(1, 22))


def test_shapes_eval_shards_are_disjoint(shapes_config):
  digests = []
  for shard in (0, 1):
    loader = data.make_loader(shapes_config, "validation", global_batch_size=4, seed=0, train=False,
                              shard_index=shard, shard_count=2)
    digests.append({hashlib.sha1(img.tobytes()).hexdigest() for b in loader for img in b["image"]})
  assert len(digests[0]) == len(digests[1]) == 8
  assert not digests[0] & digests[1]


# ------------------------------------------------- registry and validation


def test_grayscale_and_rgba_inputs_become_rgb(fake_dataset):
  rng = np.random.default_rng(0)
  rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
  records = [
      {"image": rng.integers(0, 256, (20, 24), dtype=np.uint8), "mask": np.zeros((20, 24), np.uint8)},
      {"image": rng.integers(0, 256, (20, 24, 1), dtype=np.uint8), "mask": np.zeros((20, 24, 1), np.uint8)},
      {"image": rgba, "mask": np.ones((20, 24), np.uint8)},
  ]
  name = fake_dataset("mixed_channels", records, labels=("a", "b"))
  b = next(iter(data.make_loader(dict(dataset=name, eval_mode="none"), "test", global_batch_size=3,
                                 seed=0, train=False, shard_index=0, shard_count=1)))
  assert b["image"].shape == (3, 20, 24, 3)
  gray = (b["image"][0] + 1) / 2 * 255
  np.testing.assert_allclose(gray[..., 0], gray[..., 2])
  np.testing.assert_allclose((b["image"][2] + 1) / 2 * 255, rgba[..., :3], atol=1e-4)
  train = next(iter(data.make_loader(dict(dataset=name, crop_size=16, base_size=24), "train",
                                     global_batch_size=3, seed=0, train=True, shard_index=0, shard_count=1)))
  assert train["image"].shape == (3, 16, 16, 3)


def test_mask_id_out_of_range_names_it(fake_dataset):
  records = [{"image": np.zeros((8, 8, 3), np.uint8), "mask": np.full((8, 8), 9, np.uint8)}] * 2
  name = fake_dataset("bad_mask", records, labels=("a", "b", "c"))
  loader = data.make_loader(dict(dataset=name, eval_mode="none"), "train", global_batch_size=2,
                            seed=0, train=False, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=r"bad_mask: mask value 9 is outside the label table \[0, 3\)"):
    next(iter(loader))
  with pytest.raises(ValueError, match="mask value -3"):
    pipeline.mask_to_positions(np.array([[-3, 0]]), np.arange(3), 3)
  with pytest.raises(ValueError, match="mask value 2 is not in this example's label list"):
    pipeline.mask_to_positions(np.array([[2, 0]]), np.array([0, 1]), 3)


def test_unknown_dataset_and_bad_config_key():
  with pytest.raises(ValueError, match=r"Unknown dataset 'lseg_shape'.*'lseg_shapes'"):
    data.make_loader(dict(dataset="lseg_shape"), "train", global_batch_size=2, seed=0, train=True)
  with pytest.raises(ValueError, match=r"Unknown input config key 'crop_szie'.*'crop_size'"):
    data.make_loader(dict(crop_szie=480), "train", global_batch_size=2, seed=0, train=True)
  with pytest.raises(ValueError, match="normalization"):
    data.resolve_input_config(dict(normalization="imagenett"))
  with pytest.raises(ValueError, match="eval_mode"):
    data.resolve_input_config(dict(eval_mode="center"))
  with pytest.raises(ValueError, match="Unknown dataset"):
    data.label_names("nope")
  cfg = data.resolve_input_config(data.default_input_config())
  assert cfg.crop_size == 480 and cfg.base_size == 520 and cfg.normalization == "clip"
  with pytest.raises(ValueError, match="already registered"):
    data.register("lseg_shapes", source=lambda c, s: [], labels=("x",))


def test_variable_label_sets_share_a_batch(fake_dataset):
  """Label-table ids in the mask become positions in each example's list;
  lists of different lengths are padded to max_labels."""
  table = ("others", "cat", "dog", "car", "tree")
  sets = [[0, 2], [3], [4, 1, 0]]
  records = []
  for labels in sets:
    mask = np.full((6, 6), labels[-1], np.uint8)
    mask[:, :2] = labels[0]
    mask[0, 0] = 255  # ignore
    records.append({"image": np.zeros((6, 6, 3), np.uint8), "mask": mask, "labels": np.array(labels)})
  name = fake_dataset("subsets", records, labels=table,
                      mask_fn=lambda m: np.where(m == 255, -1, m.astype(np.int32)),
                      label_set_fn=lambda r: r["labels"])
  b = next(iter(data.make_loader(dict(dataset=name, eval_mode="none", max_labels=4), "val",
                                 global_batch_size=3, seed=0, train=False, shard_index=0, shard_count=1)))
  np.testing.assert_array_equal(b["label_ids"], [[0, 2, 0, 0], [3, 0, 0, 0], [4, 1, 0, 0]])
  np.testing.assert_array_equal(b["label_mask"], [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
  for i, labels in enumerate(sets):
    m = b["mask"][i]
    assert m[0, 0] == -1
    assert (m[1:, :2] == 0).all() and (m[1:, 2:] == len(labels) - 1).all()
  with pytest.raises(ValueError, match="more than max_labels=2"):
    list(iter(data.make_loader(dict(dataset=name, eval_mode="none", max_labels=2), "val",
                               global_batch_size=3, seed=0, train=False, shard_index=0, shard_count=1)))


# ------------------------------------------------------ training episodes

# (image name, class): class 0 has 3 images, class 1 two (image "a" is in
# both classes), class 2 four; record 9 is dropped by the whole-batch cut.
_EPISODE_ENTRIES = [("a", 0), ("b", 0), ("a", 1), ("c", 2), ("d", 1), ("e", 2), ("c", 0), ("f", 2), ("g", 2)]


def _episode_records(entries, size: int = 16) -> list[dict]:
  """Few-shot records (image, stored 0/1/255 mask, class_id, file_name) whose
  constant image value is the record number (1..n); column 0 is a boundary."""
  records = []
  for i, (name, c) in enumerate(entries):
    mask = np.zeros((size, size, 1), np.uint8)
    mask[:, size // 2:] = 1
    mask[:, 0] = fewshot.STORED_IGNORE
    records.append({"image": np.full((size, size, 3), i + 1, np.uint8), "mask": mask, "class_id": c,
                    "file_name": name})
  return records


@pytest.fixture
def episodes_dataset(fake_dataset):
  """An in-memory dataset registered as the few-shot ones are (pairs in training)."""
  return fake_dataset("episodes_ds", _episode_records(_EPISODE_ENTRIES), labels=("others", "x", "y", "z"),
                      example_fn=fewshot.episode_example, train_example_fn=fewshot.episode_train_example,
                      train_pairs=data.TrainPairs())


def _episode_cfg(name):
  return dict(dataset=name, crop_size=16, train_mode="resize", eval_mode="resize", max_labels=2)


def test_training_batches_are_support_query_episodes(episodes_dataset):
  """B images = B / 2 episodes, support then query, of one class, from two
  different images; every record is the query once per epoch."""
  cfg = _episode_cfg(episodes_dataset)
  batches = list(iter(data.make_loader(cfg, "train", global_batch_size=4, seed=0, train=True,
                                       shard_index=0, shard_count=1, num_epochs=2)))
  assert len(batches) == 8  # 8 of the 9 records per epoch, 2 episodes per batch
  ids = _ids(batches)  # record numbers, 1-based
  queries = []
  for b in batches:
    np.testing.assert_array_equal(b["label_ids"][0::2], b["label_ids"][1::2])  # support and query: one class
    assert b["label_mask"].all()
  for support, query in zip(ids[0::2], ids[1::2]):
    (s_name, s_class), (q_name, q_class) = _EPISODE_ENTRIES[support - 1], _EPISODE_ENTRIES[query - 1]
    assert s_class == q_class and s_name != q_name
    queries.append(query)
  label_ids = np.concatenate([b["label_ids"] for b in batches])
  np.testing.assert_array_equal(label_ids[:, 1], [_EPISODE_ENTRIES[i - 1][1] + 1 for i in ids])
  assert sorted(queries[:8]) == sorted(queries[8:]) == list(range(1, 9)) and queries[:8] != queries[8:]
  # Training folds the boundary (column 0) into "others": no pixel is ignored.
  masks = np.concatenate([b["mask"] for b in batches])
  assert (masks[:, :, 0] == 0).all() and (masks[:, :, 8:] == 1).all() and (masks[:, :, 1:8] == 0).all()
  evaluation = next(iter(data.make_loader(cfg, "test", global_batch_size=3, seed=0, train=False,
                                          shard_index=0, shard_count=1)))
  assert _ids([evaluation]) == [1, 2, 3]  # queries only, in order
  assert (evaluation["mask"][:, :, 0] == -1).all() and (evaluation["mask"][:, :, 8:] == 1).all()
  assert data.num_examples(cfg, "train", train=True) == 18 and data.num_examples(cfg, "train") == 9


def test_training_episodes_are_reproducible_resumable_and_process_independent(episodes_dataset):
  cfg = _episode_cfg(episodes_dataset)
  kw = dict(global_batch_size=4, seed=3, train=True, num_epochs=2)
  whole = list(iter(data.make_loader(cfg, "train", shard_index=0, shard_count=1, **kw)))
  _assert_batches_equal(whole, list(iter(data.make_loader(cfg, "train", shard_index=0, shard_count=1, **kw))))
  other_seed = list(iter(data.make_loader(cfg, "train", shard_index=0, shard_count=1, **{**kw, "seed": 4})))
  assert _ids(whole) != _ids(other_seed)
  for count in (2, 4):  # 4 processes: one image each, the pair split over two processes
    parts = [list(iter(data.make_loader(cfg, "train", shard_index=i, shard_count=count, **kw)))
             for i in range(count)]
    for w, *p in zip(whole, *parts, strict=True):
      for key in w:
        np.testing.assert_array_equal(w[key], np.concatenate([x[key] for x in p]))
  restored = iter(data.make_loader(cfg, "train", shard_index=0, shard_count=1, start_batch=5, **kw))
  _assert_batches_equal(whole[5:], list(restored))  # into the second epoch


def test_training_episodes_reject_odd_batches_and_lone_classes(episodes_dataset, fake_dataset):
  cfg = _episode_cfg(episodes_dataset)
  with pytest.raises(ValueError, match="2 per training episode.*must be even, got 3"):
    data.make_loader(cfg, "train", global_batch_size=3, seed=0, train=True, shard_index=0, shard_count=1)
  lone = fake_dataset("lone_class", _episode_records([("a", 0), ("b", 0), ("c", 1)]), labels=("o", "x", "y"),
                      example_fn=fewshot.episode_example, train_pairs=data.TrainPairs())
  with pytest.raises(ValueError, match=r"lone_class/train: class 1 has a single training image \('c'\)"):
    data.make_loader(_episode_cfg(lone), "train", global_batch_size=2, seed=0, train=True, shard_index=0,
                     shard_count=1)


def test_ade20k_mask_convention():
  np.testing.assert_array_equal(data.ade20k.ade20k_mask_map(np.array([0, 1, 150], np.uint8)), [-1, 0, 149])


def test_make_global_batch():
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  n = 2 * len(devices)
  local = {"image": np.zeros((n, 4, 4, 3), np.float32), "mask": np.arange(n * 16, dtype=np.int32).reshape(n, 4, 4),
           "label_ids": np.zeros((n, 7), np.int32), "label_mask": np.ones((n, 7), bool)}
  g = data.make_global_batch(local, mesh, P("data"))
  assert g["mask"].shape == (n, 4, 4) and g["mask"].sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(g["mask"]), local["mask"])
  g = data.make_global_batch(local, mesh, rules=(("batch", "data"), ("embed", None)))
  for key in ("image", "label_ids"):  # leading axis over `data`, the others replicated
    assert g[key].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("data")), g[key].ndim)
  with pytest.raises(ValueError, match="partition_spec or rules"):
    data.make_global_batch(local, mesh)


def test_training_script_helpers(shapes_config):
  """label_names / num_examples from an input config (the keys a training
  config carries); the input position on resume is `start_batch`, tested above."""
  cfg = dict(shapes_config, split="train", batch_size=4, max_labels=0)
  assert data.label_names(cfg) == shapes.LABELS
  assert data.num_examples(cfg, "validation") == 16


def test_worker_processes_give_the_same_batches(shapes_config):
  kw = dict(global_batch_size=2, seed=5, train=True, shard_index=0, shard_count=1)
  a = _batches(data.make_loader(shapes_config, "train", worker_count=0, **kw), 3)
  it = iter(data.make_loader(shapes_config, "train", worker_count=1, **kw))
  try:
    b = [next(it) for _ in range(3)]
  finally:
    it.close()
  _assert_batches_equal(a, b)
