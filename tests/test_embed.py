"""Dense features: `Segmenter.embed` against an independent reference (the
model's sown head1 output, normalised and cropped in numpy), the checkpoint
against its export, and `python -m lseg_jax.embed`: files, manifest, dtype,
resume, a kill -9 mid-run, refusals, video frames, PCA pictures."""

import dataclasses
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
from PIL import Image
import pytest

from helpers import ROOT, cpu_env, fill_disk, random_variables
from lseg_jax import checkpoint, embed as embed_cli, export, features, segmenter
from lseg_jax.data import transforms
from lseg_jax.models import LSeg, build_model, get_model_config
from lseg_jax.models.layers import resize_bilinear_np
from lseg_jax.segmenter import Segmenter

pytest.importorskip("flatbuffers", reason="jax.export serialization needs the flatbuffers package")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, dict]:
  """(a model directory of the tiny model with random weights, its variables)."""
  variables = random_variables(get_model_config("tiny"), 5)
  return checkpoint.save_model(tmp_path_factory.mktemp("embed") / "model", variables, get_model_config("tiny")), \
      variables


def reference_embedding(variables: dict, image: np.ndarray, full_size: bool) -> np.ndarray:
  """What lang-seg's pixel features are, computed apart from LSeg.embed: the
  image normalised (CLIP) and padded bottom/right to a multiple of 32 with
  the normalised black, the model's sown head1 output (intermediates)
  normalised in numpy; cropped to ceil(h/2) x ceil(w/2), or resized x2
  (align_corners) in numpy, cropped to h x w and renormalised."""
  config = get_model_config("tiny")
  model = build_model(config)
  mean, std = transforms.normalization_stats("clip")
  h, w = image.shape[:2]
  ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
  x = np.broadcast_to(-mean / std, (ph, pw, 3)).copy()
  x[:h, :w] = (image / 255.0 - mean) / std
  params = {"params": {k: v for k, v in variables["params"].items() if k != "text_encoder"},
            "batch_stats": variables["batch_stats"]}
  text = np.ones((1, config.text.embed_dim), np.float32)
  _, state = jax.jit(lambda v, x, t: model.apply(v, x, t, mutable=["intermediates"]))(params, x[None].astype(np.float32),
                                                                                      text)
  f = np.asarray(state["intermediates"]["head"]["pixel_embeddings"][0][0], np.float64)  # [ph/2, pw/2, D]
  f = f / np.linalg.norm(f, axis=-1, keepdims=True)
  if not full_size:
    return f[:-(-h // 2), :-(-w // 2)]
  f = resize_bilinear_np(f, (ph, pw), align_corners=True)[:h, :w]
  return f / np.linalg.norm(f, axis=-1, keepdims=True)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)


@pytest.mark.parametrize("full_size", [False, True], ids=["native", "full_size"])
def test_embed_is_the_padded_head1_output(model_dir, full_size):
  path, variables = model_dir
  seg = Segmenter.load(path)
  frames = [random_image(45, 70, 1), random_image(64, 64, 2), random_image(45, 70, 3)]  # two sizes, one repeated
  got = seg.embed(frames, full_size=full_size)
  for frame, g in zip(frames, got):
    want = reference_embedding(variables, frame, full_size)
    assert g.shape == want.shape and g.dtype == np.float32
    np.testing.assert_allclose(g, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(g, axis=-1), 1.0, atol=1e-5)


def test_embed_of_the_artifact_is_the_checkpoints(model_dir, tmp_path):
  path, _ = model_dir
  artifact = tmp_path / "tiny.jaxexport"
  assert export.main(["--checkpoint", str(path), "--out", str(artifact), "--window", "64", "--platforms", "cpu"]) == 0
  frames = [random_image(50, 60, 4), random_image(64, 33, 5)]  # both pad to 64 x 64
  want = Segmenter.load(path).embed(frames)
  got = Segmenter.load(artifact).embed(frames)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)
  with pytest.raises(ValueError, match="this artifact embeds 64x64 inputs; a 100x40 image pads to 128x64"):
    Segmenter.load(artifact).embed([random_image(40, 100)])
  # the artifact's module docstring: the features with JAX alone, no lseg_jax code
  z = zipfile.ZipFile(artifact)
  meta = json.loads(z.read("meta.json"))
  x = np.full((64, 64, 3), -np.array(meta["mean"]) / np.array(meta["std"]), np.float32)  # the normalised black
  x[:50, :60] = (frames[0] / 255.0 - np.array(meta["mean"])) / np.array(meta["std"])
  head1 = jax.export.deserialize(z.read("pixel_features.bin")).call(x[None])
  features = np.asarray(head1 / np.linalg.norm(head1, axis=-1, keepdims=True))  # [1, 32, 32, D]
  np.testing.assert_allclose(features[0, :25, :30], want[0], atol=1e-5)


