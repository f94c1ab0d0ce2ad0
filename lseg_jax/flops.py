"""Analytic FLOPs of an LSeg forward pass (multiply-adds x 2), for MFU.

Counts the matmuls and convolutions (what bounds a TPU/GPU step); norms,
activations, softmax and the interpolations are left out. A training step
costs about 3x the forward (backward = 2x). Cross-check: clip_vitl16_384 at
384 x 384 is ~0.5 TFLOP forward, ~1.5 TFLOP per training image.
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lseg_jax.models.dpt import LEVEL_STRIDES

# Peak dense bf16 FLOP/s per chip, for MFU (vendor data sheets).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def best_time(fn, *args, repeats: int = 3) -> float:
  """Seconds of the fastest of `repeats` calls of fn(*args), after one
  untimed call (which compiles a jitted fn)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def compiled_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled program (per device), None where the
  backend reports none."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return (cost or {}).get("flops")


def measured_matmul_flops(size: int = 2048, repeats: int = 3) -> float:
  """FLOP/s of a size^3 float32 matmul on the default device, best of
  `repeats`: the reference a CPU benchmark's achieved rate is read against
  (a ratio that travels between machines, unlike a time)."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
  return 2 * size ** 3 / best_time(jax.jit(jnp.matmul), a, a, repeats=repeats)


def peak_flops(device: jax.Device) -> float | None:
  """The bf16 peak of `device`, None for a device not in PEAK_FLOPS (CPUs)."""
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in device.device_kind.lower()), None)


def _vit(config: ml_collections.ConfigDict, h: int, w: int) -> tuple[float, list[tuple[int, int]]]:
  v = config.vit
  p, c, m = v.patch_size, v.width, v.mlp_dim
  n = (h // p) * (w // p)
  t = n + 1
  block = 2 * t * c * 3 * c + 2 * 2 * t * t * c + 2 * t * c * c + 2 * 2 * t * c * m
  flops = 2 * n * 3 * p * p * c + (max(v.hooks) + 1) * block
  levels = []
  for ch, stride in zip(config.channels, LEVEL_STRIDES):
    hs, ws = h // stride, w // stride
    if config.readout == "project":
      flops += 2 * n * 2 * c * c
    flops += 2 * n * c * ch  # 1x1 projection on the token grid
    if stride < p:  # transposed conv: every output pixel sums ch inputs
      flops += 2 * hs * ws * ch * ch
    elif stride > p:  # 3x3 stride-2 conv
      flops += 2 * hs * ws * 9 * ch * ch
    levels.append((hs * ws, ch))
  return flops, levels


def _resnet(config: ml_collections.ConfigDict, h: int, w: int) -> tuple[float, list[tuple[int, int]]]:
  r = config.resnet
  flops = 2 * (h // 2) * (w // 2) * 49 * 3 * r.width
  c_in, levels = r.width, []
  for s, blocks in enumerate(r.stage_sizes):
    stride = 4 * 2 ** s
    hw, mid = (h // stride) * (w // stride), r.width * 2 ** s
    for i in range(blocks):
      in_hw = hw * 4 if (s > 0 and i == 0) else hw
      flops += 2 * in_hw * c_in * mid + 2 * hw * 9 * mid * mid + 2 * hw * mid * 4 * mid
      if i == 0:
        flops += 2 * hw * c_in * 4 * mid  # projection shortcut
      c_in = 4 * mid
    levels.append((hw, c_in))
  return flops, levels


def forward_flops(config: ml_collections.ConfigDict, height: int, width: int, num_labels: int) -> float:
  """FLOPs of one image's forward pass (the text tower excluded: its label
  embeddings are computed once per label set)."""
  flops, levels = (_vit if config.kind == "vit" else _resnet)(config, height, width)
  f = config.features
  for hw, ch in levels:
    flops += 2 * hw * 9 * ch * f  # layerN_rn
  for i, (hw, _) in enumerate(levels):
    rcus = 1 if i == 3 else 2
    flops += rcus * 2 * (2 * hw * 9 * f * f) + 2 * (4 * hw) * f * f  # RCUs, out_conv after x2
  hw2 = (height // 2) * (width // 2)
  flops += 2 * hw2 * f * config.text.embed_dim + 2 * hw2 * config.text.embed_dim * num_labels
  return float(flops)


def train_flops(config: ml_collections.ConfigDict, height: int, width: int, num_labels: int) -> float:
  """Forward + backward of one training image."""
  return 3.0 * forward_flops(config, height, width, num_labels)
