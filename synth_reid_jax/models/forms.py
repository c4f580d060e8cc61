"""Which form each convolution kind, and the train step's non-finite guard, take on each backend: the one
place the model and step code look at the backend.

The backend is the platform of the devices a program is compiled for - the mesh's - never the host's: a TPU
program compiled on a CPU machine (tools/aot.py) takes the TPU forms. make_train_step and make_feature_fn
trace their function under `compiling_for(mesh)`; a trace outside any (an eager call, a jit without
shardings) is for the default device, where such a program runs.

Every layer kind below has two forms that compute the same function (tests/test_forms.py checks outputs,
gradients and a whole train step against each other in float32):
- "xla": the plain `lax` convolution, which GPU and TPU convolution libraries handle well;
- "cpu": a rewrite chosen from XLA:CPU timings (docs/performance.md; benchmarks/conv_forms.py times both).
`config.model.conv_impl` picks them: "auto" (default) takes AUTO[backend], "xla" or "cpu" every kind's form
of that name on any backend.
"""

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax

CONV_IMPLS = ("auto", "xla", "cpu")


@dataclasses.dataclass(frozen=True)
class ConvForms:
  """True where a layer kind takes its CPU form."""
  # ConvTranspose3x3s2 as its four sub-pixel phases (no multiplies by inserted zeros) instead of one
  # convolution over the zero-dilated input.
  subpixel_transpose: bool = False
  # An unpadded ("VALID") k > 1 convolution as a padded one with the extra output row dropped (XLA:CPU's
  # unpadded path is several times slower).
  padded_valid: bool = False
  # Uneven zero padding (the discriminator's last two convs) applied with jnp.pad before the convolution
  # instead of inside it (XLA:CPU's kernel gradient of the inline form is far slower).
  prepad_uneven: bool = False
  # 1x1 convolutions as matrix products over the pixels.
  pointwise_matmul: bool = False
  # Input and kernel gradients of strided convolutions as stride**2 stride-1 convolutions over the input's
  # phases (a custom VJP) instead of autodiff's zero-dilated forms.
  phase_gradients: bool = False


XLA = ConvForms()
CPU = ConvForms(subpixel_transpose=True, padded_valid=True, prepad_uneven=True, pointwise_matmul=True,
                phase_gradients=True)
# "auto": the CPU forms on XLA:CPU, the plain forms elsewhere. A CPU form moves into a GPU/TPU entry only
# when benchmarks/conv_forms.py measured it faster on that backend.
AUTO = {"cpu": CPU, "gpu": XLA, "cuda": XLA, "rocm": XLA, "tpu": XLA}


# The platform the function being traced is compiled for (compiling_for), None outside one.
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


def platform_of(target=None) -> str:
  """The platform ("cpu", "gpu", "tpu") of the devices a program is compiled for. `target`: a platform name,
  a Mesh, a Sharding, a device or a sequence of devices; None: the platform being traced for
  (compiling_for), else the default device's - where an eager call or a jit without shardings runs."""
  if isinstance(target, str):
    return target
  if target is None:
    return _TARGET.get() or jax.devices()[0].platform
  if isinstance(target, jax.sharding.Mesh):
    devices = list(target.devices.flat)
  elif isinstance(target, jax.sharding.Sharding):
    devices = list(target.device_set)
  elif isinstance(target, jax.Device):
    devices = [target]
  else:
    devices = list(target)
  platforms = {device.platform for device in devices}
  if len(platforms) != 1:
    raise ValueError(f"A program is compiled for the devices of one platform, got {sorted(platforms)}.")
  return platforms.pop()


@contextlib.contextmanager
def compiling_for(target) -> Iterator[str]:
  """Within it, conv_impl="auto" and nonfinite_guard="auto" resolve for `target`'s platform (platform_of)."""
  token = _TARGET.set(platform_of(target))
  try:
    yield _TARGET.get()
  finally:
    _TARGET.reset(token)


def traced_for(fn: Callable, target) -> Callable:
  """`fn`, traced under compiling_for(target): what jax.jit(..., in_shardings over `target`) should trace."""
  platform = platform_of(target)

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with compiling_for(platform):
      return fn(*args, **kwargs)
  return traced


def check_conv_impl(conv_impl: str) -> None:
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"config.model.conv_impl={conv_impl!r}; use one of {CONV_IMPLS}")


def conv_forms(conv_impl: str = "auto", backend=None) -> ConvForms:
  """The forms for `conv_impl` on `backend` (a platform name or devices, platform_of; default: the platform
  being traced for)."""
  check_conv_impl(conv_impl)
  if conv_impl == "xla":
    return XLA
  if conv_impl == "cpu":
    return CPU
  return AUTO.get(platform_of(backend), XLA)


def conv_impl_name(conv_impl: str = "auto", backend=None) -> str:
  """"xla" or "cpu": the name of the forms `conv_impl` resolves to on `backend` (for reports)."""
  return "cpu" if conv_forms(conv_impl, backend) == CPU else "xla"


# The train step's non-finite guard (train_step.apply_updates), config.train.nonfinite_guard:
# - "select": every updated array chosen elementwise between its new and old value (jnp.where) - the form the
#   GPU numbers in the README were measured with;
# - "cond": the whole update inside one lax.cond on the finiteness flag. On XLA:CPU the selects quadruple the
#   full-size step's compile time (71 s vs 21 s) and cost 5% of its step time (docs/performance.md).
# Both leave the same state (tests/test_train_step.py); "auto" takes NONFINITE_GUARD_AUTO[backend].
NONFINITE_GUARDS = ("auto", "select", "cond")
NONFINITE_GUARD_AUTO = {"cpu": "cond"}  # other backends: "select" until "cond" is measured faster there


def nonfinite_guard(impl: str = "auto", backend=None) -> str:
  """"select" or "cond" for config.train.nonfinite_guard=`impl` on `backend` (a platform name or devices,
  platform_of; default: the platform being traced for)."""
  if impl not in NONFINITE_GUARDS:
    raise ValueError(f"config.train.nonfinite_guard={impl!r}; use one of {NONFINITE_GUARDS}")
  if impl != "auto":
    return impl
  return NONFINITE_GUARD_AUTO.get(platform_of(backend), "select")
