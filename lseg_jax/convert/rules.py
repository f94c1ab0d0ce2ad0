"""Name rules between the official PyTorch state_dict and our Flax variables.

A rule pairs an official key pattern with a Flax path pattern (`{i}` stands
for a number) and a layout transform. The same rules run forwards (convert a
checkpoint) and backwards (name the official key a missing parameter should
have come from), so the converter's error messages speak the checkpoint's
language.
"""

from collections.abc import Callable, Iterator
import dataclasses
import re

import ml_collections
import numpy as np

from lseg_jax.models.dpt import LEVEL_STRIDES


def _linear(w: np.ndarray) -> np.ndarray:
  return w.T  # torch Linear [out, in] -> flax Dense [in, out]


def _conv(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)  # torch Conv2d [O, I, kh, kw] -> flax [kh, kw, I, O]


def _conv_transpose(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 0, 1)  # torch ConvTranspose2d [I, O, kh, kw] -> [kh, kw, I, O]


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _conv_to_torch(w: np.ndarray) -> np.ndarray:
  return w.transpose(3, 2, 0, 1)  # flax [kh, kw, I, O] -> torch Conv2d [O, I, kh, kw]


# Each layout transform and its inverse (the Dense and ConvTranspose ones are
# their own inverses).
_INVERSE = {_linear: _linear, _conv: _conv_to_torch, _conv_transpose: _conv_transpose, _same: _same}


