"""`python -m lseg_jax.predict`: image modes, output names, labels, legend,
memory cap, input geometry and usage errors; end to end on a trained tiny run."""

import importlib
import io
import json
import math
import tracemalloc

import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from lseg_jax import checkpoint, geometry as geometry_lib, images, inference, labels as labels_lib, pictures, predict
from lseg_jax import segmenter, sharding
from lseg_jax.segmenter import Segmenter
from lseg_jax.data import shapes
from lseg_jax.models import get_model_config
from lseg_jax.models.layers import resize_bilinear_np

# ------------------------------------------------------------------ images


def gradient_image(h: int = 24, w: int = 32) -> Image.Image:
  """A smooth RGB test image (lossy modes such as P stay close to it)."""
  y, x = np.mgrid[0:h, 0:w]
  rgb = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 255 - 255 * x / (w - 1)], -1)
  return Image.fromarray(rgb.round().astype(np.uint8))


COLOUR_MODES = {"RGB": 0, "RGBX": 0, "CMYK": 0, "RGBA": 0, "RGBa": 0, "YCbCr": 3, "LAB": 3, "HSV": 3, "P": 20, "PA": 20}
GRAY_MODES = ("L", "LA", "La", "I", "F")


@pytest.mark.parametrize("mode", list(COLOUR_MODES))
def test_colour_modes_read_as_their_rgb(mode):
  im = gradient_image()
  got = images.to_rgb(im.convert(mode))
  assert got.dtype == np.uint8 and got.shape == (24, 32, 3)
  assert np.abs(got.astype(int) - np.asarray(im)).mean() <= COLOUR_MODES[mode]


@pytest.mark.parametrize("mode", [*GRAY_MODES, "I;16", "I;16B", "I;16L", "I;16N", "1"])
def test_gray_modes_read_as_their_gray_levels(mode):
  gray = np.asarray(gradient_image().convert("L"))
  if mode.startswith("I;16"):  # a real 16-bit image spans 0..65535
    order = {"I;16B": ">", "I;16N": "="}.get(mode, "<")
    im = Image.frombytes(mode, gray.shape[::-1], (gray.astype(f"{order}u2") * 257).tobytes())
  else:  # Pillow makes La only from LA
    im = Image.fromarray(gray).convert("LA" if mode == "La" else mode).convert(mode)
  got = images.to_rgb(im)
  assert got.dtype == np.uint8 and got.shape == (24, 32, 3)
  np.testing.assert_array_equal(got[..., 0], got[..., 1])
  np.testing.assert_array_equal(got[..., 0], got[..., 2])
  if mode == "1":  # dithered: black and white at the same mean brightness
    assert set(np.unique(got)) <= {0, 255} and abs(got.mean() - gray.mean()) < 10
  else:
    assert np.abs(got[..., 0].astype(int) - gray).max() <= 1


def test_16_bit_ramp_is_scaled_not_saturated(tmp_path):
  ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(4, 0)  # [4, 256]
  Image.fromarray(ramp).save(tmp_path / "ramp16.png")
  assert Image.open(tmp_path / "ramp16.png").mode == "I;16"
  got = images.read_image(tmp_path / "ramp16.png")[0, :, 0]
  assert got[0] == 0 and got[-1] == 255 and (np.diff(got.astype(int)) >= 0).all()
  assert len(np.unique(got)) == 256  # PIL's convert("RGB") gives 0 then 255 everywhere