# ------------------------------------------------------------------ the command line

def save_frames(folder: Path, sizes) -> list[Path]:
  folder.mkdir(exist_ok=True)
  paths = []
  for i, (h, w) in enumerate(sizes):
    paths.append(folder / f"f{i:02d}.png")
    Image.fromarray(random_image(h, w, 10 + i)).save(paths[-1])
  return paths


def test_embed_cli_writes_features_and_a_manifest_and_resumes(model_dir, tmp_path, capsys):
  path, variables = model_dir
  frames = save_frames(tmp_path / "frames", [(40, 50), (33, 64), (40, 50)])
  (tmp_path / "frames" / "zz.png").write_bytes(b"not a png")
  out = tmp_path / "out"
  assert embed_cli.main(["--checkpoint", str(path), "--out", str(out), "--vis", "pca", str(tmp_path / "frames")]) == 1
  err = capsys.readouterr().err
  assert "error: cannot read image" in err and "zz.png" in err
  manifest = json.loads((out / embed_cli.MANIFEST).read_text())
  assert manifest["preset"] == "native" and manifest["dtype"] == "float16" and len(manifest["pca"]["components"]) == 3
  for frame in frames:
    f = np.load(out / f"{frame.name}.npy")
    image = np.asarray(Image.open(frame))
    assert f.dtype == np.float16 and manifest["frames"][frame.name]["shape"] == list(f.shape)
    np.testing.assert_allclose(f, reference_embedding(variables, image, False), atol=2e-3)  # float16
    assert Image.open(out / f"{frame.name}_pca.png").size == (f.shape[1], f.shape[0])
  # a rerun skips what is there and redoes a file that is not complete
  first = (out / "f00.png.npy").stat().st_mtime_ns
  with open(out / "f01.png.npy", "r+b") as f:
    f.truncate(200)
  assert embed_cli.main(["--checkpoint", str(path), "--out", str(out), "--vis", "pca", str(tmp_path / "frames")]) == 1
  assert "wrote 1 frames" in capsys.readouterr().out
  assert (out / "f00.png.npy").stat().st_mtime_ns == first
  assert np.load(out / "f01.png.npy").shape == (17, 32, 32)
  # another configuration is refused before any work
  assert embed_cli.main(["--checkpoint", str(path), "--out", str(out), "--dtype", "float32", str(frames[0])]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "another configuration (dtype differ)" in err and "\n" not in err


def test_the_pca_colours_are_fitted_once(model_dir, tmp_path, capsys):
  path, _ = model_dir
  frame = save_frames(tmp_path / "frames", [(40, 50)])[0]
  copy = tmp_path / "frames" / "g00.png"
  copy.write_bytes(frame.read_bytes())
  out = tmp_path / "out"
  assert embed_cli.main(["--checkpoint", str(path), "--out", str(out), "--vis", "pca", str(tmp_path / "frames")]) == 0
  capsys.readouterr()
  a, b = (np.asarray(Image.open(out / f"{n}_pca.png")) for n in ("f00.png", "g00.png"))
  np.testing.assert_array_equal(a, b)
  assert a.std() > 10  # not a flat picture


@pytest.mark.parametrize("args, expected", [
    (["--checkpoint", "{tmp}/nope", "{frame}"], "does not exist"),
    (["{tmp}/missing.png"], "input {tmp}/missing.png does not exist"),
    (["{tmp}/frames/..."], "does not exist"),
    (["{tmp}/empty"], "no images found in {tmp}/empty"),
    (["--out", "{frame}", "{frame}"], "is a file, not a folder"),
    (["--preset", "nerf", "{frame}"], "argument --preset: invalid choice: 'nerf'"),
    (["--window", "64", "{frame}"], "unrecognized arguments: --window"),
    (["--preset", "dff", "--full_size", "{frame}"], "--full_size is the native preset's option"),
    (["{tmp}/clip.mp4"], "video input needs PyAV: pip install 'lseg-jax[video]'"),
], ids=["checkpoint", "missing_input", "bad_path", "empty_folder", "out_is_a_file", "preset", "option", "full_size",
        "video_without_the_extra"])
def test_embed_cli_usage_errors_are_one_line(model_dir, tmp_path, capsys, monkeypatch, args, expected):
  path, _ = model_dir
  frame = save_frames(tmp_path / "frames", [(40, 50)])[0]
  (tmp_path / "empty").mkdir()
  (tmp_path / "clip.mp4").write_bytes(b"\0" * 64)
  find_spec = embed_cli.importlib.util.find_spec
  monkeypatch.setattr(embed_cli.importlib.util, "find_spec", lambda name: None if name == "av" else find_spec(name))
  monkeypatch.setattr(Segmenter, "load", lambda *_: pytest.fail("the model was loaded before the check"))
  args = [a.format(tmp=tmp_path, frame=frame) for a in args]
  model = [] if "--checkpoint" in args else ["--checkpoint", str(path)]
  out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
  assert embed_cli.main([*model, *out, *args]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and expected.format(tmp=tmp_path) in err and "\n" not in err, err
  assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_a_disk_that_fills_mid_run_leaves_only_complete_files(model_dir, tmp_path, small_disk, capsys):
  """The disk fills after a few frames: one error line, exit 1, every .npy
  there complete and no temporary file; once there is room, a rerun writes
  the rest and keeps the finished ones."""
  path, variables = model_dir
  frames = save_frames(tmp_path / "frames", [(40, 50)] * 12)
  out = small_disk / "out"
  args = ["--checkpoint", str(path), "--out", str(out), "--dtype", "float32", "--full_size", "--vis", "pca",
          str(tmp_path / "frames")]
  frame_bytes = 40 * 50 * 32 * 4  # one frame's features
  filler = fill_disk(small_disk, leave=4 * frame_bytes + frame_bytes // 2)
  assert embed_cli.main(args) == 1
  captured = capsys.readouterr()
  errors = captured.err.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith(f"error: cannot write to {out}: No space left on device"), errors
  written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
  assert 0 < len(written) < 12 and not [p for p in out.iterdir() if p.name.startswith(".")], sorted(written)
  for name in written:
    assert np.load(out / name).shape == (40, 50, 32)
  filler.unlink()
  assert embed_cli.main(args) == 0
  assert f"wrote {12 - len(written)} frames" in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy") if p.name in written} == written
  for frame in frames:
    f = np.load(out / f"{frame.name}.npy")
    np.testing.assert_allclose(f, reference_embedding(variables, np.asarray(Image.open(frame)), True), atol=2e-5)
    assert Image.open(out / f"{frame.name}_pca.png").size == (50, 40)


def test_video_frames_are_embedded(model_dir, tmp_path, capsys):
  av = pytest.importorskip("av", reason="video input needs PyAV (the video extra)")
  path, _ = model_dir
  video = tmp_path / "clip.mp4"
  with av.open(str(video), "w") as container:
    stream = container.add_stream("mpeg4", rate=5)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for i in range(3):
      frame = av.VideoFrame.from_ndarray(random_image(48, 64, i), format="rgb24")
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  out = tmp_path / "out"
  assert embed_cli.main(["--checkpoint", str(path), "--out", str(out), str(video)]) == 0
  capsys.readouterr()
  names = sorted(json.loads((out / embed_cli.MANIFEST).read_text())["frames"])
  assert names == ["clip.mp4_000000", "clip.mp4_000001", "clip.mp4_000002"]
  assert all(np.load(out / f"{n}.npy").shape == (24, 32, 32) for n in names)


def test_a_kill_9_mid_run_leaves_only_complete_files(model_dir, tmp_path):
  """kill -9 once the first frames are written: every NAME.npy there is
  complete (the others are absent), and a rerun finishes the rest without
  rewriting them."""
  path, _ = model_dir
  save_frames(tmp_path / "frames", [(40 + i, 50) for i in range(30)])
  out = tmp_path / "out"
  command = [sys.executable, "-m", "lseg_jax.embed", "--checkpoint", str(path), "--out", str(out), "--full_size",
             "--dtype", "float32", str(tmp_path / "frames")]
  env = cpu_env(1)
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while not list(out.glob("*.npy")) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
  assert 0 < len(written) < 30, written
  for name in written:
    h = 40 + int(name[1:3])
    assert np.load(out / name).shape == (h, 50, 32)
  rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy") if p.name in written} == written
  assert len(list(out.glob("*.npy"))) == 30 and not list(out.glob(".*.tmp"))


def test_query_gives_predicts_labels_from_stored_features(model_dir, tmp_path, capsys):
  """embed (float32) then query equals predict with the single forward embed
  runs (base_size 64 resizes nothing, images that pad to the 64 px crop):
  exactly for sides that are multiples of 32, on 99% of the pixels for
  others (their last rows interpolate towards the cropped padding)."""
  from lseg_jax import predict, query  # pylint: disable=g-import-not-at-top
  path, _ = model_dir
  frames = save_frames(tmp_path / "frames", [(64, 64), (50, 64), (64, 40)])  # each pads to 64 x 64
  labels = ["dog,cat,grass,sky"]
  assert embed_cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "feats"), "--dtype", "float32",
                         str(tmp_path / "frames")]) == 0
  assert query.main(["--features", str(tmp_path / "feats"), "--labels", *labels, "--out", str(tmp_path / "q")]) == 0
  assert predict.main(["--checkpoint", str(path), "--labels", *labels, "--out", str(tmp_path / "p"), "--no-square",
                       "--base_size", "64", "--crop_size", "64", *map(str, frames)]) == 0
  capsys.readouterr()
  for frame in frames:
    got, want = (np.load(tmp_path / kind / f"{frame.name}_ids.npy") for kind in ("q", "p"))
    assert got.shape == want.shape == np.asarray(Image.open(frame)).shape[:2]
    if all(n % 32 == 0 for n in got.shape):
      np.testing.assert_array_equal(got, want)
    else:
      assert (got == want).mean() > 0.99 and (got[:-2, :-2] == want[:-2, :-2]).all()
    assert (tmp_path / "q" / f"{frame.name}_overlay.png").exists()


