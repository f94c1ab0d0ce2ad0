"""The CLIP ViT-B/32 text tower (OpenAI `CLIP.encode_text`), which LSeg keeps frozen.

token + position embedding -> 12 causal pre-norm blocks (QuickGELU, LN eps
1e-5) -> ln_final -> the features at the end-of-text token -> text_projection.
The EOT token has the largest id, so its position is argmax(ids): true with
OpenAI's zero padding and with HF's padding by the EOT id itself (argmax
returns the first maximum).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lseg_jax.models import layers
from lseg_jax.models.transformer import Block


class CLIPTextEncoder(nn.Module):
  """Token ids [..., L] -> text features [..., embed_dim] (not normalised)."""
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  embed_dim: int = 512
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, token_ids: jax.Array) -> jax.Array:
    batch_shape, length = token_ids.shape[:-1], token_ids.shape[-1]
    ids = token_ids.reshape(-1, length)  # [N, L]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = layers.Embed(self.vocab_size, self.width, nn.initializers.normal(0.02), name="token_embedding", **kw)
    pos = layers.partitioned_param(self, "positional_embedding", nn.initializers.normal(0.01), (None, "embed"),
                                   (self.context_length, self.width), self.param_dtype, self.dtype)
    x = embed(ids) + pos[:length]  # [N, L, width]
    for i in range(self.depth):
      x = Block(self.num_heads, 4 * self.width, layers.quick_gelu, 1e-5, causal=True,
                name=f"resblocks_{i}", **kw)(x)
    x = nn.LayerNorm(epsilon=1e-5, name="ln_final", **kw)(x)
    x = x[jnp.arange(x.shape[0]), jnp.argmax(ids, axis=-1)]  # [N, width] at the EOT token
    proj = layers.partitioned_param(self, "text_projection", nn.initializers.normal(self.width ** -0.5),
                                    ("embed", None), (self.width, self.embed_dim), self.param_dtype, x.dtype)
    x = x @ proj  # [N, embed_dim]
    return x.reshape(*batch_shape, self.embed_dim)
