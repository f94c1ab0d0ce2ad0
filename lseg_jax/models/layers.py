"""Small layers shared by the LSeg towers, written to match PyTorch numerics.

Two bilinear conventions meet in LSeg and both are here:
- `resize_bilinear(..., align_corners=True)`: every decoder upsampling, the
  head's final x2 and the multi-scale evaluation (`F.interpolate(...,
  align_corners=True)`); `jax.image.resize` cannot do it.
- `resize_bilinear(..., align_corners=False)`: the position-embedding resize
  (`F.interpolate` default): half-pixel centres clamped at the edges, no
  antialiasing, unlike `jax.image.resize` when it downsamples.

Both are separable interpolation matrices applied with two matmuls: MXU/tensor
core friendly, exact to float32 rounding, and their gradient is a matmul too.
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def interpolation_taps(n_in: int, n_out: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """1-D linear interpolation, PyTorch conventions: output i = (1 - frac[i]) *
  input[lo[i]] + frac[i] * input[hi[i]]."""
  dst = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = dst * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(dst)
  else:
    # F.interpolate(size=...) uses scale = in/out and clamps negative sources.
    src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, src - lo


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """[n_out, n_in] weights of 1-D linear interpolation (`interpolation_taps`)."""
  lo, hi, frac = interpolation_taps(n_in, n_out, align_corners)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool) -> jax.Array:
  """Bilinear resize of a [B, H, W, C] array to [B, size[0], size[1], C]."""
  h, w = x.shape[1:3]
  mh = jnp.asarray(interpolation_matrix(h, size[0], align_corners), x.dtype)
  mw = jnp.asarray(interpolation_matrix(w, size[1], align_corners), x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", mh, x)  # [B, H', W, C]
  return jnp.einsum("pw,bowc->bopc", mw, x)  # [B, H', W', C]


def resize_bilinear_np(x: np.ndarray, size: Sequence[int], align_corners: bool) -> np.ndarray:
  """`resize_bilinear` on the host for [..., H, W, C] numpy arrays of any size
  (evaluation's per-image resizes): two taps per output, O(output) work."""
  for axis, n_out in ((-3, size[0]), (-2, size[1])):
    lo, hi, frac = interpolation_taps(x.shape[axis], n_out, align_corners)
    shape = [1] * x.ndim
    shape[axis] = n_out
    frac = frac.astype(np.float32).reshape(shape)
    x = np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac
  return x


def upsample2x(x: jax.Array) -> jax.Array:
  """x2 bilinear upsampling with align_corners=True (the DPT/LSeg decoder's)."""
  return resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)


# Exact (erf) GELU as torch.nn.GELU: flax's nn.gelu defaults to the tanh form.
gelu = functools.partial(nn.gelu, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's activation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0, use_bias: bool = True,
         dtype=jnp.float32, param_dtype=jnp.float32, name: str | None = None) -> nn.Conv:
  """A PyTorch-style Conv2d: explicit symmetric padding (never 'SAME', which pads
  (0, 1) for a stride-2 conv on an even input where PyTorch pads (1, 1))."""
  return nn.Conv(
      features, (kernel, kernel), strides=stride, padding=((padding, padding), (padding, padding)),
      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
      name=name)


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True,
          dtype=jnp.float32, param_dtype=jnp.float32, name: str | None = None) -> nn.Dense:
  """nn.Dense whose kernel carries logical axis names for the sharding rules."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
      name=name)


class PatchUpsample(nn.Module):
  """ConvTranspose2d with kernel == stride: every input pixel paints its own
  s x s block, so it is one einsum and a reshape (no kernel flip to get wrong).

  Kernel layout [s, s, C_in, C_out]; from PyTorch's [C_in, C_out, s, s] it is
  `w.transpose(2, 3, 0, 1)`.
  """
  features: int
  factor: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    s = self.factor
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
        (s, s, c, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.einsum("bhwc,pqco->bhpwqo", x, kernel)  # [B, H, s, W, s, C_out]
    return y.reshape(b, h * s, w * s, self.features) + bias
