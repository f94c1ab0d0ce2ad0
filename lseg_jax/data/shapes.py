"""`lseg_shapes`: a synthetic segmentation dataset that needs nothing from outside.

Why: the tests, the CI smoke runs and the input-pipeline benchmark need a
dataset with the same features as the real ones (an RGB image, a per-pixel
label mask, a table of label names) that prepares in seconds on 2 cores with
no download. The task is learnable but not trivial:
- the class of a pixel is decided by the SHAPE it belongs to, never by colour
  (each shape instance gets a random colour, so colour carries no label);
- backgrounds are textured (gradients and block noise by default; stripes
  and checkerboards on request) and shapes are shaded, so a colour threshold
  does not work;
- later shapes occlude earlier ones and the mask follows the occlusion.

Every pixel is labelled: 0 is "background", 1..6 the shapes (`LABELS`).
Each example is drawn from a numpy Generator seeded by (config seed, split,
index), so a build is byte-for-byte reproducible and does not depend on the
order TFDS writes examples in.

Usage (no TensorFlow needed):
  import lseg_jax.data.shapes  # registers the builder with TFDS
  ds = tfds.data_source("lseg_shapes", data_dir=d, split="train")
  ds[0]["image"]  # uint8 [H, W, 3]; ds[0]["mask"]: uint8 [H, W, 1]
The "tiny" config (64 / 16 examples) is for tests; a `LsegShapesConfig` with
other sizes or seed can be passed as `builder_kwargs={"config": ...}`.
"""

import dataclasses
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

LABELS: tuple[str, ...] = ("background", "circle", "square", "triangle", "star", "ring", "cross")
_SPLIT_IDS = {"train": 0, "validation": 1}
BACKGROUNDS: tuple[str, ...] = ("gradient", "stripes", "noise", "checker")


@dataclasses.dataclass(eq=False)
class LsegShapesConfig(tfds.core.BuilderConfig):
  """Split sizes, seed and image geometry of one `lseg_shapes` build."""
  num_train: int = 2000
  num_validation: int = 200
  seed: int = 0
  min_size: int = 128  # H and W are drawn independently in [min_size, max_size]
  max_size: int = 192
  # Shapes per image, radii and backgrounds are sized so that the offline demo
  # (a small model, a few CPU minutes) can learn the set; 1.0.0 had up to 4
  # shapes of radius 0.12-0.3 on all four textures, which that model learns
  # about 2x slower (val mIoU 0.41 after the demo's budget).
  max_shapes: int = 2  # 1..max_shapes shapes per image
  min_radius: float = 0.25  # shape radius, as a fraction of the short side
  max_radius: float = 0.4
  backgrounds: tuple[str, ...] = ("gradient", "noise")  # texture kinds drawn from (BACKGROUNDS)


