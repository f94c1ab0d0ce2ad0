"""Images/s of the lseg_shapes training input pipeline on this machine's CPU.

  python benchmarks/input_pipeline.py [--crop 480] [--batch 16] [--workers 0,1,2]

Builds lseg_shapes (config "tiny" by default: the per-image cost does not
depend on how many distinct images there are) into a temporary TFDS dir
unless --data_dir is given, then times the official training transform
(flip, long side in [260, 1040], pad, 480 crop, normalise) plus decoding and
batching, for each grain worker count. Warm-up batches (worker start-up) are
not timed. Prints ONE JSON line:
  {"benchmark": "input_pipeline", "crop": 480, "results": {"workers_0": ..., ...}}
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

from lseg_jax import data


def images_per_second(input_config: dict, *, batch: int, workers: int, warmup: int, steps: int) -> float:
  """Throughput of `steps` batches after `warmup` untimed ones."""
  loader = data.make_loader(input_config, "train", global_batch_size=batch, seed=0, train=True,
                            shard_index=0, shard_count=1, worker_count=workers)
  it = iter(loader)
  try:
    for _ in range(warmup):
      next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
      next(it)
    return batch * steps / (time.perf_counter() - t0)
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--crop", type=int, default=480)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--data_dir", default=None, help="TFDS dir to build/reuse lseg_shapes in")
  p.add_argument("--builder_config", default="tiny")
  args = p.parse_args()
  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger("absl").setLevel(logging.ERROR)

  with contextlib.ExitStack() as stack:
    data_dir = args.data_dir or stack.enter_context(tempfile.TemporaryDirectory())
    cfg = dict(dataset="lseg_shapes", data_dir=data_dir, builder_config=args.builder_config,
               crop_size=args.crop)
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress: keep stdout one line
      data.dataset_size(cfg, "train")  # prepares the data before anything is timed
    results = {}
    for w in (int(x) for x in args.workers.split(",")):
      results[f"workers_{w}"] = round(images_per_second(
          cfg, batch=args.batch, workers=w, warmup=args.warmup, steps=args.steps), 1)
  print(json.dumps({"benchmark": "input_pipeline", "crop": args.crop, "batch": args.batch,
                    "cpu_count": os.cpu_count(), "unit": "images/s", "results": results}))


if __name__ == "__main__":
  main()
