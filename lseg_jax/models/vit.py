"""The image backbone of LSeg's ViT variants: timm `vit_large_patch16_384` and
`vit_base_patch32_384` as the official `forward_flex` runs them.

Differences from a plain ViT classifier, all from the official code:
- any input whose sides are multiples of the patch runs: the learned
  position embedding of the pre-training grid is resized to the input grid
  (bilinear, align_corners=False, no antialias, the cls row kept);
- the outputs of the hooked blocks are returned, before the final LayerNorm,
  which is never applied (and the classifier head is not built).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lseg_jax.models import layers
from lseg_jax.models.transformer import ATTENTION, Block

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def resize_pos_embed(pos_embed: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[1, 1 + g*g, C] -> [1, 1 + gh*gw, C]: cls row kept, grid resized as an image."""
  cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
  g = int(round(grid_pos.shape[1] ** 0.5))
  if (g, g) == tuple(grid):
    return pos_embed
  grid_pos = grid_pos.reshape(1, g, g, -1)  # [1, g, g, C], row index first
  grid_pos = layers.resize_bilinear(grid_pos, grid, align_corners=False)  # [1, gh, gw, C]
  return jnp.concatenate([cls_pos, grid_pos.reshape(1, grid[0] * grid[1], -1)], axis=1)


class ViT(nn.Module):
  """ViT returning the tokens [B, 1 + gh*gw, C] after each hooked block.

  Blocks after the last hook do not influence LSeg and are not built.
  """
  patch_size: int
  width: int
  num_heads: int
  mlp_dim: int
  hooks: Sequence[int]
  pretrain_grid: int  # 384 / patch: the grid the position embedding was learned on
  remat_policy: str = "none"
  attention: str = "plain"  # one of ATTENTION
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[list[jax.Array], tuple[int, int]]:
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"ViT input {h}x{w} is not divisible by the patch size {p}.")
    grid = (h // p, w // p)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv(self.width, p, stride=p, name="patch_embed", **kw)(images)  # [B, gh, gw, C]
    x = x.reshape(b, grid[0] * grid[1], self.width)  # [B, gh*gw, C], row-major as torch
    embedding = lambda name, n, dtype: layers.partitioned_param(
        self, name, nn.initializers.truncated_normal(0.02), (None, None, "embed"), (1, n, self.width),
        self.param_dtype, dtype)
    cls = embedding("cls_token", 1, x.dtype)
    pos = embedding("pos_embed", 1 + self.pretrain_grid ** 2, self.param_dtype)  # resized in param_dtype
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
    x = x + resize_pos_embed(pos, grid).astype(x.dtype)  # [B, 1 + gh*gw, C]

    policy = REMAT_POLICIES[self.remat_policy]
    block = Block if self.remat_policy == "none" else nn.remat(Block, policy=policy)
    hooked = []
    for i in range(max(self.hooks) + 1):
      x = block(self.num_heads, self.mlp_dim, layers.gelu, 1e-6, attention=self.attention, name=f"blocks_{i}",
                **kw)(x)
      if i in self.hooks:
        hooked.append(x)
    return hooked, grid