def _background(rng: np.random.Generator, h: int, w: int, kinds: tuple[str, ...]) -> np.ndarray:
  """A textured background of one of `kinds`, float32 [h, w, 3] in [0, 255]."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # [h, w] each
  c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)  # two colours
  kind = kinds[rng.integers(len(kinds))]
  if kind == "gradient":  # linear gradient along a random direction
    a = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(a) + yy * np.sin(a)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
  elif kind == "stripes":  # sinusoidal stripes, random period and angle
    a = rng.uniform(0, np.pi)
    period = rng.uniform(6, 40)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
  elif kind == "noise":  # smooth block noise: a coarse random grid, bilinearly upsampled
    g = int(rng.integers(3, 12))
    coarse = rng.uniform(0, 255, size=(g, g)).astype(np.uint8)
    t = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.float32) / 255.0
  elif kind == "checker":  # checkerboard with a random cell size
    cell = int(rng.integers(8, 32))
    t = ((yy // cell + xx // cell) % 2).astype(np.float32)
  else:
    raise ValueError(f"Unknown lseg_shapes background {kind!r}; known: {BACKGROUNDS}.")
  return c0 + t[..., None] * (c1 - c0)  # [h, w, 3]


def _rotated(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
             angle: float) -> tuple[np.ndarray, np.ndarray]:
  """Pixel coordinates in a frame centred on (cy, cx) and rotated by `angle`."""
  dy, dx = yy - cy, xx - cx
  c, s = np.cos(angle), np.sin(angle)
  return dx * c + dy * s, -dx * s + dy * c  # (u, v), each [h, w]


def _regular_polygon(u: np.ndarray, v: np.ndarray, radius: float, n: int) -> np.ndarray:
  """Inside a regular n-gon of circumradius `radius`: all n half-planes hold."""
  normals = np.pi / n + 2 * np.pi * np.arange(n) / n  # edge-normal angles [n]
  proj = u[..., None] * np.cos(normals) + v[..., None] * np.sin(normals)  # [h, w, n]
  return np.all(proj <= radius * np.cos(np.pi / n), axis=-1)


def _star(u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
  """Inside a five-pointed star: fold the angle into one half-tip sector, then
  test against the edge from the tip (radius, 0) to the inner vertex."""
  sector = 2 * np.pi / 5
  rho = np.hypot(u, v)
  phi = np.mod(np.arctan2(v, u), sector)
  phi = np.minimum(phi, sector - phi)  # [0, pi/5]: 0 = tip, pi/5 = inner vertex
  px, py = rho * np.cos(phi), rho * np.sin(phi)
  inner = 0.45 * radius
  ix, iy = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
  # Edge normal pointing away from the origin; inside iff n.p <= n.tip.
  nx, ny = iy, radius - ix
  return px * nx + py * ny <= radius * nx


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
                radius: float, angle: float) -> np.ndarray:
  """bool [h, w]: the pixels of one shape of class `kind` (1..6, see LABELS)."""
  u, v = _rotated(yy, xx, cy, cx, angle)
  name = LABELS[kind]
  if name == "circle":
    return u * u + v * v <= radius * radius
  if name == "square":
    half = radius / np.sqrt(2.0)
    return (np.abs(u) <= half) & (np.abs(v) <= half)
  if name == "triangle":
    return _regular_polygon(u, v, radius, 3)
  if name == "star":
    return _star(u, v, radius)
  if name == "ring":
    d2 = u * u + v * v
    return (d2 <= radius * radius) & (d2 >= (0.55 * radius) ** 2)
  if name == "cross":
    arm, half = radius, radius / 3.0
    return ((np.abs(u) <= arm) & (np.abs(v) <= half)) | ((np.abs(u) <= half) & (np.abs(v) <= arm))
  raise ValueError(f"Unknown shape class {kind}.")


def generate_example(cfg: LsegShapesConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws example `index` of `split`: image uint8 [H, W, 3], mask uint8 [H, W].

  Pure function of (cfg.seed, split, index), vectorised over pixels.
  """
  rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], index])
  h, w = (int(x) for x in rng.integers(cfg.min_size, cfg.max_size + 1, size=2))
  image = _background(rng, h, w, cfg.backgrounds)  # [h, w, 3] float
  bg_mean = image.reshape(-1, 3).mean(0)
  mask = np.zeros((h, w), np.uint8)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  for _ in range(int(rng.integers(1, cfg.max_shapes + 1))):
    kind = int(rng.integers(1, len(LABELS)))
    radius = rng.uniform(cfg.min_radius, cfg.max_radius) * min(h, w)
    cy = rng.uniform(0.5 * radius, h - 0.5 * radius)
    cx = rng.uniform(0.5 * radius, w - 0.5 * radius)
    angle = rng.uniform(0, 2 * np.pi)
    # Rasterise only inside a bounding box of every class (the cross reaches
    # 1.054 * radius from the centre, the others stay within the radius).
    reach = 1.1 * radius
    y0, y1 = max(int(cy - reach) - 1, 0), min(int(cy + reach) + 2, h)
    x0, x1 = max(int(cx - reach) - 1, 0), min(int(cx + reach) + 2, w)
    inside = _shape_mask(kind, yy[y0:y1, x0:x1], xx[y0:y1, x0:x1], cy, cx, radius, angle)
    # Random colour, redrawn a few times if it is too close to the background
    # mean (a shape invisible to the eye would only be label noise).
    for _ in range(8):
      colour = rng.uniform(0, 255, size=3)
      if np.abs(colour - bg_mean).sum() > 120:
        break
    # Linear shading across the shape (+-25% brightness, random direction):
    # shapes are not flat patches of one colour either.
    b = rng.uniform(0, 2 * np.pi)
    ys, xs = np.nonzero(inside)
    shade = ((xs + x0 - cx) * np.cos(b) + (ys + y0 - cy) * np.sin(b)) / radius  # [n] in [-1, 1]
    image[ys + y0, xs + x0] = colour * (1.0 + 0.25 * shade[:, None])
    mask[ys + y0, xs + x0] = kind
  # No per-pixel i.i.d. noise: it makes PNG encoding 4x slower and the files 5x
  # larger, and the textures already defeat colour thresholds.
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _png(array: np.ndarray) -> bytes:
  """PNG bytes at a low compression level: preparation time is mostly zlib.

  A 2-D array becomes a grayscale PNG, which TFDS decodes as [H, W, 1].
  """
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


class LsegShapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes segmentation: 6 shape classes + background."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Up to 2 larger shapes (radius 0.25-0.4) on gradient or block-noise backgrounds.",
  }
  BUILDER_CONFIGS = [
      LsegShapesConfig(name="default", description="2000 train / 200 validation."),
      LsegShapesConfig(name="tiny", num_train=64, num_validation=16,
                       description="64 train / 16 validation, for tests."),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # ArrayRecord by default: the random-access format `tfds.data_source` and
    # grain read, and the only one TFDS writes without TensorFlow.
    super().__init__(file_format=file_format or "array_record", **kwargs)


  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "mask"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "validation": self._generate_examples("validation", cfg.num_validation),
    }

  def _generate_examples(self, split: str, num: int):
    # Encoded PNG bytes, not arrays: without TensorFlow, TFDS cannot encode
    # numpy images itself.
    for i in range(num):
      image, mask = generate_example(self.builder_config, split, i)
      name = f"{split}_{i:05d}"
      yield name, {"image": _png(image), "mask": _png(mask), "file_name": name}
