"""The converter against state_dicts written here in the official names and
PyTorch layouts (LSEG_REFERENCE.md section 2), from random Flax variables of the
tiny configs: converting them back must give the variables exactly. Bad files
and destinations give the command line one `error:` line and exit code 2."""

import json
from pathlib import Path
import pickle
import re
import sys

import flax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import checkpoint, convert as C
from lseg_jax.convert import __main__ as convert_cli
from lseg_jax.convert import rules as R
from lseg_jax.models import abstract_variables, get_model_config

# --- our own inverse mapping: Flax path -> official key, PyTorch layout -------------

# (Flax module path, official module name); the first full match wins.
VIT_MODULES = [
    (r"backbone/patch_embed", r"pretrained.model.patch_embed.proj"),
    (r"backbone/blocks_(\d+)/norm([12])", r"pretrained.model.blocks.\1.norm\2"),
    (r"backbone/blocks_(\d+)/attn/(qkv|proj)", r"pretrained.model.blocks.\1.attn.\2"),
    (r"backbone/blocks_(\d+)/fc([12])", r"pretrained.model.blocks.\1.mlp.fc\2"),
    (r"reassemble/level(\d)/readout/project", r"pretrained.act_postprocess\1.0.project.0"),
    (r"reassemble/level(\d)/proj", r"pretrained.act_postprocess\1.3"),
    (r"reassemble/level(\d)/resample", r"pretrained.act_postprocess\1.4"),
]
RESNET_MODULES = [
    (r"backbone/conv1", r"pretrained.layer1.0"),
    (r"backbone/bn1", r"pretrained.layer1.1"),
    (r"backbone/layer1_(\d+)/(conv|bn)(\d)", r"pretrained.layer1.4.\1.\2\3"),
    (r"backbone/layer1_(\d+)/downsample_conv", r"pretrained.layer1.4.\1.downsample.0"),
    (r"backbone/layer1_(\d+)/downsample_bn", r"pretrained.layer1.4.\1.downsample.1"),
    (r"backbone/layer([234])_(\d+)/(conv|bn)(\d)", r"pretrained.layer\1.\2.\3\4"),
    (r"backbone/layer([234])_(\d+)/downsample_conv", r"pretrained.layer\1.\2.downsample.0"),
    (r"backbone/layer([234])_(\d+)/downsample_bn", r"pretrained.layer\1.\2.downsample.1"),
]
COMMON_MODULES = [
    (r"fusion/layer(\d)_rn", r"scratch.layer\1_rn"),
    (r"fusion/refinenet(\d)/resConfUnit(\d)/(conv|bn)(\d)", r"scratch.refinenet\1.resConfUnit\2.\3\4"),
    (r"fusion/refinenet(\d)/out_conv", r"scratch.refinenet\1.out_conv"),
    (r"head/head1", r"scratch.head1"),
    (r"head/head_block", r"scratch.head_block.depthwise.depthwise"),
    (r"text_encoder/ln_final", r"clip_pretrained.ln_final"),
    (r"text_encoder/resblocks_(\d+)/norm([12])", r"clip_pretrained.transformer.resblocks.\1.ln_\2"),
    (r"text_encoder/resblocks_(\d+)/attn/proj", r"clip_pretrained.transformer.resblocks.\1.attn.out_proj"),
    (r"text_encoder/resblocks_(\d+)/fc1", r"clip_pretrained.transformer.resblocks.\1.mlp.c_fc"),
    (r"text_encoder/resblocks_(\d+)/fc2", r"clip_pretrained.transformer.resblocks.\1.mlp.c_proj"),
]
# whole parameters with their own names
SPECIAL = {
    "backbone/cls_token": "pretrained.model.cls_token",
    "backbone/pos_embed": "pretrained.model.pos_embed",
    "text_encoder/token_embedding/embedding": "clip_pretrained.token_embedding.weight",
    "text_encoder/positional_embedding": "clip_pretrained.positional_embedding",
    "text_encoder/text_projection": "clip_pretrained.text_projection",  # used as x @ P: no transpose
}
LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# tiny ViT (patch 16): levels 1 and 2 upsample with a transposed conv, level 4 is a strided conv
CONV_TRANSPOSE = re.compile(r"reassemble/level[12]/resample")