# ------------------------------------------------------------------ the published recipes
# An independent transcription of each recipe's code (notes: lseg_jax.features'
# docstring), in numpy, channels first as PyTorch holds them, loop by loop;
# only the network's head1 output comes from the model.

def torch_resize(x: np.ndarray, size, align_corners: bool) -> np.ndarray:
  """F.interpolate(mode="bilinear") of [C, H, W], no antialias: source
  coordinate i * (in-1)/(out-1) (align_corners) or (i + 0.5) * in/out - 0.5
  clamped at 0, neighbours clamped at the edge."""
  for axis, n_out in ((1, size[0]), (2, size[1])):
    n_in = x.shape[axis]
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
      src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros_like(i)
    else:
      src = np.maximum((i + 0.5) * n_in / n_out - 0.5, 0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(3)])
    x = np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac
  return x


def pad_image(x: np.ndarray, crop: int) -> np.ndarray:
  """lang-seg's pad_image: bottom/right to crop with -mean/std = -1 (CLIP normalisation)."""
  c, h, w = x.shape
  out = np.full((c, max(h, crop), max(w, crop)), -1.0)
  out[:, :h, :w] = x
  return out


class Net:
  """The model as the recipes call it: [3, c, c] -> head1's output [D, c/2, c/2]."""

  def __init__(self, variables):
    self.model = build_model(get_model_config("tiny"))
    self.params = {"params": {k: v for k, v in variables["params"].items() if k != "text_encoder"},
                   "batch_stats": variables["batch_stats"]}
    text = np.ones((1, 32), np.float32)
    self.run = jax.jit(lambda p, x: self.model.apply(p, x, text, mutable=["intermediates"])[1])

  def head1(self, x: np.ndarray) -> np.ndarray:
    state = self.run(self.params, x.transpose(1, 2, 0)[None].astype(np.float32))
    return np.asarray(state["intermediates"]["head"]["pixel_embeddings"][0][0], np.float64).transpose(2, 0, 1)


