"""Model parts and the tiny LSeg network against numpy references of the
official PyTorch semantics (LSEG_REFERENCE.md sections 1 and 8)."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax.models import abstract_variables, build_model, get_model_config
from lseg_jax.models.clip_text import CLIPTextEncoder
from lseg_jax.models.dpt import Readout
from lseg_jax.models.lseg import SpatialRegularization
from lseg_jax.models.transformer import MultiHeadAttention
from lseg_jax.models.vit import ViT, resize_pos_embed

RNG = np.random.default_rng(0)
EOT = 49407


# --- numpy references ----------------------------------------------------------


def torch_interp_weights(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """[n_out, n_in] weights of F.interpolate(mode='bilinear', size=...) along one axis."""
  w = np.zeros((n_out, n_in))
  for o in range(n_out):
    if align_corners:
      src = o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
      src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = int(src)
    i1 = i0 + 1 if i0 < n_in - 1 else i0
    w[o, i0] += 1 - (src - i0)
    w[o, i1] += src - i0
  return w


def torch_resize(x: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
  """Bilinear resize of [B, H, W, C] (separable, as F.interpolate's 4-point lerp)."""
  wh = torch_interp_weights(x.shape[1], size[0], align_corners)
  ww = torch_interp_weights(x.shape[2], size[1], align_corners)
  return np.einsum("oh,pw,bhwc->bopc", wh, ww, x)


def np_gelu(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def random_variables(config, seed: int = 0) -> dict:
  """Every variable of `config` filled like the golden weight recipe: weights
  0.02 N(0, 1), norm scales 1 + 0.02 N(0, 1), running variances U(0.5, 1.5)."""
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    if path[-1] == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if path[-1] == "scale":
      return (1 + 0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)
  flat = flax.traverse_util.flatten_dict(abstract_variables(config))
  return flax.traverse_util.unflatten_dict({k: fill(k, v) for k, v in flat.items()})


# --- position embedding --------------------------------------------------------


def test_resize_pos_embed_identity_at_pretrain_grid():
  pos = RNG.standard_normal((1, 65, 4)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(resize_pos_embed(jnp.asarray(pos), (8, 8))), pos)


@pytest.mark.parametrize("grid", [(6, 10), (12, 4), (3, 3)])
def test_resize_pos_embed_half_pixel_non_square(grid):
  pos = RNG.standard_normal((1, 65, 4)).astype(np.float32)
  out = np.asarray(resize_pos_embed(jnp.asarray(pos), grid))
  assert out.shape == (1, 1 + grid[0] * grid[1], 4)
  np.testing.assert_array_equal(out[:, 0], pos[:, 0])  # the cls row is kept as is
  # the grid is (8, 8) row-major, resized as an image with align_corners=False
  ref = torch_resize(pos[:, 1:].reshape(1, 8, 8, 4), grid, align_corners=False)
  np.testing.assert_allclose(out[:, 1:], ref.reshape(1, -1, 4), atol=2e-6)
  wrong = torch_resize(pos[:, 1:].reshape(1, 8, 8, 4), grid, align_corners=True)
  assert np.abs(out[:, 1:] - wrong.reshape(1, -1, 4)).max() > 1e-3


# --- readout --------------------------------------------------------------------


def test_readout_ignore_and_add():
  tokens = RNG.standard_normal((2, 7, 4)).astype(np.float32)
  ignore = Readout("ignore").apply({}, jnp.asarray(tokens))
  add = Readout("add").apply({}, jnp.asarray(tokens))
  np.testing.assert_array_equal(np.asarray(ignore), tokens[:, 1:])
  np.testing.assert_allclose(np.asarray(add), tokens[:, 1:] + tokens[:, :1], atol=1e-7)


def test_readout_project_concatenates_patch_first():
  c = 4
  tokens = RNG.standard_normal((2, 7, c)).astype(np.float32)
  w_torch = RNG.standard_normal((c, 2 * c)).astype(np.float32)  # Linear(2C -> C) weight [out, in]
  b = RNG.standard_normal((c,)).astype(np.float32)
  out = Readout("project").apply({"params": {"project": {"kernel": w_torch.T, "bias": b}}}, jnp.asarray(tokens))
  patch, cls = tokens[:, 1:].astype(np.float64), tokens[:, :1].astype(np.float64)
  # weight[:, :C] multiplies the patch token, weight[:, C:] the cls token
  ref = np_gelu(patch @ w_torch[:, :c].T + cls @ w_torch[:, c:].T + b)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  swapped = np_gelu(cls @ w_torch[:, :c].T + patch @ w_torch[:, c:].T + b)
  assert np.abs(np.asarray(out) - swapped).max() > 1e-2


# --- spatial regularisation ----------------------------------------------------

NP_ACTS = {"relu": lambda y: np.maximum(y, 0), "lrelu": lambda y: np.where(y > 0, y, 0.01 * y), "tanh": np.tanh}


def shared_conv3x3(x: np.ndarray, k: np.ndarray, bias: float) -> np.ndarray:
  """torch Conv2d(1, 1, 3, padding=1) on every label channel of [B, H, W, N]."""
  b, h, w, n = x.shape
  out = np.zeros_like(x)
  for bi in range(b):
    for ni in range(n):
      img = np.pad(x[bi, :, :, ni], 1)
      for i in range(h):
        for j in range(w):
          out[bi, i, j, ni] = np.sum(img[i:i + 3, j:j + 3] * k) + bias
  return out


def spatial_reference(x, k, bias, arch_option, block_depth, activation):
  def block(y, act):
    out = shared_conv3x3(y, k, bias)
    if arch_option == 1:
      out = out + y.max(axis=-1, keepdims=True)  # max over labels of the block's input
    return NP_ACTS[activation](out) if act else out
  for _ in range(block_depth - 1):
    x = block(x, True)
  return block(x, False)


def spatial_params(seed=1):
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((3, 3)).astype(np.float32) * 0.5
  bias = np.float32(rng.standard_normal())
  return k, bias, {"params": {"kernel": k.reshape(3, 3, 1, 1), "bias": np.array([bias], np.float32)}}


@pytest.mark.parametrize("activation", ["relu", "lrelu", "tanh"])
@pytest.mark.parametrize("block_depth", [0, 1, 2, 3])
@pytest.mark.parametrize("arch_option", [1, 2])
def test_spatial_regularization(arch_option, block_depth, activation):
  k, bias, variables = spatial_params()
  x = RNG.standard_normal((2, 5, 6, 3)).astype(np.float32)
  out = SpatialRegularization(arch_option, block_depth, activation).apply(variables, jnp.asarray(x), None)
  ref = spatial_reference(x.astype(np.float64), k, bias, arch_option, block_depth, activation)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_spatial_regularization_last_block_has_no_activation():
  # depth 1 = one application without activation: relu would clip the negatives.
  k, bias, variables = spatial_params()
  x = RNG.standard_normal((1, 5, 6, 3)).astype(np.float32)
  out = np.asarray(SpatialRegularization(2, 1, "relu").apply(variables, jnp.asarray(x), None))
  assert out.min() < 0
  np.testing.assert_allclose(out, shared_conv3x3(x.astype(np.float64), k, bias), atol=1e-5)


@pytest.mark.parametrize("block_depth", [1, 2])
def test_bottleneck_max_ignores_padded_labels(block_depth):
  k, bias, variables = spatial_params()
  x = RNG.standard_normal((2, 5, 6, 4)).astype(np.float32)
  x[0, ..., 3] = 100.0  # padding of image 0
  x[1, ..., 2:] = 100.0  # padding of image 1
  mask = np.array([[True, True, True, False], [True, True, False, False]])
  module = SpatialRegularization(1, block_depth, "lrelu")
  out = np.asarray(module.apply(variables, jnp.asarray(x), jnp.asarray(mask)))
  for b, n_valid in ((0, 3), (1, 2)):
    ref = spatial_reference(x[b:b + 1, ..., :n_valid].astype(np.float64), k, bias, 1, block_depth, "lrelu")
    np.testing.assert_allclose(out[b:b + 1, ..., :n_valid], ref, atol=1e-4)
  # a shared [N] mask works too
  out1 = np.asarray(module.apply(variables, jnp.asarray(x[1:]), jnp.asarray(mask[1])))
  np.testing.assert_allclose(out1[..., :2], out[1:, ..., :2], atol=1e-6)


# --- attention and the text tower ----------------------------------------------


def attention_reference(x, wqkv, bqkv, wo, bo, heads, causal):
  b, n, c = x.shape
  d = c // heads
  qkv = (x @ wqkv + bqkv).reshape(b, n, 3, heads, d)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, D]
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  if causal:
    scores = np.where(np.triu(np.ones((n, n), bool), 1), -np.inf, scores)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  y = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, n, c)
  return y @ wo + bo


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_attention(causal):
  b, n, c, heads = 2, 5, 8, 2
  x = RNG.standard_normal((b, n, c))
  params = {"qkv": {"kernel": RNG.standard_normal((c, 3 * c)) * 0.5, "bias": RNG.standard_normal(3 * c)},
            "proj": {"kernel": RNG.standard_normal((c, c)), "bias": RNG.standard_normal(c)}}
  params32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  out = MultiHeadAttention(heads, causal).apply({"params": params32}, jnp.asarray(x, jnp.float32))
  ref = attention_reference(x, params["qkv"]["kernel"], params["qkv"]["bias"], params["proj"]["kernel"],
                            params["proj"]["bias"], heads, causal)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)
  other = attention_reference(x, params["qkv"]["kernel"], params["qkv"]["bias"], params["proj"]["kernel"],
                              params["proj"]["bias"], heads, not causal)
  assert np.abs(np.asarray(out) - other).max() > 1e-2
  if causal:  # the first token attends only to itself
    v0 = (x[:, 0] @ params["qkv"]["kernel"] + params["qkv"]["bias"])[:, 2 * c:]
    np.testing.assert_allclose(np.asarray(out)[:, 0], v0 @ params["proj"]["kernel"] + params["proj"]["bias"],
                               atol=1e-4)


