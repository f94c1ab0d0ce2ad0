"""Metrics against independent numpy references, the multi-scale sliding
window, and eval.py on a trained tiny workdir (predict: test_predict.py; every
protocol of eval.py on 1 vs 8 devices and 2 processes: test_eval_sharded.py)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import eval_cli
from lseg_jax import inference, metrics, sharding
from lseg_jax.models.layers import resize_bilinear_np


def encoding_reference(preds, targets, nclass):
  """PyTorch-Encoding's batch_pix_accuracy / batch_intersection_union, in numpy."""
  correct = labeled = 0
  inter_t = union_t = np.zeros(nclass)
  for p, t in zip(preds, targets):
    p, t = p + 1, t + 1
    labeled += (t > 0).sum()
    correct += ((p == t) * (t > 0)).sum()
    p = p * (t > 0)
    inter = p * (p == t)
    a_i, _ = np.histogram(inter, bins=nclass, range=(1, nclass))
    a_p, _ = np.histogram(p, bins=nclass, range=(1, nclass))
    a_t, _ = np.histogram(t, bins=nclass, range=(1, nclass))
    inter_t, union_t = inter_t + a_i, union_t + a_p + a_t - a_i
  eps = np.spacing(1)
  return correct / (eps + labeled), (inter_t / (eps + union_t)).mean()


def test_segmentation_metric_matches_pytorch_encoding():
  rng = np.random.default_rng(0)
  nclass = 9  # classes 7 and 8 never occur: IoU 0, still in the mean
  preds = [rng.integers(0, 7, (13, 17)) for _ in range(3)]
  targets = [np.where(rng.random((13, 17)) < 0.2, -1, rng.integers(0, 7, (13, 17))) for _ in range(3)]
  confusion = sum(np.asarray(metrics.confusion_matrix(p, t, nclass)) for p, t in zip(preds, targets))
  scores = metrics.segmentation_scores(confusion)
  pix_acc, miou = encoding_reference(preds, targets, nclass)
  assert scores["pixAcc"] == pytest.approx(pix_acc, abs=1e-12)
  assert scores["mIoU"] == pytest.approx(miou, abs=1e-12)
  assert scores["IoU"][7] == scores["IoU"][8] == 0.0


def test_fewshot_metric_matches_hsnet():
  rng = np.random.default_rng(1)
  inter, union = np.zeros((5, 2)), np.zeros((5, 2))
  ref_i, ref_u = np.zeros((2, 5)), np.zeros((2, 5))
  for _ in range(12):
    c = rng.integers(0, 5)
    pred = rng.integers(0, 2, (9, 11))
    gt = np.where(rng.random((9, 11)) < 0.1, -1, rng.integers(0, 2, (9, 11)))
    i, u = metrics.fewshot_areas(pred, gt)
    inter[c] += i
    union[c] += u
    p = np.where(gt < 0, 255, pred)  # HSNet: ignored pixels leave both histograms
    g = np.where(gt < 0, 255, gt)
    hi = np.array([((p == k) & (g == k)).sum() for k in (0, 1)])
    hp, hg = np.array([(p == k).sum() for k in (0, 1)]), np.array([(g == k).sum() for k in (0, 1)])
    ref_i[:, c] += hi
    ref_u[:, c] += hp + hg - hi
  classes = [0, 2, 3]
  s = metrics.fewshot_scores(inter, union, classes)
  iou = ref_i / np.maximum(ref_u, 1)
  assert s["mIoU"] == pytest.approx(100 * iou[1, classes].mean())
  assert s["FB-IoU"] == pytest.approx(100 * (ref_i[:, classes].sum(1) / ref_u[:, classes].sum(1)).mean())


