r"""Host memory of a loaded model, phase by phase: a converted model
directory of random weights is written by one process, then a fresh process
loads it with `Segmenter.load` and runs one forward, printing its resident
memory (VmRSS) and peak (VmHWM) after each phase, next to the bytes of the
weights themselves. One JSON line.

  python benchmarks/inference_memory.py                          # ViT-L/16, one 384 x 384 image
  python benchmarks/inference_memory.py --model clip_vitb32_384 --size 480

The official PyTorch forward of the same model at 1 x 384 peaks at 2.65 GB
(issue 17's side-by-side measurement); a long-running embed job or server
should hold the weights once.
"""

import argparse
import json
from pathlib import Path
import subprocess
import sys
import tempfile


def memory_mb() -> dict[str, float]:
  status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
  return {key: round(int(status[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM")}


def write_model(name: str, folder: str) -> None:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from lseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from lseg_jax.models import LSeg, build_model, get_model_config, init_inputs  # pylint: disable=g-import-not-at-top
  config = get_model_config(name)
  model = build_model(config)
  variables = jax.jit(lambda r: nn.unbox(model.init(r, *init_inputs(config), method=LSeg.segment)))(
      jax.random.key(0))
  checkpoint.save_model(Path(folder) / name, variables, config)


def measure(model_dir: str, size: int, name: str) -> None:
  phases = {"start": memory_mb()}
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lseg_jax.segmenter import Segmenter  # pylint: disable=g-import-not-at-top
  jax.devices()
  phases["imported"] = memory_mb()
  seg = Segmenter.load(model_dir)
  weights_mb = sum(x.nbytes for x in jax.tree.leaves((seg.params, seg.text_params))) / 2**20
  phases["loaded"] = memory_mb()
  image = np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)
  text = seg.encode_labels(["wall", "floor", "chair", "table", "other"])
  phases["labels encoded"] = memory_mb()
  seg.segment([image], text, geometry=seg.geometry(square=True, crop_size=size, base_size=size))
  phases["first segment"] = memory_mb()
  seg.segment([image], text, geometry=seg.geometry(square=True, crop_size=size, base_size=size))
  phases["second segment"] = memory_mb()
  seg.embed([image])
  phases["embed"] = memory_mb()
  print(json.dumps({"benchmark": "inference_memory", "model": name, "image": f"{size}x{size}",
                    "weights_mb": round(weights_mb, 1), "peak_mb": phases["embed"]["VmHWM"], "phases": phases}),
        flush=True)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="clip_vitl16_384")
  p.add_argument("--size", type=int, default=384)
  p.add_argument("--folder", help="where the model directory is written (and reused if there); default: a temp dir")
  p.add_argument("--_measure", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._measure:
    return measure(args._measure, args.size, args.model)
  with tempfile.TemporaryDirectory() as tmp:
    folder = args.folder or tmp
    if not (Path(folder) / args.model).is_dir():
      subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                      f"import inference_memory as m; m.write_model({args.model!r}, {folder!r})"], check=True)
    subprocess.run([sys.executable, __file__, "--model", args.model, "--size", str(args.size),
                    "--_measure", str(Path(folder) / args.model)], check=True)


if __name__ == "__main__":
  main()
