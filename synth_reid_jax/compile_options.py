"""XLA compiler options of the project's jitted functions: on CPU, convolutions through XLA's own kernels.

jaxlib 0.10's XLA:CPU hands convolutions and matrix products to YNNPACK. Its matrix products are fast, but
its kernel gradients of convolutions (contracting over a batch 2-8 wide) are slower than XLA's Eigen kernels,
so YNNPACK keeps the matrix products only ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"; docs/performance.md). Only
where the work runs changes: same operations, float32 throughout.

On a jaxlib without the option (older or newer), nothing is set; on GPU and TPU nothing is set. The platform
is that of the devices the program is compiled for (forms.platform_of: the mesh's), not the host's: a TPU
program compiled on a CPU machine gets no XLA:CPU option."""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from synth_reid_jax.models.forms import platform_of

CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _cpu_options_supported() -> bool:
  """Whether this jaxlib's XLA:CPU knows the options (compiles a scalar function with them for a CPU)."""
  x = jax.device_put(jnp.zeros((), jnp.float32), jax.devices("cpu")[0])
  try:
    jax.jit(jnp.negative).lower(x).compile(compiler_options=CPU_COMPILER_OPTIONS)
  except jax.errors.JaxRuntimeError:  # "No such compile option" / not a valid enum value
    return False
  return True


def compiler_options(overrides: dict[str, Any] | None = None, target=None) -> dict[str, Any] | None:
  """The options for jax.jit(..., compiler_options=...) of a program compiled for `target` (a mesh, sharding,
  devices or platform name; default: the default device), updated with `overrides`."""
  options = {}
  if platform_of(target) == "cpu" and _cpu_options_supported():
    options.update(CPU_COMPILER_OPTIONS)
  options.update(overrides or {})
  return options or None