@pytest.mark.parametrize("values, expected", [
    (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # F in [0, 1]
    (np.array([[0.0, 100.0, 255.0]], np.float32), [0, 100, 255]),  # F in 8-bit range
    (np.array([[0, 32896, 65535]], np.int32), [0, 128, 255]),  # I holding 16-bit data
    (np.array([[-100, 0, 100]], np.int32), [0, 128, 255]),  # any other range: min..max
], ids=["F_unit", "F_8bit", "I_16bit", "I_signed"])
def test_wide_gray_ranges(values, expected):
  assert images.to_rgb(Image.fromarray(values))[0, :, 0].tolist() == expected


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_are_white(mode):
  rgba = np.zeros((4, 6, 4), np.uint8)
  rgba[..., 3] = 255
  rgba[:, :3, 3] = 0  # the left half fully transparent (black underneath)
  got = images.to_rgb(Image.fromarray(rgba, "RGBA").convert(mode))
  assert (got[:, :3] == 255).all() and (got[:, 3:] == 0).all()


def test_palette_transparency_index_is_white():
  im = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
  im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
  im.info["transparency"] = 0
  assert images.to_rgb(im)[..., 0].tolist() == [[255, 200], [200, 255]]


def test_exif_orientation_is_applied(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  gradient_image(24, 32).save(tmp_path / "rotated.png", exif=exif)
  assert images.read_image(tmp_path / "rotated.png").shape == (32, 24, 3)


def bad_images(folder) -> dict[str, str]:
  """name -> why: files that are not readable images."""
  buffer = io.BytesIO()
  gradient_image(64, 64).save(buffer, "JPEG")
  (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:300])
  (folder / "text.png").write_text("not a png at all")
  (folder / "empty.png").write_bytes(b"")
  return {"truncated.jpg": "Truncated", "text.png": "cannot identify", "empty.png": "cannot identify"}


def test_bad_images_raise_naming_the_file(tmp_path):
  for name, why in bad_images(tmp_path).items():
    with pytest.raises(images.ImageError, match=f"(?i)cannot read image .*{name}.*{why}"):
      images.probe_image(tmp_path / name) if name != "truncated.jpg" else images.read_image(tmp_path / name)


def test_output_names_never_collide(tmp_path):
  paths = [tmp_path / "a" / "x.jpg", tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg", tmp_path / "c" / "X.JPG",
           tmp_path / "d" / "x.jpg-2"]
  assert images.output_names(paths) == ["x.jpg", "x.png", "x.jpg-2", "X.JPG-3", "x.jpg-2-2"]


def test_expand_inputs_lists_folders_once(tmp_path):
  for name in ("b.png", "a.JPG", "notes.txt"):
    (tmp_path / name).write_bytes(b"")
  assert images.expand_inputs([str(tmp_path / "b.png"), str(tmp_path)]) == [tmp_path / "b.png", tmp_path / "a.JPG"]
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no images found"):
    images.expand_inputs([str(tmp_path / "empty")])


# ------------------------------------------------------------------ labels and legend


@pytest.mark.parametrize("text, duplicate", [("dog,cat,dog", "'dog'"), ("dog, cat , dog ", "'dog'"),
                                             ("dog,Dog", "'Dog' (the same to CLIP as 'dog')"),
                                             ("big  dog,big dog", "'big dog' (the same to CLIP as 'big  dog')")])
def test_duplicate_labels_are_an_error_naming_them(text, duplicate):
  with pytest.raises(ValueError, match=f"duplicate label {duplicate}".replace("(", r"\(").replace(")", r"\)")):
    labels_lib.parse_labels(text)


def test_labels_no_font_covers_are_escaped():
  labels, missing = pictures.legend_labels(["dog", "x\ufdd0"])  # U+FDD0 is a noncharacter: no font has it
  assert labels[0][0] == "dog" and labels[1][0] == "x\\ufdd0" and missing == ["x\ufdd0"]


@pytest.mark.skipif("DejaVuSans.ttf" not in pictures.available_fonts(), reason="needs the DejaVu Sans font")
def test_non_ascii_labels_render_with_a_covering_font():
  labels, missing = pictures.legend_labels(["café", "Ωmega", "жук"])
  assert missing == [] and [t for t, _ in labels] == ["café", "Ωmega", "жук"]
  assert all(f == "DejaVuSans.ttf" for _, f in labels)


def legend_columns(panel: Image.Image, colours) -> list[int]:
  """The x of each swatch's left edge in a legend panel."""
  a = np.asarray(panel)
  return [int(np.nonzero((a == c).all(-1).any(0))[0].min()) for c in colours]


def test_legend_grows_to_fit_long_labels():
  colour = (200, 10, 10)
  short = pictures.draw_legend([("cat", pictures.available_fonts()[0], colour)], 200)
  text = "a very long label that the old 160 pixel legend clipped after a few words"
  long = pictures.draw_legend([(text, pictures.available_fonts()[0], colour)], 200)
  font = pictures._font(pictures.available_fonts()[0], 12)
  assert long.width > short.width + font.getlength(text) - font.getlength("cat") - 2
  # the text's last pixels lie inside the panel: some dark pixel in the right part of the row
  assert (np.asarray(long)[:, long.width - 40:long.width - 4] < 100).any()


def test_many_labels_lay_out_in_columns():
  colours = [tuple(int(v) for v in c) for c in pictures.palette(60)]
  panel = pictures.draw_legend([(f"label {i}", pictures.available_fonts()[0], c) for i, c in enumerate(colours)], 300)
  columns = sorted(set(legend_columns(panel, colours)))
  assert panel.height <= 300 and len(columns) >= 3
  one = pictures.draw_legend([(f"label {i}", pictures.available_fonts()[0], c) for i, c in enumerate(colours[:5])], 300)
  assert len(set(legend_columns(one, colours[:5]))) == 1


def test_overlay_draws_the_present_labels_beside_the_image():
  names = ["background", "犬", "café", "x\ufdd0"]
  labels, _ = pictures.legend_labels(names)
  ids = np.zeros((50, 60), np.int64)
  ids[10:20, 10:20], ids[30:40, 30:40] = 1, 3
  colours = pictures.palette(len(names))
  canvas = pictures.overlay_with_legend(np.full((50, 60, 3), 128, np.uint8), ids, labels, colours)
  assert canvas.height >= 50 and canvas.width > 60
  legend = np.asarray(canvas)[:, 60:]
  present = [(legend == colours[i]).all(-1).any() for i in range(len(names))]
  assert present == [True, True, False, True]  # "café" is absent from the map


# ------------------------------------------------------------------ geometry and memory


def run_config(**input_fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"input": input_fields, "init": {"clip_text": None, "model_dir": None}})


