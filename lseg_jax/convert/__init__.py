"""Official LSeg weights -> Flax variables, and pre-trained towers for training.

`convert_lseg(state_dict, model_config)` takes a plain dict of numpy arrays in
the official names (a Lightning `.ckpt`'s `state_dict`, with or without its
`net.` prefix) and returns `{'params', 'batch_stats'}` for `build_model`.
Missing, unexpected and mis-shaped keys are errors naming the key; the keys no
forward pass reads (the CLIP image tower, the ViT's final norm and classifier,
`refinenet4.resConfUnit1`, `num_batches_tracked`) are dropped.

The paper's initialisation for training comes from `convert_vit_init` (timm
state dict or a big_vision/vit_jax AugReg `.npz`), `convert_resnet_init`
(torchvision ResNet-101) and `convert_clip_text` (OpenAI CLIP or HF
`CLIPModel` / `CLIPTextModelWithProjection` weights); each returns the part of
the variables it fills. The CLI is in `__main__.py`.
"""

from collections.abc import Iterable, Mapping
import os
import re
import zipfile
import zlib

import flax
import jax
import ml_collections
import numpy as np

from lseg_jax.checkpoint import short_reason
from lseg_jax.convert import rules as R
from lseg_jax.models import BACKBONES, OFFICIAL_BACKBONES, abstract_variables, get_model_config
from lseg_jax.models.presets import CLIP_TEXT

StateDict = Mapping[str, np.ndarray]


class ConversionError(ValueError):
  """A checkpoint that does not fit the model it is converted for."""


def _is_float(array: np.ndarray) -> bool:
  """Any floating dtype, bfloat16 (which numpy does not class as floating) included."""
  return bool(jax.numpy.issubdtype(array.dtype, jax.numpy.floating))


def _flat(tree: Mapping) -> dict[str, jax.ShapeDtypeStruct]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def convert(state_dict: StateDict, rules: Iterable[R.Rule], expected: Mapping,
            unused: re.Pattern = R.UNUSED) -> dict:
  """Fills the abstract variables `expected` from `state_dict` by `rules`."""
  rules = list(rules)
  targets = _flat(expected)
  out = {}
  for key, value in state_dict.items():
    if unused.match(key):
      continue
    found = next(((r, p) for r in rules if (p := r.forward(key)) is not None), None)
    if found is None:
      raise ConversionError(f"unexpected key {key!r}: no LSeg parameter has this name")
    rule, path = found
    if path not in targets:
      raise ConversionError(
          f"unexpected key {key!r}: the model config has no parameter {path} "
          "(another backbone, arch_option or hook set?)")
    value = np.asarray(value)
    if not _is_float(value):  # casting would turn a quantised or damaged tensor into wrong weights without a word
      raise ConversionError(f"key {key!r} holds {value.dtype} values where LSeg has a float parameter: a quantised "
                            "or damaged checkpoint? (convert the float checkpoint)")
    if not np.isfinite(value).all():
      bad = int(value.size - np.isfinite(value).sum())
      raise ConversionError(f"key {key!r} holds {bad} NaN/Inf values of {value.size}: a damaged checkpoint?")
    array = rule.transform(value)
    if array.shape != targets[path].shape:
      raise ConversionError(
          f"key {key!r} has shape {list(value.shape)} but {path} needs "
          f"{list(targets[path].shape)} in Flax layout: is this a checkpoint of another backbone?")
    out[path] = array.astype(targets[path].dtype)
  missing = [p for p in targets if p not in out]
  if missing:
    names = [found[0] if (found := R.official_name(rules, p)) else p for p in missing]
    raise ConversionError(f"{len(missing)} parameters missing from the checkpoint: {', '.join(names[:8])}"
                          + (", ..." if len(names) > 8 else ""))
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def strip_prefix(state_dict: StateDict, prefix: str = "net.") -> dict[str, np.ndarray]:
  """Lightning checkpoints prefix every key with the module attribute (`net.`)."""
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def infer_backbone(state_dict: StateDict) -> str:
  """The official `--backbone` name a state_dict was trained with, from shapes."""
  sd = strip_prefix(state_dict)
  text_width = sd["clip_pretrained.token_embedding.weight"].shape[1] if (
      "clip_pretrained.token_embedding.weight" in sd) else 512
  clip = next((name for name, c in CLIP_TEXT.items() if c["width"] == text_width and name != "tiny"), None)
  if "pretrained.layer1.0.weight" in sd:
    return "clip_resnet101"
  if "pretrained.model.patch_embed.proj.weight" in sd:
    width, _, patch, _ = sd["pretrained.model.patch_embed.proj.weight"].shape
    vit = {(1024, 16): "vitl16_384", (768, 32): "vitb32_384"}.get((width, patch))
    prefix = "clip" if clip == "ViT-B/32" else f"clip{clip}"
    name = f"{prefix}_{vit}"
    if vit and name in BACKBONES:
      return name
    raise ConversionError(f"no known backbone has a ViT of width {width} and patch {patch} "
                          f"with a text tower of width {text_width}")
  raise ConversionError("cannot tell the backbone: the state_dict has neither "
                        "'pretrained.model.patch_embed.proj.weight' nor 'pretrained.layer1.0.weight'")


