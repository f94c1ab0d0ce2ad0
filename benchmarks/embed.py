r"""Dense features per preset, side by side: `Segmenter.embed` (windows in
fixed batches on the devices, each window's map folded into the frame's map
there) against the published recipes' structure (a host loop: one frame at
a time, one window at a time, its mirror after it, the maps merged in
numpy), timed with the same network on the same frames. One JSON line per
(model, frame size, preset).

  python benchmarks/embed.py                                       # ViT-B/32, 240x320 and 480x640, every preset
  python benchmarks/embed.py --model clip_vitl16_384 --sizes 240,320 --presets native,openscene
  python benchmarks/embed.py --model tiny --frames 2                # a quick look

Random weights, random frames. frames_per_s: one over the median time of a
frame, after one frame that compiles; the two paths take turns frame by frame.
rss_peak_mb: the process's resident-memory peak while embedding a timed
frame, over what was resident before it (Linux VmHWM, reset before each
call): every host allocation, and on a CPU the device buffers too;
device_peak_mb where the backend reports it (GPU, TPU).
device_over_host_loop: how many times faster the device path is. max_abs_diff:
the two paths' largest difference (the same recipe: float32 rounding only).
"""

import argparse
import json
from pathlib import Path
import time

import flax.linen as nn
import jax
import numpy as np

from lseg_jax import features as features_lib, sharding
from lseg_jax.data import transforms
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs
from lseg_jax.segmenter import Segmenter


def random_segmenter(name: str) -> Segmenter:
  config = get_model_config(name)
  model = build_model(config)
  variables = jax.jit(lambda r: nn.unbox(model.init(r, *init_inputs(config), method=LSeg.segment)))(
      jax.random.key(0))
  text = variables["params"].pop("text_encoder")
  return Segmenter(model, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}, text,
                   config, {}, mesh=sharding.make_mesh([("data", -1)]))


def host_loop(seg: Segmenter, preset: features_lib.Preset):
  """frame -> features by the recipes' structure: every window (and its
  mirror) through the network on its own (a batch of 1, the same kernels)."""
  if preset.name == "native":
    return lambda frame: seg.embed([frame])[0]  # one forward whatever the path
  mean, std = transforms.normalization_stats(seg.normalization)
  fn = features_lib.WINDOW_FEATURES[preset.feature]
  one = jax.jit(lambda params, x: fn(seg.model.apply(params, x, method=LSeg.pixel_features)))
  forward = lambda window: np.asarray(one(seg.params, window))  # [1, c, c, 3]: preset_features runs one at a time

  return lambda frame: features_lib.preset_features(forward, transforms.normalize(frame, mean, std), preset,
                                                    -mean / std)


def resident_mb(field: str) -> float:
  """VmRSS (now) or VmHWM (the peak since the last reset) of this process, MB."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) / 1024
  raise KeyError(field)


def interleaved(runs: dict, frames) -> dict:
  """Times each path frame by frame, the paths taking turns (their order
  alternating between frames), so that a change in the machine's load moves
  both alike. -> {path: (median seconds per frame, resident peak MB, outputs)}.
  Each path's first call compiles and is not timed."""
  for run in runs.values():
    run(frames[0])
  seconds = {name: [] for name in runs}
  peak = dict.fromkeys(runs, 0.0)
  out = {name: [] for name in runs}
  for i, frame in enumerate(frames):
    for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
      Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
      held = resident_mb("VmRSS")  # the weights, compiled code, earlier outputs: not this call's
      t0 = time.perf_counter()
      out[name].append(runs[name](frame))
      seconds[name].append(time.perf_counter() - t0)
      peak[name] = max(peak[name], resident_mb("VmHWM") - held)
  return {name: (float(np.median(seconds[name])), peak[name], out[name]) for name in runs}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="clip_vitb32_384")
  p.add_argument("--sizes", default="240,320;480,640", help="frame height,width; several separated by ;")
  p.add_argument("--presets", default=",".join(features_lib.PRESETS))
  p.add_argument("--frames", type=int, default=3)
  args = p.parse_args()
  seg = random_segmenter(args.model)
  rng = np.random.default_rng(0)
  for size in args.sizes.split(";"):
    h, w = (int(s) for s in size.split(","))
    frames = [rng.integers(0, 255, (h, w, 3), np.uint8) for _ in range(args.frames)]
    for name in args.presets.split(","):
      preset = features_lib.PRESETS[name]
      timings = interleaved({"device": lambda f: seg.embed([f], preset=preset)[0],
                             "host_loop": host_loop(seg, preset)}, frames)
      (device_s, device_peak, device_out), (host_s, host_peak, host_out) = timings["device"], timings["host_loop"]
      stats = jax.devices()[0].memory_stats() or {}
      print(json.dumps({
          "benchmark": "embed", "model": args.model, "frame": f"{w}x{h}", "preset": name, "frames": args.frames,
          "output": "x".join(map(str, device_out[0].shape)),
          "device_frames_per_s": round(1 / device_s, 4), "host_loop_frames_per_s": round(1 / host_s, 4),
          "device_over_host_loop": round(host_s / device_s, 3),
          "device_path_rss_peak_mb": round(device_peak, 1), "host_loop_rss_peak_mb": round(host_peak, 1),
          "device_peak_mb": round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None,
          "max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(device_out, host_out))),
          "devices": jax.device_count(), "platform": jax.devices()[0].platform}), flush=True)


if __name__ == "__main__":
  main()
