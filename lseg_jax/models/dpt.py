"""The DPT neck as LSeg uses it: reassemble (ViT tokens -> 4 feature maps) and
the fusion decoder (`scratch` in the official code).

Reassemble, per hooked block (official `act_postprocess{1..4}`):
  readout (ignore / add / project) -> [B, gh, gw, C] -> 1x1 conv -> resample
  to the level's stride 4, 8, 16, 32. With patch p the resampling factor is
  p / stride: a kernel == stride transposed conv when > 1, nothing when 1,
  a 3x3 stride-1/factor conv (padding 1) when < 1. ViT-L/16 gives x4, x2, 1,
  1/2; ViT-B/32 gives x8, x4, x2, 1, exactly the official per-backbone tables.
  Other patch sizes (8 gives x2, 1, 1/2, 1/4) extend the same rule.

Fusion: a 3x3 conv (no bias) per level to `features` channels, then four
FeatureFusionBlocks from the coarsest level: add the skip after a residual
conv unit, another unit, x2 bilinear (align_corners=True), 1x1 conv.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lseg_jax.models import layers

LEVEL_STRIDES = (4, 8, 16, 32)
READOUTS = ("ignore", "add", "project")


class Readout(nn.Module):
  """Folds the cls token into the patch tokens: [B, 1+N, C] -> [B, N, C]."""
  kind: str
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    cls, patches = tokens[:, :1], tokens[:, 1:]
    if self.kind == "ignore":
      return patches
    if self.kind == "add":
      return patches + cls
    # project: GELU(Linear_{2C->C}([patch, cls])), patch features first.
    x = jnp.concatenate([patches, jnp.broadcast_to(cls, patches.shape)], axis=-1)  # [B, N, 2C]
    x = layers.dense(tokens.shape[-1], ("embed", "embed_out"), name="project",
                     dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return layers.gelu(x)


class ReassembleLevel(nn.Module):
  """Readout, token grid -> image, 1x1 conv, resample by `factor`."""
  readout: str
  features: int
  factor: float  # patch / level stride
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Readout(self.readout, name="readout", **kw)(tokens)  # [B, gh*gw, C]
    x = x.reshape(x.shape[0], *grid, x.shape[-1])  # [B, gh, gw, C]
    x = layers.conv(self.features, 1, name="proj", **kw)(x)
    if self.factor > 1:
      x = layers.PatchUpsample(self.features, int(self.factor), name="resample", **kw)(x)
    elif self.factor < 1:
      x = layers.conv(self.features, 3, stride=round(1 / self.factor), padding=1, name="resample", **kw)(x)
    return x  # [B, gh * factor, gw * factor, features]


class Reassemble(nn.Module):
  """The four hooked token maps -> feature maps at strides 4, 8, 16, 32."""
  readout: str
  channels: Sequence[int]
  patch_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, hooked: Sequence[jax.Array], grid: tuple[int, int]) -> list[jax.Array]:
    if self.patch_size & (self.patch_size - 1) or not 1 <= self.patch_size <= 32:
      raise ValueError(f"DPT needs a power-of-two patch size up to 32 (level strides {LEVEL_STRIDES}); "
                       f"got {self.patch_size}.")
    return [
        ReassembleLevel(self.readout, c, self.patch_size / stride, name=f"level{i + 1}",
                        dtype=self.dtype, param_dtype=self.param_dtype)(tokens, grid)
        for i, (tokens, c, stride) in enumerate(zip(hooked, self.channels, LEVEL_STRIDES))
    ]


class ResidualConvUnit(nn.Module):
  """x + BN(conv(ReLU(BN(conv(ReLU(x)))))): the skip adds the un-rectified x.

  Without `use_bn` the convs carry biases instead (the official `bias=not bn`).
  """
  use_bn: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    def conv_norm(y: jax.Array, i: int) -> jax.Array:
      y = layers.conv(c, 3, padding=1, use_bias=not self.use_bn, name=f"conv{i}", **kw)(y)
      return layers.batch_norm(train, f"bn{i}", **kw)(y) if self.use_bn else y

    return x + conv_norm(nn.relu(conv_norm(nn.relu(x), 1)), 2)


class FeatureFusionBlock(nn.Module):
  """[skip-add after a RCU] -> RCU -> x2 bilinear (align_corners) -> 1x1 conv."""
  use_bn: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if skip is not None:
      x = x + ResidualConvUnit(self.use_bn, name="resConfUnit1", **kw)(skip, train)
    x = ResidualConvUnit(self.use_bn, name="resConfUnit2", **kw)(x, train)
    x = layers.upsample2x(x)  # [B, 2H, 2W, C]
    return layers.conv(x.shape[-1], 1, name="out_conv", **kw)(x)


class Fusion(nn.Module):
  """Four feature maps (strides 4..32) -> fused map at stride 2, `features` wide."""
  features: int = 256
  use_bn: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rn = [layers.conv(self.features, 3, padding=1, use_bias=False, name=f"layer{i + 1}_rn", **kw)(x)
          for i, x in enumerate(levels)]
    path = FeatureFusionBlock(self.use_bn, name="refinenet4", **kw)(rn[3], None, train)
    for i in (2, 1, 0):
      path = FeatureFusionBlock(self.use_bn, name=f"refinenet{i + 1}", **kw)(path, rn[i], train)
    return path  # [B, H/2, W/2, features]
