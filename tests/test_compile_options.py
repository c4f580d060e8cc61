"""The CPU compiler options: convolutions stay with XLA's kernels, matrix products go to the library, and
the numbers do not change."""

import jax
import numpy as np
import pytest

from synth_reid_jax import compile_options

needs_cpu_options = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not compile_options._cpu_options_supported(),
    reason="needs XLA:CPU with the YNNPACK fusion option")


def conv_kernel_grad(x, kernel, dy):
  conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.vjp(conv, kernel)[1](dy)[0]


@needs_cpu_options
def test_cpu_options_move_convolutions_off_the_library_only():
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, 8, 6, 16))
  kernel = jax.random.normal(keys[1], (3, 3, 16, 32))
  dy = jax.random.normal(keys[2], (2, 8, 6, 32))
  fn = lambda x, k, dy: (conv_kernel_grad(x, k, dy), x.reshape(-1, 16) @ k[0, 0])
  default = jax.jit(fn).lower(x, kernel, dy).compile()
  ours = jax.jit(fn).lower(x, kernel, dy).compile(compiler_options=compile_options.compiler_options())
  hlo = ours.as_text()
  assert "convolution(" in hlo and "__ynn_fusion" in hlo  # the conv is XLA's, the matmul the library's
  assert hlo.count("__ynn_fusion") < default.as_text().count("__ynn_fusion")
  for got, want in zip(ours(x, kernel, dy), default(x, kernel, dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_overrides_are_added_and_win():
  options = compile_options.compiler_options({"xla_backend_optimization_level": 0})
  assert options["xla_backend_optimization_level"] == 0
  if jax.default_backend() == "cpu" and compile_options._cpu_options_supported():
    assert options.items() >= compile_options.CPU_COMPILER_OPTIONS.items()
  key = next(iter(compile_options.CPU_COMPILER_OPTIONS))
  assert compile_options.compiler_options({key: ""})[key] == ""


def test_the_target_decides_not_the_host():
  """A program compiled for TPU devices gets no XLA:CPU option, even when this CPU host compiles it."""
  from synth_reid_jax import sharding

  assert compile_options.compiler_options(target="tpu") is None
  assert compile_options.compiler_options({"xla_backend_optimization_level": 0}, target="tpu") == {
      "xla_backend_optimization_level": 0}
  cpu_mesh = sharding.create_mesh(jax.devices()[:2])
  assert compile_options.compiler_options(target=cpu_mesh) == compile_options.compiler_options()
  if compile_options._cpu_options_supported():
    assert compile_options.compiler_options(target=cpu_mesh) == compile_options.CPU_COMPILER_OPTIONS
