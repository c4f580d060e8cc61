"""XLA compiler options of the project's jitted functions: on CPU, convolutions through XLA's own kernels.

jaxlib 0.10's XLA:CPU hands convolutions and matrix products to YNNPACK. Its matrix products are fast, but
for the kernel gradient of a convolution (a convolution contracting over the batch, 2-8 wide) it is 2.5x
slower than XLA's Eigen kernels: 30 vs 12 ms for a residual block's 3x3x256 kernel gradient at batch 2, of
which the full-size train step has 28. Keeping YNNPACK for matrix products only
("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT") took the full-size step from 2.29 to 1.90 s in one process
(README, Performance). Only where the work runs changes: same operations, float32 throughout.

On a jaxlib without the option (older or newer), nothing is set; on GPU and TPU nothing is set.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _cpu_options_supported() -> bool:
  """Whether this jaxlib's XLA:CPU knows the options (compiles a scalar function with them)."""
  try:
    jax.jit(jnp.negative).lower(jnp.zeros((), jnp.float32)).compile(compiler_options=CPU_COMPILER_OPTIONS)
  except jax.errors.JaxRuntimeError:  # "No such compile option" / not a valid enum value
    return False
  return True


def compiler_options(overrides: dict[str, Any] | None = None) -> dict[str, Any] | None:
  """The options for jax.jit(..., compiler_options=...) on the default backend, updated with `overrides`."""
  options = {}
  if jax.default_backend() == "cpu" and _cpu_options_supported():
    options.update(CPU_COMPILER_OPTIONS)
  options.update(overrides or {})
  return options or None
