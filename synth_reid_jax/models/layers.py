"""Building blocks shared by the networks: reflect padding, instance/batch norm, torch-style initialisers.

Everything is NHWC. Normalisation statistics are computed in float32 whatever the compute dtype.
"""

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synth_reid_jax.models.forms import ConvForms, conv_forms

Dtype = jnp.dtype | type
Initializer = Callable[..., jax.Array]

# config.model.dtype: the compute dtypes. Parameters, optimiser states and normalisation statistics stay
# float32.
COMPUTE_DTYPES = ("float32", "bfloat16")
NORM_EPS = 1e-5  # torch's InstanceNorm2d / BatchNorm eps
BN_MOMENTUM = 0.1  # torch's BatchNorm momentum: running = (1 - m) * running + m * batch
KAIMING_GAIN_SQ = 2.0  # kaiming_normal_(a=0): std = sqrt(2 / fan)
BNNECK_SCALE_STD = 0.02  # the original draws BatchNorm1d weights from N(1, 0.02)
# Strided convolutions reading this few channels keep autodiff's input gradient in the CPU forms: XLA:CPU
# runs convolutions producing so few channels far below their FLOP rate (docs/performance.md).
NARROW_CHANNELS = 4

# The original initialises every module with weights_init_kaiming: conv weights kaiming-normal over fan_in,
# linear weights kaiming-normal over fan_out, biases 0.
conv_init = nn.initializers.variance_scaling(KAIMING_GAIN_SQ, "fan_in", "normal")
dense_init = nn.initializers.variance_scaling(KAIMING_GAIN_SQ, "fan_out", "normal")
# torch computes a ConvTranspose2d weight's "fan_in" from its dim 1, i.e. out_channels * k * k; our transposed
# kernels are stored (k, k, in, out), so that fan is over the last axis.
conv_transpose_init = nn.initializers.variance_scaling(
    KAIMING_GAIN_SQ, "fan_in", "normal", in_axis=-1, out_axis=-2)
# torchvision / torchreid initialise a plain ResNet's convs over fan_out.
resnet_conv_init = nn.initializers.variance_scaling(KAIMING_GAIN_SQ, "fan_out", "normal")


def bnneck_scale_init(key, shape, dtype=jnp.float32):
  """N(1, 0.02) as the original's weights_init_kaiming for BatchNorm1d."""
  return 1.0 + BNNECK_SCALE_STD * jax.random.normal(key, shape, dtype)


def reflect_pad(x: jax.Array, pad: int) -> jax.Array:
  """torch's ReflectionPad2d(pad) on the H and W axes of an NHWC array, as one concatenation per axis
  (bit-identical to jnp.pad(mode="reflect"))."""
  if pad == 0:
    return x
  for axis in (1, 2):
    size = x.shape[axis]
    if pad >= size:
      raise ValueError(f"reflect padding {pad} needs a spatial size > {pad}, got shape {x.shape}; "
                       "use a larger image")
    before = jnp.flip(jax.lax.slice_in_dim(x, 1, pad + 1, axis=axis), axis)
    after = jnp.flip(jax.lax.slice_in_dim(x, size - 1 - pad, size - 1, axis=axis), axis)
    x = jnp.concatenate([before, x, after], axis=axis)
  return x


def pixels_view(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, H * W, C), a free reshape on every backend.

  Reductions over pixels (norm statistics, bias gradients) run on this view: XLA:CPU rewrites a sum over H
  and W into 32x32 reduce-windows plus a final sum, and over one flattened axis the same sum runs faster
  (docs/performance.md); elsewhere it is the same reduction.
  """
  n, h, w, c = x.shape
  return x.reshape(n, h * w, c)


def instance_norm(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """InstanceNorm2d without affine parameters: per image and channel over H, W, statistics in float32.

  The variance is taken around the mean (two passes; XLA fuses both reductions), without the cancellation
  of E[x^2] - E[x]^2 when |mean| >> std.
  """
  xf = pixels_view(x.astype(jnp.float32))
  mean = jnp.mean(xf, axis=1, keepdims=True)
  centered = xf - mean
  var = jnp.mean(jnp.square(centered), axis=1, keepdims=True)
  return (centered * jax.lax.rsqrt(var + eps)).astype(x.dtype).reshape(x.shape)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias over the last axis; on the pixels view for a 4-D y, so its gradient is a fast reduction."""
  if y.ndim != 4:
    return y + bias
  return (pixels_view(y) + bias).reshape(y.shape)


