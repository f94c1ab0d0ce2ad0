"""Small layers shared by the LSeg towers, written to match PyTorch numerics.

Two bilinear conventions meet in LSeg and both are here:
- `resize_bilinear(..., align_corners=True)`: every decoder upsampling, the
  head's final x2 and the multi-scale evaluation (`F.interpolate(...,
  align_corners=True)`); `jax.image.resize` cannot do it.
- `resize_bilinear(..., align_corners=False)`: the position-embedding resize
  (`F.interpolate` default): half-pixel centres clamped at the edges, no
  antialiasing, unlike `jax.image.resize` when it downsamples.

Both are separable and run as two gathers of whole rows (two taps per
output) whose gradient is a gather too, over the taps' adjoint. On the CPU a
x2 upsampling of the head's logits ran 7x faster than as dense
interpolation-matrix matmuls (what jax.image.resize does): O(output) work
instead of O(output x input side).
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import sharding

CONV_AXES = (None, None, "conv_in", "conv_out")  # logical axes of a [k, k, C_in, C_out] kernel


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


def _transpose_taps(lo: np.ndarray, hi: np.ndarray, frac: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
  """The adjoint of the two-tap interpolation as taps over the outputs:
  (index [n_in, K], weight [n_in, K]), K the most outputs one input feeds,
  padded with weight-0 taps at index 0."""
  sources = [[] for _ in range(n_in)]
  for o, (i0, i1, f) in enumerate(zip(lo, hi, frac)):
    sources[i0].append((o, 1.0 - f))
    sources[i1].append((o, f))
  k = max(len(s) for s in sources)
  index, weight = np.zeros((n_in, k), np.int32), np.zeros((n_in, k), np.float32)
  for i, s in enumerate(sources):
    index[i, :len(s)] = [o for o, _ in s]
    weight[i, :len(s)] = [f for _, f in s]
  return index, weight


def _gather_taps(x: jax.Array, axis: int, index: np.ndarray, weight: np.ndarray) -> jax.Array:
  """sum_k x[index[:, k]] * weight[:, k] along `axis`: [.., n, ..] -> [.., len(index), ..]."""
  shape = [1] * x.ndim
  shape[axis] = len(index)
  out = None
  for k in range(index.shape[1]):
    term = jnp.take(x, jnp.asarray(index[:, k]), axis=axis) * jnp.asarray(weight[:, k].reshape(shape), x.dtype)
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _resize_axis(x: jax.Array, axis: int, n_in: int, n_out: int, align_corners: bool) -> jax.Array:
  """x resized along `axis` from n_in to n_out samples."""
  lo, hi, frac = interpolation_taps(n_in, n_out, align_corners)
  return _gather_taps(x, axis, np.stack([lo, hi], 1), np.stack([1 - frac, frac], 1).astype(np.float32))


def _resize_axis_fwd(x, axis, n_in, n_out, align_corners):
  return _resize_axis(x, axis, n_in, n_out, align_corners), None


def _resize_axis_bwd(axis, n_in, n_out, align_corners, _, g):
  lo, hi, frac = interpolation_taps(n_in, n_out, align_corners)
  return (_gather_taps(g, axis, *_transpose_taps(lo, hi, frac, n_in)),)


_resize_axis.defvjp(_resize_axis_fwd, _resize_axis_bwd)


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool) -> jax.Array:
  """Bilinear resize of a [B, H, W, C] array to [B, size[0], size[1], C]:
  rows, then columns, two taps per output (the arithmetic of
  `resize_bilinear_np`); the gradient gathers too, through the taps' adjoint."""
  x = _resize_axis(x, 1, x.shape[1], int(size[0]), align_corners)  # [B, H', W, C]
  return _resize_axis(x, 2, x.shape[2], int(size[1]), align_corners)  # [B, H', W', C]


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


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU as torch.nn.GELU (flax's nn.gelu defaults to the tanh
  form). The gradient keeps only x for the backward pass, as PyTorch does:
  differentiated as written it kept four [B, N, mlp] arrays per ViT block
  (0.9 GiB of a ViT-L/16 step at batch 2 x 384)."""
  return nn.gelu(x, approximate=False)


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return gelu(x), x


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  cdf = 0.5 * (1 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))
  pdf = jnp.exp(-0.5 * x * x) * np.sqrt(0.5 / np.pi).astype(x.dtype)
  return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's activation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def torch_uniform(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default init of Linear / Conv weights and biases:
  kaiming_uniform(a=sqrt(5)) for the weight and the bias alike reduce to
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (std 1/sqrt(3 fan_in)). The layers trained
  from scratch (reassemble, decoder, head) thus start from the official
  run's distribution."""
  bound = fan_in ** -0.5

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def partitioned_param(module: nn.Module, name: str, init: nn.initializers.Initializer,
                      axes: tuple[str | None, ...], shape: Sequence[int], param_dtype, dtype) -> jax.Array:
  """Parameter `name` of `module`, laid out by the rule table under the
  logical axis names `axes`, as its layer uses it: cast to `dtype` (the
  compute dtype), then pinned by `sharding.param_at_use` (FSDP's all-gather,
  made explicit inside the activation layout; a no-op outside it)."""
  value = module.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)
  return sharding.param_at_use(value.astype(dtype), axes)


