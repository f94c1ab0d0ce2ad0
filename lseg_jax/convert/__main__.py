"""python -m lseg_jax.convert SRC DST: an official LSeg checkpoint -> a model directory.

SRC: a Lightning `.ckpt` (keys `net.*` under `state_dict`), a plain state_dict
(`.pth`/`.pt`), `.safetensors` or `.npz` in the official key names. Reading
PyTorch pickles needs `pip install 'lseg-jax[torch]'`.
DST: a new directory (model_config.json + orbax variables) that eval.py,
lseg_jax.predict and train.py (`--config.init.model_dir`) load; an existing
model directory is replaced only with --overwrite, anything else never.

A bad input (a missing, damaged or non-finite SRC, an existing or unwritable
DST) is one `error:` line and exit code 2; DST is checked before SRC is read.

The backbone is read from the weights' shapes; the options the weights cannot
tell (arch_option, block_depth, activation) are given as the official flags.

  python -m lseg_jax.convert demo_e200.ckpt /models/lseg_demo
  python -m lseg_jax.convert pascal_fold0.ckpt /models/lsegzs_pascal0
  python -m lseg_jax.convert lseg_b32_block.ckpt /models/b32 --arch_option 1 --block_depth 2
"""

import argparse
from pathlib import Path
import sys

import jax

from lseg_jax import checkpoint, cli, convert
from lseg_jax.models import ACTIVATIONS, ARCH_OPTIONS, BACKBONES


def build_parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser("python -m lseg_jax.convert", __doc__)
  parser.add_argument("src", help="official checkpoint (.ckpt, .pth, .pt, .safetensors, .npz)")
  parser.add_argument("dst", help="model directory to create")
  parser.add_argument("--backbone", choices=BACKBONES, help="default: inferred from the weights")
  parser.add_argument("--arch_option", type=int, default=0, choices=sorted(ARCH_OPTIONS))
  parser.add_argument("--block_depth", type=int, default=0)
  parser.add_argument("--activation", default="lrelu", choices=sorted(ACTIVATIONS))
  parser.add_argument("--allow_pickle", action="store_true",
                      help="let torch unpickle non-tensor objects (only for files you trust)")
  parser.add_argument("--overwrite", action="store_true", help="replace DST if it is a model directory")
  return parser


def main(argv: list[str] | None = None) -> int:
  """The command line: 0, or 2 with one `error:` line on stderr for a bad input."""
  cli.quiet_libraries()
  try:
    args = build_parser().parse_args(argv)
    checkpoint.check_destination(Path(args.dst).absolute(), args.overwrite)  # before reading anything
    state_dict = convert.load_state_dict(args.src, allow_pickle=args.allow_pickle)
    backbone = args.backbone or convert.infer_backbone(state_dict)
    config = convert.model_config_from_official(
        backbone, arch_option=args.arch_option, block_depth=args.block_depth, activation=args.activation)
    variables = convert.convert_lseg(state_dict, config)
    out = checkpoint.save_model(args.dst, variables, config, overwrite=args.overwrite)
  except (OSError, ValueError, ImportError) as e:  # OSError: missing, existing or unwritable paths
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(v.size for v in jax.tree.leaves(variables["params"]))
  print(f"wrote {out} ({backbone}, {n / 1e6:.1f}M parameters)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
