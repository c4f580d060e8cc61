"""Times both forms (models/forms.py) of every convolution kind that has two, at the full-size shapes of the
method's layers: forward + backward (input and kernel gradients) of one layer, `conv_impl="xla"` against
`conv_impl="cpu"`, on the default backend.

python benchmarks/conv_forms.py [--batch_size=8 --repeats=20 --json]

This is what decides `forms.AUTO` for a backend: a CPU form runs there under conv_impl="auto" only where it
is faster. With --json the last stdout line is one JSON object: {"backend", "device", "layers": [{"layer",
"kind", "xla_ms", "cpu_ms", "cpu_over_xla"}]}.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from synth_reid_jax import compile_options  # noqa: E402
from synth_reid_jax.models.layers import Conv, ConvTranspose3x3s2  # noqa: E402

# (layer, kind, module kwargs, input shape at batch B (N is replaced), transposed?) at 256x128 images. D runs
# on [G(s); r; s]: three images per batch element.
LAYERS = (
    ("G conv_in 7x7 (unpadded)", "padded_valid", dict(features=64, kernel_size=7), (1, 262, 134, 3)),
    ("G block conv 3x3 (unpadded)", "padded_valid", dict(features=256, kernel_size=3), (1, 66, 34, 256)),
    ("G conv_out 7x7 (unpadded)", "padded_valid", dict(features=3, kernel_size=7, use_bias=True),
     (1, 262, 134, 64)),
    ("G down_0 3x3/2", "phase_gradients", dict(features=128, kernel_size=3, stride=2, padding=1),
     (1, 256, 128, 64)),
    ("G down_1 3x3/2", "phase_gradients", dict(features=256, kernel_size=3, stride=2, padding=1),
     (1, 128, 64, 128)),
    ("G up_0 transposed 3x3/2", "subpixel_transpose", dict(features=128), (1, 64, 32, 256)),
    ("G up_1 transposed 3x3/2", "subpixel_transpose", dict(features=64), (1, 128, 64, 128)),
    ("D conv_1 4x4/2", "phase_gradients", dict(features=128, kernel_size=4, stride=2, padding=1),
     (3, 128, 64, 64)),
    ("D conv_2 4x4/2", "phase_gradients", dict(features=256, kernel_size=4, stride=2, padding=1),
     (3, 64, 32, 128)),
    ("D conv_3 4x4 pad (1,2)", "prepad_uneven", dict(features=512, kernel_size=4, padding=((1, 1), (2, 2))),
     (3, 32, 16, 256)),
    ("D conv_4 4x4 pad (2,1)", "prepad_uneven",
     dict(features=1, kernel_size=4, padding=((2, 2), (1, 1)), use_bias=True), (3, 31, 17, 512)),
    ("R bottleneck 1x1", "pointwise_matmul", dict(features=128, kernel_size=1), (1, 64, 32, 256)),
    ("R shortcut 1x1/2", "pointwise_matmul", dict(features=512, kernel_size=1, stride=2), (1, 64, 32, 256)),
    ("R conv2 3x3/2", "phase_gradients", dict(features=128, kernel_size=3, stride=2, padding=1),
     (1, 64, 32, 128)),
)


def build(kind, kwargs, conv_impl):
  if kind == "subpixel_transpose":
    return ConvTranspose3x3s2(conv_impl=conv_impl, **kwargs)
  return Conv(conv_impl=conv_impl, **kwargs)


def time_layer(kind, kwargs, shape, conv_impl, repeats, dtype):
  """Median ms of one forward + backward of the layer."""
  x = jax.random.normal(jax.random.key(0), shape, dtype)
  module = build(kind, kwargs, conv_impl)
  params = module.init(jax.random.key(1), x)["params"]
  weights = jax.random.normal(jax.random.key(2), jax.eval_shape(
      lambda: module.apply({"params": params}, x)).shape, dtype)

  def objective(p, x):
    return jnp.sum((module.apply({"params": p}, x) * weights).astype(jnp.float32))

  fn = jax.jit(jax.grad(objective, argnums=(0, 1)), compiler_options=compile_options.compiler_options())
  jax.block_until_ready(fn(params, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, x))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  rows = []
  print(f"conv forms, fwd+bwd, batch {args.batch_size}, {args.dtype}, {jax.devices()[0].device_kind}")
  print(f"  {'layer':30s} {'form':20s} {'xla ms':>8s} {'cpu ms':>8s} {'cpu/xla':>8s}")
  for layer, kind, kwargs, shape in LAYERS:
    shape = (shape[0] * args.batch_size, *shape[1:])
    xla, cpu = (time_layer(kind, kwargs, shape, impl, args.repeats, dtype) for impl in ("xla", "cpu"))
    rows.append({"layer": layer, "kind": kind, "xla_ms": xla, "cpu_ms": cpu, "cpu_over_xla": cpu / xla})
    print(f"  {layer:30s} {kind:20s} {xla:8.2f} {cpu:8.2f} {cpu / xla:8.2f}", flush=True)
  if args.json:
    print(json.dumps({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                      "batch_size": args.batch_size, "dtype": args.dtype, "layers": rows}))


if __name__ == "__main__":
  main()
