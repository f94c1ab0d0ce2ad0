"""The small layers against numpy references of PyTorch's formulas
(LSEG_REFERENCE.md section 8: both bilinear conventions, ConvTranspose with
kernel == stride, exact GELU and QuickGELU, a strided conv padded (1, 1))."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax.models import layers

RNG = np.random.default_rng(0)


def torch_source_index(dst: int, n_in: int, n_out: int, align_corners: bool) -> tuple[int, int, float]:
  """(i0, i1, lambda) of F.interpolate(mode='bilinear', size=...) for one axis."""
  if align_corners:
    src = dst * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  else:
    src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
  i0 = int(src)  # src >= 0: truncation is floor
  i1 = i0 + 1 if i0 < n_in - 1 else i0
  return i0, i1, src - i0


def torch_bilinear(x: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
  """Loop reference: each output pixel lerps its 4 source pixels ([B, H, W, C])."""
  b, h, w, c = x.shape
  out = np.zeros((b, size[0], size[1], c), np.float64)
  for oy in range(size[0]):
    y0, y1, ly = torch_source_index(oy, h, size[0], align_corners)
    for ox in range(size[1]):
      x0, x1, lx = torch_source_index(ox, w, size[1], align_corners)
      out[:, oy, ox] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                        + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return out


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """[n_out, n_in] dense weights of `layers.interpolation_taps`."""
  lo, hi, frac = layers.interpolation_taps(n_in, n_out, align_corners)
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


SIZES = [
    (5, 7, 10, 14),  # x2
    (5, 7, 8, 11),  # non-integer up
    (5, 7, 3, 4),  # down
    (6, 4, 9, 3),  # up one side, down the other
    (4, 4, 1, 1),  # to a single pixel
]


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("h,w,oh,ow", SIZES)
def test_resize_bilinear_matches_pytorch_formula(h, w, oh, ow, align_corners):
  x = RNG.standard_normal((2, h, w, 3)).astype(np.float32)
  got = layers.resize_bilinear(jnp.asarray(x), (oh, ow), align_corners)
  assert got.shape == (2, oh, ow, 3)
  np.testing.assert_allclose(np.asarray(got), torch_bilinear(x, (oh, ow), align_corners), atol=2e-6, rtol=0)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("h,w,oh,ow", SIZES + [(24, 24, 30, 20), (12, 9, 24, 18)])
def test_resize_bilinear_gradient_is_the_adjoint(h, w, oh, ow, align_corners):
  # The custom VJP gathers over the transposed taps; it must equal the dense
  # interpolation matrices' transposes applied to the cotangent.
  x = RNG.standard_normal((2, h, w, 3)).astype(np.float32)
  g = RNG.standard_normal((2, oh, ow, 3)).astype(np.float32)
  _, vjp = jax.vjp(lambda v: layers.resize_bilinear(v, (oh, ow), align_corners), jnp.asarray(x))
  mh, mw = interpolation_matrix(h, oh, align_corners), interpolation_matrix(w, ow, align_corners)
  want = np.einsum("oh,pw,bopc->bhwc", mh, mw, g)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("n_in,n_out", [(5, 10), (5, 8), (7, 3), (4, 4), (3, 1)])
def test_interpolation_taps_rows(n_in, n_out, align_corners):
  m = interpolation_matrix(n_in, n_out, align_corners)
  ref = np.zeros((n_out, n_in))
  for o in range(n_out):
    i0, i1, lam = torch_source_index(o, n_in, n_out, align_corners)
    ref[o, i0] += 1 - lam
    ref[o, i1] += lam
  assert m.shape == (n_out, n_in)
  np.testing.assert_allclose(m, ref, atol=1e-7)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)  # a convex combination per output


def test_align_corners_conventions_differ():
  # 4 -> 8: align_corners=True hits the corners; half-pixel clamps -0.25 to 0.
  m_true = interpolation_matrix(4, 8, True)
  m_false = interpolation_matrix(4, 8, False)
  np.testing.assert_allclose(m_true[1], [4 / 7, 3 / 7, 0, 0], atol=1e-7)  # src = 3/7
  np.testing.assert_allclose(m_false[1], [0.75, 0.25, 0, 0], atol=1e-7)  # src = 1.5 / 2 - 0.5
  np.testing.assert_allclose(m_false[0], [1, 0, 0, 0], atol=1e-7)  # src clamped to 0


@pytest.mark.parametrize("size", [(6, 10), (3, 5), (16, 13)])
def test_half_pixel_resize_agrees_with_jax_image_resize_without_antialias(size):
  x = RNG.standard_normal((1, 8, 8, 4)).astype(np.float32)
  got = layers.resize_bilinear(jnp.asarray(x), size, align_corners=False)
  ref = jax.image.resize(x, (1, *size, 4), "bilinear", antialias=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=5e-6)


@pytest.mark.parametrize("align_corners", [True, False])
def test_resize_to_same_size_is_identity(align_corners):
  x = RNG.standard_normal((2, 5, 7, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(layers.resize_bilinear(jnp.asarray(x), (5, 7), align_corners)), x)


def test_upsample2x_doubles_and_keeps_corners():
  x = RNG.standard_normal((2, 3, 5, 4)).astype(np.float32)
  y = np.asarray(layers.upsample2x(jnp.asarray(x)))
  assert y.shape == (2, 6, 10, 4)
  for cy, cx in ((0, 0), (-1, -1), (0, -1), (-1, 0)):
    np.testing.assert_allclose(y[:, cy, cx], x[:, cy, cx], atol=1e-6)
  np.testing.assert_allclose(y, torch_bilinear(x, (6, 10), align_corners=True), atol=2e-6)


def test_patch_upsample_is_conv_transpose_with_kernel_equal_stride():
  b, h, w, c, o, s = 2, 3, 4, 5, 6, 4
  x = RNG.standard_normal((b, h, w, c)).astype(np.float32)
  kernel = RNG.standard_normal((s, s, c, o)).astype(np.float32)
  bias = RNG.standard_normal((o,)).astype(np.float32)
  y = layers.PatchUpsample(o, s).apply({"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
  ref = np.zeros((b, h * s, w * s, o))
  for p in range(s):
    for q in range(s):
      # out[b, i*s+p, j*s+q, o] = sum_c x[b, i, j, c] K[p, q, c, o] + bias[o]
      ref[:, p::s, q::s, :] = np.einsum("bijc,co->bijo", x, kernel[p, q]) + bias
  assert y.shape == (b, h * s, w * s, o)
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)


def test_patch_upsample_from_torch_layout():
  # The docstring's conversion: torch ConvTranspose2d weight [C_in, C_out, s, s] -> [s, s, C_in, C_out].
  c, o, s = 3, 2, 2
  w_torch = RNG.standard_normal((c, o, s, s)).astype(np.float32)
  x = RNG.standard_normal((1, 2, 2, c)).astype(np.float32)
  y = layers.PatchUpsample(o, s).apply(
      {"params": {"kernel": w_torch.transpose(2, 3, 0, 1), "bias": np.zeros(o, np.float32)}}, x)
  # torch: out[n, o, i*s+p, j*s+q] = sum_c x[n, c, i, j] W[c, o, p, q]
  ref = np.zeros((1, 4, 4, o))
  for i in range(2):
    for j in range(2):
      for p in range(s):
        for q in range(s):
          ref[0, i * s + p, j * s + q] = x[0, i, j] @ w_torch[:, :, p, q]
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)


def test_gelu_is_exact_erf_gelu():
  x = np.linspace(-5, 5, 201).astype(np.float32)
  ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
  got = np.asarray(layers.gelu(jnp.asarray(x)))
  np.testing.assert_allclose(got, ref, atol=1e-6)
  # ... and not the tanh approximation, which is 4.7e-4 away somewhere in [-5, 5].
  assert np.abs(np.asarray(jax.nn.gelu(x, approximate=True)) - ref).max() > 1e-4


def test_quick_gelu():
  x = np.linspace(-6, 6, 121).astype(np.float32)
  ref = x.astype(np.float64) / (1 + np.exp(-1.702 * x.astype(np.float64)))
  np.testing.assert_allclose(np.asarray(layers.quick_gelu(jnp.asarray(x))), ref, atol=1e-6)


def torch_conv2d(x: np.ndarray, w: np.ndarray, bias: np.ndarray, stride: int, padding: int) -> np.ndarray:
  """Direct convolution (cross-correlation) with symmetric zero padding, NHWC / HWIO."""
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  kh, kw = w.shape[:2]
  oh = (xp.shape[1] - kh) // stride + 1
  ow = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i in range(oh):
    for j in range(ow):
      patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw]  # [B, kh, kw, I]
      out[:, i, j] = np.einsum("bhwi,hwio->bo", patch, w) + bias
  return out


@pytest.mark.parametrize("stride,padding,hw", [(2, 1, (8, 6)), (1, 1, (5, 4)), (2, 0, (6, 6))])
def test_conv_pads_symmetrically_like_torch(stride, padding, hw):
  x = RNG.standard_normal((2, *hw, 3)).astype(np.float32)
  w = RNG.standard_normal((3, 3, 3, 4)).astype(np.float32)
  bias = RNG.standard_normal((4,)).astype(np.float32)
  module = layers.conv(4, 3, stride=stride, padding=padding)
  y = np.asarray(module.apply({"params": {"kernel": w, "bias": bias}}, jnp.asarray(x)))
  ref = torch_conv2d(x, w, bias, stride, padding)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_strided_conv_differs_from_same_padding():
  # On an even input 'SAME' would pad (0, 1): the first output row would then see
  # input rows 0..2 instead of (pad), 0, 1. Ours must match the (1, 1) reference.
  x = RNG.standard_normal((1, 8, 8, 2)).astype(np.float32)
  w = RNG.standard_normal((3, 3, 2, 1)).astype(np.float32)
  params = {"params": {"kernel": w, "bias": np.zeros(1, np.float32)}}
  y = np.asarray(layers.conv(1, 3, stride=2, padding=1).apply(params, x))
  same = np.asarray(jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  assert y.shape == same.shape == (1, 4, 4, 1)
  assert np.abs(y - same).max() > 1e-2
  np.testing.assert_allclose(y, torch_conv2d(x, w, np.zeros(1), 2, 1), atol=1e-5)


def _torch_batch_norm(x: np.ndarray, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5):
  """PyTorch's BatchNorm2d.train() forward on NHWC, in float64: biased variance to
  normalise, unbiased variance into the running statistics."""
  axes = tuple(range(x.ndim - 1))
  mean, var = x.mean(axes), x.var(axes)
  n = x.size // x.shape[-1]
  y = (x - mean) / np.sqrt(var + eps) * weight + bias
  return y, (1 - momentum) * running_mean + momentum * mean, (1 - momentum) * running_var + momentum * var * n / (n - 1)


def test_batch_norm_is_pytorchs_in_train_and_eval_mode():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (2, 3, 5, 4)).astype(np.float32)  # n = 30 per channel: the n/(n-1) shows
  params = {"scale": rng.uniform(0.5, 1.5, 4).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)}
  stats = {"mean": rng.normal(size=4).astype(np.float32), "var": rng.uniform(0.5, 1.5, 4).astype(np.float32)}
  y, updates = layers.BatchNorm(use_running_average=False).apply(
      {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
  ref_y, ref_mean, ref_var = _torch_batch_norm(x.astype(np.float64), params["scale"], params["bias"],
                                               stats["mean"], stats["var"])
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], ref_mean, rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], ref_var, rtol=1e-6)
  biased = 0.9 * stats["var"] + 0.1 * x.var((0, 1, 2))
  assert np.abs(updates["batch_stats"]["var"] - biased).max() > 1e-3  # flax.linen.BatchNorm's would be this
  y_eval = layers.BatchNorm(use_running_average=True).apply({"params": params, "batch_stats": stats}, x)
  np.testing.assert_allclose(y_eval, (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"]
                             + params["bias"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module,x_shape,fan_in", [
    (layers.Conv(64, 3), (1, 8, 8, 96), 3 * 3 * 96),
    (layers.Conv(256, 1), (1, 4, 4, 256), 256),
    (layers.Dense(128, (None, None)), (2, 512), 512),
    (layers.PatchUpsample(96, 4), (1, 2, 2, 128), 96 * 4 * 4),  # ConvTranspose2d: fan_in over C_out
], ids=["conv3x3", "conv1x1", "dense", "conv_transpose"])
def test_layers_start_from_pytorchs_default_init(module, x_shape, fan_in):
  """kaiming_uniform(a=sqrt(5)) weights and fan-in uniform biases: U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in)."""
  params = nn.unbox(module.init(jax.random.key(0), jnp.zeros(x_shape)))["params"]
  bound = fan_in ** -0.5
  for name in ("kernel", "bias"):
    w = np.asarray(params[name])
    assert np.abs(w).max() <= bound
    if w.size >= 1000:
      assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.05, (name, w.std(), bound / math.sqrt(3))
    else:
      assert np.abs(w).max() > 0.8 * bound