def _pattern(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class Rule:
  official: str  # e.g. "pretrained.model.blocks.{i}.norm1.weight"
  flax: str  # e.g. "params/backbone/blocks_{i}/norm1/scale"
  transform: Callable[[np.ndarray], np.ndarray] = _same

  def forward(self, key: str) -> str | None:
    m = _pattern(self.official).match(key)
    return None if m is None else self.flax.replace("{i}", "{}").format(*m.groups())

  def backward(self, path: str) -> str | None:
    m = _pattern(self.flax).match(path)
    return None if m is None else self.official.replace("{i}", "{}").format(*m.groups())

  def to_official(self, array: np.ndarray) -> np.ndarray:
    """A Flax array in the official (PyTorch) layout: `transform` undone."""
    return _INVERSE[self.transform](array)


def official_name(rules: list[Rule], path: str) -> tuple[str, Rule] | None:
  """The official key of a Flax path ('params/backbone/...') and its rule."""
  return next(((name, r) for r in rules if (name := r.backward(path)) is not None), None)


def linear(src: str, dst: str) -> Iterator[Rule]:
  yield Rule(f"{src}.weight", f"params/{dst}/kernel", _linear)
  yield Rule(f"{src}.bias", f"params/{dst}/bias")


def conv(src: str, dst: str, transform=_conv) -> Iterator[Rule]:
  yield Rule(f"{src}.weight", f"params/{dst}/kernel", transform)
  yield Rule(f"{src}.bias", f"params/{dst}/bias")


def layer_norm(src: str, dst: str) -> Iterator[Rule]:
  yield Rule(f"{src}.weight", f"params/{dst}/scale")
  yield Rule(f"{src}.bias", f"params/{dst}/bias")


def batch_norm(src: str, dst: str) -> Iterator[Rule]:
  yield from layer_norm(src, dst)
  yield Rule(f"{src}.running_mean", f"batch_stats/{dst}/mean")
  yield Rule(f"{src}.running_var", f"batch_stats/{dst}/var")


def vit_rules(prefix: str = "pretrained.model.", dst: str = "backbone") -> Iterator[Rule]:
  """timm VisionTransformer (also the LSeg `pretrained.model.*` keys)."""
  yield Rule(f"{prefix}cls_token", f"params/{dst}/cls_token")
  yield Rule(f"{prefix}pos_embed", f"params/{dst}/pos_embed")
  yield from conv(f"{prefix}patch_embed.proj", f"{dst}/patch_embed")
  blk, out = f"{prefix}blocks.{{i}}", f"{dst}/blocks_{{i}}"
  yield from layer_norm(f"{blk}.norm1", f"{out}/norm1")
  yield from layer_norm(f"{blk}.norm2", f"{out}/norm2")
  yield from linear(f"{blk}.attn.qkv", f"{out}/attn/qkv")
  yield from linear(f"{blk}.attn.proj", f"{out}/attn/proj")
  yield from linear(f"{blk}.mlp.fc1", f"{out}/fc1")
  yield from linear(f"{blk}.mlp.fc2", f"{out}/fc2")


def clip_text_rules(prefix: str = "clip_pretrained.", dst: str = "text_encoder") -> Iterator[Rule]:
  """OpenAI CLIP's text tower (the LSeg `clip_pretrained.*` keys)."""
  yield Rule(f"{prefix}token_embedding.weight", f"params/{dst}/token_embedding/embedding")
  yield Rule(f"{prefix}positional_embedding", f"params/{dst}/positional_embedding")
  yield Rule(f"{prefix}text_projection", f"params/{dst}/text_projection")  # used as x @ P
  yield from layer_norm(f"{prefix}ln_final", f"{dst}/ln_final")
  blk, out = f"{prefix}transformer.resblocks.{{i}}", f"{dst}/resblocks_{{i}}"
  yield Rule(f"{blk}.attn.in_proj_weight", f"params/{out}/attn/qkv/kernel", _linear)
  yield Rule(f"{blk}.attn.in_proj_bias", f"params/{out}/attn/qkv/bias")
  yield from linear(f"{blk}.attn.out_proj", f"{out}/attn/proj")
  yield from layer_norm(f"{blk}.ln_1", f"{out}/norm1")
  yield from layer_norm(f"{blk}.ln_2", f"{out}/norm2")
  yield from linear(f"{blk}.mlp.c_fc", f"{out}/fc1")
  yield from linear(f"{blk}.mlp.c_proj", f"{out}/fc2")


def resnet_rules(dst: str = "backbone") -> Iterator[Rule]:
  """torchvision ResNet stages as LSeg's `_make_resnet_backbone` names them:
  `pretrained.layer1` = Sequential(conv1, bn1, relu, maxpool, layer1)."""
  yield from conv("pretrained.layer1.0", f"{dst}/conv1")
  yield from batch_norm("pretrained.layer1.1", f"{dst}/bn1")
  for stage in range(1, 5):
    src = f"pretrained.layer{stage}.4.{{i}}" if stage == 1 else f"pretrained.layer{stage}.{{i}}"
    out = f"{dst}/layer{stage}_{{i}}"
    for m in (1, 2, 3):
      yield from conv(f"{src}.conv{m}", f"{out}/conv{m}")
      yield from batch_norm(f"{src}.bn{m}", f"{out}/bn{m}")
    yield from conv(f"{src}.downsample.0", f"{out}/downsample_conv")
    yield from batch_norm(f"{src}.downsample.1", f"{out}/downsample_bn")


def reassemble_rules(config: ml_collections.ConfigDict) -> Iterator[Rule]:
  """`pretrained.act_postprocess{k}`: 0 readout, 3 the 1x1 conv, 4 the resampling,
  a transposed conv when upsampling and a strided conv when downsampling."""
  for k, stride in enumerate(LEVEL_STRIDES, start=1):
    src, out = f"pretrained.act_postprocess{k}", f"reassemble/level{k}"
    yield from linear(f"{src}.0.project.0", f"{out}/readout/project")
    yield from conv(f"{src}.3", f"{out}/proj")
    up = config.vit.patch_size > stride
    yield from conv(f"{src}.4", f"{out}/resample", _conv_transpose if up else _conv)


def decoder_rules() -> Iterator[Rule]:
  """The `scratch` decoder and head."""
  for k in range(1, 5):
    yield from conv(f"scratch.layer{k}_rn", f"fusion/layer{k}_rn")
  rcu, out = "scratch.refinenet{i}.resConfUnit{i}", "fusion/refinenet{i}/resConfUnit{i}"
  for m in (1, 2):
    yield from conv(f"{rcu}.conv{m}", f"{out}/conv{m}")
    yield from batch_norm(f"{rcu}.bn{m}", f"{out}/bn{m}")
  yield from conv("scratch.refinenet{i}.out_conv", "fusion/refinenet{i}/out_conv")
  yield from conv("scratch.head1", "head/head1")
  yield from conv("scratch.head_block.depthwise.depthwise", "head/head_block")


def lseg_rules(config: ml_collections.ConfigDict) -> list[Rule]:
  """Every rule of an official LSeg / LSeg-ZS state_dict for this model config."""
  rules = list(clip_text_rules()) + list(decoder_rules())
  if config.kind == "vit":
    rules += list(vit_rules()) + list(reassemble_rules(config))
  else:
    rules += list(resnet_rules())
  return rules


# Official keys that no forward pass reads (see the golden README): dropped.
UNUSED = re.compile(
    r"(clip_pretrained\.visual\..*|clip_pretrained\.logit_scale|pretrained\.model\.norm\..*"
    r"|pretrained\.model\.head\..*|scratch\.refinenet4\.resConfUnit1\..*"
    r"|.*\.num_batches_tracked)$")
