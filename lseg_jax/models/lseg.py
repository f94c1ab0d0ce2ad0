"""LSeg: dense image embeddings matched against text embeddings of any labels.

  logits[b, y, x, n] = logit_scale * <pixel(b, y, x) / |.|, text(n) / |.|>

The pixel embeddings come from a backbone (ViT or ResNet-101), the DPT neck
and `head1` (a 1x1 conv to the text width) at half the input resolution; the
text embeddings from the frozen CLIP text tower. Optional spatial
regularisation blocks act on the logit map, then a x2 bilinear
(align_corners=True) upsampling restores the input size.

Label sets are either shared by the batch (text features [N, D]) or per image
([B, N, D], the zero-shot networks' ['others', class] pairs and batches of
mixed label sets); `label_mask` [B, N] / [N] marks padded labels.

Precision: the official forward multiplies fp16 pixel features with fp16 text
features. We compute the similarity in the configured `dtype` with float32
accumulation (float32 by default, which is what the golden fixtures hold).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lseg_jax.models import layers
from lseg_jax.models.clip_text import CLIPTextEncoder
from lseg_jax.models.dpt import Fusion, Reassemble

ARCH_OPTIONS = {0: "none", 1: "bottleneck", 2: "depthwise"}
ACTIVATIONS = {"relu": nn.relu, "lrelu": nn.leaky_relu, "tanh": jnp.tanh}  # leaky slope 0.01 as torch


def check_image_size(height: int, width: int, multiple: int) -> None:
  """The fusion chain doubles resolution from stride 32 four times, so both sides
  must be multiples of 32 (and of the patch, which divides 32)."""
  if height % multiple or width % multiple:
    raise ValueError(
        f"input image is {height}x{width}; LSeg needs both sides to be multiples of {multiple} "
        "(the patch size, and the stride-32 level of the DPT fusion decoder). Resize or pad it.")


class SpatialRegularization(nn.Module):
  """The official `head_block`: one 3x3 kernel with bias, shared by every label
  channel and by every repetition; the last repetition has no activation.

  arch_option 1 (bottleneck) adds the max over labels of its input; 2
  (depthwise) is the plain shared conv.
  """
  arch_option: int
  block_depth: int
  activation: str

  @nn.compact
  def __call__(self, logits: jax.Array, label_mask: jax.Array | None) -> jax.Array:
    init = layers.torch_uniform(9)  # PyTorch's default for Conv2d(1, 1, 3)
    kernel = self.param("kernel", init, (3, 3, 1, 1))
    bias = self.param("bias", init, (1,))
    act = ACTIVATIONS[self.activation]

    def block(x: jax.Array, use_act: bool) -> jax.Array:
      h, w = x.shape[1:3]
      padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      y = sum(kernel[dy, dx, 0, 0] * padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
      y = y + bias[0]
      if self.arch_option == 1:
        valid = x if label_mask is None else jnp.where(label_mask[..., None, None, :], x, -jnp.inf)
        y = y + jnp.max(valid, axis=-1, keepdims=True)
      return act(y) if use_act else y

    for _ in range(self.block_depth - 1):
      logits = block(logits, True)
    return block(logits, False)


class LSegHead(nn.Module):
  """Fused map [B, h, w, F] and text features -> logits [B, 2h, 2w, N], in
  two steps that callers also use alone: `embed` (the unit pixel embeddings
  [B, h, w, D]: head1's output, L2-normalised) and `score` (embeddings and
  text -> logits: the logit scale, the spatial regularisation blocks, the x2
  upsampling)."""
  embed_dim: int = 512
  logit_scale: float = 1 / 0.07
  arch_option: int = 0
  block_depth: int = 0
  activation: str = "lrelu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.head1 = layers.conv(self.embed_dim, 1, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.arch_option:
      self.head_block = SpatialRegularization(self.arch_option, self.block_depth, self.activation)

  def __call__(self, path: jax.Array, text_features: jax.Array, label_mask: jax.Array | None = None) -> jax.Array:
    return self.score(self.embed(path), text_features, label_mask)

  def pixel_features(self, path: jax.Array) -> jax.Array:
    """[B, h, w, F] -> head1's output [B, h, w, D] in float32, not normalised."""
    pixels = self.head1(path)
    self.sow("intermediates", "pixel_embeddings", pixels)  # [B, h, w, D], head1 output
    return pixels.astype(jnp.float32)

  def embed(self, path: jax.Array) -> jax.Array:
    """[B, h, w, F] -> unit pixel embeddings [B, h, w, D] in float32."""
    pixels = self.pixel_features(path)
    return pixels / jnp.linalg.norm(pixels, axis=-1, keepdims=True)

  def score(self, pixels: jax.Array, text_features: jax.Array, label_mask: jax.Array | None = None) -> jax.Array:
    """Unit pixel embeddings [B, h, w, D] and text features [N, D] or
    [B, N, D] -> logits [B, 2h, 2w, N] in float32."""
    text = text_features.astype(jnp.float32)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    spec = "bhwd,nd->bhwn" if text.ndim == 2 else "bhwd,bnd->bhwn"
    logits = self.logit_scale * jnp.einsum(
        spec, pixels.astype(self.dtype), text.astype(self.dtype), preferred_element_type=jnp.float32)
    self.sow("intermediates", "logits_lowres_pre_block", logits)  # [B, h, w, N]
    if self.arch_option:
      logits = self.head_block(logits, label_mask)
    self.sow("intermediates", "logits_lowres", logits)
    return layers.upsample2x(logits)  # [B, 2h, 2w, N]


