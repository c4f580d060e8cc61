"""Times the generator's forward + backward pass with alternative padding / norm / upsampling kernels.

python benchmarks/models_bench.py [--batch=2 --height=256 --width=128 --repeats=5 --dtype=float32 --remat]
Each variant swaps one building block; "ours" is what the package uses. Variants run round robin, and the
process CPU time is printed next to wall time (on a shared machine it is the steadier of the two).
"""

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from synth_reid_jax import compile_options  # noqa: E402
from synth_reid_jax.models import generator as generator_lib  # noqa: E402
from synth_reid_jax.models import layers  # noqa: E402


def pad_jnp_reflect(x, pad):
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def pad_zeros(x, pad):
  """Not the method (a lower bound for what any reflect padding can cost)."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def instance_norm_one_pass(x, eps=layers.NORM_EPS):
  """Variance as E[x^2] - E[x]^2 (one read of x for both statistics)."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=(1, 2), keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(xf), axis=(1, 2), keepdims=True) - jnp.square(mean), 0.0)
  scale = jax.lax.rsqrt(var + eps)
  return (xf * scale - mean * scale).astype(x.dtype)


def instance_norm_hw_axes(x, eps=layers.NORM_EPS):
  """The same two-pass statistics reduced over the H and W axes of the 4-D array (XLA:CPU then sums in
  32x32 reduce-windows) instead of over the flattened pixels."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=(1, 2), keepdims=True)
  centered = xf - mean
  var = jnp.mean(jnp.square(centered), axis=(1, 2), keepdims=True)
  return (centered * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class ConvTransposeDilated(nn.Module):
  """The same layer as a zero-dilated convolution (lax.conv_transpose), with the same parameters."""
  features: int
  use_bias: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", layers.conv_transpose_init, (3, 3, x.shape[-1], self.features), jnp.float32)
    # torch's transposed conv: the dilated input, padded (k-1-p, k-1-p+op), with the flipped kernel.
    return jax.lax.conv_transpose(x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype), (2, 2),
                                  ((1, 2), (1, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def plain_conv(features, kernel_size, *, stride=1, padding=0, use_bias=False, dtype=jnp.float32,
               kernel_init=layers.conv_init, name=None):
  """flax.linen.Conv with the same parameters: an unpadded conv runs as XLA's "VALID" convolution."""
  pad = ((padding, padding),) * 2 if isinstance(padding, int) else padding
  return nn.Conv(features, (kernel_size, kernel_size), strides=stride, padding=pad, use_bias=use_bias,
                 dtype=dtype, kernel_init=kernel_init, name=name)


VARIANTS = {
    "ours": {},
    "jnp.pad reflect": {"reflect_pad": pad_jnp_reflect},
    "VALID conv after padding": {"conv": plain_conv},
    "jnp.pad reflect + VALID conv": {"reflect_pad": pad_jnp_reflect, "conv": plain_conv},
    "zero padding (not the method)": {"reflect_pad": pad_zeros},
    "one-pass instance norm": {"instance_norm": instance_norm_one_pass},
    "instance norm over the H and W axes": {"instance_norm": instance_norm_hw_axes},
    "dilated transposed conv": {"ConvTranspose3x3s2": ConvTransposeDilated},
}


def compile_generator(batch, height, width, patches, dtype=jnp.float32, remat=False):
  """A jitted, compiled forward+backward of the generator with module attributes swapped during tracing."""
  originals = {attr: getattr(generator_lib, attr) for attr in patches}
  for attr, value in patches.items():
    setattr(generator_lib, attr, value)
  try:
    model = generator_lib.Generator(dtype=dtype, remat=remat)
    x = jax.random.uniform(jax.random.PRNGKey(0), (batch, height, width, 3), minval=-1, maxval=1)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda s: 0.05 * jnp.ones(s.shape, s.dtype), params)

    def loss(p):
      return jnp.mean(jnp.square(model.apply(p, x)))

    fwd_bwd = jax.jit(jax.grad(loss), compiler_options=compile_options.compiler_options())
    jax.block_until_ready(fwd_bwd(params))
  finally:
    for attr, value in originals.items():
      setattr(generator_lib, attr, value)
  return lambda: jax.block_until_ready(fwd_bwd(params))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--height", type=int, default=256)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", action="store_true")
  args = parser.parse_args()
  names = args.variants.split(",")
  print(f"generator forward+backward, batch {args.batch}, {args.height}x{args.width}, {args.dtype}, "
        f"remat={args.remat}, {jax.devices()}")
  runs = {name: compile_generator(args.batch, args.height, args.width, VARIANTS[name], jnp.dtype(args.dtype),
                                  args.remat) for name in names}
  wall = {name: [] for name in names}
  cpu = {name: [] for name in names}
  for _ in range(args.repeats):  # round robin, so load changes hit every variant alike
    for name in names:
      w, c = time.perf_counter(), time.process_time()
      runs[name]()
      wall[name].append(time.perf_counter() - w)
      cpu[name].append(time.process_time() - c)
  for name in names:
    median = lambda values: sorted(values)[len(values) // 2] * 1e3
    print(f"  {name:36s} wall best {min(wall[name]) * 1e3:7.0f} ms  median {median(wall[name]):7.0f} ms"
          f"   cpu median {median(cpu[name]):7.0f} ms")


if __name__ == "__main__":
  main()