@pytest.mark.parametrize("run, flags, expected", [
    (None, (None, None, None), (False, 520, 480)),  # the official demo's windows
    (run_config(eval_mode="resize", crop_size=96, base_size=108), (None, None, None), (True, 96, 96)),
    (run_config(eval_mode="val", crop_size=480, base_size=520), (None, None, None), (False, 520, 480)),
    (run_config(eval_mode="resize", crop_size=96, base_size=108), (False, 480, 480), (False, 480, 480)),
    (run_config(eval_mode="resize", crop_size=96, base_size=108), (None, 128, None), (True, 128, 96)),
    (None, (True, None, None), (True, 480, 480)),
], ids=["converted", "resize_run", "val_run", "flags_win", "square_base", "converted_square"])
def test_input_geometry(run, flags, expected):
  assert geometry_lib.input_geometry(geometry_lib.recorded_input(run), *flags) == geometry_lib.Geometry(*expected)


def segmenter_of(forward) -> Segmenter:
  """A Segmenter around `forward` (no weights), on one device, CLIP's normalisation."""
  return Segmenter(None, {}, None, get_model_config("tiny"), {"normalization": "clip"},
                   mesh=sharding.make_mesh([("data", 1)]), forward=forward)


def first_channels(params, windows, text, label_mask):
  """A "network" whose logits are the normalised channels, repeated over the labels."""
  n = text.shape[1]
  return jnp.tile(windows, (1, 1, 1, n))[..., :n]


@pytest.mark.parametrize("hw, n, geometry_, scales, flip", [
    ((300, 400), 20, (False, 520, 480), (1.0,), False),
    ((90, 120), 10, (False, 80, 64), (0.5, 1.0, 1.75), True),
    ((70, 50), 30, (True, 96, 96), (1.0, 1.5), False),
])
def test_logits_stay_on_the_device(hw, n, geometry_, scales, flip):
  """Host memory does not grow with the image's [H, W, N] logits: with 4x the
  labels the peak of host allocations (tracemalloc) grows by far less than
  one such map; the device estimate covers the summed map."""
  geometry = geometry_lib.Geometry(*geometry_)
  ms = inference.MultiScale(scales=scales, flip=flip, base_size=geometry.base_size, crop_size=geometry.crop_size)
  image = np.zeros((*hw, 3), np.uint8)
  seg = segmenter_of(first_channels)
  peaks = []
  for labels in (n, 4 * n):
    text = np.ones((labels, 4), np.float32)
    run = lambda: seg.segment([image], text, geometry=geometry, scales=scales, flip=flip)
    run()  # compile
    tracemalloc.start()
    (ids, logits), = run()
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    assert ids.shape == hw and logits is None
  assert peaks[1] - peaks[0] < 4 * hw[0] * hw[1] * n  # the host would hold 3 more maps of n labels
  assert segmenter.logits_gb(*hw, n, geometry, ms) * 1e9 >= 4 * inference.size_bucket(hw[0]) * inference.size_bucket(
      hw[1]) * n


