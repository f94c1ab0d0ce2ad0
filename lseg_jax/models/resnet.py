"""torchvision ResNet-101 as the zero-shot `clip_resnet101` backbone uses it.

The stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) and the four bottleneck stages
(torchvision's "v1.5": the stride sits on the 3x3 conv), returning each
stage's output at strides 4, 8, 16 and 32 for the DPT fusion decoder.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lseg_jax.models import layers


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (x4 channels), BN after each, projection skip."""
  features: int
  stride: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = layers.conv(self.features, 1, use_bias=False, name="conv1", **kw)(x)
    y = nn.relu(layers.batch_norm(train, "bn1", **kw)(y))
    y = layers.conv(self.features, 3, stride=self.stride, padding=1, use_bias=False, name="conv2", **kw)(y)
    y = nn.relu(layers.batch_norm(train, "bn2", **kw)(y))
    y = layers.conv(4 * self.features, 1, use_bias=False, name="conv3", **kw)(y)
    y = layers.batch_norm(train, "bn3", **kw)(y)
    if x.shape[-1] != 4 * self.features or self.stride != 1:
      x = layers.conv(4 * self.features, 1, stride=self.stride, use_bias=False, name="downsample_conv", **kw)(x)
      x = layers.batch_norm(train, "downsample_bn", **kw)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Returns the four stage outputs [B, H/4, W/4, 256] ... [B, H/32, W/32, 2048]."""
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  width: int = 64
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv(self.width, 7, stride=2, padding=3, use_bias=False, name="conv1", **kw)(images)
    x = nn.relu(layers.batch_norm(train, "bn1", **kw)(x))  # [B, H/2, W/2, 64]
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # [B, H/4, W/4, 64]
    outputs = []
    for s, n_blocks in enumerate(self.stage_sizes):
      for i in range(n_blocks):
        stride = 2 if s > 0 and i == 0 else 1
        x = Bottleneck(self.width * 2 ** s, stride, name=f"layer{s + 1}_{i}", **kw)(x, train)
      outputs.append(x)
    return outputs