@pytest.fixture(scope="module")
def text_tower():
  config = get_model_config("tiny").text
  encoder = CLIPTextEncoder(**config)
  abstract = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32)))
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32),
                        flax.linen.unbox(abstract))
  return encoder, params


def test_clip_text_pools_at_eot_for_either_padding(text_tower):
  encoder, params = text_tower
  body = [[49406, 320, 1125, EOT], [49406, 2368, 539, 320, 7651, EOT]]
  zero_pad = np.zeros((2, 77), np.int32)
  eot_pad = np.full((2, 77), EOT, np.int32)
  for i, t in enumerate(body):
    zero_pad[i, :len(t)] = t
    eot_pad[i, :len(t)] = t
  apply = jax.jit(encoder.apply)
  a, b = np.asarray(apply(params, zero_pad)), np.asarray(apply(params, eot_pad))
  assert a.shape == (2, 32)
  np.testing.assert_allclose(a, b, atol=1e-6)
  # Sanity: the features do depend on the tokens before EOT, and the batch shape is kept.
  assert np.abs(a[0] - a[1]).max() > 1e-3
  c = np.asarray(apply(params, zero_pad.reshape(2, 1, 77)))
  assert c.shape == (2, 1, 32)
  np.testing.assert_allclose(c[:, 0], a, atol=1e-6)