def test_too_thin_images_are_refused_before_any_work(tmp_path):
  Image.fromarray(np.zeros((1, 3000, 3), np.uint8)).save(tmp_path / "thin.png")
  ms = inference.MultiScale(scales=(0.5, 1.0), flip=False, base_size=520, crop_size=480)
  with pytest.raises(images.ImageError, match="1 image is too thin for --base_size 520 at scale 0.5"):
    predict.check_image(tmp_path / "thin.png", 2, geometry_lib.Geometry(False, 520, 480), ms, 4.0)
  square = inference.MultiScale(scales=(0.5, 1.0), flip=False, base_size=96, crop_size=96)
  predict.check_image(tmp_path / "thin.png", 2, geometry_lib.Geometry(True, 96, 96), square, 4.0)  # squashed: fine


def test_square_geometry_maps_back_to_the_image_size():
  """The square path runs the model on base x base and resizes the logits to
  H x W, on the device, as the host resize would."""
  seen = []

  def forward(params, windows, text, label_mask):
    seen.append(windows.shape)
    return jnp.tile(windows[..., :2], (1, 1, 1, text.shape[1]))[..., :text.shape[1]]  # labels 0, 1: R and G

  image = np.asarray(gradient_image(30, 50))
  (ids, logits), = segmenter_of(forward).segment([image], np.ones((2, 4), np.float32),
                                                 geometry=geometry_lib.Geometry(True, 32, 32), return_logits=True)
  assert seen == [(1, 32, 32, 3)] and logits.shape == (30, 50, 2)  # one window: a batch of one
  square = geometry_lib.square_input(image, 32) / 255.0 * 2 - 1  # CLIP's normalisation
  expected = resize_bilinear_np(square[None, ..., :2].astype(np.float32), (30, 50), align_corners=True)[0]
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(ids, np.argmax(logits, -1))


# ------------------------------------------------------------------ the text tower


def test_text_tower_note():
  official = get_model_config("clip_vitl16_384")
  assert "not CLIP (a 32-wide test tower)" in segmenter.text_tower_note(get_model_config("tiny"), None)
  assert segmenter.text_tower_note(official, None) is None  # a converted official model
  random_run = run_config(dataset="lseg_shapes")
  note = segmenter.text_tower_note(official, random_run)
  assert "initialised at random" in note and "(background, circle, square" in note
  random_run.init.clip_text = "/w/clip.safetensors"
  assert segmenter.text_tower_note(official, random_run) is None


def test_normalisation_follows_the_run():
  resnet = get_model_config("tiny_resnet")
  assert geometry_lib.input_normalization(geometry_lib.recorded_input(run_config(normalization="clip")), resnet) == "clip"
  assert geometry_lib.input_normalization({}, resnet) == "imagenet"
  assert geometry_lib.input_normalization({}, get_model_config("tiny")) == "clip"


# ------------------------------------------------------------------ end to end on a trained run

def shapes_images(shapes_config, folder, count: int) -> dict[str, np.ndarray]:
  """The first `count` lseg_shapes training images as PNGs in `folder`: name -> mask."""
  ds = tfds.data_source("lseg_shapes/tiny", split="train", data_dir=shapes_config["data_dir"])
  folder.mkdir()
  masks = {}
  for i in range(count):
    Image.fromarray(ds[i]["image"]).save(folder / f"shapes{i}.png")
    masks[f"shapes{i}.png"] = ds[i]["mask"][..., 0]
  return masks


def pixel_accuracy(out, masks: dict[str, np.ndarray]) -> float:
  correct = sum((np.load(out / f"{name}_ids.npy") == mask).sum() for name, mask in masks.items())
  return correct / sum(mask.size for mask in masks.values())


def test_predict_uses_the_runs_input_sizes(trained, shapes_config, tmp_path, capsys):
  """The run squashes 128-192 px images to 64 x 64: predict does the same by
  default and is far better than with the old fixed 480 px windows (measured:
  0.92 vs 0.79, the latter about the background's share)."""
  masks = shapes_images(shapes_config, tmp_path / "shapes", 6)
  common = ["--checkpoint", str(trained), "--labels", ",".join(shapes.LABELS), str(tmp_path / "shapes")]
  assert predict.main([*common, "--out", str(tmp_path / "own")]) == 0
  assert predict.main([*common, "--out", str(tmp_path / "old"), "--no-square", "--base_size", "480",
                       "--crop_size", "480"]) == 0
  own, old = pixel_accuracy(tmp_path / "own", masks), pixel_accuracy(tmp_path / "old", masks)
  print(f"pixel accuracy: run's sizes {own:.3f}, 480 px windows {old:.3f}")
  assert own > 0.85 and own > old + 0.08
  err = capsys.readouterr().err
  assert err.count("note: this model's text tower is not CLIP") == 2  # once per call


