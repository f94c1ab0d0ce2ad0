r"""Jitted forward of an LSeg preset: compile time and steady-state time, one JSON line.

  python benchmarks/forward.py                       # clip_vitl16_384, 1 x 384 x 384, 5 labels
  python benchmarks/forward.py --model clip_vitb32_384 --size 480 --batch 2 --dtype bfloat16
  python benchmarks/forward.py --model clip_vitb32_384 --attention xla   # the attention core A/B

Random weights (speed does not depend on them). Times are the median of
--repeats runs after one warm-up; on this 2-core CPU the absolute number is
only meaningful next to another measured in the same run.
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import flops
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="clip_vitl16_384")
  p.add_argument("--size", type=int, default=384)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--labels", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--attention", default="plain", help="plain | xla | cudnn (models/transformer.py)")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()

  config = get_model_config(args.model, dtype=args.dtype, attention=args.attention)
  model = build_model(config)
  variables = jax.jit(lambda r: nn.unbox(model.init(r, *init_inputs(config), method=LSeg.segment)))(
      jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (args.batch, args.size, args.size, 3)), jnp.float32)
  token_ids = jnp.zeros((args.labels, 77), jnp.int32).at[:, 0].set(49406).at[:, 1].set(400).at[:, 2].set(49407)
  forward = jax.jit(lambda v, x, t: model.apply(v, x, t, method=LSeg.segment))

  t0 = time.perf_counter()
  compiled = forward.lower(variables, images, token_ids).compile()
  compile_s = time.perf_counter() - t0
  compiled(variables, images, token_ids).block_until_ready()  # warm-up
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    compiled(variables, images, token_ids).block_until_ready()
    times.append(time.perf_counter() - t0)
  forward_s = float(np.median(times))
  flop = flops.compiled_flops(compiled)
  print(json.dumps({
      "benchmark": "forward", "model": args.model, "batch": args.batch, "size": args.size,
      "labels": args.labels, "dtype": args.dtype, "attention": args.attention, "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(), "compile_s": round(compile_s, 2),
      "forward_s": round(forward_s, 4),
      "images_per_s": round(args.batch / forward_s, 3),
      "xla_gflop": round(flop / 1e9, 1) if flop else None,
      "achieved_gflops": round(flop / forward_s / 1e9, 1) if flop else None,
      "matmul_gflops": round(flops.measured_matmul_flops() / 1e9, 1),
  }))


if __name__ == "__main__":
  main()
