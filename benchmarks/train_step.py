r"""One sharded training step of an LSeg preset: step time, images/s, compile
time, peak memory and MFU, one JSON line.

  python benchmarks/train_step.py                                   # clip_vitl16_384, 2 x 384, 150 labels, fp32
  python benchmarks/train_step.py --batch 16 --size 480 --dtype bfloat16 --remat dots_saveable   # on a GPU/TPU

The step is train.py's (`lseg_jax.training.make_train_step`: SGD as the official recipe, frozen
label embeddings), on all devices (data parallel), random weights and data.
FLOPs are counted analytically (lseg_jax.flops: ~1.5 TFLOP per image at 384,
~2.4 at 480 for ViT-L/16) and cross-checked with XLA's cost analysis; the
compiling step is excluded from the timing. MFU needs a known peak: the
device's bf16 peak (lseg_jax.flops.PEAK_FLOPS) or --peak_tflops.
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import config_lib, flops, optim, sharding, training
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="clip_vitl16_384")
  p.add_argument("--batch", type=int, default=2, help="global batch")
  p.add_argument("--size", type=int, default=384)
  p.add_argument("--labels", type=int, default=150)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--peak_tflops", type=float, default=None, help="per device, for MFU")
  args = p.parse_args()

  config = config_lib.base_config()
  config.model = get_model_config(args.model, dtype=args.dtype, remat_policy=args.remat)
  config.total_steps = 1000
  config.lr = 1e-3
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model = build_model(config.model)
  init_fn = lambda rng: model.init(rng, *init_inputs(config.model), method=LSeg.segment)
  shardings = sharding.logical_shardings(jax.eval_shape(init_fn, jax.random.key(0)), mesh, rules)
  variables = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(jax.random.key(0))
  variables["params"].pop("text_encoder")
  tx, sched = optim.make_optimizer(config, variables["params"], 1000)
  state = training.init_state(variables["params"], variables["batch_stats"], tx, mesh)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32),
           "mask": rng.integers(-1, args.labels, (args.batch, args.size, args.size)).astype(np.int32),
           "label_ids": np.tile(np.arange(args.labels, dtype=np.int32), (args.batch, 1)),
           "label_mask": np.ones((args.batch, args.labels), bool)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
  text_table = jax.device_put(jnp.asarray(rng.normal(size=(args.labels, config.model.text.embed_dim)), jnp.float32),
                              sharding.replicated(mesh))
  step_fn = jax.jit(training.make_train_step(model, tx, sched), donate_argnums=(0,))

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, text_table).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else (cost or {})
  state, m = compiled(state, batch, text_table)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch, text_table)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  analytic = args.batch * flops.train_flops(config.model, args.size, args.size, args.labels)
  peak = (args.peak_tflops * 1e12) if args.peak_tflops else flops.peak_flops(jax.devices()[0])
  mem = jax.devices()[0].memory_stats() or {}
  print(json.dumps({
      "benchmark": "train_step", "model": args.model, "batch": args.batch, "size": args.size,
      "labels": args.labels, "dtype": args.dtype, "remat": args.remat,
      "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
      "images_per_s": round(args.batch / step_s, 3),
      "analytic_tflop_per_step": round(analytic / 1e12, 3),
      "xla_tflop_per_step": round(cost.get("flops", float("nan")) * jax.device_count() / 1e12, 3),
      "peak_memory_gb": round(mem.get("peak_bytes_in_use", float("nan")) / 2**30, 2) if mem else None,
      "mfu": round(analytic / step_s / (peak * jax.device_count()), 4) if peak else None,
      "loss": float(m["loss"]),
  }))


if __name__ == "__main__":
  main()
