"""LSeg networks in Flax linen, built from a model ConfigDict."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lseg_jax.models.clip_text import CLIPTextEncoder
from lseg_jax.models.dpt import READOUTS, Fusion, Reassemble
from lseg_jax.models.lseg import ACTIVATIONS, ARCH_OPTIONS, LSeg, LSegHead
from lseg_jax.models.presets import BACKBONES, OFFICIAL_BACKBONES, get_model_config
from lseg_jax.models.resnet import ResNet
from lseg_jax.models.transformer import ATTENTION
from lseg_jax.models.vit import REMAT_POLICIES, ViT

__all__ = ["BACKBONES", "LSeg", "OFFICIAL_BACKBONES", "abstract_variables", "build_model", "get_model_config", "init_inputs"]


def _check_choice(config: ml_collections.ConfigDict, key: str, choices, default=None):
  """config[key] (`default` where a config saved before the field lacks it),
  checked against `choices`."""
  value = config.get(key, default)
  if value not in choices:
    raise ValueError(f"model.{key}={value!r} is not one of {sorted(choices)}")
  return value


def build_model(config: ml_collections.ConfigDict) -> LSeg:
  """An `LSeg` module from a model config (see `presets.get_model_config`)."""
  _check_choice(config, "kind", ("vit", "resnet"))
  _check_choice(config, "readout", READOUTS)
  _check_choice(config, "arch_option", ARCH_OPTIONS)
  _check_choice(config, "activation", ACTIVATIONS)
  _check_choice(config, "remat_policy", REMAT_POLICIES)
  attention = _check_choice(config, "attention", ATTENTION, default="plain")
  kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
  if config.kind == "vit":
    backbone = ViT(**config.vit, remat_policy=config.remat_policy, attention=attention, **kw)
    reassemble = Reassemble(config.readout, tuple(config.channels), config.vit.patch_size, **kw)
  else:
    backbone, reassemble = ResNet(**config.resnet, **kw), None
  return LSeg(
      backbone=backbone,
      reassemble=reassemble,
      fusion=Fusion(config.features, config.use_bn, **kw),
      head=LSegHead(config.text.embed_dim, config.logit_scale, config.arch_option, config.block_depth,
                    config.activation, **kw),
      text_encoder=CLIPTextEncoder(**config.text, **kw),
  )


def init_inputs(config: ml_collections.ConfigDict, batch: int = 1, size: int = 32):
  """Smallest valid (images, token_ids) to initialise or trace a model; the
  parameter shapes do not depend on the image size."""
  images = jnp.zeros((batch, size, size, 3), jnp.float32)
  token_ids = jnp.zeros((1, config.text.context_length), jnp.int32)
  return images, token_ids


def abstract_variables(config: ml_collections.ConfigDict) -> dict:
  """{'params', 'batch_stats'} as ShapeDtypeStructs, without allocating them."""
  model = build_model(config)
  init = lambda rng: model.init(rng, *init_inputs(config), method=LSeg.segment)
  return nn.unbox(jax.eval_shape(init, jax.random.key(0)))
