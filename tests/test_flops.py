"""lseg_jax.flops, on which every MFU figure rests: the analytic count
against the matmuls and convolutions of the traced forward (exact), against
XLA's cost analysis of the compiled forward and gradient (close), and
against published ViT-L counts."""

import math

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import pytest

from lseg_jax import flops
from lseg_jax.models import abstract_variables, build_model, get_model_config

LABELS = 5


def image_inputs(config, h: int, w: int) -> tuple:
  """(variables without the text tower, images, text features, label mask) as
  ShapeDtypeStructs: traced and compiled, never allocated."""
  v = abstract_variables(config)
  variables = {"params": {k: x for k, x in v["params"].items() if k != "text_encoder"},
               "batch_stats": v["batch_stats"]}
  sds = jax.ShapeDtypeStruct
  return (variables, sds((1, h, w, 3), jnp.float32), sds((1, LABELS, config.text.embed_dim), jnp.float32),
          sds((1, LABELS), jnp.bool_))


def forward_fn(config):
  model = build_model(config)
  return lambda variables, images, text, mask: model.apply(variables, images, text, mask)


def matmul_flops(jaxpr: jax_core.Jaxpr) -> int:
  """2 x multiply-adds of every dot_general and conv_general_dilated in
  `jaxpr` and the jaxprs inside it (padding taps included, as the analytic
  count has them)."""
  total = 0
  for eqn in jaxpr.eqns:
    out = math.prod(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      total += 2 * out * math.prod(eqn.invars[0].aval.shape[d] for d in contract)
    elif eqn.primitive.name == "conv_general_dilated":
      kernel, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
      total += 2 * out * kernel[spec[1]] * math.prod(kernel[d] for d in spec[2:])
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
          total += matmul_flops(getattr(sub, "jaxpr", sub))
  return total


CONFIGS = {
    "tiny": get_model_config("tiny"),
    # patch 32: the stride-32 level is the token grid itself; no readout projection
    "tiny_patch32_ignore": get_model_config("tiny", readout="ignore",
                                            vit=dict(get_model_config("tiny").vit, patch_size=32)),
    # more than one bottleneck in some stages
    "tiny_resnet_2121": get_model_config("tiny_resnet", resnet=dict(stage_sizes=(2, 1, 2, 1), width=4)),
}
SIZE = (96, 160)  # not square: height and width kept apart


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_flops_are_the_traced_matmuls_and_convs(name):
  config = CONFIGS[name]
  traced = jax.make_jaxpr(forward_fn(config))(*image_inputs(config, *SIZE)).jaxpr
  assert flops.forward_flops(config, *SIZE, LABELS) == pytest.approx(matmul_flops(traced), rel=1e-9)


def test_xla_counts_about_the_same_forward():
  """XLA's count of the compiled forward adds the elementwise work and leaves
  out padded taps: within 10% of the analytic one."""
  config = CONFIGS["tiny"]
  compiled = jax.jit(forward_fn(config)).lower(*image_inputs(config, *SIZE)).compile()
  assert flops.forward_flops(config, *SIZE, LABELS) == pytest.approx(flops.compiled_flops(compiled), rel=0.1)


def test_a_training_step_is_about_three_forwards():
  """train_flops (3x the forward) against the matmuls of the traced gradient
  (the forward and its backward; the images get no gradient)."""
  config = CONFIGS["tiny"]
  model = build_model(config)

  def loss(params, batch_stats, images, text, mask):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, text, mask, train=True,
                            mutable=["batch_stats"])
    return logits.sum()

  variables, *rest = image_inputs(config, *SIZE)
  traced = jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"], *rest).jaxpr
  assert flops.train_flops(config, *SIZE, LABELS) == pytest.approx(matmul_flops(traced), rel=0.05)


# timm's model cards, in GMACs (multiply-adds): ViT-L/16 at 384 174.8, at 224
# 59.7; ViT-L/32 at 384 44.3. They count the patch embedding and the
# 1000-class head, and leave out attention's two matmuls (q.k, weights x v).
TIMM_GMACS = [((16, 384), 174.8), ((16, 224), 59.7), ((32, 384), 44.3)]


@pytest.mark.parametrize("patch_size, size, gmacs", [(p, s, g) for (p, s), g in TIMM_GMACS],
                         ids=["L16_384", "L16_224", "L32_384"])
def test_vit_l_blocks_match_the_published_counts(patch_size, size, gmacs):
  """The count of 12 ViT-L blocks (24 hooked blocks minus 12, the decoder
  unchanged) against timm's published whole-model count: its per-block
  multiply-adds (the patch embedding and the 1000-class head taken out) plus
  the attention matmuls timm leaves out, 2 x 2 x tokens^2 x width."""
  def count(hooks):
    vit = dict(get_model_config("clip_vitl16_384").vit, patch_size=patch_size, hooks=hooks)
    return flops.forward_flops(get_model_config("clip_vitl16_384", vit=vit), size, size, LABELS)

  tokens = (size // patch_size) ** 2
  width = 1024
  timm_block = 2 * (gmacs * 1e9 - tokens * 3 * patch_size ** 2 * width - width * 1000) / 24  # FLOPs
  attention = 2 * 2 * (tokens + 1) ** 2 * width
  assert count((5, 11, 17, 23)) - count((2, 5, 8, 11)) == pytest.approx(12 * (timm_block + attention), rel=2e-3)


def test_compiled_flops_reads_xla_and_peak_flops_knows_the_chips():
  a, b = jax.ShapeDtypeStruct((64, 128), jnp.float32), jax.ShapeDtypeStruct((128, 32), jnp.float32)
  assert flops.compiled_flops(jax.jit(jnp.matmul).lower(a, b).compile()) == 2 * 64 * 128 * 32

  class Device:
    def __init__(self, kind):
      self.device_kind = kind

  assert flops.peak_flops(Device("NVIDIA H100 80GB HBM3")) == 989e12
  assert flops.peak_flops(Device("TPU v5 lite")) == 197e12
  assert flops.peak_flops(Device("TPU v5p")) == 459e12
  assert flops.peak_flops(Device("cpu")) is None
