"""The pre-norm transformer block shared by the timm ViT and the CLIP text tower.

Both are x += Attn(LN1(x)); x += MLP(LN2(x)) with a fused [q; k; v] input
projection laid out head by head. They differ only in the LayerNorm epsilon
(timm 1e-6, CLIP 1e-5), the MLP activation (exact GELU, QuickGELU) and the
causal mask of the text tower, so one module with those three knobs serves both.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lseg_jax.models import layers


class MultiHeadAttention(nn.Module):
  """softmax(q k^T / sqrt(d)) v over `num_heads` heads, fused qkv projection."""
  num_heads: int
  causal: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, width = x.shape
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = layers.dense(3 * width, ("embed", "qkv"), name="qkv", **kw)(x)  # [B, N, 3C]
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, head_dim), 3, axis=2)
    y = jax.nn.dot_product_attention(
        q[:, :, 0], k[:, :, 0], v[:, :, 0], scale=head_dim ** -0.5, is_causal=self.causal)
    y = y.reshape(b, n, width)  # [B, N, C]
    return layers.dense(width, ("qkv", "embed"), name="proj", **kw)(y)


class Block(nn.Module):
  """One pre-norm residual transformer block."""
  num_heads: int
  mlp_dim: int
  activation: Callable[[jax.Array], jax.Array] = layers.gelu
  layer_norm_eps: float = 1e-6
  causal: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, name=name, **kw)
    x = x + MultiHeadAttention(self.num_heads, self.causal, name="attn", **kw)(norm("norm1")(x))
    h = layers.dense(self.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(norm("norm2")(x))
    h = layers.dense(width, ("mlp", "embed"), name="fc2", **kw)(self.activation(h))
    return x + h