class LSeg(nn.Module):
  """The whole network; parts are built from a config by `lseg_jax.models.build_model`.

  `reassemble` is None for a backbone that returns feature maps (ResNet).
  """
  backbone: nn.Module
  reassemble: Reassemble | None
  fusion: Fusion
  head: LSegHead
  text_encoder: CLIPTextEncoder
  size_multiple: int = 32

  def encode_text(self, token_ids: jax.Array) -> jax.Array:
    """Token ids [..., 77] -> text features [..., D], not normalised."""
    return self.text_encoder(token_ids)

  def __call__(self, images: jax.Array, text_features: jax.Array, label_mask: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """images [B, H, W, 3] (normalised) and text features [N, D] or [B, N, D]
    -> logits [B, H, W, N] in float32."""
    if text_features.shape[-2] == 0:
      raise ValueError("the label set is empty: LSeg needs at least one label to segment against.")
    return self.head(self.fused(images, train), text_features, label_mask)

  def embed(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, 3] (normalised) -> unit pixel embeddings [B, H/2, W/2, D]
    in float32: head1's output before the logit scale, the spatial
    regularisation blocks and the x2 upsampling (the features OpenScene,
    VLMaps and DFF extract)."""
    return self.head.embed(self.fused(images, train))

  def pixel_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """`embed` before the L2 normalisation: head1's output [B, H/2, W/2, D]
    (the recipes that resize before normalising start from it)."""
    return self.head.pixel_features(self.fused(images, train))

  def score(self, pixels: jax.Array, text_features: jax.Array, label_mask: jax.Array | None = None) -> jax.Array:
    """Unit pixel embeddings [B, h, w, D] (`embed`) and text features -> logits
    [B, 2h, 2w, N]: what the model computes after them."""
    return self.head.score(pixels, text_features, label_mask)

  def fused(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, 3] -> the DPT decoder's fused map [B, H/2, W/2, F]."""
    check_image_size(images.shape[1], images.shape[2], self.size_multiple)
    if self.reassemble is None:
      levels = self.backbone(images, train)
    else:
      hooked, grid = self.backbone(images)
      for i, tokens in enumerate(hooked):
        self.sow("intermediates", f"hook{i + 1}_tokens", tokens)
      levels = self.reassemble(hooked, grid)
    for i, level in enumerate(levels):
      self.sow("intermediates", f"layer{i + 1}", level)
    path = self.fusion(levels, train)  # [B, H/2, W/2, F]
    self.sow("intermediates", "path_1", path)
    return path

  def segment(self, images: jax.Array, token_ids: jax.Array, train: bool = False) -> jax.Array:
    """Images and label token ids ([N, 77] or [B, N, 77]) -> logits [B, H, W, N]."""
    return self(images, self.encode_text(token_ids), train=train)