def convert_lseg(state_dict: StateDict, config: ml_collections.ConfigDict) -> dict:
  """An official LSeg / LSeg-ZS state_dict -> {'params', 'batch_stats'}."""
  sd = strip_prefix(state_dict)
  try:
    found = infer_backbone(sd)
  except ConversionError:
    found = None  # not an official network: `convert` checks every key and shape
  if found and config.backbone in OFFICIAL_BACKBONES and found != config.backbone:
    raise ConversionError(f"the checkpoint holds a {found} network but the model config asks for "
                          f"{config.backbone}")
  has_block = "scratch.head_block.depthwise.depthwise.weight" in sd
  if has_block != bool(config.arch_option):
    raise ConversionError(
        f"the checkpoint {'has' if has_block else 'has no'} spatial regularisation block "
        f"(scratch.head_block) but the model config sets arch_option={config.arch_option}")
  return convert(sd, R.lseg_rules(config), abstract_variables(config))


def model_config_from_official(backbone: str, **official_args) -> ml_collections.ConfigDict:
  """Our model config from the official LSegNet arguments (backbone, features,
  readout, use_bn, arch_option, block_depth, activation, logit_scale)."""
  known = {"features", "readout", "use_bn", "arch_option", "block_depth", "activation", "logit_scale"}
  return get_model_config(backbone, **{k: v for k, v in official_args.items() if k in known})


def _subtree(config: ml_collections.ConfigDict, part: str) -> dict:
  abstract = abstract_variables(config)
  return {col: {part: tree[part]} for col, tree in abstract.items() if part in tree}


# --- pre-trained towers for training from the paper's initialisation ---------


