"""The synthetic `lseg_shapes` TFDS dataset: builds without TensorFlow, the
features have the promised shapes and values, builds are reproducible from the
seed, and the label is carried by the shape, not the colour."""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lseg_jax.data import shapes


def _build(data_dir, **config_kwargs) -> dict[str, dict[str, dict]]:
  """Builds an lseg_shapes variant; {split: {file_name: example}}."""
  cfg = shapes.LsegShapesConfig(**config_kwargs)
  out = {}
  for split in ("train", "validation"):
    ds = tfds.data_source("lseg_shapes", split=split, data_dir=data_dir, builder_kwargs={"config": cfg})
    out[split] = {_name(ex): ex for ex in (ds[i] for i in range(len(ds)))}
  return out


def _name(ex) -> str:
  name = ex["file_name"]
  return name.decode() if isinstance(name, bytes) else str(name)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
  """The registered "tiny" config, through the plain `tfds.data_source` call
  (ArrayRecord is the builder's default format, no builder_kwargs needed)."""
  data_dir = tmp_path_factory.mktemp("tfds_shapes")
  return {split: tfds.data_source("lseg_shapes/tiny", split=split, data_dir=data_dir)
          for split in ("train", "validation")}


def test_prepares_with_split_sizes(tiny):
  assert len(tiny["train"]) == 64 and len(tiny["validation"]) == 16
  names = {_name(tiny["train"][i]) for i in range(64)}
  assert names == {f"train_{i:05d}" for i in range(64)}


def test_features_shapes_dtypes_and_values(tiny):
  seen = set()
  for split, ds in tiny.items():
    for i in range(len(ds)):
      ex = ds[i]
      image, mask = ex["image"], ex["mask"]
      assert image.dtype == np.uint8 and mask.dtype == np.uint8
      h, w, c = image.shape
      assert c == 3 and 128 <= h <= 192 and 128 <= w <= 192
      assert mask.shape == (h, w, 1)
      assert mask.max() < len(shapes.LABELS)
      seen |= set(np.unique(mask).tolist())
  assert shapes.LABELS[0] == "background"
  assert seen == set(range(len(shapes.LABELS)))  # every class occurs


def test_stored_examples_equal_the_generator(tiny):
  cfg = shapes.LsegShapes.builder_configs["tiny"]
  for i in (0, 7):
    ex = tiny["validation"][i]
    index = int(_name(ex).split("_")[1])
    image, mask = shapes.generate_example(cfg, "validation", index)
    np.testing.assert_array_equal(ex["image"], image)
    np.testing.assert_array_equal(ex["mask"][..., 0], mask)


def _file_digests(root) -> dict[str, str]:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*.array_record*"))}


def test_deterministic_by_seed(tmp_path):
  kw = dict(name="det", num_train=6, num_validation=2)
  a = _build(tmp_path / "a", seed=3, **kw)
  b = _build(tmp_path / "b", seed=3, **kw)
  c = _build(tmp_path / "c", seed=4, **kw)
  assert _file_digests(tmp_path / "a") == _file_digests(tmp_path / "b")
  for split in a:
    assert a[split].keys() == b[split].keys() == c[split].keys()
    for name in a[split]:
      np.testing.assert_array_equal(a[split][name]["image"], b[split][name]["image"])
      np.testing.assert_array_equal(a[split][name]["mask"], b[split][name]["mask"])
  assert any(not np.array_equal(a["train"][n]["image"], c["train"][n]["image"]) for n in a["train"])
  # train and validation are drawn from different streams
  assert not np.array_equal(a["train"]["train_00000"]["image"], a["validation"]["validation_00000"]["image"])


def test_class_is_decided_by_shape_not_colour(tiny):
  """The same class shows up in very different colours, and a colour threshold
  cannot find a class: each class's pixel colours spread widely."""
  colours = {k: [] for k in range(1, len(shapes.LABELS))}
  for i in range(len(tiny["train"])):
    ex = tiny["train"][i]
    for k in colours:
      sel = ex["mask"][..., 0] == k
      if sel.sum() > 50:
        colours[k].append(ex["image"][sel].astype(np.float32).mean(0))
  for k, cs in colours.items():
    cs = np.stack(cs)
    assert len(cs) >= 3, shapes.LABELS[k]
    spread = cs.max(0) - cs.min(0)  # per RGB channel, across instances
    assert spread.max() > 120, (shapes.LABELS[k], spread)


def test_shape_geometry_is_consistent():
  """A lone shape's area matches its class's geometry (radius known): the
  rasteriser draws what the label says."""
  yy, xx = np.mgrid[0:200, 0:200].astype(np.float32)
  r = 60.0
  areas = {shapes.LABELS[k]: shapes._shape_mask(k, yy, xx, 100.0, 100.0, r, 0.3).sum() / (np.pi * r * r)
           for k in range(1, len(shapes.LABELS))}
  expected = {  # area / (pi r^2) for circumradius r
      "circle": 1.0, "square": 2 / np.pi, "triangle": 3 * np.sqrt(3) / (4 * np.pi),
      "ring": 1 - 0.55 ** 2, "cross": (4 * r * r / 3 + 4 * r * r / 3 - 4 * r * r / 9) / (np.pi * r * r),
  }
  for name, value in expected.items():
    assert areas[name] == pytest.approx(value, rel=0.03), name
  assert 0.2 < areas["star"] < 0.5


def test_backgrounds_follow_the_config():
  """`backgrounds` picks the texture kinds: a checkerboard has two colours, a
  gradient many; an unknown kind is an error naming it."""
  rng = np.random.default_rng(0)
  checker = shapes._background(rng, 64, 64, ("checker",))
  gradient = shapes._background(rng, 64, 64, ("gradient",))
  assert len(np.unique(checker.reshape(-1, 3), axis=0)) == 2
  assert len(np.unique(gradient.reshape(-1, 3), axis=0)) > 20
  with pytest.raises(ValueError, match="background 'plaid'"):
    shapes._background(rng, 64, 64, ("plaid",))
