"""The pre-norm transformer block shared by the timm ViT and the CLIP text tower.

Both are x += Attn(LN1(x)); x += MLP(LN2(x)) with a fused [q; k; v] input
projection laid out head by head. They differ only in the LayerNorm epsilon
(timm 1e-6, CLIP 1e-5), the MLP activation (exact GELU, QuickGELU) and the
causal mask of the text tower, so one module with those three knobs serves both.

The attention core is selectable (`ATTENTION`): "plain" is two einsums around
a float32 softmax, which XLA:CPU fuses (~2.5x faster per block than
`jax.nn.dot_product_attention` there); "xla" and "cudnn" are
`jax.nn.dot_product_attention` with that implementation ("cudnn": the fused
flash kernel of NVIDIA GPUs, bf16/fp16 only).

The block's input, MLP hidden layer and output carry logical activation
names (`batch`, `length`, `embed`, `mlp`), which pin their sharding inside
`sharding.activation_layout` and do nothing outside it.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lseg_jax.models import layers

ATTENTION = ("plain", "xla", "cudnn")
TOKENS = ("batch", "length", "embed")  # logical names of a [B, N, C] activation


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
  """jax.nn.softmax over the last axis whose backward keeps only its output
  (dx = y * (dy - sum(dy * y))), as PyTorch's does: differentiated as
  written it also kept the exponentials, a second [B, H, N, N] array per
  block (1 GiB of a ViT-L/16 step at batch 2 x 384)."""
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  y = softmax(x)
  return y, y


def _softmax_bwd(y: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def plain_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, causal: bool) -> jax.Array:
  """softmax(q k^T * scale) v on [B, N, H, D] inputs, the softmax in float32
  whatever the compute dtype. q, k, v are moved heads-major first, so both
  batched matmuls run on contiguous [N, D] slices: on XLA:CPU the ViT-L
  attention's forward ran 40% faster so (forward + backward 11%)."""
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, N, D]
  logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(scale, q.dtype), k).astype(jnp.float32)  # [B, H, N, N]
  if causal:
    n = q.shape[2]
    logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, jnp.finfo(jnp.float32).min)
  probs = softmax(logits).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)  # [B, N, H, D]


class MultiHeadAttention(nn.Module):
  """softmax(q k^T / sqrt(d)) v over `num_heads` heads, fused qkv projection."""
  num_heads: int
  causal: bool = False
  attention: str = "plain"  # one of ATTENTION
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, width = x.shape
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = layers.dense(3 * width, ("embed", "qkv"), name="qkv", **kw)(x)  # [B, N, 3C]
    q, k, v = (t[:, :, 0] for t in jnp.split(qkv.reshape(b, n, 3, self.num_heads, head_dim), 3, axis=2))
    if self.attention == "plain":
      y = plain_attention(q, k, v, head_dim ** -0.5, self.causal)
    else:
      y = jax.nn.dot_product_attention(q, k, v, scale=head_dim ** -0.5, is_causal=self.causal,
                                       implementation=self.attention)
    y = y.reshape(b, n, width)  # [B, N, C]
    return layers.dense(width, ("qkv", "embed"), name="proj", **kw)(y)


class Block(nn.Module):
  """One pre-norm residual transformer block."""
  num_heads: int
  mlp_dim: int
  activation: Callable[[jax.Array], jax.Array] = layers.gelu
  layer_norm_eps: float = 1e-6
  causal: bool = False
  attention: str = "plain"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, name=name, **kw)
    x = nn.with_logical_constraint(x, TOKENS)
    x = x + MultiHeadAttention(self.num_heads, self.causal, self.attention, name="attn", **kw)(norm("norm1")(x))
    h = layers.dense(self.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(norm("norm2")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))  # [B, N, mlp]
    h = layers.dense(width, ("mlp", "embed"), name="fc2", **kw)(self.activation(h))
    return nn.with_logical_constraint(x + h, TOKENS)
