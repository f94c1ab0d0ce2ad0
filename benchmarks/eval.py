r"""Multi-scale evaluation throughput, side by side: the host transcription
(the official MultiEvalModule's structure: window logits pulled to the host,
numpy sums and resizes, one image at a time) and the on-device path
(`inference.MultiScaleSegmenter`: every [H, W, labels] map stays on the
devices, only the label map comes back). Same model, same images, same
protocol (6 scales x flip, 480 windows at stride 320); one JSON line per
configuration.

  python benchmarks/eval.py                                   # clip_vitb32_384, 150 labels, 1 image of 512x683
  python benchmarks/eval.py --model clip_vitl16_384 --images 4
  python benchmarks/eval.py --model tiny --labels 7 --images 4   # a quick look

Random weights. host_peak_mb: the peak of host (numpy) allocations during
the timed images (tracemalloc; on a CPU the "device" buffers live in host
memory too, outside it). network_s_per_image: the network alone on the
image's windows, what neither path avoids. official_structure_s_per_image:
the host transcription plus one CLIP text-tower pass over the labels per
window forward (lang-seg's LSegNet.forward encodes its labels at every call),
timed here with our kernels: the official evaluator's work, not PyTorch's
speed. The default run takes about 3 minutes on 2 CPU cores.
"""

import argparse
import json
import time
import tracemalloc

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import inference, sharding
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs


def timed(run, images) -> tuple[float, float, list[np.ndarray]]:
  """(images/s, host peak MB, label maps) of run(image) over `images` (already compiled)."""
  tracemalloc.start()
  t0 = time.perf_counter()
  maps = [run(image) for image in images]
  rate = len(images) / (time.perf_counter() - t0)
  peak = tracemalloc.get_traced_memory()[1] / 2**20
  tracemalloc.stop()
  return rate, peak, maps


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="clip_vitb32_384")
  p.add_argument("--labels", type=int, default=150)
  p.add_argument("--images", type=int, default=1)
  p.add_argument("--size", default="512,683", help="image height,width")
  p.add_argument("--windows_per_device", type=int, default=4)
  args = p.parse_args()

  config = get_model_config(args.model)
  model = build_model(config)
  variables = jax.jit(lambda r: nn.unbox(model.init(r, *init_inputs(config), method=LSeg.segment)))(
      jax.random.key(0))
  text_variables = {"params": {"text_encoder": variables["params"].pop("text_encoder")}}
  text = np.random.default_rng(0).normal(size=(args.labels, config.text.embed_dim)).astype(np.float32)
  mesh = sharding.make_mesh([("data", -1)])
  ms = inference.MultiScale()
  pad = np.full(3, -1.0, np.float32)
  rng = np.random.default_rng(1)
  hw = tuple(int(s) for s in args.size.split(","))
  images = [rng.uniform(-1, 1, (*hw, 3)).astype(np.float32) for _ in range(args.images)]

  host_forward = inference.make_window_forward(model, inference.replicate(variables, mesh), jnp.asarray(text),
                                               2 * jax.device_count(),
                                               sharding.batch_sharding(mesh, (("batch", "data"),)))
  host = lambda image: np.argmax(inference.multiscale_logits(host_forward, image, args.labels, ms, pad), -1)

  segmenter = inference.MultiScaleSegmenter(inference.model_forward(model), variables, mesh, ms, pad,
                                            windows_per_device=args.windows_per_device)
  label_mask = np.ones((segmenter.slots, args.labels), bool)
  per_slot_text = np.broadcast_to(text, (segmenter.slots, *text.shape))

  def device(image):
    sums, _ = segmenter.logit_sums([image] + [None] * (segmenter.slots - 1), per_slot_text, label_mask)
    return np.asarray(segmenter.positions(sums, jnp.asarray(label_mask)))[0, :hw[0], :hw[1]]

  # Compile each path with one batch of windows (not a whole image: that would
  # double the run), then time whole images.
  # (The device step's program depends on the padded image size, not on the scales.)
  host_forward(np.zeros((1, ms.crop_size, ms.crop_size, 3), np.float32))
  segmenter.ms = inference.MultiScale(scales=ms.scales[:1], flip=False)
  device(images[0])
  segmenter.ms = ms
  results, maps = {}, {}
  for name, run in (("host", host), ("device", device)):
    rate, peak, maps[name] = timed(run, images)
    results[f"{name}_images_per_s"] = round(rate, 4)
    results[f"{name}_s_per_image"] = round(1 / rate, 2)
    results[f"{name}_host_peak_mb"] = round(peak, 1)
  # The network alone on the same windows: what neither path can avoid.
  windows = len(inference.window_plans(*hw, ms, hw, 0))
  k = args.windows_per_device
  net = jax.jit(model.apply)
  batch = (jnp.zeros((k, ms.crop_size, ms.crop_size, 3)), jnp.asarray(text))
  jax.block_until_ready(net(variables, *batch))
  t0 = time.perf_counter()
  jax.block_until_ready(net(variables, *batch))
  results["windows_per_image"] = windows
  results["network_s_per_image"] = round((time.perf_counter() - t0) * -(-windows // k), 2)
  # lang-seg's LSegNet.forward runs the CLIP text tower on its labels at every
  # call, i.e. for every window and every mirrored window: the official
  # evaluator's structure costs the host transcription plus that.
  encode = jax.jit(lambda v, ids: model.apply(v, ids, method=LSeg.encode_text))
  ids = jnp.zeros((args.labels, config.text.context_length), jnp.int32).at[:, 0].set(49406).at[:, 1].set(49407)
  jax.block_until_ready(encode(text_variables, ids))
  t0 = time.perf_counter()
  jax.block_until_ready(encode(text_variables, ids))
  results["text_tower_s"] = round(time.perf_counter() - t0, 3)
  results["official_structure_s_per_image"] = round(
      results["host_s_per_image"] + windows * results["text_tower_s"], 2)
  results["device_over_official_structure"] = round(
      results["official_structure_s_per_image"] / results["device_s_per_image"], 3)
  results["same_label"] = round(float(np.mean([(a == b).mean() for a, b in zip(maps["host"], maps["device"])])), 6)
  results["device_over_host"] = round(results["device_images_per_s"] / results["host_images_per_s"], 3)
  print(json.dumps({"benchmark": "eval_multiscale", "model": args.model, "labels": args.labels, "image": list(hw),
                    "scales": list(ms.scales), "flip": ms.flip, "crop": ms.crop_size,
                    "windows_per_device": args.windows_per_device, "device": jax.devices()[0].device_kind,
                    "num_devices": jax.device_count(), "images": args.images, **results}))


if __name__ == "__main__":
  main()