class BatchNorm(nn.Module):
  """torch-semantics BatchNorm over all axes but the last (BatchNorm1d/2d).

  Differences from flax.linen.BatchNorm that matter for faithfulness: the running variance is updated with the
  unbiased batch variance (n / (n - 1)), as torch does, and the shift can be frozen (BNNeck).
  """
  momentum: float = BN_MOMENTUM
  epsilon: float = NORM_EPS
  scale_init: Initializer = nn.initializers.ones
  freeze_bias: bool = False  # the shift stays a param (counts match) but receives no gradient
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    if self.freeze_bias:
      bias = jax.lax.stop_gradient(bias)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    xf = x.astype(jnp.float32)
    if x.ndim == 4:
      xf = pixels_view(xf)  # the statistics' sums run over (N, H * W), see pixels_view
    if train:
      axes = tuple(range(xf.ndim - 1))
      count = int(np.prod([xf.shape[a] for a in axes]))
      if count < 2:
        raise ValueError(f"BatchNorm in training needs more than one value per channel, got shape {x.shape}; "
                         "use a batch size > 1")
      mean = jnp.mean(xf, axis=axes)
      var = jnp.maximum(jnp.mean(jnp.square(xf), axis=axes) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (count / (count - 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return (xf * mul + (bias - mean * mul)).astype(self.dtype).reshape(x.shape)


_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding=((0, 0), (0, 0))) -> jax.Array:
  """lax.conv_general_dilated in NHWC/HWIO with explicit ((top, bottom), (left, right)) zero padding."""
  padding = tuple(tuple(p) for p in padding)
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=_DIMENSION_NUMBERS)


def _phase_taps(kernel_size: int, stride: int, pad_before: int, phase: int, in_size: int, out_size: int):
  """For input rows stride * m + phase: the kernel taps that read them, in order of the output row they feed
  (row m + offset), and the (before, after) padding of the output gradient that lines those rows up."""
  taps = [t for t in range(kernel_size) if (phase + pad_before - t) % stride == 0]
  if not taps:  # a kernel narrower than the stride skips this phase
    return [], None
  taps.sort(key=lambda t: -t)  # offset (phase + pad_before - t) / stride grows as t falls
  first = (phase + pad_before - taps[0]) // stride
  last = (phase + pad_before - taps[-1]) // stride
  rows = in_size // stride
  return taps, (-first, rows - 1 + last - (out_size - 1))


def strided_conv_input_grad(dy: jax.Array, kernel: jax.Array, stride: int, padding, in_shape) -> jax.Array:
  """The input gradient of a strided convolution as stride**2 stride-1 convolutions of dy, one per phase of
  the input grid (rows stride * m + a, columns stride * l + b), interleaved.

  Autodiff gives a convolution of dy dilated with zeros, which XLA:CPU runs at the dilated size (4x the
  multiplications at stride 2). Each phase here touches only the taps that reach it. Needs the input's H and
  W divisible by the stride.
  """
  n, height, width, channels = in_shape
  (pad_top, _), (pad_left, _) = padding
  kernel_t = jnp.swapaxes(kernel, 2, 3)  # correlate dy's output channels back to input channels
  rows = []
  for a in range(stride):
    taps_h, pad_h = _phase_taps(kernel.shape[0], stride, pad_top, a, height, dy.shape[1])
    row = []
    for b in range(stride):
      taps_w, pad_w = _phase_taps(kernel.shape[1], stride, pad_left, b, width, dy.shape[2])
      if not taps_h or not taps_w:
        row.append(jnp.zeros((n, height // stride, width // stride, channels), dy.dtype))
        continue
      sub_kernel = kernel_t[np.array(taps_h)][:, np.array(taps_w)]
      row.append(jax.lax.conv_general_dilated(dy, sub_kernel, (1, 1), (pad_h, pad_w),
                                              dimension_numbers=_DIMENSION_NUMBERS))
    rows.append(jnp.stack(row, axis=3))  # (N, H/s, W/s, s, C)
  return jnp.stack(rows, axis=2).reshape(n, height, width, channels)


def strided_conv_kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape, stride: int, padding) -> jax.Array:
  """The kernel gradient of a strided convolution from stride**2 stride-1 kernel gradients, one per phase of
  the input grid: the taps reading input rows stride * m + a only ever see that phase of x (autodiff's form
  is one convolution with the output gradient dilated by the stride).
  """
  k_h, k_w, _, _ = kernel_shape
  (pad_top, _), (pad_left, _) = padding
  grad = jnp.zeros(kernel_shape, dy.dtype)
  for a in range(stride):
    taps_h = [t for t in range(k_h) if (t - pad_top - a) % stride == 0]
    if not taps_h:
      continue
    for b in range(stride):
      taps_w = [t for t in range(k_w) if (t - pad_left - b) % stride == 0]
      if not taps_w:
        continue
      x_ab = x[:, a::stride, b::stride]
      # y[i] += x_ab[i + o] w[t] with o = (t - pad - a) / stride, rising with t
      pads = []
      for taps, phase, pad, size, out in ((taps_h, a, pad_top, x_ab.shape[1], dy.shape[1]),
                                          (taps_w, b, pad_left, x_ab.shape[2], dy.shape[2])):
        first, last = (taps[0] - pad - phase) // stride, (taps[-1] - pad - phase) // stride
        pads.append((-first, out - 1 + last - (size - 1)))
      sub_shape = (len(taps_h), len(taps_w), *kernel_shape[2:])
      _, vjp = jax.vjp(lambda k, x_ab=x_ab, pads=tuple(pads): jax.lax.conv_general_dilated(
          x_ab, k, (1, 1), pads, dimension_numbers=_DIMENSION_NUMBERS), jnp.zeros(sub_shape, dy.dtype))
      grad = grad.at[np.ix_(taps_h, taps_w)].set(vjp(dy)[0])
  return grad


def _phase_gradients_fit(in_shape, stride: int) -> bool:
  """Whether a strided conv can take strided_conv2d's gradients: H and W divisible by the stride, and more
  than NARROW_CHANNELS input channels."""
  _, height, width, channels = in_shape
  return height % stride == 0 and width % stride == 0 and channels > NARROW_CHANNELS


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
  """conv2d with stride > 1 whose input and kernel gradients run as phases (the CPU form)."""
  return conv2d(x, kernel, stride, padding)


def _strided_conv2d_fwd(x, kernel, stride, padding):
  return conv2d(x, kernel, stride, padding), (x, kernel)


def _strided_conv2d_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  dx = strided_conv_input_grad(dy, kernel, stride, padding, x.shape).astype(x.dtype)
  return dx, strided_conv_kernel_grad(x, dy, kernel.shape, stride, padding).astype(kernel.dtype)


strided_conv2d.defvjp(_strided_conv2d_fwd, _strided_conv2d_bwd)


class ConvTranspose3x3s2(nn.Module):
  """torch's ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1): (N,H,W,C) -> (N,2H,2W,features).

  The kernel is stored (3, 3, in, out) with torch's tap order (torch weight (in, out, 3, 3) transposed, not
  flipped). Two forms (forms.ConvForms.subpixel_transpose): one convolution of the zero-dilated input with
  the flipped kernel (the plain form), or its four output phases - output pixel (2m + a, 2l + b) reads 1, 2,
  2 or 4 kernel taps, so no multiply hits an inserted zero.
  """
  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  conv_impl: str = "auto"

  # Output row 2m + phase reads input rows m + offset with kernel row _TAP[phase][offset] (None: no tap).
  # From torch's definition y[2i - 1 + k] += x[i] w[k]: y[2m] = x[m] w[1], y[2m+1] = x[m] w[2] + x[m+1] w[0].
  _TAP = ((1, None), (2, 0))
  # The plain form: dilate by the stride, pad (k - 1 - padding, k - 1 - padding + output_padding).
  _DILATED_PADDING = ((1, 2), (1, 2))

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param("kernel", conv_transpose_init, (3, 3, c, self.features), jnp.float32)
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    if conv_forms(self.conv_impl).subpixel_transpose:
      y = self._subpixel(x, kernel)
    else:
      y = jax.lax.conv_general_dilated(x, kernel[::-1, ::-1], (1, 1), self._DILATED_PADDING,
                                       lhs_dilation=(2, 2), dimension_numbers=_DIMENSION_NUMBERS)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = add_bias(y, bias.astype(self.dtype))
    return y

  def _subpixel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    n, h, w, _ = x.shape
    phases = []  # phases[a][b]: output pixels (2m + a, 2l + b), (N,H,W,features)
    for taps_h in self._TAP:
      taps_h = [t for t in taps_h if t is not None]
      row = []
      for taps_w in self._TAP:
        taps_w = [t for t in taps_w if t is not None]
        # (offsets_h, offsets_w, in, out)
        sub_kernel = jnp.stack([jnp.stack([kernel[i, j] for j in taps_w]) for i in taps_h])
        # Offset 1 reads row m + 1: one zero row (column) past the end, which is torch's output_padding.
        padding = ((0, len(taps_h) - 1), (0, len(taps_w) - 1))
        row.append(conv2d(x, sub_kernel, 1, padding))
      phases.append(jnp.stack(row, axis=3))  # (N,H,W,2,features)
    return jnp.stack(phases, axis=2).reshape(n, 2 * h, 2 * w, self.features)  # (N,H,2,W,2,F) interleaved


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """An unpadded 1x1 convolution as one matrix product over the (strided) pixels: the same sums, and its
  kernel gradient is a plain matrix product too."""
  if stride > 1:
    x = x[:, ::stride, ::stride]
  return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])


def _padding_pairs(padding):
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  return tuple(tuple(p) for p in padding)


class Conv(nn.Module):
  """torch's Conv2d in NHWC with float32 params (kernel (k, k, in, out), bias) and zero padding.

  `conv_impl` picks the form of each special case (forms.ConvForms): unpadded k > 1 convolutions, uneven
  padding, 1x1 convolutions and the gradients of strided convolutions; every form gives the same numbers.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int | Sequence[tuple[int, int]] = 0
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = conv_init
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = self._convolve(x, kernel, conv_forms(self.conv_impl))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = add_bias(y, bias.astype(self.dtype))
    return y

  def _convolve(self, x: jax.Array, kernel: jax.Array, forms: ConvForms) -> jax.Array:
    k, s = self.kernel_size, self.stride
    padding = _padding_pairs(self.padding)
    unpadded = all(p == (0, 0) for p in padding)
    if k == 1 and unpadded and forms.pointwise_matmul:
      return pointwise_conv(x, kernel, s)
    if k > 1 and len(set(sum(padding, ()))) > 1 and forms.prepad_uneven:
      x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
      padding, unpadded = ((0, 0), (0, 0)), True
    if k > 1 and unpadded and forms.padded_valid:
      # One zero row below the input, the extra output row dropped.
      return conv2d(x, kernel, s, ((0, s), (0, 0)))[:, :-1]
    if s > 1 and forms.phase_gradients and _phase_gradients_fit(x.shape, s):
      return strided_conv2d(x, kernel, s, padding)
    return conv2d(x, kernel, s, padding)


def conv(features: int, kernel_size: int, *, stride: int = 1, padding: int | Sequence[tuple[int, int]] = 0,
         use_bias: bool = False, dtype: Dtype = jnp.float32, kernel_init: Initializer = conv_init,
         conv_impl: str = "auto", name: str | None = None) -> Conv:
  """A torch-style Conv2d: symmetric zero padding given as an int (or explicit (H, W) pairs)."""
  return Conv(features, kernel_size, stride=stride, padding=padding, use_bias=use_bias, dtype=dtype,
              kernel_init=kernel_init, conv_impl=conv_impl, name=name)


dense = functools.partial(nn.Dense, kernel_init=dense_init, bias_init=nn.initializers.zeros,
                          param_dtype=jnp.float32)


def canonical_dtype(dtype: str | Dtype) -> jnp.dtype:
  """config.model.dtype ("float32" / "bfloat16") or a dtype -> the compute dtype."""
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"config.model.dtype={dtype!r}; use one of {COMPUTE_DTYPES}") from e
  if dtype.name not in COMPUTE_DTYPES:
    raise ValueError(f"config.model.dtype={dtype.name!r}; use one of {COMPUTE_DTYPES} (float16 would need "
                     "loss scaling, which the method does not have)")
  return dtype
