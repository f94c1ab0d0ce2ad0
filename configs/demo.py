r"""The offline demo: the tiny LSeg on the synthetic `lseg_shapes` set, on CPU.

  python train.py                       # this config is train.py's default
  python train.py --config configs/demo.py --workdir /tmp/demo --config.total_steps=100

Reaches validation mIoU >= 0.7 on lseg_shapes in under 5 minutes on 2 CPU
cores (checked by `pytest -m slow tests/test_demo.py`). The text tower is
randomly initialised here (no CLIP weights offline): its frozen label
embeddings are fixed random directions, which is all the demo needs.
"""

from lseg_jax import config_lib
from lseg_jax.models import get_model_config


def get_config(arg: str | None = None):
  del arg
  config = config_lib.base_config()
  config.model = get_model_config("tiny")
  # Square 128 px resizes (no scale augmentation): the tiny model learns the
  # shapes ~2x faster than with the ADE20K-style random scale and crop.
  config.input.update(dict(dataset="lseg_shapes", builder_config="default", crop_size=128, base_size=144,
                           batch_size=8, train_mode="resize", eval_mode="resize"))
  config.evals = dict(split="validation", batch_size=16)
  config.optax_name = "adamw"
  config.lr = 3e-3
  config.wd = 1e-4
  config.lr_mults = {"fusion": 1.0, "head": 1.0}
  config.schedule = dict(kind="cosine", power=0.9, per_epoch=False, warmup_steps=50)
  config.total_steps = 3000
  config.log_every = 100
  config.ckpt_every = 1000
  config.keep_ckpts = 2
  return config