def test_predict_writes_maps_of_the_image_size(trained, tmp_path, capsys):
  rng = np.random.default_rng(4)
  Image.fromarray(rng.integers(0, 255, (70, 100, 3), np.uint8)).save(tmp_path / "x.png")
  Image.fromarray(rng.integers(0, 255, (50, 40, 3), np.uint8)).save(tmp_path / "x.jpg")
  folder = tmp_path / "more"
  folder.mkdir()
  Image.fromarray(rng.integers(0, 255, (64, 64), np.uint8), "L").save(folder / "gray.png")
  Image.fromarray(rng.integers(0, 255, (40, 90, 4), np.uint8), "RGBA").save(folder / "rgba.png")
  Image.fromarray(rng.integers(0, 65535, (30, 20), np.uint16)).save(folder / "deep.png")
  out = tmp_path / "out"
  rc = predict.main(["--checkpoint", str(trained), "--labels", "background, circle,square,x\ufdd0", "--out",
                     str(out), "--save_logits", "--template", "a photo of a {}.", "--template", "a {}",
                     str(tmp_path / "x.png"), str(tmp_path / "x.jpg"), str(folder)])
  assert rc == 0
  sizes = {"x.png": (70, 100), "x.jpg": (50, 40), "gray.png": (64, 64), "rgba.png": (40, 90), "deep.png": (30, 20)}
  for name, (h, w) in sizes.items():
    ids = np.asarray(Image.open(out / f"{name}_ids.png"))
    assert ids.shape == (h, w) and ids.max() < 4
    assert Image.open(out / f"{name}_labels.png").size == (w, h)
    assert Image.open(out / f"{name}_overlay.png").size[0] > w  # the legend
    logits = np.load(out / f"{name}_logits.npy")
    assert logits.shape == (h, w, 4)
    np.testing.assert_array_equal(np.argmax(logits, -1), np.load(out / f"{name}_ids.npy"))
  err = capsys.readouterr().err
  assert err.count("no font here renders the labels " + repr(["x\ufdd0"])) == 1


def test_bad_images_in_a_batch_are_skipped(trained, tmp_path, capsys):
  bad = bad_images(tmp_path)
  gradient_image(40, 50).save(tmp_path / "good.png")
  gradient_image(60, 40).save(tmp_path / "good.jpg")
  rc = predict.main(["--checkpoint", str(trained), "--labels", "background,circle", "--out", str(tmp_path / "out"),
                     str(tmp_path)])
  err = capsys.readouterr().err
  assert rc == 1
  for name, why in bad.items():
    assert f"error: cannot read image {tmp_path / name}" in err and why in err
  assert sorted(p.name for p in (tmp_path / "out").glob("*_ids.npy")) == ["good.jpg_ids.npy", "good.png_ids.npy"]


def test_images_over_the_memory_cap_are_skipped_before_any_work(trained, tmp_path, capsys):
  gradient_image(40, 50).save(tmp_path / "small.png")
  gradient_image(400, 500).save(tmp_path / "large.png")
  geometry = Segmenter.load(trained).geometry()
  ms = inference.MultiScale(scales=(1.0,), flip=False, base_size=geometry.base_size, crop_size=geometry.crop_size)
  cap = math.sqrt(segmenter.logits_gb(40, 50, 2, geometry, ms) * segmenter.logits_gb(400, 500, 2, geometry, ms))
  rc = predict.main(["--checkpoint", str(trained), "--labels", "background,circle", "--out", str(tmp_path / "out"),
                     "--max_logits_gb", f"{cap:.6g}", str(tmp_path / "large.png"), str(tmp_path / "small.png")])
  err = capsys.readouterr().err
  assert rc == 1 and "large.png: its logits (500x400 pixels x 2 labels) need about" in err
  assert [p.name for p in (tmp_path / "out").glob("*_ids.npy")] == ["small.png_ids.npy"]