def official_multiscale(forward, image, nclass, ms, pad):
  """MultiEvalModule.forward, transcribed loop by loop (numpy, HWC)."""
  h, w = image.shape[:2]
  crop, stride = ms.crop_size, int(ms.crop_size * ms.stride_rate)
  scores = np.zeros((h, w, nclass))

  def run(x):
    out = forward(x[None])[0]
    if ms.flip:
      out = out + forward(x[None, :, ::-1])[0][:, ::-1]
    return out

  def pad_img(x):
    ph, pw = max(crop - x.shape[0], 0), max(crop - x.shape[1], 0)
    return np.concatenate([np.concatenate([x, np.broadcast_to(pad, (x.shape[0], pw, 3))], 1),
                           np.broadcast_to(pad, (ph, x.shape[1] + pw, 3))], 0)

  for scale in ms.scales:
    long_size = int(math.ceil(ms.base_size * scale))
    if h > w:
      height, width, short = long_size, int(1.0 * w * long_size / h + 0.5), int(1.0 * w * long_size / h + 0.5)
    else:
      width, height, short = long_size, int(1.0 * h * long_size / w + 0.5), int(1.0 * h * long_size / w + 0.5)
    cur = resize_bilinear_np(image[None], (height, width), True)[0]
    if long_size <= crop:
      out = run(pad_img(cur))[:height, :width]
    else:
      img = pad_img(cur) if short < crop else cur
      ph, pw = img.shape[:2]
      out, count = np.zeros((ph, pw, nclass)), np.zeros((ph, pw, 1))
      for i in range(int(math.ceil((ph - crop) / stride)) + 1):
        for j in range(int(math.ceil((pw - crop) / stride)) + 1):
          h0, w0 = i * stride, j * stride
          h1, w1 = min(h0 + crop, ph), min(w0 + crop, pw)
          o = run(pad_img(img[h0:h1, w0:w1]))
          out[h0:h1, w0:w1] += o[:h1 - h0, :w1 - w0]
          count[h0:h1, w0:w1] += 1
      out = (out / count)[:height, :width]
    scores += resize_bilinear_np(out[None].astype(np.float32), (h, w), True)[0]
  return scores


def fake_forward(batch):
  """A position-dependent per-pixel map, so windows and flips matter."""
  y = np.arange(batch.shape[1])[None, :, None, None] / 10.0
  return np.concatenate([batch.sum(-1, keepdims=True) * (1 + y), batch[..., :1] ** 2], -1).astype(np.float32)


@pytest.mark.parametrize("hw", [(30, 40), (90, 130), (130, 50)], ids=["smaller", "larger", "portrait"])
def test_multiscale_matches_the_official_algorithm(hw):
  image = np.random.default_rng(2).uniform(-1, 1, (*hw, 3)).astype(np.float32)
  ms = inference.MultiScale(scales=(0.5, 1.0, 1.5), flip=True, base_size=80, crop_size=64)
  pad = np.full(3, -1.0, np.float32)
  ours = inference.multiscale_logits(fake_forward, image, 2, ms, pad)
  np.testing.assert_allclose(ours, official_multiscale(fake_forward, image, 2, ms, pad), rtol=1e-5, atol=1e-5)


def device_fake_forward(params, batch, text, label_mask):
  """fake_forward, traceable (the device path's DeviceForward)."""
  y = jnp.arange(batch.shape[1])[None, :, None, None] / 10.0
  return jnp.concatenate([batch.sum(-1, keepdims=True) * (1 + y), batch[..., :1] ** 2], -1)


def test_on_device_multiscale_equals_the_transcription():
  """8 devices, 3 non-square images in one group (5 empty slots), scales whose
  long side is below (0.5: 40) and above (1.0, 1.5) the 64 crop, flip."""
  ms = inference.MultiScale(scales=(0.5, 1.0, 1.5), flip=True, base_size=80, crop_size=64)
  pad = np.full(3, -1.0, np.float32)
  mesh = sharding.make_mesh([("data", 8)])
  segmenter = inference.MultiScaleSegmenter(device_fake_forward, {}, mesh, ms, pad, windows_per_device=3)
  rng = np.random.default_rng(2)
  images = [rng.uniform(-1, 1, (*hw, 3)).astype(np.float32) for hw in [(30, 40), (90, 130), (130, 50)]]
  group = images + [None] * (segmenter.slots - len(images))
  sums, out_hw = segmenter.logit_sums(group, np.zeros((8, 2, 4), np.float32), np.ones((8, 2), bool))
  sums = np.asarray(sums)
  assert out_hw == (160, 160) and sums.shape == (8, 160, 160, 2)
  for i, image in enumerate(images):
    h, w = image.shape[:2]
    reference = official_multiscale(fake_forward, image, 2, ms, pad)
    np.testing.assert_allclose(sums[i, :h, :w], reference, rtol=1e-5, atol=1e-4)
    assert not sums[i, h:].any() and not sums[i, :, w:].any()  # the padding stays empty
  assert not sums[len(images):].any()