def official_key(path: str, kind: str) -> str:
  if path in SPECIAL:
    return SPECIAL[path]
  m = re.fullmatch(r"text_encoder/resblocks_(\d+)/attn/qkv/(kernel|bias)", path)
  if m:  # nn.MultiheadAttention's fused input projection
    return f"clip_pretrained.transformer.resblocks.{m[1]}.attn.in_proj_{'weight' if m[2] == 'kernel' else 'bias'}"
  module, leaf = path.rsplit("/", 1)
  for pattern, name in (VIT_MODULES if kind == "vit" else RESNET_MODULES) + COMMON_MODULES:
    if re.fullmatch(pattern, module):
      return re.sub(pattern, name, module) + "." + LEAF[leaf]
  raise KeyError(path)


def torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  if path.endswith("/kernel") and value.ndim == 2:
    return value.T  # Dense [in, out] -> Linear [out, in]
  if path.endswith("/kernel") and value.ndim == 4:
    if CONV_TRANSPOSE.search(path):
      return value.transpose(2, 3, 0, 1)  # [kh, kw, I, O] -> ConvTranspose2d [I, O, kh, kw]
    return value.transpose(3, 2, 0, 1)  # [kh, kw, I, O] -> Conv2d [O, I, kh, kw]
  return value


def flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def random_variables(config, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  leaves = {k: rng.standard_normal(v.shape).astype(np.float32)
            for k, v in flax.traverse_util.flatten_dict(abstract_variables(config)).items()}
  return flax.traverse_util.unflatten_dict(leaves)


def official_state_dict(variables, kind: str) -> dict[str, np.ndarray]:
  sd = {}
  for path, value in flat(variables).items():
    _, rest = path.split("/", 1)  # params/..., batch_stats/...
    sd[official_key(rest, kind)] = torch_layout(rest, value)
  for key in list(sd):  # BatchNorm2d also stores a counter
    if key.endswith(".running_mean"):
      sd[key.replace(".running_mean", ".num_batches_tracked")] = np.array(7, np.int64)
  return sd


UNUSED_KEYS = {
    "clip_pretrained.visual.conv1.weight": np.ones((4, 3, 2, 2), np.float16),
    "clip_pretrained.visual.transformer.resblocks.0.attn.in_proj_weight": np.ones((6, 2), np.float16),
    "clip_pretrained.logit_scale": np.array(4.6052, np.float32),
    "pretrained.model.norm.weight": np.ones(32, np.float32),
    "pretrained.model.norm.bias": np.ones(32, np.float32),
    "pretrained.model.head.weight": np.ones((10, 32), np.float32),
    "pretrained.model.head.bias": np.ones(10, np.float32),
    "scratch.refinenet4.resConfUnit1.conv1.weight": np.ones((16, 16, 3, 3), np.float32),
    "scratch.refinenet4.resConfUnit1.bn1.running_mean": np.ones(16, np.float32),
    "scratch.refinenet4.resConfUnit1.bn1.num_batches_tracked": np.array(0, np.int64),
}


def assert_same_variables(got, expected):
  got, expected = flat(got), flat(expected)
  assert got.keys() == expected.keys()
  for k in expected:
    assert got[k].dtype == np.float32, k
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


@pytest.fixture(scope="module", params=["tiny", "tiny_resnet"])
def tiny(request):
  config = get_model_config(request.param, arch_option=1, block_depth=2)
  variables = random_variables(config)
  return config, variables, official_state_dict(variables, config.kind)


@pytest.fixture(scope="module")
def tiny_vit():
  config = get_model_config("tiny", arch_option=2)
  variables = random_variables(config, seed=1)
  return config, variables, official_state_dict(variables, "vit")


# --- round trips --------------------------------------------------------------


def test_official_names_match_the_documented_table(tiny_vit):
  _, _, sd = tiny_vit
  for key, shape in [("pretrained.act_postprocess1.0.project.0.weight", (32, 64)),
                     ("pretrained.act_postprocess1.4.weight", (8, 8, 4, 4)),  # ConvT [in, out, k, k]
                     ("pretrained.act_postprocess4.4.weight", (32, 32, 3, 3)),
                     ("pretrained.model.blocks.3.attn.qkv.weight", (96, 32)),
                     ("scratch.layer4_rn.weight", (16, 32, 3, 3)),
                     ("scratch.head_block.depthwise.depthwise.weight", (1, 1, 3, 3)),
                     ("clip_pretrained.transformer.resblocks.1.attn.in_proj_weight", (96, 32)),
                     ("clip_pretrained.text_projection", (32, 32))]:
    assert sd[key].shape == shape, key
  assert "pretrained.act_postprocess3.4.weight" not in sd  # level 3 does not resample


def test_rules_round_trip(tiny):
  config, variables, sd = tiny
  out = C.convert(sd, R.lseg_rules(config), abstract_variables(config))
  assert_same_variables(out, variables)


def test_convert_lseg_round_trip(tiny):
  config, variables, sd = tiny
  assert_same_variables(C.convert_lseg(sd, config), variables)


def test_convert_lseg_round_trip_with_net_prefix_and_unused_keys(tiny):
  config, variables, sd = tiny
  ckpt = {f"net.{k}": v for k, v in {**sd, **UNUSED_KEYS}.items()}
  assert_same_variables(C.convert_lseg(ckpt, config), variables)


def test_float16_weights_become_float32(tiny_vit):
  config, variables, sd = tiny_vit
  half = {k: (v.astype(np.float16) if k.startswith("clip_pretrained.") else v) for k, v in sd.items()}
  out = flat(C.convert_lseg(half, config))
  key = "params/text_encoder/resblocks_0/attn/qkv/kernel"
  assert out[key].dtype == np.float32
  np.testing.assert_array_equal(out[key], flat(variables)[key].astype(np.float16).astype(np.float32))


# --- errors ---------------------------------------------------------------------


def test_unknown_key_is_named(tiny_vit):
  config, _, sd = tiny_vit
  with pytest.raises(C.ConversionError, match=re.escape("'scratch.head2.weight'")):
    C.convert_lseg({**sd, "scratch.head2.weight": np.zeros((1,), np.float32)}, config)
  # a block the config does not have: a known name, but no parameter for it
  with pytest.raises(C.ConversionError, match=re.escape("'pretrained.model.blocks.7.norm1.weight'")):
    C.convert_lseg({**sd, "pretrained.model.blocks.7.norm1.weight": np.zeros(32, np.float32)}, config)


@pytest.mark.parametrize("key", ["scratch.refinenet2.resConfUnit1.bn2.running_var",
                                 "clip_pretrained.transformer.resblocks.1.attn.in_proj_weight",
                                 "pretrained.act_postprocess1.4.weight",
                                 "pretrained.model.pos_embed"])
def test_missing_key_is_named_in_official_terms(tiny_vit, key):
  config, _, sd = tiny_vit
  sd = dict(sd)
  del sd[key]
  with pytest.raises(C.ConversionError, match=r"1 parameters? missing.*" + re.escape(key)):
    C.convert_lseg(sd, config)


def test_wrong_shape_is_named(tiny_vit):
  config, _, sd = tiny_vit
  with pytest.raises(C.ConversionError, match=re.escape("'scratch.head1.weight' has shape [32, 16, 1, 2]")):
    C.convert_lseg({**sd, "scratch.head1.weight": np.zeros((32, 16, 1, 2), np.float32)}, config)
  # a square Linear is fine either way round, a transposed rectangular one is not
  bad = sd["pretrained.act_postprocess2.0.project.0.weight"].T
  with pytest.raises(C.ConversionError, match=re.escape("pretrained.act_postprocess2.0.project.0.weight")):
    C.convert_lseg({**sd, "pretrained.act_postprocess2.0.project.0.weight": bad}, config)


def test_checkpoint_of_another_backbone_is_an_error(tiny):
  config, _, sd = tiny
  other = get_model_config("tiny_resnet" if config.kind == "vit" else "tiny", arch_option=config.arch_option,
                           block_depth=config.block_depth)
  with pytest.raises(C.ConversionError, match=r"resnet|pretrained\.layer|pretrained\.model|ViT"):
    C.convert_lseg(sd, other)


def test_vit_with_another_patch_is_an_error(tiny_vit):
  config, _, sd = tiny_vit
  sd = {**sd, "pretrained.model.patch_embed.proj.weight": np.zeros((32, 3, 8, 8), np.float32),
        "pretrained.model.pos_embed": np.zeros((1, 257, 32), np.float32)}
  with pytest.raises(C.ConversionError, match="patch"):
    C.convert_lseg(sd, config)


def test_vitb32_checkpoint_into_vitl16_config_is_an_error():
  sd = {"pretrained.model.patch_embed.proj.weight": np.broadcast_to(np.float16(0), (768, 3, 32, 32)),
        "clip_pretrained.token_embedding.weight": np.broadcast_to(np.float16(0), (49408, 512))}
  with pytest.raises(C.ConversionError, match="clip_vitb32_384.*clip_vitl16_384"):
    C.convert_lseg(sd, get_model_config("clip_vitl16_384"))


def test_head_block_must_agree_with_arch_option(tiny_vit):
  config, _, sd = tiny_vit  # arch_option=2, with head_block
  with pytest.raises(C.ConversionError, match=r"head_block.*arch_option=0"):
    C.convert_lseg(sd, get_model_config("tiny"))
  no_block = {k: v for k, v in sd.items() if not k.startswith("scratch.head_block.")}
  with pytest.raises(C.ConversionError, match=r"no spatial regularisation.*arch_option=2"):
    C.convert_lseg(no_block, config)


# --- infer_backbone -------------------------------------------------------------


def zeros(*shape):
  return np.broadcast_to(np.float16(0), shape)  # no memory behind it


@pytest.mark.parametrize("sd,expected", [
    ({"pretrained.model.patch_embed.proj.weight": zeros(1024, 3, 16, 16),
      "clip_pretrained.token_embedding.weight": zeros(49408, 512)}, "clip_vitl16_384"),
    ({"net.pretrained.model.patch_embed.proj.weight": zeros(1024, 3, 16, 16),
      "net.clip_pretrained.token_embedding.weight": zeros(49408, 512)}, "clip_vitl16_384"),
    ({"pretrained.model.patch_embed.proj.weight": zeros(768, 3, 32, 32),
      "clip_pretrained.token_embedding.weight": zeros(49408, 512)}, "clip_vitb32_384"),
    ({"pretrained.model.patch_embed.proj.weight": zeros(1024, 3, 16, 16),
      "clip_pretrained.token_embedding.weight": zeros(49408, 768)}, "clipRN50x16_vitl16_384"),
    ({"pretrained.layer1.0.weight": zeros(64, 3, 7, 7),
      "scratch.layer4_rn.weight": zeros(256, 2048, 3, 3),
      "clip_pretrained.token_embedding.weight": zeros(49408, 512)}, "clip_resnet101"),
])
def test_infer_backbone(sd, expected):
  assert C.infer_backbone(sd) == expected


def test_infer_backbone_errors():
  with pytest.raises(C.ConversionError, match="width 512 and patch 8"):
    C.infer_backbone({"pretrained.model.patch_embed.proj.weight": zeros(512, 3, 8, 8)})
  with pytest.raises(C.ConversionError, match="cannot tell the backbone"):
    C.infer_backbone({"scratch.head1.weight": zeros(512, 256, 1, 1)})


# --- pre-trained towers -----------------------------------------------------------


def backbone_params(variables) -> dict:
  return {"params": {"backbone": variables["params"]["backbone"]}}


def big_vision_npz(variables, heads: int) -> dict[str, np.ndarray]:
  """The tiny ViT's parameters in big_vision / vit_jax AugReg names and layouts."""
  p = variables["params"]["backbone"]
  width = p["cls_token"].shape[-1]
  hd = width // heads
  npz = {"cls": p["cls_token"], "Transformer/posembed_input/pos_embedding": p["pos_embed"],
         "embedding/kernel": p["patch_embed"]["kernel"], "embedding/bias": p["patch_embed"]["bias"],
         "Transformer/encoder_norm/scale": np.ones(width, np.float32),
         "Transformer/encoder_norm/bias": np.zeros(width, np.float32),
         "head/kernel": np.ones((width, 10), np.float32), "head/bias": np.zeros(10, np.float32)}
  i = 0
  while f"blocks_{i}" in p:
    blk, src = p[f"blocks_{i}"], f"Transformer/encoderblock_{i}/"
    for flax_ln, bv_ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      npz[f"{src}{bv_ln}/scale"] = blk[flax_ln]["scale"]
      npz[f"{src}{bv_ln}/bias"] = blk[flax_ln]["bias"]
    attn = src + "MultiHeadDotProductAttention_1/"
    for j, name in enumerate(("query", "key", "value")):
      cols = slice(j * width, (j + 1) * width)
      npz[f"{attn}{name}/kernel"] = blk["attn"]["qkv"]["kernel"][:, cols].reshape(width, heads, hd)
      npz[f"{attn}{name}/bias"] = blk["attn"]["qkv"]["bias"][cols].reshape(heads, hd)
    npz[f"{attn}out/kernel"] = blk["attn"]["proj"]["kernel"].reshape(heads, hd, width)
    npz[f"{attn}out/bias"] = blk["attn"]["proj"]["bias"]
    for j, fc in enumerate(("fc1", "fc2")):
      npz[f"{src}MlpBlock_3/Dense_{j}/kernel"] = blk[fc]["kernel"]
      npz[f"{src}MlpBlock_3/Dense_{j}/bias"] = blk[fc]["bias"]
    i += 1
  return npz


def test_convert_vit_init_from_big_vision_npz(tiny_vit):
  config, variables, _ = tiny_vit
  npz = big_vision_npz(variables, config.vit.num_heads)
  assert_same_variables(C.convert_vit_init(npz, config), backbone_params(variables))


def test_vit_npz_to_timm_layouts(tiny_vit):
  config, variables, sd = tiny_vit
  timm = C.vit_npz_to_timm(big_vision_npz(variables, config.vit.num_heads))
  for key, value in timm.items():  # the LSeg checkpoint holds the same timm tensors
    np.testing.assert_array_equal(value, sd[f"pretrained.model.{key}"], err_msg=key)
  assert len(timm) == 4 + 12 * 4


def test_convert_vit_init_from_timm_state_dict(tiny_vit):
  config, variables, sd = tiny_vit
  timm = {k.removeprefix("pretrained.model."): v for k, v in sd.items() if k.startswith("pretrained.model.")}
  extra = {"norm.weight": np.ones(32, np.float32), "norm.bias": np.zeros(32, np.float32),
           "head.weight": np.ones((10, 32), np.float32), "head.bias": np.zeros(10, np.float32),
           "blocks.4.norm1.weight": np.ones(32, np.float32),  # after the last hook: dropped
           "blocks.11.mlp.fc2.bias": np.ones(32, np.float32)}
  assert_same_variables(C.convert_vit_init({**timm, **extra}, config), backbone_params(variables))
  del timm["blocks.2.attn.qkv.bias"]
  with pytest.raises(C.ConversionError, match=re.escape("blocks.2.attn.qkv.bias")):
    C.convert_vit_init(timm, config)


def text_params(variables) -> dict:
  return {"params": {"text_encoder": variables["params"]["text_encoder"]}}


def hf_clip_state_dict(variables) -> dict[str, np.ndarray]:
  """The tiny text tower in HF `CLIPModel` names (Linear weights [out, in])."""
  p = variables["params"]["text_encoder"]
  width = p["ln_final"]["scale"].shape[0]
  t = "text_model."
  sd = {f"{t}embeddings.token_embedding.weight": p["token_embedding"]["embedding"],
        f"{t}embeddings.position_embedding.weight": p["positional_embedding"],
        f"{t}embeddings.position_ids": np.arange(77, dtype=np.int64)[None],
        f"{t}final_layer_norm.weight": p["ln_final"]["scale"], f"{t}final_layer_norm.bias": p["ln_final"]["bias"],
        "text_projection.weight": p["text_projection"].T,  # Linear(bias=False): x @ W.T, so P = W.T
        "visual_projection.weight": np.ones((8, 4), np.float32),
        "vision_model.embeddings.class_embedding": np.ones(4, np.float32),
        "logit_scale": np.array(4.6, np.float32)}
  i = 0
  while f"resblocks_{i}" in p:
    blk, layer = p[f"resblocks_{i}"], f"{t}encoder.layers.{i}."
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
      cols = slice(j * width, (j + 1) * width)
      sd[f"{layer}self_attn.{name}.weight"] = blk["attn"]["qkv"]["kernel"][:, cols].T
      sd[f"{layer}self_attn.{name}.bias"] = blk["attn"]["qkv"]["bias"][cols]
    for flax_name, hf in (("attn/proj", "self_attn.out_proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
      module = blk
      for part in flax_name.split("/"):
        module = module[part]
      sd[f"{layer}{hf}.weight"] = module["kernel"].T
      sd[f"{layer}{hf}.bias"] = module["bias"]
    for flax_ln, hf in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
      sd[f"{layer}{hf}.weight"] = blk[flax_ln]["scale"]
      sd[f"{layer}{hf}.bias"] = blk[flax_ln]["bias"]
    i += 1
  return sd


def test_convert_clip_text_from_hf_names(tiny_vit):
  config, variables, _ = tiny_vit
  out = C.convert_clip_text(hf_clip_state_dict(variables), config)
  assert_same_variables(out, text_params(variables))


@pytest.mark.parametrize("prefix", ["", "clip_pretrained.", "net.clip_pretrained."])
def test_convert_clip_text_from_openai_names(tiny_vit, prefix):
  config, variables, sd = tiny_vit
  openai = {prefix + k.removeprefix("clip_pretrained."): v for k, v in sd.items()
            if k.startswith("clip_pretrained.")}
  openai[prefix + "visual.proj"] = np.ones((4, 32), np.float16)
  openai[prefix + "logit_scale"] = np.array(4.6, np.float32)
  assert_same_variables(C.convert_clip_text(openai, config), text_params(variables))


def test_convert_resnet_init_from_torchvision_names():
  config = get_model_config("tiny_resnet")
  variables = random_variables(config, seed=2)
  lseg = official_state_dict(variables, "resnet")
  torchvision = {}
  for key, value in lseg.items():  # written from torchvision's own names
    m = re.fullmatch(r"pretrained\.layer(\d)\.(?:4\.)?(\d+)\.(.*)", key)
    if key.startswith("pretrained.layer1.0."):
      torchvision["conv1." + key.rsplit(".", 1)[1]] = value
    elif key.startswith("pretrained.layer1.1."):
      torchvision["bn1." + key.rsplit(".", 1)[1]] = value
    elif m:
      torchvision[f"layer{m[1]}.{m[2]}.{m[3]}"] = value
  assert "layer1.0.downsample.0.weight" in torchvision and "bn1.running_var" in torchvision
  torchvision["fc.weight"] = np.ones((1000, 128), np.float32)
  torchvision["fc.bias"] = np.ones(1000, np.float32)
  expected = {col: {"backbone": variables[col]["backbone"]} for col in ("params", "batch_stats")}
  assert_same_variables(C.convert_resnet_init(torchvision, config), expected)


# --- files --------------------------------------------------------------------------


def test_load_state_dict_npz(tmp_path):
  path = tmp_path / "weights.npz"
  np.savez(path, **{"a.weight": np.arange(6, dtype=np.float16).reshape(2, 3),
                    "b.num_batches_tracked": np.array(3, np.int64)})
  sd = C.load_state_dict(path)
  assert sd["a.weight"].dtype == np.float32 and sd["b.num_batches_tracked"].dtype == np.int64
  np.testing.assert_array_equal(sd["a.weight"], np.arange(6).reshape(2, 3))
  assert int(sd["b.num_batches_tracked"]) == 3


def test_load_state_dict_safetensors(tmp_path):
  from safetensors.numpy import save_file
  path = tmp_path / "weights.safetensors"
  w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float16)
  save_file({"scratch.head1.weight": w, "scratch.head1.bias": np.ones(3, np.float32)}, str(path))
  sd = C.load_state_dict(str(path))
  assert set(sd) == {"scratch.head1.weight", "scratch.head1.bias"}
  assert sd["scratch.head1.weight"].dtype == np.float32
  np.testing.assert_array_equal(sd["scratch.head1.weight"], w.astype(np.float32))


def test_load_state_dict_round_trips_a_checkpoint(tmp_path, tiny_vit):
  config, variables, sd = tiny_vit
  path = tmp_path / "lseg.npz"
  np.savez(path, **{f"net.{k}": v for k, v in sd.items()})
  assert_same_variables(C.convert_lseg(C.load_state_dict(path), config), variables)


def test_load_state_dict_errors(tmp_path, monkeypatch):
  missing = tmp_path / "nope.safetensors"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    C.load_state_dict(missing)
  odd = tmp_path / "weights.h5"
  odd.write_bytes(b"\0")
  with pytest.raises(C.ConversionError, match="unknown checkpoint format"):
    C.load_state_dict(odd)
  ckpt = tmp_path / "demo.ckpt"
  ckpt.write_bytes(b"\0")
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as on a machine without PyTorch
  with pytest.raises(ImportError, match="needs PyTorch"):
    C.load_state_dict(ckpt)


def test_load_state_dict_reads_bfloat16_safetensors_as_float32(tmp_path):
  from safetensors.numpy import save_file
  path = tmp_path / "bf16.safetensors"
  save_file({"w": np.array([1.5, -2.0], np.float32).astype(jnp.bfloat16)}, str(path))
  sd = C.load_state_dict(path)
  assert sd["w"].dtype == np.float32
  np.testing.assert_array_equal(sd["w"], [1.5, -2.0])


# --- the command line: python -m lseg_jax.convert ------------------------------------


def test_cli_writes_a_model_directory_that_loads(tiny_vit, tmp_path, capsys):
  config, variables, sd = tiny_vit
  np.savez(tmp_path / "lseg.npz", **{f"net.{k}": v for k, v in sd.items()})
  rc = convert_cli.main([str(tmp_path / "lseg.npz"), str(tmp_path / "model"), "--backbone", "tiny",
                         "--arch_option", "2"])
  assert rc == 0 and f"wrote {tmp_path / 'model'} (tiny, " in capsys.readouterr().out
  loaded_config, loaded = checkpoint.load_model(tmp_path / "model")
  assert json.loads(loaded_config.to_json()) == json.loads(config.to_json())
  assert_same_variables(loaded, variables)


class FakeTorch:
  """`torch.load` raising what PyTorch raises for a file (torch is an optional dependency)."""

  def __init__(self, error: Exception):
    self.error = error

  def load(self, *_, **__):
    raise self.error


def bad_convert_input(case: str, tmp: Path, sd: dict) -> tuple[list[str], str, FakeTorch | None]:
  """(arguments, what the error line must say, torch stand-in) for one bad input; files in `tmp`."""
  good = tmp / "good.npz"
  np.savez(good, **sd)
  npz_bytes = good.read_bytes()
  src, dst, extra, torch = good, tmp / "model", [], None
  if case == "missing_src":
    src = tmp / "nope.npz"
  elif case in ("truncated_npz", "garbage_npz", "npy_named_npz", "empty_npz"):
    src = tmp / f"{case}.npz"
    src.write_bytes({"truncated_npz": npz_bytes[: len(npz_bytes) // 2], "garbage_npz": b"\x93NUMPY garbage" * 9,
                     "npy_named_npz": b"", "empty_npz": b""}[case])
    if case == "npy_named_npz":
      np.save(tmp / "a.npy", np.ones(3, np.float32))
      (tmp / "a.npy").rename(src)
  elif case == "object_array_npz":
    src = tmp / "objects.npz"
    np.savez(src, **{"scratch.head1.bias": np.array([{"a": 1}], dtype=object)})
  elif case in ("truncated_safetensors", "garbage_safetensors"):
    from safetensors.numpy import save_file
    src = tmp / f"{case}.safetensors"
    save_file(sd, str(src))
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2] if case == "truncated_safetensors" else b"garbage" * 9)
  elif case == "unknown_format":
    src = tmp / "weights.h5"
    src.write_bytes(b"\0")
  elif case == "nan_weight":
    src = tmp / "nan.npz"
    np.savez(src, **{**sd, "scratch.head1.weight": np.full_like(sd["scratch.head1.weight"], np.nan)})
  elif case == "integer_weight":
    src = tmp / "int8.npz"
    np.savez(src, **{**sd, "scratch.head1.weight": np.ones_like(sd["scratch.head1.weight"], np.int8)})
  elif case in ("torch_pickled_objects", "torch_truncated"):
    src = tmp / "lseg.ckpt"
    src.write_bytes(b"PK\x03\x04 not really")
    torch = FakeTorch(pickle.UnpicklingError("Weights only load failed.")
                      if case == "torch_pickled_objects" else
                      RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"))
  elif case == "dst_is_a_file":
    dst = good
  elif case == "dst_under_a_file":
    dst = good / "model"
  elif case == "dst_exists":
    dst.mkdir()
  elif case == "overwrite_a_foreign_directory":
    dst = tmp / "photos"
    dst.mkdir()
    (dst / "holiday.jpg").write_bytes(b"precious")
    extra = ["--overwrite"]
  elif case == "bad_arch_option":
    extra = ["--arch_option", "9"]
  expected = {
      "missing_src": f"checkpoint {src} does not exist",
      "truncated_npz": f"{src} is not an .npz archive",
      "garbage_npz": f"{src} is not an .npz archive",
      "npy_named_npz": f"{src} is not an .npz archive",
      "empty_npz": f"checkpoint {src} is empty",
      "object_array_npz": f"cannot read {src} as .npz: it holds pickled Python objects",
      "truncated_safetensors": f"cannot read {src} as safetensors (SafetensorError",
      "garbage_safetensors": f"cannot read {src} as safetensors (SafetensorError",
      "unknown_format": f"{src}: unknown checkpoint format",
      "nan_weight": "key 'scratch.head1.weight' holds 512 NaN/Inf values of 512",
      "integer_weight": "key 'scratch.head1.weight' holds int8 values where LSeg has a float parameter",
      "torch_pickled_objects": f"{src} holds more than tensors (UnpicklingError: Weights only load failed.); "
                               "if you trust the file, pass --allow_pickle",
      "torch_truncated": f"cannot read {src} as a PyTorch checkpoint (RuntimeError: PytorchStreamReader",
      "dst_is_a_file": f"{good} is a file, not a model directory",
      "dst_under_a_file": f"cannot create {good / 'model'}: {good} is a file, not a directory",
      "dst_exists": f"{dst} already exists; choose another destination or pass --overwrite",
      "overwrite_a_foreign_directory": f"{dst} is a non-empty directory without model_config.json; refusing",
      "bad_arch_option": "argument --arch_option: invalid choice: 9",
  }[case]
  return [str(src), str(dst), "--backbone", "tiny", "--arch_option", "2", *extra], expected, torch


@pytest.mark.parametrize("case", [
    "missing_src", "truncated_npz", "garbage_npz", "npy_named_npz", "empty_npz", "object_array_npz",
    "truncated_safetensors", "garbage_safetensors", "unknown_format", "nan_weight", "integer_weight",
    "torch_pickled_objects", "torch_truncated", "dst_is_a_file", "dst_under_a_file", "dst_exists", "overwrite_a_foreign_directory",
    "bad_arch_option"])
def test_cli_bad_input_is_one_line_and_exit_2(case, tiny_vit, tmp_path, monkeypatch, capsys):
  _, _, sd = tiny_vit
  args, expected, torch = bad_convert_input(case, tmp_path, sd)
  if torch:
    monkeypatch.setitem(sys.modules, "torch", torch)
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  assert convert_cli.main(args) == 2
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  assert out == "" and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written or removed
