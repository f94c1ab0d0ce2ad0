r"""One sharded training step of an LSeg preset: step time, images/s(/device),
compile time, per-device memory and MFU, one JSON line.

  python benchmarks/train_step.py                                   # clip_vitl16_384, 2 x 384, 150 labels, fp32
  python benchmarks/train_step.py --batch 16 --size 480 --dtype bfloat16 --remat dots_saveable   # on a GPU/TPU
  python benchmarks/train_step.py --accum 4 --accum_impl scan       # accumulation: loop vs scan
  python benchmarks/train_step.py --memory_only --size 480 --batch 4,8,16 --remat none,dots_saveable,full

The step is train.py's (`lseg_jax.training.make_train_step`: SGD as the official recipe, frozen
label embeddings), on all devices (data parallel), random weights and data.
FLOPs are counted analytically (lseg_jax.flops: ~1.5 TFLOP per image at 384,
~2.4 at 480 for ViT-L/16) and cross-checked with XLA's cost analysis; the
compiling step is excluded from the timing. MFU needs a known peak: the
device's bf16 peak (lseg_jax.flops.PEAK_FLOPS) or --peak_tflops.

--memory_only lowers and compiles the step on ONE device from abstract
shapes (nothing is initialised or run; --batch is then the per-device batch
of a data-parallel replica) and prints XLA's buffer assignment per device,
one line per (remat, batch): on the CPU backend an estimate of an
accelerator's needs (its fusions, hence temporaries, differ).
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lseg_jax import config_lib, flops, optim, sharding, training
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="clip_vitl16_384")
  p.add_argument("--batch", default="2", help="global batch; with --memory_only per device, comma-separated")
  p.add_argument("--size", type=int, default=384)
  p.add_argument("--labels", type=int, default=150)
  p.add_argument("--dtype", default="float32", help="compute dtype; parameters and loss stay float32")
  p.add_argument("--remat", default="none", help="none | dots_saveable | full; comma-separated with --memory_only")
  p.add_argument("--attention", default="plain", help="plain | xla | cudnn")
  p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
  p.add_argument("--accum_impl", default="auto", choices=training.ACCUM_IMPLS)
  p.add_argument("--activation_sharding", action="store_true", help="pin activations by the sharding rules")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--peak_tflops", type=float, default=None, help="per device, for MFU")
  p.add_argument("--memory_only", action="store_true", help="compile only and print per-device memory")
  return p.parse_args()


def train_config(args: argparse.Namespace, remat: str) -> ml_collections.ConfigDict:
  """The base training config with the benchmarked model."""
  config = config_lib.base_config()
  config.model = get_model_config(args.model, dtype=args.dtype, remat_policy=remat, attention=args.attention)
  config.total_steps = 1000
  config.lr = 1e-3
  return config


def random_batch(batch: int, size: int, labels: int) -> dict:
  rng = np.random.default_rng(0)
  return {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
          "mask": rng.integers(-1, labels, (batch, size, size)).astype(np.int32),
          "label_ids": np.tile(np.arange(labels, dtype=np.int32), (batch, 1)),
          "label_mask": np.ones((batch, labels), bool)}


def step_fn(args: argparse.Namespace, config: ml_collections.ConfigDict, params, mesh=None, rules=None):
  """(the jitted train step, its optimizer) for `config`."""
  model = build_model(config.model)
  tx, sched = optim.make_optimizer(config, params, 1000)
  activations = (mesh, rules) if args.activation_sharding and mesh is not None else None
  step = training.make_train_step(model, tx, sched, accum=args.accum, accum_impl=args.accum_impl,
                                  activations=activations)
  return jax.jit(step, donate_argnums=(0,)), tx


def memory_only(args: argparse.Namespace) -> None:
  """Compile-only per-device memory, one JSON line per (remat, batch)."""
  for remat in args.remat.split(","):
    config = train_config(args, remat)
    model = build_model(config.model)
    variables = nn.unbox(jax.eval_shape(
        lambda r: model.init(r, *init_inputs(config.model), method=LSeg.segment), jax.random.key(0)))
    variables["params"].pop("text_encoder")
    fn, tx = step_fn(args, config, variables["params"])
    state = jax.eval_shape(lambda p: {"params": p, "batch_stats": variables["batch_stats"], "opt": tx.init(p),
                                      "step": jnp.zeros((), jnp.int32)}, variables["params"])
    text_table = jax.ShapeDtypeStruct((args.labels, config.model.text.embed_dim), jnp.float32)
    for batch in (int(b) for b in args.batch.split(",")):
      batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  random_batch(batch, args.size, args.labels))
      t0 = time.perf_counter()
      compiled = fn.lower(state, batch_shapes, text_table).compile()
      print(json.dumps({
          "benchmark": "train_step_memory", "model": args.model, "batch_per_device": batch, "size": args.size,
          "labels": args.labels, "dtype": args.dtype, "remat": remat, "attention": args.attention,
          "accum": args.accum, "backend": jax.default_backend(), "compile_s": round(time.perf_counter() - t0, 2),
          "memory_gib": sharding.compiled_memory_gib(compiled)}), flush=True)


def timed(args: argparse.Namespace) -> None:
  """Compile, one untimed step, then the median of --steps timed steps."""
  batch_size = int(args.batch)
  config = train_config(args, args.remat)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model = build_model(config.model)
  init_fn = lambda rng: model.init(rng, *init_inputs(config.model), method=LSeg.segment)
  shardings = sharding.logical_shardings(jax.eval_shape(init_fn, jax.random.key(0)), mesh, rules)
  variables = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(jax.random.key(0))
  variables["params"].pop("text_encoder")
  fn, tx = step_fn(args, config, variables["params"], mesh, rules)
  state = training.init_state(variables["params"], variables["batch_stats"], tx, mesh)
  batch = jax.device_put(random_batch(batch_size, args.size, args.labels), sharding.batch_sharding(mesh, rules))
  rng = np.random.default_rng(1)
  text_table = jax.device_put(jnp.asarray(rng.normal(size=(args.labels, config.model.text.embed_dim)), jnp.float32),
                              sharding.replicated(mesh))

  t0 = time.perf_counter()
  compiled = fn.lower(state, batch, text_table).compile()
  compile_s = time.perf_counter() - t0
  xla_flop = flops.compiled_flops(compiled)
  state, m = compiled(state, batch, text_table)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch, text_table)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  n = jax.device_count()
  analytic = batch_size * flops.train_flops(config.model, args.size, args.size, args.labels)
  peak = (args.peak_tflops * 1e12) if args.peak_tflops else flops.peak_flops(jax.devices()[0])
  mem = jax.devices()[0].memory_stats() or {}
  print(json.dumps({
      "benchmark": "train_step", "model": args.model, "batch": batch_size, "size": args.size,
      "labels": args.labels, "dtype": args.dtype, "remat": args.remat, "attention": args.attention,
      "accum": args.accum, "accum_impl": training.resolve_accum_impl(args.accum_impl),
      "activation_sharding": args.activation_sharding,
      "device": jax.devices()[0].device_kind, "num_devices": n,
      "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
      "images_per_s": round(batch_size / step_s, 3), "images_per_s_per_device": round(batch_size / step_s / n, 3),
      "analytic_tflop_per_step": round(analytic / 1e12, 3),
      "xla_tflop_per_step": round(xla_flop * n / 1e12, 3) if xla_flop else None,
      "memory_gib": sharding.compiled_memory_gib(compiled),
      "peak_memory_gb": round(mem["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in mem else None,
      "mfu": round(analytic / step_s / (peak * n), 4) if peak else None,
      "achieved_gflops_per_device": round(analytic / step_s / n / 1e9, 1),
      "matmul_gflops": round(flops.measured_matmul_flops() / 1e9, 1),
      "loss": float(m["loss"]), "loss_dtype": str(m["loss"].dtype),
  }))


def main() -> None:
  args = parse_args()
  if args.memory_only:
    memory_only(args)
  else:
    timed(args)


if __name__ == "__main__":
  main()
