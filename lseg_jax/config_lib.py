"""Pieces every training config in configs/ shares (as big_vision.configs.common)."""

import ml_collections
from ml_collections import config_dict

from lseg_jax import data


def optional_str():
  """A str field that may stay None and can still be set with --config.x=...
  (a new placeholder each call: a shared one would link the fields)."""
  return config_dict.placeholder(str)


# Logical parameter axes -> mesh axes (see lseg_jax/sharding.py). FSDP shards
# parameters and optimiser state over `fsdp`; `tensor` splits the MLP / qkv /
# conv output dims when the mesh has that axis > 1.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("vocab", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("conv_out", "tensor"),
    ("embed_out", "tensor"),
)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """A config's `:key=value,key=value` argument over its `defaults`, each value
  cast to its default's type (big_vision's `parse_arg`). An unknown key or a
  malformed item is a ValueError naming it."""
  args = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in args:
      raise ValueError(f"bad config argument {item!r}: expected key=value with a key in {list(args)}")
    args[key] = type(args[key])(value)
  return args


def base_config() -> ml_collections.ConfigDict:
  """Defaults every config overrides where it needs to."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.input = data.default_input_config()  # every key of the input pipeline, with its default
  config.init = dict(model_dir=optional_str(), vit=optional_str(), resnet=optional_str(), clip_text=optional_str())
  config.prompt_templates = ("{}",)  # LSeg feeds raw label names

  config.optax_name = "sgd"
  config.lr = 0.004 / 16  # the official base_lr / 16 * batch_size with batch 1
  config.momentum = 0.9
  config.wd = 1e-4
  config.lr_mults = {"fusion": 10.0, "head": 10.0}  # the official `scratch` group at 10x
  config.schedule = dict(kind="poly", power=0.9, per_epoch=True, warmup_steps=0)
  config.grad_clip_norm = 0.0
  config.grad_accum_steps = 1
  config.total_steps = 0  # set, or derived from total_epochs
  config.total_epochs = 0.0

  config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  config.sharding_rules = SHARDING_RULES

  config.log_every = 50
  config.ckpt_every = 1000
  config.keep_ckpts = 3
  config.eval_every = 0
  config.evals = dict(split="validation", batch_size=8)
  return config