class Conv(nn.Module):
  """A PyTorch Conv2d on NHWC: explicit symmetric padding (never 'SAME', which
  pads (0, 1) for a stride-2 conv on an even input where PyTorch pads (1, 1)),
  PyTorch's default init (`torch_uniform`, fan_in = k * k * C_in).
  Kernel [k, k, C_in, C_out].

  A conv whose kernel equals its stride without padding (every 1x1 conv, the
  ViT patch embedding) runs as one einsum over each k x k patch: the same
  sums, and on XLA:CPU a 1x1 conv's forward + backward ran 5x faster so
  (0.41 vs 2.12 s for the head's 256 -> 512 at 2 x 192 x 192).
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c_in = self.kernel_size, x.shape[-1]
    init = torch_uniform(k * k * c_in)
    kernel = partitioned_param(self, "kernel", init, CONV_AXES, (k, k, c_in, self.features), self.param_dtype,
                               self.dtype)
    x = x.astype(self.dtype)
    p = self.padding
    if k == self.stride and p == 0:  # 1x1 convs and patch embeddings: a matmul per k x k patch
      b, h, w, _ = x.shape
      x = x[:, :h // k * k, :w // k * k].reshape(b, h // k, k, w // k, k, c_in)  # [B, H/k, k, W/k, k, C_in]
      y = jnp.einsum("bhpwqc,pqco->bhwo", x, kernel)  # [B, H/k, W/k, C_out]
    else:
      y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((p, p), (p, p)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", init, (self.features,), self.param_dtype).astype(y.dtype)
    return y


class Dense(nn.Module):
  """A PyTorch Linear with PyTorch's default init (fan_in = C_in); the kernel
  [C_in, C_out] carries the logical axis names `axes` for the sharding rules."""
  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = torch_uniform(x.shape[-1])
    kernel = partitioned_param(self, "kernel", init, self.axes, (x.shape[-1], self.features), self.param_dtype,
                               self.dtype)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel)
    if self.use_bias:
      y = y + self.param("bias", init, (self.features,), self.param_dtype).astype(y.dtype)
    return y


class Embed(nn.Module):
  """A lookup table [num_embeddings, features] (`nn.Embed`'s parameter name
  `embedding`), logical axes ("vocab", "embed")."""
  num_embeddings: int
  features: int
  embedding_init: nn.initializers.Initializer
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    table = partitioned_param(self, "embedding", self.embedding_init, ("vocab", "embed"),
                              (self.num_embeddings, self.features), self.param_dtype, self.dtype)
    return jnp.take(table, ids, axis=0)  # [..., features]


def conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0, use_bias: bool = True,
         dtype=jnp.float32, param_dtype=jnp.float32, name: str | None = None) -> Conv:
  """`Conv` with positional features and kernel size, as nn.Conv is called."""
  return Conv(features, kernel, stride, padding, use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True,
          dtype=jnp.float32, param_dtype=jnp.float32, name: str | None = None) -> Dense:
  """`Dense` with positional features and logical axes."""
  return Dense(features, axes, use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class BatchNorm(nn.Module):
  """PyTorch's BatchNorm2d in train and eval mode, on the last axis.

  Train mode normalises with the batch mean and the BIASED batch variance and
  moves the running statistics by `momentum` (PyTorch's convention: 0.1 is
  Flax's 0.9) towards the batch mean and the UNBIASED variance (x n/(n-1),
  n = the elements per channel). flax.linen.BatchNorm uses the biased one
  there: 0.1 * var / (n - 1) apart, 8e-4 relative at the stride-32 level of a
  small batch. Statistics are float32, two-pass, and, under jit with a
  globally sharded batch, over the global batch (the official SyncBatchNorm).
  Eval mode uses the running statistics. Init: scale 1, bias 0, mean 0, var 1.
  """
  use_running_average: bool
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = x32.mean(axes)  # [C]
      var = jnp.square(x32 - mean).mean(axes)  # [C], biased
      if not self.is_initializing():
        n = x.size // c
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * mean
        running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
    y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def batch_norm(train: bool, name: str, dtype=jnp.float32, param_dtype=jnp.float32) -> BatchNorm:
  """The decoder's and the ResNet's BatchNorm: batch statistics when `train`."""
  return BatchNorm(use_running_average=not train, dtype=dtype, param_dtype=param_dtype, name=name)


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
    # PyTorch's ConvTranspose2d default init counts fan_in over its weight's
    # dim 1, which is C_out: U(+-1/sqrt(C_out * s * s)) for kernel and bias.
    init = torch_uniform(self.features * s * s)
    kernel = partitioned_param(self, "kernel", init, CONV_AXES, (s, s, c, self.features), self.param_dtype, self.dtype)
    bias = self.param("bias", init, (self.features,), self.param_dtype).astype(self.dtype)
    x = x.astype(self.dtype)
    y = jnp.einsum("bhwc,pqco->bhpwqo", x, kernel)  # [B, H, s, W, s, C_out]
    return y.reshape(b, h * s, w * s, self.features) + bias