# --- the tiny network ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  config = get_model_config("tiny")
  return config, build_model(config), random_variables(config)


_FORWARD = {}


def run(config, variables, images, text):
  """Logits and intermediates, with one jitted forward per config."""
  key = config.to_json()
  if key not in _FORWARD:
    model = build_model(config)
    _FORWARD[key] = jax.jit(lambda v, x, t: model.apply(v, x, t, mutable=["intermediates"]))
  logits, state = _FORWARD[key](variables, images, text)
  return np.asarray(logits), state["intermediates"]


def inputs(batch=2, hw=(64, 96), n=3, seed=5):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, *hw, 3)).astype(np.float32),
          rng.standard_normal((n, 32)).astype(np.float32))


def test_tiny_logits_are_scaled_cosine_similarities(tiny):
  config, _, variables = tiny
  images, text = inputs()
  logits, inter = run(config, variables, images, text)
  assert logits.shape == (2, 64, 96, 3) and logits.dtype == np.float32
  scale = 1 / 0.07
  assert np.abs(logits).max() <= scale * (1 + 1e-5)
  pixels = np.asarray(inter["head"]["pixel_embeddings"][0], np.float64)  # [B, 32, 48, D]
  assert pixels.shape == (2, 32, 48, 32)
  cos = np.einsum("bhwd,nd->bhwn", pixels / np.linalg.norm(pixels, axis=-1, keepdims=True),
                  text / np.linalg.norm(text, axis=-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(inter["head"]["logits_lowres"][0]), scale * cos, atol=1e-4)
  # the final x2 upsampling is bilinear with align_corners=True
  np.testing.assert_allclose(logits, torch_resize(scale * cos, (64, 96), align_corners=True), atol=1e-4)


def test_tiny_per_image_label_sets(tiny):
  config, _, variables = tiny
  images, _ = inputs()
  rng = np.random.default_rng(9)
  per_image = rng.standard_normal((2, 3, 32)).astype(np.float32)  # [B, N, D]
  logits, _ = run(config, variables, images, per_image)
  for b in range(2):
    alone, _ = run(config, variables, images[b:b + 1], per_image[b])  # image b alone with its [N, D]
    np.testing.assert_allclose(logits[b], alone[0], atol=1e-5)
  assert np.abs(logits[0] - run(config, variables, images, per_image[1])[0][0]).max() > 1e-3


def test_tiny_bfloat16_close_to_float32(tiny):
  config, _, variables = tiny
  images, text = inputs()
  ref, _ = run(config, variables, images, text)
  bf16 = get_model_config("tiny", dtype="bfloat16")
  got, inter = run(bf16, variables, images, text)
  assert got.dtype == np.float32 and inter["head"]["pixel_embeddings"][0].dtype == jnp.bfloat16
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert 0 < err < 3e-2


def test_tiny_remat_full_same_outputs_and_gradients(tiny):
  config, _, variables = tiny
  images = inputs(batch=1, hw=(32, 64))[0]
  backbone_params = {"params": variables["params"]["backbone"]}
  weights = [np.random.default_rng(i).standard_normal((1, 9, 32)).astype(np.float32) for i in range(4)]

  def loss_and_grad(policy):
    vit = build_model(get_model_config("tiny", remat_policy=policy)).backbone
    assert isinstance(vit, ViT) and vit.remat_policy == policy
    def loss(p):
      hooked, grid = vit.apply(p, images)
      assert grid == (2, 4)
      return sum(jnp.sum(h * w) for h, w in zip(hooked, weights)), hooked
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(backbone_params)

  ((l0, h0), g0), ((l1, h1), g1) = loss_and_grad("none"), loss_and_grad("full")
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(h0, h1):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
  flat0, flat1 = flax.traverse_util.flatten_dict(g0), flax.traverse_util.flatten_dict(g1)
  assert flat0.keys() == flat1.keys()
  for k in flat0:  # equal up to float32 reassociation by XLA
    scale = np.abs(flat0[k]).max()
    np.testing.assert_allclose(flat1[k], flat0[k], rtol=0, atol=1e-5 * scale, err_msg="/".join(k))
  assert np.abs(flat0[("params", "blocks_0", "fc1", "kernel")]).max() > 0


# --- clear errors ----------------------------------------------------------------


def test_empty_label_set_is_an_error(tiny):
  config, model, variables = tiny
  images = np.zeros((1, 32, 32, 3), np.float32)
  for empty in (np.zeros((0, 32), np.float32), np.zeros((1, 0, 32), np.float32)):
    with pytest.raises(ValueError, match="label set is empty"):
      model.apply(variables, images, empty)


@pytest.mark.parametrize("hw", [(48, 64), (64, 80), (40, 40)])
def test_sides_not_multiple_of_32_are_an_error(tiny, hw):
  config, model, variables = tiny
  with pytest.raises(ValueError, match=rf"{hw[0]}x{hw[1]}.*multiples of 32"):
    model.apply(variables, np.zeros((1, *hw, 3), np.float32), np.ones((2, 32), np.float32))


@pytest.mark.parametrize("patch", [8, 32])
def test_other_patch_sizes_resample_to_the_level_strides(patch):
  # Patch 8 needs a x2 transposed conv and a stride-4 conv, patch 32 (ViT-B/32) x8.
  config = get_model_config("tiny")
  config.vit.patch_size = patch
  model = build_model(config)
  images, text = np.zeros((1, 64, 96, 3), np.float32), np.ones((3, 32), np.float32)
  logits, state = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), images, text, capture_intermediates=True))
  levels = [state["intermediates"]["reassemble"][f"level{i}"]["__call__"][0].shape for i in range(1, 5)]
  assert levels == [(1, 64 // s, 96 // s, c) for s, c in zip((4, 8, 16, 32), config.channels)]
  assert logits.shape == (1, 64, 96, 3)


def test_patch_size_not_a_power_of_two_is_an_error():
  config = get_model_config("tiny")
  config.vit.patch_size = 12
  with pytest.raises(ValueError, match="power-of-two patch size.*got 12"):
    build_model(config).init(jax.random.key(0), np.zeros((1, 96, 96, 3), np.float32), np.ones((2, 32), np.float32))


def test_unknown_backbone_is_an_error():
  with pytest.raises(ValueError, match="unknown backbone 'vit_huge'"):
    get_model_config("vit_huge")


@pytest.mark.parametrize("field,value", [("arch_option", 3), ("readout", "mean"), ("activation", "gelu"),
                                         ("remat_policy", "some")])
def test_unknown_options_are_errors(field, value):
  with pytest.raises(ValueError, match=rf"model\.{field}={value!r}"):
    build_model(get_model_config("tiny", **{field: value}))


# --- ResNet backbone in train mode ---------------------------------------------------


def test_tiny_resnet_train_mode_updates_batch_stats():
  config = get_model_config("tiny_resnet")
  model = build_model(config)
  variables = random_variables(config, seed=4)
  images = np.random.default_rng(6).standard_normal((2, 64, 64, 3)).astype(np.float32)
  text = np.random.default_rng(7).standard_normal((3, 32)).astype(np.float32)
  train = jax.jit(lambda v, x, t: model.apply(v, x, t, train=True, mutable=["batch_stats"]))
  logits, updates = train(variables, images, text)
  assert logits.shape == (2, 64, 64, 3)
  old = flax.traverse_util.flatten_dict(variables["batch_stats"])
  new = flax.traverse_util.flatten_dict(updates["batch_stats"])
  assert old.keys() == new.keys()
  for k in old:
    assert np.abs(np.asarray(new[k]) - old[k]).max() > 1e-6, "/".join(k)
  # PyTorch momentum 0.1: running_mean <- 0.9 running_mean + 0.1 batch_mean, checked on the stem BN.
  stem = jax.lax.conv_general_dilated(images, variables["params"]["backbone"]["conv1"]["kernel"], (2, 2),
                                      ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision="highest")
  expected = 0.9 * old[("backbone", "bn1", "mean")] + 0.1 * np.asarray(stem).mean((0, 1, 2))
  np.testing.assert_allclose(np.asarray(new[("backbone", "bn1", "mean")]), expected, atol=1e-6)
  # eval mode uses the running statistics, so it differs from the train-mode output
  eval_logits = jax.jit(model.apply)(variables, images, text)
  assert np.abs(np.asarray(eval_logits) - np.asarray(logits)).max() > 1e-4
