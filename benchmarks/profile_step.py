r"""Where a training step's time goes: each stage of LSeg jitted on its own,
forward and forward + backward, next to this machine's fp32 matmul rate
measured in the same run. One JSON line.

  python benchmarks/profile_step.py                        # clip_vitl16_384, 2 x 384, 150 labels, fp32
  python benchmarks/profile_step.py --model clip_vitb32_384 --size 480 --batch 1 --forward_only

Stages, in the order the step runs them: `backbone` (the ViT, patch embedding
to the last hooked block), `reassemble` (readout, 1x1 convs, resampling),
`fusion` (the DPT decoder, BatchNorm in train mode), `head` (head1, the
similarity with the label embeddings, the x2 upsampling) and `loss` (the
per-pixel softmax cross-entropy). Each stage's backward gets a random
cotangent of its output's shape; `whole` is the gradient of the whole loss in
one program, for comparison with the sum (XLA fuses across stage borders
there). GFLOP/s = XLA's own FLOP count of the stage / its time, to be read
against `matmul_gflops` (a 2048^3 float32 matmul in the same run): a stage far
below it spends its time outside matmuls and convolutions.
"""

import argparse
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import flops, losses
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs


def timed_compile(fn, *args, repeats: int) -> tuple[float, float]:
  """(best time, XLA's FLOP count) of fn(*args), compiled once."""
  compiled = jax.jit(fn).lower(*args).compile()
  return flops.best_time(compiled, *args, repeats=repeats), flops.compiled_flops(compiled) or float("nan")


def stage_report(fn, diff: tuple, const: tuple, repeats: int, forward_only: bool) -> dict:
  """Forward and forward + backward (a VJP with a random cotangent, w.r.t.
  `diff`) of fn(*diff, *const). Everything is an argument: a closed-over
  array would be folded into the program as a constant."""
  args = (*diff, *const)
  seconds, flop = timed_compile(fn, *args, repeats=repeats)
  report = {"forward_s": seconds, "gflop": flop / 1e9, "forward_gflops": flop / 1e9 / seconds}
  if not forward_only:
    out = jax.eval_shape(fn, *args)
    rng = np.random.default_rng(1)
    cot = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), out)

    def fwd_bwd(diff, const, cot):
      _, vjp = jax.vjp(lambda *d: fn(*d, *const), *diff)
      return vjp(cot)

    seconds, flop = timed_compile(fwd_bwd, diff, const, cot, repeats=repeats)
    report.update(forward_backward_s=seconds, forward_backward_gflop=flop / 1e9,
                  forward_backward_gflops=flop / 1e9 / seconds)
  return {k: float(f"{v:.4g}") for k, v in report.items()}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="clip_vitl16_384")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=384)
  p.add_argument("--labels", type=int, default=150)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--forward_only", action="store_true")
  args = p.parse_args()

  config = get_model_config(args.model)
  model = build_model(config)
  variables = jax.jit(lambda r: nn.unbox(model.init(r, *init_inputs(config), method=LSeg.segment)))(
      jax.random.key(0))
  params, stats = variables["params"], variables["batch_stats"]
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(args.batch, args.labels, config.text.embed_dim)), jnp.float32)
  label_mask = jnp.ones((args.batch, args.labels), bool)
  mask = jnp.asarray(rng.integers(-1, args.labels, (args.batch, args.size, args.size)), jnp.int32)

  # Each stage as a function of (its parameters, its input), on the same module
  # definitions the model uses.
  def backbone(p, x):
    return model.backbone.apply({"params": p}, x)[0]

  def reassemble(p, hooked):
    return model.reassemble.apply({"params": p}, hooked, (args.size // config.vit.patch_size,) * 2)

  def fusion(p, levels, batch_stats):
    return model.fusion.apply({"params": p, "batch_stats": batch_stats}, levels, True,
                              mutable=["batch_stats"])[0]

  def head(p, path, text, label_mask):
    return model.head.apply({"params": p}, path, text, label_mask)

  def loss(logits, mask, label_mask):
    nll, valid, _ = losses.pixel_nll(logits, mask, label_mask)
    return jnp.sum(nll) / jnp.maximum(jnp.sum(valid), 1)

  def whole(p, x, batch_stats, text, mask, label_mask):
    logits = model.apply({"params": p, "batch_stats": batch_stats}, x, text, label_mask, train=True,
                         mutable=["batch_stats"])[0]
    return loss(logits, mask, label_mask)

  hooked = jax.jit(backbone)(params["backbone"], images)
  levels = jax.jit(reassemble)(params["reassemble"], hooked)
  path = jax.jit(fusion)(params["fusion"], levels, stats["fusion"])
  logits = jax.jit(head)(params["head"], path, text, label_mask)
  report = functools.partial(stage_report, repeats=args.repeats, forward_only=args.forward_only)
  stages = {
      "backbone": report(backbone, (params["backbone"], images), ()),
      "reassemble": report(reassemble, (params["reassemble"], hooked), ()),
      "fusion": report(fusion, (params["fusion"], levels), (stats["fusion"],)),
      "head": report(head, (params["head"], path), (text, label_mask)),
      "loss": report(loss, (logits,), (mask, label_mask)),
  }
  key = "forward_s" if args.forward_only else "forward_backward_s"
  whole_fn = whole if args.forward_only else jax.grad(whole)
  whole_s = flops.best_time(jax.jit(whole_fn), params, images, stats, text, mask, label_mask, repeats=args.repeats)
  total = sum(s[key] for s in stages.values())
  print(json.dumps({
      "benchmark": "train_step_profile", "model": args.model, "batch": args.batch, "size": args.size,
      "labels": args.labels, "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "matmul_gflops": round(flops.measured_matmul_flops() / 1e9, 1), "measured": key,
      "stages": stages, "share": {k: round(s[key] / total, 3) for k, s in stages.items()},
      "sum_of_stages_s": round(total, 3), "whole_s": round(whole_s, 3)}))


if __name__ == "__main__":
  main()