def l2(x: np.ndarray, eps: float = 0.0) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=0, keepdims=True), eps)


def up2(x: np.ndarray) -> np.ndarray:  # output_conv: Interpolate(scale_factor=2, bilinear, align_corners=True)
  return torch_resize(x, (2 * x.shape[1], 2 * x.shape[2]), True)


def multi_eval(net_fn, image: np.ndarray, base: int, crop: int, scales, flip_mean: bool | None, resize_back: bool):
  """MultiEvalModule.forward (lang-seg / DFF encoding_models): per scale the
  long side to ceil(base * s), resize (AC), full image if it fits the crop,
  else windows at stride int(crop * 2/3) padded to the crop; window mean;
  crop; resize back (AC) and sum the scales. flip_mean None: no flip."""
  _, h, w = image.shape
  stride = int(crop * 2 / 3)
  scores = None
  for scale in scales:
    long_size = int(np.ceil(base * scale))
    if h > w:
      height, width = long_size, int(1.0 * w * long_size / h + 0.5)
    else:
      width, height = long_size, int(1.0 * h * long_size / w + 0.5)
    cur = torch_resize(image, (height, width), True)

    def infer(x):
      out = net_fn(x)
      if flip_mean is not None:
        out = out + net_fn(x[:, :, ::-1])[:, :, ::-1]
        out = out / 2 if flip_mean else out
      return out

    if long_size <= crop:
      outputs = infer(pad_image(cur, crop))[:, :height, :width]
    else:
      pad = pad_image(cur, crop) if min(height, width) < crop else cur
      _, ph, pw = pad.shape
      outputs, count = 0, np.zeros((1, ph, pw))
      for idh in range(int(np.ceil((ph - crop) / stride)) + 1):
        for idw in range(int(np.ceil((pw - crop) / stride)) + 1):
          h0, w0 = idh * stride, idw * stride
          h1, w1 = min(h0 + crop, ph), min(w0 + crop, pw)
          out = infer(pad_image(pad[:, h0:h1, w0:w1], crop))
          if np.isscalar(outputs):
            outputs = np.zeros((out.shape[0], ph, pw))
          outputs[:, h0:h1, w0:w1] += out[:, :h1 - h0, :w1 - w0]
          count[:, h0:h1, w0:w1] += 1
      outputs = (outputs / count)[:, :height, :width]
    score = torch_resize(outputs, (h, w), True) if resize_back else outputs
    scores = score if scores is None else scores + score
  return scores


