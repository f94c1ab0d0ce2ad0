"""python -m lseg_jax.convert SRC DST: an official LSeg checkpoint -> a model directory.

SRC: a Lightning `.ckpt` (keys `net.*` under `state_dict`), a plain state_dict
(`.pth`/`.pt`), `.safetensors` or `.npz` in the official key names. Reading
PyTorch pickles needs `pip install 'lseg-jax[torch]'`.
DST: a new directory (model_config.json + orbax variables) that eval.py,
lseg_jax.predict and train.py (`--config.init.model_dir`) load.

The backbone is read from the weights' shapes; the options the weights cannot
tell (arch_option, block_depth, activation) are given as the official flags.

  python -m lseg_jax.convert demo_e200.ckpt /models/lseg_demo
  python -m lseg_jax.convert pascal_fold0.ckpt /models/lsegzs_pascal0
  python -m lseg_jax.convert lseg_b32_block.ckpt /models/b32 --arch_option 1 --block_depth 2
"""

import argparse
import sys

from lseg_jax import checkpoint, convert
from lseg_jax.models import ACTIVATIONS, ARCH_OPTIONS, BACKBONES


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lseg_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="official checkpoint (.ckpt, .pth, .pt, .safetensors, .npz)")
  parser.add_argument("dst", help="model directory to create")
  parser.add_argument("--backbone", choices=BACKBONES, help="default: inferred from the weights")
  parser.add_argument("--arch_option", type=int, default=0, choices=sorted(ARCH_OPTIONS))
  parser.add_argument("--block_depth", type=int, default=0)
  parser.add_argument("--activation", default="lrelu", choices=sorted(ACTIVATIONS))
  parser.add_argument("--allow_pickle", action="store_true",
                      help="let torch unpickle non-tensor objects (only for files you trust)")
  parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  args = parser.parse_args(argv)
  try:
    state_dict = convert.load_state_dict(args.src, allow_pickle=args.allow_pickle)
    backbone = args.backbone or convert.infer_backbone(state_dict)
    config = convert.model_config_from_official(
        backbone, arch_option=args.arch_option, block_depth=args.block_depth, activation=args.activation)
    variables = convert.convert_lseg(state_dict, config)
    out = checkpoint.save_model(args.dst, variables, config, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(v.size for v in __import__("jax").tree.leaves(variables["params"]))
  print(f"wrote {out} ({backbone}, {n / 1e6:.1f}M parameters)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
