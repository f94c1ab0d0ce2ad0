r"""Evaluation throughput at 480: single-scale (one 480 x 480 forward per image)
and the official multi-scale protocol (6 scales x flip, sliding 480 windows) on
a 512 x 683 image (ADE20K's typical size), one JSON line.

  python benchmarks/eval.py                                  # clip_vitl16_384, 150 labels
  python benchmarks/eval.py --model tiny --images 4          # a quick look on a CPU

Random weights; windows run in chunks of 2 per device, data parallel.
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import inference, sharding
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="clip_vitl16_384")
  p.add_argument("--labels", type=int, default=150)
  p.add_argument("--images", type=int, default=2)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args()

  config = get_model_config(args.model, dtype=args.dtype)
  model = build_model(config)
  variables = jax.jit(lambda r: nn.unbox(model.init(r, *init_inputs(config), method=LSeg.segment)))(
      jax.random.key(0))
  variables["params"].pop("text_encoder")
  text = jnp.asarray(np.random.default_rng(0).normal(size=(args.labels, config.text.embed_dim)), jnp.float32)
  mesh = sharding.make_mesh([("data", -1)])
  chunk = 2 * jax.device_count()
  forward = inference.make_window_forward(model, jax.device_put(variables, sharding.replicated(mesh)), text, chunk,
                                          sharding.batch_sharding(mesh, (("batch", "data"),)))
  rng = np.random.default_rng(1)
  images = [rng.uniform(-1, 1, (512, 683, 3)).astype(np.float32) for _ in range(args.images)]
  pad = np.full(3, -1.0, np.float32)
  results = {}
  for name, ms in (("single_scale", inference.MultiScale(scales=(480 / 520,), flip=False)),
                   ("multi_scale", inference.MultiScale())):
    inference.multiscale_logits(forward, images[0], args.labels, ms, pad)  # compile + warm up
    t0 = time.perf_counter()
    for image in images:
      inference.multiscale_logits(forward, image, args.labels, ms, pad)
    results[f"{name}_images_per_s"] = round(args.images / (time.perf_counter() - t0), 4)
  print(json.dumps({"benchmark": "eval", "model": args.model, "labels": args.labels, "dtype": args.dtype,
                    "image": [512, 683], "crop": 480, "device": jax.devices()[0].device_kind,
                    "num_devices": jax.device_count(), **results}))


if __name__ == "__main__":
  main()
