r"""The web demo's latency: time to `ready:`, the first request of an image
size (its compile), and warm requests (p50 / p95), single scale and
multi-scale + flip, through HTTP on loopback exactly as the page calls it.
One JSON line per (model, protocol).

  python benchmarks/serve.py                                # the demo's run and a ViT-B/32 at 480
  python benchmarks/serve.py --models demo --requests 5
  python benchmarks/serve.py --models clip_vitb32_384 --protocols single

The demo: a 2-step run of configs/demo.py (its model and its 96 px square
input; the speed does not depend on the weights), on 160x120 images. The
ViT-B/32: random weights as a converted model directory (480 px sliding
windows), on 640x480 images. Random pixels; labels: 7 words.
Absolute times mean something only on the machine that printed them; the
ratios (first / warm, multi-scale / single) travel.
"""

import argparse
import base64
import io
import json
from pathlib import Path
import subprocess
import sys
import tempfile
import time
import urllib.request

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from lseg_jax import checkpoint
from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs

IMAGE_SIZES = {"demo": (120, 160), "clip_vitb32_384": (480, 640)}
LABELS = "background, circle, square, triangle, star, ring, cross"


def demo_workdir(folder: Path) -> Path:
  """The demo's run (configs/demo.py: small_resnet, whole images squashed to
  96 x 96) after 2 steps: the demo's model and input geometry."""
  workdir = folder / "demo"
  subprocess.run([sys.executable, "train.py", "--workdir", str(workdir), "--config.total_steps=2",
                  "--config.eval_every=0"], check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
  return workdir


def random_model_dir(name: str, folder: Path) -> Path:
  """A converted model of `name` with random weights (sliding 480 px windows)."""
  config = get_model_config(name)
  model = build_model(config)
  variables = jax.jit(lambda r: nn.unbox(model.init(r, *init_inputs(config), method=LSeg.segment)))(
      jax.random.key(0))
  return checkpoint.save_model(folder / name, variables, config)


def post(url: str, payload: bytes) -> float:
  t = time.perf_counter()
  req = urllib.request.Request(f"{url}/api/segment", data=payload, headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=3600) as r:
    assert r.status == 200, r.read()[:300]
    r.read()
  return time.perf_counter() - t


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="demo,clip_vitb32_384", help="demo (the trained demo's run) or model presets")
  p.add_argument("--requests", type=int, default=20, help="warm requests per protocol")
  p.add_argument("--protocols", default="single,multiscale_flip")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      model_dir = demo_workdir(Path(tmp)) if name == "demo" else random_model_dir(name, Path(tmp))
      t0 = time.perf_counter()
      proc = subprocess.Popen([sys.executable, "-m", "lseg_jax.serve", "--checkpoint", str(model_dir), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      try:
        for line in proc.stdout:
          print(line, end="", file=sys.stderr)
          if line.startswith("ready: "):
            url = line.split()[1].rstrip("/")
            break
        else:
          raise SystemExit(f"the server for {name} exited before it was ready")
        ready_s = time.perf_counter() - t0
        h, w = IMAGE_SIZES.get(name, (480, 640))
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8)).save(buf, "PNG")
        for protocol in args.protocols.split(","):
          multiscale = {"single": False, "multiscale_flip": True}[protocol]
          payload = json.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "labels": LABELS,
                                "multiscale": multiscale}).encode()
          first = post(url, payload)
          warm = np.array([post(url, payload) for _ in range(args.requests)])
          print(json.dumps({
              "benchmark": "serve", "model": name, "image": f"{w}x{h}",
              "protocol": protocol, "ready_s": round(ready_s, 2),
              "first_request_s": round(first, 3), "warm_p50_s": round(float(np.percentile(warm, 50)), 3),
              "warm_p95_s": round(float(np.percentile(warm, 95)), 3), "requests": args.requests,
              "first_over_warm": round(first / float(np.percentile(warm, 50)), 2),
              "devices": jax.device_count(), "platform": jax.devices()[0].platform}), flush=True)
      finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
  main()