@pytest.mark.parametrize("scales, flip, windows, per_step", [
    ((0.5,), False, 1, 1), ((0.5,), True, 2, 2), ((0.5, 1.0), False, 5, 4), ((1.0,), True, 8, 4)])
def test_a_step_runs_the_windows_there_are(scales, flip, windows, per_step):
  """A device step holds windows_per_device (4) windows, or the power of two
  that holds a group's fewer windows: a one-window image runs one forward,
  not four (a ViT-L/16 forward at 1x384: 2.6 GB peak, not 3.2). The sums
  equal the transcription's either way."""
  ms = inference.MultiScale(scales=scales, flip=flip, base_size=80, crop_size=64)  # 40 px: 1 window; 80 px: 4
  seen = []

  def forward(params, batch, text, label_mask):
    seen.append(batch.shape[0])
    return device_fake_forward(params, batch, text, label_mask)

  segmenter = inference.MultiScaleSegmenter(forward, {}, sharding.make_mesh([("data", 1)]), ms,
                                            np.full(3, -1.0, np.float32), windows_per_device=4)
  image = np.random.default_rng(5).uniform(-1, 1, (60, 60, 3)).astype(np.float32)
  sums, _ = segmenter.logit_sums([image], np.zeros((1, 2, 4), np.float32), np.ones((1, 2), bool))
  assert seen == [per_step]  # traced once: every step of the group has this batch
  np.testing.assert_allclose(np.asarray(sums)[0, :60, :60], official_multiscale(fake_forward, image, 2, ms,
                                                                                np.full(3, -1.0)), rtol=1e-5, atol=1e-4)
  assert len(inference.window_plans(60, 60, ms, (64, 64), 0)) == windows


def test_image_sizes_compile_once_per_bucket():
  assert [inference.size_bucket(n) for n in (20, 64, 65, 200, 512, 513, 683)] == [32, 64, 96, 224, 512, 640, 768]
  ms = inference.MultiScale(scales=(0.75, 1.25), flip=False, base_size=48, crop_size=32)
  segmenter = inference.MultiScaleSegmenter(device_fake_forward, {}, sharding.make_mesh([("data", 1)]), ms,
                                            np.zeros(3, np.float32), windows_per_device=2)
  sizes = [(33, 47), (40, 60), (50, 50), (61, 41), (64, 64), (70, 90), (90, 40)]
  for hw in sizes:
    segmenter.logit_sums([np.ones((*hw, 3), np.float32)], np.zeros((1, 2, 4), np.float32), np.ones((1, 2), bool))
  buckets = {tuple(inference.size_bucket(n) for n in hw) for hw in sizes}
  assert len(buckets) == 3 and segmenter.step._cache_size() == len(buckets)  # 7 sizes, 3 compilations


def test_flip_symmetry():
  image = np.random.default_rng(3).uniform(-1, 1, (50, 90, 3)).astype(np.float32)
  ms = inference.MultiScale(scales=(0.75, 1.25), flip=True, base_size=80, crop_size=64)
  mirror_equivariant = lambda b: b[..., :2] * 2.0
  a = inference.multiscale_logits(mirror_equivariant, image, 2, ms, np.full(3, -1.0))
  b = inference.multiscale_logits(mirror_equivariant, image[:, ::-1], 2, ms, np.full(3, -1.0))
  np.testing.assert_allclose(b, a[:, ::-1], atol=1e-5)


def logged_scores(workdir) -> dict:
  """The final validation scores train.py logged (metrics.jsonl)."""
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {k.removeprefix("validation/"): v for k, v in [l for l in lines if "validation/mIoU" in l][-1].items()}


def test_eval_reproduces_the_training_validation(finished_run, tmp_path, capsys):
  """eval.py on conftest's finished run (trained on one device, evaluated
  here on 8) gives the scores train.py logged at its end."""
  out = tmp_path / "scores.json"
  assert eval_cli.main(["eval.py", "--workdir", str(finished_run), "--out", str(out)]) == 0, capsys.readouterr().err
  result, logged = json.loads(out.read_text()), logged_scores(finished_run)
  assert result["mIoU"] == pytest.approx(logged["mIoU"], abs=1e-6)
  assert result["pixAcc"] == pytest.approx(logged["pixAcc"], abs=1e-6)
  assert result["loss"] == pytest.approx(logged["loss"], rel=1e-5)
  assert set(result["IoU"]) == {"background", "circle", "square", "triangle", "star", "ring", "cross"}