def reference_vlmaps(net: Net, image: np.ndarray, base: int = 520, crop: int = 480) -> np.ndarray:
  def pixel_encoding(x):
    encoding = (l2(net.head1(x)).astype(np.float16) * np.float16(1 / 0.07)).astype(np.float32)
    return up2(encoding.astype(np.float64))
  return multi_eval(pixel_encoding, image, base, crop, [1.0], None, resize_back=False)


def reference_dff(net: Net, image: np.ndarray, base: int = 520, crop: int = 480, size=(360, 480)) -> np.ndarray:
  if image.shape[2] > size[1]:
    image = torch_resize(image, size, True)
  fmap = multi_eval(lambda x: l2(up2(net.head1(x)), 1e-12), image, base, crop, [0.75, 1.0, 1.25, 1.75], True,
                    resize_back=True)
  return l2(torch_resize(fmap, size, False), 1e-12)


def reference_feature3dgs(net: Net, image: np.ndarray, base: int = 520, crop: int = 480, size=(360, 480)
                          ) -> np.ndarray:
  """dff's encode_images.py as feature-3dgs changed it: lseg_net returns
  output_conv(head1) (its normalize commented out), and the saved fmap is
  the scales' sum, before the final interpolate and normalize."""
  if image.shape[2] > size[1]:
    image = torch_resize(image, size, True)
  return multi_eval(lambda x: up2(net.head1(x)), image, base, crop, [0.75, 1.0, 1.25, 1.75], True, resize_back=True)


