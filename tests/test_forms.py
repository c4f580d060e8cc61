"""The two forms of every convolution kind (models/forms.py) compute the same outputs, gradients and updates.

The "xla" forms are what GPUs and TPUs run under conv_impl="auto"; the "cpu" forms what XLA:CPU runs. Both
are run here on the CPU, in float32, against each other.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gta2duke
from synth_reid_jax import sharding, train_state, train_step
from synth_reid_jax.models import build_models, forms
from synth_reid_jax.models.layers import Conv, ConvTranspose3x3s2

IMPLS = ("xla", "cpu")
# The bias of a residual block's second conv feeds an instance norm, which removes it: its gradient is zero
# up to rounding, so its Adam moments and first update are rounding noise in either form.
ZERO_GRADIENT = "['conv_1']['bias']"
RTOL, ATOL = 2e-5, 2e-5


def relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def outputs_and_gradients(make_module, x):
  """{impl: (y, d<y, w>/dx, d<y, w>/dparams)} of the module built with each conv_impl, on the same params."""
  params = make_module("xla").init(jax.random.key(0), x)["params"]
  weights = jax.random.normal(jax.random.key(1), make_module("xla").apply({"params": params}, x).shape)
  results = {}
  for impl in IMPLS:
    module = make_module(impl)
    y = module.apply({"params": params}, x)
    objective = lambda p, x, module=module: jnp.sum(module.apply({"params": p}, x) * weights)
    grads = jax.grad(objective, argnums=(0, 1))(params, x)
    results[impl] = (y, grads[1], grads[0])
  return results


def assert_forms_agree(make_module, x):
  results = outputs_and_gradients(make_module, x)
  (y_x, dx_x, dp_x), (y_c, dx_c, dp_c) = results["xla"], results["cpu"]
  assert y_x.shape == y_c.shape
  assert relative_error(y_c, y_x) < RTOL
  assert relative_error(dx_c, dx_x) < RTOL
  for path, leaf in jax.tree_util.tree_leaves_with_path(dp_x):
    other = dict(jax.tree_util.tree_leaves_with_path(dp_c))[path]
    assert relative_error(other, leaf) < RTOL, path


def random_images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_auto_picks_the_cpu_forms_on_cpu_and_the_plain_ones_elsewhere():
  assert forms.conv_forms("auto", "cpu") == forms.CPU
  for backend in ("gpu", "cuda", "tpu"):
    assert forms.conv_forms("auto", backend) == forms.XLA
  assert forms.conv_forms("xla", "cpu") == forms.XLA and forms.conv_forms("cpu", "gpu") == forms.CPU
  assert forms.conv_forms() == forms.CPU  # these tests run on the CPU
  with pytest.raises(ValueError, match="conv_impl='cuda'.*auto"):
    forms.conv_forms("cuda")


@pytest.mark.parametrize("use_bias", [False, True])
def test_transposed_convolution(use_bias):
  # The generator's upsampling: sub-pixel phases vs one convolution of the zero-dilated input.
  assert_forms_agree(lambda impl: ConvTranspose3x3s2(6, use_bias=use_bias, conv_impl=impl),
                     random_images((2, 5, 3, 8)))


@pytest.mark.parametrize("kernel,stride,padding,channels", [
    (7, 1, 0, 3),  # G's reflect-padded input conv (unpadded, 3 channels)
    (3, 1, 0, 8),  # a residual block's conv after its reflect padding
    (7, 1, 0, 8),  # G's output conv
    (4, 1, ((1, 1), (2, 2)), 8),  # D's penultimate conv (uneven padding)
    (4, 1, ((2, 2), (1, 1)), 8),  # D's last conv
    (1, 1, 0, 8),  # R's bottleneck 1x1
    (1, 2, 0, 8),  # R's strided 1x1 shortcut
    (3, 2, 1, 8),  # G's downsampling, R's stride-2 3x3 (phase gradients)
    (4, 2, 1, 8),  # D's strided convs (phase gradients)
    (4, 2, 1, 3),  # D's first conv: 3 channels keep autodiff's input gradient
    (3, 2, 1, 5),  # odd spatial size below: phase gradients do not apply
])
def test_convolution(kernel, stride, padding, channels):
  height, width = (8, 6) if channels != 5 else (7, 5)
  assert_forms_agree(lambda impl: Conv(4, kernel, stride=stride, padding=padding, use_bias=True,
                                       conv_impl=impl), random_images((2, height, width, channels)))


def tiny_config(conv_impl):
  config = gta2duke.get_config("tiny")
  config.model.conv_impl = conv_impl
  return config


def test_whole_networks_agree():
  x = random_images((2, 32, 16, 3))
  models = {impl: build_models(tiny_config(impl), num_classes=5) for impl in IMPLS}
  g_params = models["xla"].generator.init(jax.random.key(0), x)
  d_params = models["xla"].discriminator.init(jax.random.key(1), x)
  for name, params in (("generator", g_params), ("discriminator", d_params)):
    out = {impl: getattr(models[impl], name).apply(params, x) for impl in IMPLS}
    assert relative_error(out["cpu"], out["xla"]) < RTOL, name
  feats = models["xla"].generator.apply(g_params, x, method="encoder_output")
  r_vars = models["xla"].reid.init(jax.random.key(2), feats, train=False)
  out = {impl: models[impl].reid.apply(r_vars, feats, train=True, mutable=["batch_stats"])[0][0]
         for impl in IMPLS}
  assert relative_error(out["cpu"], out["xla"]) < RTOL


def test_train_step_first_updates_agree():
  """One full method step (every default loss, the four optimisers) with each form: same losses, same new
  parameters, optimiser moments and BatchNorm statistics."""
  mesh = sharding.create_mesh(jax.devices()[:1])
  num_classes, batch = 5, 4
  rng = np.random.default_rng(0)
  data = {"source": rng.uniform(-1, 1, (batch, 32, 16, 3)).astype(np.float32),
          "pid": rng.integers(0, num_classes, batch).astype(np.int32),
          "target": rng.uniform(-1, 1, (batch, 32, 16, 3)).astype(np.float32)}
  results = {}
  for impl in IMPLS:
    config = tiny_config(impl)
    state, optimizers = train_state.create_train_state(config, jax.random.key(0), num_classes)
    step = train_step.make_train_step(config, build_models(config, num_classes), optimizers, 10, mesh)
    results[impl] = step(sharding.replicate(state, mesh), sharding.make_global_batch(data, mesh),
                         jax.random.key(1))
  (state_x, metrics_x), (state_c, metrics_c) = results["xla"], results["cpu"]
  for key in train_step.LOSS_METRICS:
    assert float(metrics_c[key]) == pytest.approx(float(metrics_x[key]), rel=1e-5, abs=1e-6), key
  lr = tiny_config("xla").optim.generator.lr
  for name in state_x.params:
    # Per network, all leaves together: a few small leaves (the output conv's bias) differ by several percent
    # even between two compilations of one form, at this tiny size PatchNCE's gradient on G(s) is that
    # sensitive to rounding.
    moments_x, moments_c = (adam_moments(state.opt_state[name]) for state in (state_x, state_c))
    assert relative_error(moments_c, moments_x) < 1e-3, name
    # Adam's first update is +-lr whatever the gradient's size: where a gradient is ~0, rounding can flip its
    # sign and move that parameter by 2 lr. Allow that on a few parameters only.
    new_x, new_c = (flat(state.params[name]) for state in (state_x, state_c))
    np.testing.assert_allclose(new_c, new_x, rtol=1e-4, atol=2 * lr * 1.01, err_msg=name)
    assert np.mean(~np.isclose(new_c, new_x, rtol=1e-4, atol=1e-6)) < 1e-2, name
  for name in state_x.batch_stats:
    assert relative_error(flat(state_c.batch_stats[name]), flat(state_x.batch_stats[name])) < 1e-4, name
  assert int(state_c.step) == int(state_x.step) == 1


def flat(tree, exclude=ZERO_GRADIENT):
  """Every float leaf of `tree` (but those whose path holds `exclude`) as one float64 vector."""
  leaves = [np.asarray(leaf, np.float64).ravel() for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if exclude not in jax.tree_util.keystr(path) and np.asarray(leaf).dtype.kind == "f"]
  return np.concatenate(leaves)


def adam_moments(opt_state):
  """Adam's first moments of one network (its gradients scaled by 1 - b1), as one vector."""
  moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
             if ".mu" in jax.tree_util.keystr(path) and ZERO_GRADIENT not in jax.tree_util.keystr(path)]
  return np.concatenate([np.asarray(m, np.float64).ravel() for m in moments])


def test_auto_follows_the_devices_compiled_for():
  """The platform of a mesh, a sharding or a device list picks the forms; within compiling_for the model
  layers' "auto" (conv_forms() without a backend) takes the target's forms."""
  mesh = sharding.create_mesh(jax.devices()[:2])
  assert forms.conv_forms("auto", mesh) == forms.conv_forms("auto", jax.devices()) == forms.CPU
  assert forms.nonfinite_guard("auto", sharding.batch_sharding(mesh)) == "cond"
  with forms.compiling_for("tpu") as platform:
    assert platform == "tpu" and forms.conv_forms() == forms.XLA and forms.nonfinite_guard() == "select"
    assert forms.conv_impl_name() == "xla" and forms.conv_forms("cpu") == forms.CPU
  assert forms.conv_forms() == forms.CPU and forms.conv_impl_name() == "cpu"