def vit_npz_to_timm(npz: StateDict) -> dict[str, np.ndarray]:
  """big_vision / vit_jax checkpoint names and layouts -> timm state_dict."""
  sd = {"cls_token": npz["cls"], "pos_embed": npz["Transformer/posembed_input/pos_embedding"],
        "patch_embed.proj.weight": npz["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": npz["embedding/bias"]}
  width = npz["cls"].shape[-1]
  i = 0
  while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in npz:
    src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    attn = src + "MultiHeadDotProductAttention_1/"
    for j, ln in ((1, "LayerNorm_0"), (2, "LayerNorm_2")):
      sd[f"{dst}norm{j}.weight"] = npz[f"{src}{ln}/scale"]
      sd[f"{dst}norm{j}.bias"] = npz[f"{src}{ln}/bias"]
    sd[f"{dst}attn.qkv.weight"] = np.concatenate(
        [npz[f"{attn}{n}/kernel"].reshape(width, width).T for n in ("query", "key", "value")])
    sd[f"{dst}attn.qkv.bias"] = np.concatenate([npz[f"{attn}{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
    sd[f"{dst}attn.proj.weight"] = npz[f"{attn}out/kernel"].reshape(width, width).T
    sd[f"{dst}attn.proj.bias"] = npz[f"{attn}out/bias"]
    for j in (0, 1):
      sd[f"{dst}mlp.fc{j + 1}.weight"] = npz[f"{src}MlpBlock_3/Dense_{j}/kernel"].T
      sd[f"{dst}mlp.fc{j + 1}.bias"] = npz[f"{src}MlpBlock_3/Dense_{j}/bias"]
    i += 1
  return sd


def convert_vit_init(weights: StateDict, config: ml_collections.ConfigDict) -> dict:
  """timm ViT state_dict or big_vision AugReg .npz -> {'params': {'backbone'}}.

  Blocks after the last hook (none for the presets) and the classifier are dropped.
  """
  sd = vit_npz_to_timm(weights) if "Transformer/posembed_input/pos_embedding" in weights else dict(weights)
  last = max(config.vit.hooks)
  unused = re.compile(r"(norm\..*|fc_norm\..*|head\..*|pre_logits\..*"
                      + "".join(f"|blocks\\.{i}\\..*" for i in range(last + 1, last + 64)) + ")$")
  return convert(sd, R.vit_rules(prefix=""), _subtree(config, "backbone"), unused)


def torchvision_to_lseg_resnet(sd: StateDict) -> dict[str, np.ndarray]:
  """torchvision resnet101 names -> LSeg `pretrained.layerN` names."""
  out = {}
  for key, value in sd.items():
    key = re.sub(r"^conv1\.", "pretrained.layer1.0.", key)
    key = re.sub(r"^bn1\.", "pretrained.layer1.1.", key)
    key = re.sub(r"^layer1\.", "pretrained.layer1.4.", key)
    key = re.sub(r"^layer([234])\.", r"pretrained.layer\1.", key)
    out[key] = value
  return out


def convert_resnet_init(sd: StateDict, config: ml_collections.ConfigDict) -> dict:
  """torchvision ResNet-101 state_dict -> {'params', 'batch_stats': {'backbone'}}."""
  unused = re.compile(r"(fc\..*|.*\.num_batches_tracked)$")
  return convert(torchvision_to_lseg_resnet(sd), R.resnet_rules(), _subtree(config, "backbone"), unused)


def hf_clip_to_openai(sd: StateDict) -> dict[str, np.ndarray]:
  """HF CLIPModel / CLIPTextModelWithProjection names -> OpenAI CLIP names."""
  out = {}
  t = "text_model."
  for key, value in sd.items():
    if not (key.startswith(t) or key == "text_projection.weight"):
      continue  # the vision tower, logit_scale, ...
    if key == "text_projection.weight":
      out["text_projection"] = value.T  # Linear without bias: x @ W^T
    elif key == f"{t}embeddings.token_embedding.weight":
      out["token_embedding.weight"] = value
    elif key == f"{t}embeddings.position_embedding.weight":
      out["positional_embedding"] = value
    elif key.startswith(f"{t}final_layer_norm."):
      out["ln_final." + key.rsplit(".", 1)[1]] = value
    elif m := re.match(rf"{re.escape(t)}encoder\.layers\.(\d+)\.(.*)$", key):
      i, rest = m.groups()
      blk = f"transformer.resblocks.{i}."
      if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
        continue  # fused below
      rest = (rest.replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
              .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
      out[blk + rest] = value
    elif key.endswith("position_ids"):
      continue
    else:
      out[key] = value  # unknown: `convert` names it
  layers = {m.group(1) for k in sd if (m := re.match(rf"{re.escape(t)}encoder\.layers\.(\d+)\.", k))}
  for i in layers:
    attn = f"{t}encoder.layers.{i}.self_attn."
    for suffix, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
      out[f"transformer.resblocks.{i}.attn.{name}"] = np.concatenate(
          [sd[f"{attn}{p}_proj.{suffix}"] for p in ("q", "k", "v")])
  return out


def convert_clip_text(sd: StateDict, config: ml_collections.ConfigDict) -> dict:
  """OpenAI CLIP (with or without LSeg's `clip_pretrained.` prefix) or HF CLIP
  weights -> {'params': {'text_encoder'}}. The image tower is dropped."""
  if any(k.startswith("text_model.") for k in sd):
    sd = hf_clip_to_openai(sd)
  sd = {k.removeprefix("clip_pretrained."): v for k, v in strip_prefix(sd).items()}
  unused = re.compile(r"(visual\..*|logit_scale|input_resolution|context_length|vocab_size)$")
  return convert(sd, R.clip_text_rules(prefix=""), _subtree(config, "text_encoder"), unused)


# --- reading files -------------------------------------------------------------


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file's arrays (bfloat16 too: jax registers it with numpy)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except (SafetensorError, OSError, TypeError) as e:  # TypeError: a dtype numpy lacks
    raise ConversionError(f"cannot read {path} as safetensors ({short_reason(e)}): truncated, or another "
                          "format?") from None


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """An .npz archive's arrays; never unpickles (numpy would for object arrays)."""
  if not zipfile.is_zipfile(path):
    raise ConversionError(f"{path} is not an .npz archive (no zip directory): truncated, or another format?")
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
    why = "it holds pickled Python objects, not plain arrays" if "allow_pickle" in str(e) else short_reason(e)
    raise ConversionError(f"cannot read {path} as .npz: {why}") from None


def _read_torch(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch checkpoint (a Lightning `.ckpt`'s `state_dict`);
  only tensors are unpickled unless `allow_pickle`."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch: pip install 'lseg-jax[torch]' "
                      "(or convert it to .safetensors/.npz elsewhere)") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # torch's loaders raise many types: UnpicklingError, RuntimeError, EOFError, ...
    if not allow_pickle and "weights only load failed" in str(e).lower():
      raise ConversionError(f"{path} holds more than tensors ({short_reason(e)}); if you trust the file, pass "
                            "--allow_pickle") from None
    raise ConversionError(f"cannot read {path} as a PyTorch checkpoint ({short_reason(e)}): truncated or "
                          "another format?") from None
  for key in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state_dict")
  return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


READERS = {".safetensors": _read_safetensors, ".npz": _read_npz}
TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """A flat {name: float32 array} from .ckpt/.pth/.pt (torch), .safetensors or .npz;
  a file that cannot be read is a ConversionError naming it and why."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  suffix = os.path.splitext(path)[1]
  if suffix not in (*READERS, *TORCH_SUFFIXES):
    raise ConversionError(f"{path}: unknown checkpoint format (expected .ckpt, .pth, .pt, .bin, "
                          ".safetensors or .npz)")
  if not os.path.isfile(path):
    raise ConversionError(f"checkpoint {path} is not a file")
  if os.path.getsize(path) == 0:
    raise ConversionError(f"checkpoint {path} is empty")
  sd = READERS[suffix](path) if suffix in READERS else _read_torch(path, allow_pickle)
  return {k: (v.astype(np.float32) if _is_float(v) else v) for k, v in sd.items()}