def reference_openscene(net: Net, image: np.ndarray) -> np.ndarray:
  _, h, w = image.shape
  side = 2 * max(h, w)
  x = pad_image(torch_resize(image, (2 * h, 2 * w), True), -(-side // 32) * 32)
  out = l2(net.head1(x)) + l2(net.head1(x[:, :, ::-1]))[:, :, ::-1]  # flip summed
  return out[:, :h, :w]


# The recipes at a quarter of their sizes (base 130 -> 120 keeps every branch:
# scale 0.75 fits the crop, the others slide): the same code paths at a
# sixteenth of the pixels. The real sizes run with -m slow.
SMALL = {"vlmaps": dict(base_size=120, crop_size=96),
         "dff": dict(base_size=120, crop_size=96, pre_size=(90, 120), out_size=(90, 120)),
         "feature3dgs": dict(base_size=120, crop_size=96, pre_size=(90, 120))}


def check_preset(model_dir, preset: features.Preset, hw, out_hw, reference) -> None:
  path, variables = model_dir
  image = random_image(*hw, 7)
  (got,) = Segmenter.load(path).embed([image], preset=preset)
  normalised = (image.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
  want = reference(Net(variables), normalised).transpose(1, 2, 0)
  assert got.shape == (*out_hw, 32) == want.shape
  assert features.output_size(*hw, preset) == out_hw
  # float32 to 1e-4; vlmaps' float16 product to one float16 step (2^-10) where the two round apart
  tol = 2 ** -10 if preset.feature == "vlmaps" else 1e-4
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
  if preset.feature == "vlmaps":
    assert np.mean(np.abs(got - want) > 1e-4 * np.abs(want).max()) < 1e-3


@pytest.mark.parametrize("name, hw, out_hw", [
    ("openscene", (60, 80), (60, 80)),
    ("vlmaps", (50, 75), (80, 120)),  # windows of 96 at stride 64 over 96 x 120
    ("dff", (50, 75), (90, 120)),  # not pre-resized: the map resized to 90 x 120 at the end
    ("dff", (60, 160), (90, 120)),  # wider than 120: squashed to 90 x 120 first
    ("feature3dgs", (50, 75), (50, 75)),  # the image's size
    ("feature3dgs", (60, 160), (90, 120)),  # the pre-resized size
])
def test_presets_reproduce_the_published_recipes(model_dir, name, hw, out_hw):
  preset = dataclasses.replace(features.PRESETS[name], **SMALL.get(name, {}))
  small = SMALL.get(name, {})
  reference = {"openscene": reference_openscene,
               "vlmaps": lambda net, x: reference_vlmaps(net, x, small["base_size"], small["crop_size"]),
               "dff": lambda net, x: reference_dff(net, x, small["base_size"], small["crop_size"], small["pre_size"]),
               "feature3dgs": lambda net, x: reference_feature3dgs(net, x, small["base_size"], small["crop_size"],
                                                                   small["pre_size"]),
               }[name]
  check_preset(model_dir, preset, hw, out_hw, reference)


def test_window_steps_are_sized_by_their_maps(model_dir, monkeypatch):
  """dff's windows (4 scales, mirrored) one per device step, when one map
  fills WINDOW_MAPS_PER_STEP, give the features of four per step."""
  seg = Segmenter.load(model_dir[0])
  preset = dataclasses.replace(features.PRESETS["dff"], **SMALL["dff"])
  crop, image = preset.crop_size, random_image(50, 75, 7)
  assert seg.windows_per_step("dff", crop) == segmenter.WINDOWS_PER_DEVICE  # the tiny model's maps are small
  (four,) = seg.embed([image], preset=preset)
  monkeypatch.setattr(segmenter, "WINDOW_MAPS_PER_STEP", 1.5 * crop * crop * 32 * 4)  # 1.5 float32 [c, c, 32] maps
  assert seg.windows_per_step("dff", crop) == 1 and seg.windows_per_step("unit", crop) == 4
  (one,) = seg.embed([image], preset=preset)
  np.testing.assert_allclose(one, four, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name, hw, out_hw", [
    ("vlmaps", (200, 300), (347, 520)), ("dff", (100, 150), (360, 480)), ("dff", (300, 600), (360, 480))])
def test_presets_at_their_published_sizes(model_dir, name, hw, out_hw):
  check_preset(model_dir, features.PRESETS[name], hw, out_hw, {"vlmaps": reference_vlmaps, "dff": reference_dff}[name])


def test_the_presets_are_the_published_constants():
  """What SMALL shrinks, at the sources' values."""
  p = features.PRESETS
  assert (p["vlmaps"].base_size, p["vlmaps"].crop_size, p["vlmaps"].scales, p["vlmaps"].flip) == (520, 480, (1.0,),
                                                                                                  "none")
  assert (p["dff"].base_size, p["dff"].crop_size, p["dff"].scales, p["dff"].flip) == (520, 480,
                                                                                      (0.75, 1.0, 1.25, 1.75), "mean")
  assert p["dff"].pre_size == p["dff"].out_size == (360, 480) and p["dff"].renormalize
  assert p["openscene"].flip == "sum" and not p["openscene"].renormalize
  assert dataclasses.replace(p["feature3dgs"], name="dff", feature="dff", out_size=(360, 480), renormalize=True) == \
      p["dff"]  # dff but for the window feature and the saved map's stage


@pytest.mark.parametrize("name, hw", [("openscene", (40, 50)), ("vlmaps", (50, 75)), ("dff", (60, 160))])
def test_the_device_merge_is_the_host_loops(model_dir, name, hw):
  """embed folds each window's map into the image's on the devices (plans of
  taps / window counts); the host transcription (`preset_features`, what
  benchmarks/embed.py times it against) merges them in numpy one window
  at a time: the same features to float32 rounding."""
  preset = dataclasses.replace(features.PRESETS[name], **SMALL.get(name, {}))
  seg = Segmenter.load(model_dir[0])
  image = random_image(*hw, 3)
  mean, std = transforms.normalization_stats(seg.normalization)
  window = jax.jit(lambda x: features.WINDOW_FEATURES[preset.feature](
      seg.model.apply(seg.params, x, method=LSeg.pixel_features)))
  host = features.preset_features(lambda x: np.asarray(window(x)), transforms.normalize(image, mean, std), preset,
                                  -mean / std)
  (device,) = seg.embed([image], preset=preset)
  tol = 2 ** -10 if preset.feature == "vlmaps" else 1e-5
  np.testing.assert_allclose(device, host, rtol=tol, atol=tol * np.abs(host).max())
