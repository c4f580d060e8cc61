"""The InceptionV3 behind FID (TF's 2015-12-05 graph as ported by pytorch-fid), returning pool features.

It differs from the classification InceptionV3 in faithful quirks of that graph: the average pools inside
the Mixed blocks ignore padded zeros, the last block (Mixed_7c) max-pools its pool branch, and the input is
resized to 299x299 with plain bilinear interpolation (torch's `align_corners=False`, no antialiasing) and
mapped from [0, 1] to [-1, 1]. Variable names follow the torch module names, so converted weights map
one to one.
"""

import functools
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FID_IMAGE_SIZE = 299  # the resolution the FID network was trained at
BATCH_NORM_EPS = 1e-3  # TF Inception's BatchNorm epsilon
POOL3_DIM = 2048  # width of the final average pool: the features FID is defined on
# Feature width -> the block it is read after (pytorch-fid's --dims): first max pool, second max pool, the
# input of the auxiliary classifier, the final average pool. Smaller widths are spatially averaged.
FEATURE_DIMS = (64, 192, 768, POOL3_DIM)
WEIGHTS_SEP = "/"  # flat .npz keys: "params/Mixed_5b/branch1x1/conv/kernel"

PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_HELP = (
    "The FID Inception weights are pytorch-fid's port of TF's 2015-12-05 Inception graph. Download "
    f"{PYTORCH_FID_WEIGHTS_URL} and convert it once (needs the [torch] extra: "
    "pip install 'synth-reid-jax[torch]'):"
    "\n  python -m synth_reid_jax.tools.convert_inception pt_inception-2015-12-05-6726825d.pth "
    "--output=inception_fid.npz\nthen pass --weights=inception_fid.npz.")


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 weights of torch's bilinear interpolation along one axis.

  torch (align_corners=False, no antialiasing) samples output pixel i at (i + 0.5) * in / out - 0.5, clamped
  below at 0, and mixes the two neighbouring input pixels linearly (the upper one clamped at the border). The
  coordinates are computed in float32 as torch does, which keeps us within a few 1e-6 of its output.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize needs positive sizes, got {in_size} -> {out_size}")
  scale = np.float32(in_size / out_size)
  half = np.float32(0.5)
  src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + half) - half, np.float32(0))
  lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = src - lower.astype(np.float32)
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lower), np.float32(1) - frac)
  np.add.at(weights, (rows, upper), frac)
  return weights