USAGE_ERRORS = {
    "empty_labels": (["--labels", ","], "empty label list"),
    "duplicate_labels": (["--labels", "dog,cat, dog"], "duplicate label 'dog'"),
    "bad_scales": (["--scales", "1.0,x"], "comma-separated list of numbers"),
    "zero_scale": (["--scales", "0"], "positive finite"),
    "nan_scale": (["--scales", "nan"], "positive finite"),
    "zero_crop": (["--crop_size", "0"], "positive multiple of 32"),
    "odd_crop": (["--crop_size", "33"], "positive multiple of 32"),
    "zero_base": (["--base_size", "0"], "--base_size 0 is not positive"),
    "zero_cap": (["--max_logits_gb", "0"], "--max_logits_gb 0"),
    "out_is_a_file": (["--out", "{tmp}/ok.png"], "is a file, not a folder"),
    "out_under_a_file": (["--out", "{tmp}/ok.png/sub"], "is not a writable folder"),
    "missing_checkpoint": (["--checkpoint", "{tmp}/nope"], "does not exist"),
    "not_a_model": (["--checkpoint", "{tmp}"], "model_config.json"),
    "garbage_model_config": (["--checkpoint", "{tmp}/garbage"], "not valid JSON"),
    "missing_image": (["{tmp}/nope.png"], "image {tmp}/nope.png does not exist"),
    "garbage_image": (["{tmp}/bad.png"], "cannot read image {tmp}/bad.png"),
    "no_images": (["{tmp}/empty"], "no images found"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_before_loading_the_model(trained, tmp_path, capsys, monkeypatch, case):
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ok.png")
  (tmp_path / "bad.png").write_bytes(b"not a png at all")
  (tmp_path / "garbage").mkdir()
  (tmp_path / "garbage" / "model_config.json").write_text("{not json")
  (tmp_path / "empty").mkdir()
  flags, expected = USAGE_ERRORS[case]
  flags = [f.format(tmp=tmp_path) for f in flags]
  args = {"--checkpoint": str(trained), "--labels": "a,b", "--out": str(tmp_path / "o")}
  images = [f for f in flags if not f.startswith("--") and flags.index(f) % 2 == 0] or [str(tmp_path / "ok.png")]
  for key, value in zip(flags[::2], flags[1::2]):
    if key.startswith("--"):
      args[key] = value

  def no_heavy_work(*_):
    raise AssertionError("the model was loaded before the check")

  monkeypatch.setattr(checkpoint, "load_model", no_heavy_work)
  rc = predict.main([*sum(args.items(), ()), *images])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert rc == 2 and len(errors) == 1 and expected.format(tmp=tmp_path) in errors[0], err
  assert "Traceback" not in err


@pytest.mark.parametrize("case", ["garbage_variables", "bad_template"])
def test_model_errors_are_one_line(trained, tmp_path, capsys, case):
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ok.png")
  model = tmp_path / "model"
  (model / "variables").mkdir(parents=True)
  (model / "model_config.json").write_text(json.dumps(get_model_config("tiny").to_dict()))
  (model / "variables" / "junk").write_bytes(b"\x00" * 100)
  flags = {"garbage_variables": ["--checkpoint", str(model)],
           "bad_template": ["--checkpoint", str(trained), "--template", "a photo"]}[case]
  expected = {"garbage_variables": "unreadable", "bad_template": "must each contain"}[case]
  rc = predict.main([*flags, "--labels", "a,b", "--out", str(tmp_path / "o"), str(tmp_path / "ok.png")])
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
  assert rc == 2 and len(errors) == 1 and expected in errors[0], errors


@pytest.mark.parametrize("module", ["predict", "embed", "query", "serve", "export", "convert.__main__"])
@pytest.mark.parametrize("argv", [["--checkpoint", "m", "--out", "o", "--labels", "a", "--features", "f", "--no_such",
                                   "x", "y"], []], ids=["unknown_flag", "nothing"])
def test_every_command_line_answers_a_usage_mistake_in_one_line(module, argv, capsys):
  """Not argparse's usage block and SystemExit: one line naming the mistake, exit 2."""
  main = importlib.import_module(f"lseg_jax.{module}").main
  assert main(argv) == 2
  err = capsys.readouterr().err
  prog = f"python -m lseg_jax.{module.split('.')[0]}"
  assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith(f"(see {prog} --help)\n"), err
  assert "--no_such" in err or not argv or module == "convert.__main__", err
