"""Fake dataset folders in the real layouts, for the builder, config and
evaluation tests: a few 40x60 images and masks of ADE20K and PASCAL-5i
(VOC2012 + HSNet's split lists), written where a test says."""

from etils import epath
import numpy as np
from PIL import Image

H, W = 40, 60

# PASCAL-5i fold 0 tests on these 4 lines (image__class, 1-based); every fold
# trains on the lines of the others: two images of each class, so every
# training episode can draw a support image other than its query.
PASCAL_VAL0 = ["2007_000001__01", "2007_000002__03", "2007_000001__05", "2007_000003__02"]
PASCAL_TRN = {0: ["2008_000001__02"], 1: ["2008_000001__07", "2008_000002__10", "2008_000003__07", "2008_000003__10"],
              2: ["2008_000002__12", "2008_000001__12"],
              3: ["2008_000003__20", "2008_000001__16", "2008_000002__20", "2008_000002__16"]}


def rgb(seed: int) -> np.ndarray:
  """A random [H, W, 3] uint8 image."""
  return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def save_image(path: epath.Path, array: np.ndarray, fmt: str | None = None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


def pil_rgb(path: epath.Path) -> np.ndarray:
  """What the official loaders see: PIL decode + convert('RGB')."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def ade_tree(root: epath.Path, bad_id: int | None = None) -> dict[str, np.ndarray]:
  """ADEChallengeData2016 with 3 train (RGB, grayscale, RGBA) and 2 val
  images: stem -> mask. `bad_id` puts that value into the first train mask."""
  base = root / "ADEChallengeData2016"
  masks = {}
  for split, prefix, n in (("training", "ADE_train", 3), ("validation", "ADE_val", 2)):
    for i in range(n):
      stem = f"{prefix}_{i + 1:08d}"
      image = rgb(i + 10 * n)
      if split == "training" and i == 1:
        save_image(base / "images" / split / f"{stem}.jpg", image[..., 0])  # grayscale JPEG
      elif split == "training" and i == 2:  # RGBA PNG bytes behind a .jpg name
        rgba = np.concatenate([image, np.full((H, W, 1), 128, np.uint8)], -1)
        save_image(base / "images" / split / f"{stem}.jpg", rgba, fmt="PNG")
      else:
        save_image(base / "images" / split / f"{stem}.jpg", image)
      mask = np.zeros((H, W), np.uint8)
      mask[:, 10:20], mask[:, 20:30], mask[:5] = 1, 150, i + 7
      if bad_id is not None and i == 0 and split == "training":
        mask[0, 0] = bad_id
      save_image(base / "annotations" / split / f"{stem}.png", mask)
      masks[stem] = mask
  return masks


def pascal_tree(root: epath.Path, bad_id: int | None = None) -> dict[str, np.ndarray]:
  """VOC2012 JPEGs and SegmentationClassAug masks of the images PASCAL_VAL0
  and PASCAL_TRN name (one grayscale), and HSNet's split lists of the 4 folds
  under splits/pascal: image name -> mask. Every mask holds stripes of
  classes 1, 3, 5, 2, 7, 10, 12, 20, 16 with 255 boundaries between them;
  `bad_id` puts that value into 2007_000001's mask."""
  names = sorted({l.split("__")[0] for l in PASCAL_VAL0} | {l.split("__")[0] for v in PASCAL_TRN.values() for l in v})
  masks = {}
  for i, name in enumerate(names):
    image = rgb(100 + i)
    path = root / "VOC2012" / "JPEGImages" / f"{name}.jpg"
    save_image(path, image[..., 1] if name == "2007_000002" else image)  # one grayscale
    mask = np.zeros((H, W), np.uint8)
    for k, c in enumerate((1, 3, 5, 2, 7, 10, 12, 20, 16)):
      mask[:, 5 * k:5 * k + 4] = c
    mask[:, 4::5] = 255  # boundaries between the stripes
    if bad_id is not None and name == "2007_000001":
      mask[0, 0] = bad_id
    save_image(root / "VOC2012" / "SegmentationClassAug" / f"{name}.png", mask)
    masks[name] = mask
  for f in range(4):
    val = PASCAL_VAL0 if f == 0 else [f"2007_000001__{5 * f + 1:02d}"]
    for split, lines in (("val", val), ("trn", PASCAL_TRN[f])):
      p = root / "splits" / "pascal" / split / f"fold{f}.txt"
      p.parent.mkdir(parents=True, exist_ok=True)
      p.write_text("".join(l + "\n" for l in lines))
  return masks