def resize_bilinear(images, size: int = FID_IMAGE_SIZE):
  """(..., H, W, C) -> (..., size, size, C) as torch's F.interpolate(mode="bilinear") in pytorch-fid.

  Works on numpy arrays (host-side, per image of any size) and on jax arrays (inside jit).
  """
  height, width = images.shape[-3], images.shape[-2]
  if (height, width) == (size, size):
    return images
  rows = bilinear_resize_matrix(height, size)
  cols = bilinear_resize_matrix(width, size)
  if isinstance(images, jax.Array):
    einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  else:
    einsum = np.einsum
  images = einsum("oh,...hwc->...owc", rows, images)
  return einsum("pw,...owc->...opc", cols, images)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool whose border windows average only real pixels (TF's SAME pooling)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_same(x: jax.Array) -> jax.Array:
  """3x3 stride-1 max pool keeping the spatial size."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_reduce(x: jax.Array) -> jax.Array:
  """3x3 stride-2 max pool without padding (torch's default floor mode)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2))


def global_avg_pool(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, C)."""
  return jnp.mean(x, axis=(1, 2))


class BasicConv(nn.Module):
  """Conv without bias, BatchNorm with its running statistics (eps 1e-3), ReLU: torchvision's BasicConv2d."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad_h, pad_w = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False, dtype=self.dtype,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPS, dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches (Mixed_5b-d)."""
  pool_features: int
  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = self.conv
    branch1x1 = conv(64, (1, 1), name="branch1x1")(x)
    branch5x5 = conv(48, (1, 1), name="branch5x5_1")(x)
    branch5x5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, (1, 1), name="branch_pool")(avg_pool_exclude_pad(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""
  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = self.conv
    branch3x3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_reduce(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (Mixed_6b-e)."""
  channels_7x7: int
  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, c7 = self.conv, self.channels_7x7
    branch1x1 = conv(192, (1, 1), name="branch1x1")(x)
    branch7x7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    branch7x7dbl = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = conv(192, (1, 1), name="branch_pool")(avg_pool_exclude_pad(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""
  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = self.conv
    branch3x3 = conv(192, (1, 1), name="branch3x3_1")(x)
    branch3x3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, max_pool_reduce(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3 / 3x1 branches (Mixed_7b, Mixed_7c)."""
  conv: Callable[..., nn.Module]
  # The FID graph max-pools the pool branch of its last block (Mixed_7c) where the paper averages.
  pool: Callable[[jax.Array], jax.Array] = avg_pool_exclude_pad

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = self.conv
    branch1x1 = conv(320, (1, 1), name="branch1x1")(x)
    branch3x3 = conv(384, (1, 1), name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3)], axis=-1)
    branch3x3dbl = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl)], axis=-1)
    branch_pool = conv(192, (1, 1), name="branch_pool")(self.pool(x))
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
  """FID's InceptionV3: images (N, H, W, 3) in [0, 1] -> features (N, feature_dim), by default pool3 (2048).

  feature_dim picks the block the features are read after (FEATURE_DIMS, as pytorch-fid's --dims); the
  network stops there. resize_input=False expects images already at 299x299 (e.g. resized on the host).
  """
  feature_dim: int = POOL3_DIM
  resize_input: bool = True
  dtype: Any = jnp.float32
  # TPUs otherwise run float32 convolutions as a single bfloat16 pass; FID needs the float32 numbers.
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if self.feature_dim not in FEATURE_DIMS:
      raise ValueError(f"feature_dim={self.feature_dim} is not one of {FEATURE_DIMS}")
    if self.resize_input:
      images = resize_bilinear(images, FID_IMAGE_SIZE)
    x = (2.0 * images - 1.0).astype(self.dtype)
    conv = functools.partial(BasicConv, dtype=self.dtype, precision=self.precision)
    # Shapes in comments are for a 299x299 input.
    x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # 149x149x32
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147x147x32
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = max_pool_reduce(x)  # 73x73x64
    if self.feature_dim == FEATURE_DIMS[0]:
      return global_avg_pool(x).astype(jnp.float32)
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71x71x192
    x = max_pool_reduce(x)  # 35x35x192
    if self.feature_dim == FEATURE_DIMS[1]:
      return global_avg_pool(x).astype(jnp.float32)
    x = InceptionA(32, conv, name="Mixed_5b")(x)  # 35x35x256
    x = InceptionA(64, conv, name="Mixed_5c")(x)  # 35x35x288
    x = InceptionA(64, conv, name="Mixed_5d")(x)
    x = InceptionB(conv, name="Mixed_6a")(x)  # 17x17x768
    x = InceptionC(128, conv, name="Mixed_6b")(x)
    x = InceptionC(160, conv, name="Mixed_6c")(x)
    x = InceptionC(160, conv, name="Mixed_6d")(x)
    x = InceptionC(192, conv, name="Mixed_6e")(x)
    if self.feature_dim == FEATURE_DIMS[2]:
      return global_avg_pool(x).astype(jnp.float32)
    x = InceptionD(conv, name="Mixed_7a")(x)  # 8x8x1280
    x = InceptionE(conv, name="Mixed_7b")(x)  # 8x8x2048
    x = InceptionE(conv, pool=max_pool_same, name="Mixed_7c")(x)
    return global_avg_pool(x).astype(jnp.float32)


@functools.lru_cache(maxsize=1)
def variable_shapes() -> dict[str, tuple[int, ...]]:
  """Flat variable name -> shape of the full network (what a weights file must hold)."""
  abstract = jax.eval_shape(
      InceptionV3(resize_input=False).init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, FID_IMAGE_SIZE, FID_IMAGE_SIZE, 3), jnp.float32))
  flat = traverse_util.flatten_dict(abstract, sep=WEIGHTS_SEP)
  return {name: tuple(leaf.shape) for name, leaf in flat.items()}


def check_flat_variables(flat: dict[str, np.ndarray], source: str) -> None:
  """Raises naming every missing, unexpected or mis-shaped variable of a flat weights dict."""
  expected = variable_shapes()
  problems = [f"missing {name} {shape}" for name, shape in expected.items() if name not in flat]
  problems += [f"unexpected {name}" for name in flat if name not in expected]
  problems += [f"{name} has shape {tuple(flat[name].shape)}, expected {shape}"
               for name, shape in expected.items() if name in flat and tuple(flat[name].shape) != shape]
  if problems:
    listed = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
    raise ValueError(f"{source} does not hold the FID InceptionV3 variables ({len(problems)} problems):\n  "
                     f"{listed}\n{WEIGHTS_HELP}")


def save_variables(path: str | os.PathLike, flat: dict[str, np.ndarray]) -> None:
  """Writes a flat {"params/.../kernel": array} dict as an .npz after checking it against the network."""
  check_flat_variables(flat, "the converted weights")
  with open(path, "wb") as file:  # a file object keeps the name exactly as given (np.savez would add .npz)
    np.savez(file, **{name: np.asarray(value, np.float32) for name, value in flat.items()})


def load_variables(path: str | os.PathLike) -> dict[str, Any]:
  """Reads an .npz written by tools/convert_inception into {"params", "batch_stats"} (numpy) for .apply."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID Inception weights not found: {path!r}.\n{WEIGHTS_HELP}")
  with np.load(path) as archive:
    flat = {name: archive[name] for name in archive.files}
  check_flat_variables(flat, path)
  return traverse_util.unflatten_dict(flat, sep=WEIGHTS_SEP)
