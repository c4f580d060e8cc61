"""The jitted train step on tiny networks: what each step trains, zero weights, modes, sharding, determinism.

Compiling a step takes several seconds on CPU, so every config below is compiled once per module and its
compiled step is shared by the tests that need it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from synth_reid_jax import sharding, train_state, train_step
from synth_reid_jax.models import build_models

NUM_CLASSES = 3
BATCH = 4
HEIGHT, WIDTH = 32, 16
METRIC_NAMES = set(train_step.LOSS_METRICS) | {"reid_acc"} | {
    f"lr_{name}" for name in ("generator", "discriminator", "projector", "reid")}


def tiny_config(**loss):
  """The method at a size that compiles fast: one residual block, one ResNet stage."""
  config = default.get_config()
  config.data.height, config.data.width = HEIGHT, WIDTH
  # A projector narrower than ~32 may map a patch to exactly 0 (all ReLUs off), where the L2 norm's gradient
  # is NaN - as in the original; at the real width (256) that does not happen.
  config.model.update(dict(ngf=4, n_blocks=1, ndf=4, projector_dim=32, reid_width=4, reid_stages=(1,)))
  config.loss.nce_layers = (0, 3, 4)  # 4 is also the encoder output with one block
  config.loss.num_patches = 16
  config.loss.update(loss)
  config.train.batch_size = BATCH
  return config


def fake_batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"source": rng.uniform(-1, 1, (BATCH, HEIGHT, WIDTH, 3)).astype(np.float32),
          "pid": np.array([0, 1, 2, 0], np.int32),
          "target": rng.uniform(-1, 1, (BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)}


@functools.cache
def initial_state(config_json):
  """Host copy of a fresh state (each run replicates its own copy: the step donates its input)."""
  config = _CONFIGS[config_json]
  state, optimizers = train_state.create_train_state(config, jax.random.key(0), NUM_CLASSES)
  return jax.device_get(state), optimizers


_CONFIGS = {}


def _register(config):
  key = config.to_json()
  _CONFIGS[key] = config
  return key


class Run:
  """A compiled step for one config and mesh, with helpers to run it from the initial state."""

  def __init__(self, config, devices=None, steps_per_epoch=1):
    self.config = config
    self.init, optimizers = initial_state(_register(config))
    self.mesh = sharding.create_mesh(devices)
    models = build_models(config, NUM_CLASSES)
    self.step = train_step.make_train_step(config, models, optimizers, steps_per_epoch, self.mesh)

  def __call__(self, num_steps=1, seed=0, rng_seed=1):
    state = sharding.replicate(self.init, self.mesh)
    batch = sharding.make_global_batch(fake_batch(seed), self.mesh)
    history = []
    for i in range(num_steps):
      state, metrics = self.step(state, batch, jax.random.fold_in(jax.random.key(rng_seed), i))
      history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def _changed(before, after):
  return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def _assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, **tol)


@pytest.fixture(scope="module")
def method():
  """Joint mode, every loss on (identity NCE and triplet too); re-ID from the 2nd epoch, R's lr decays then."""
  config = tiny_config(nce_idt=0.5, reid_triplet=0.5, reid_start_epoch=2)
  config.optim.reid.milestones = (1,)
  return Run(config)


@pytest.fixture(scope="module")
def method_run(method):
  return method(num_steps=2)


def test_every_network_trains_and_metrics_are_finite(method, method_run):
  state, (first, second) = method_run
  init = method.init
  assert set(first) == METRIC_NAMES
  for metrics in (first, second):
    assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert int(state.step) == 2
  for name in ("generator", "discriminator", "projector", "reid"):
    assert _changed(init.params[name], state.params[name]), name
    assert jax.tree.leaves(state.params[name])[0].dtype == jnp.float32
  assert _changed(init.batch_stats["reid"], state.batch_stats["reid"])
  for name in ("gen_gan", "gen_sim", "nce", "nce_idt", "dis_real", "dis_fake", "dis_sim"):
    assert first[name] > 0, name
  # The BNNeck shift never moves.
  np.testing.assert_array_equal(state.params["reid"]["bnneck"]["bias"], init.params["reid"]["bnneck"]["bias"])


def test_reid_starts_at_reid_start_epoch(method):
  state, (first,) = method(num_steps=1)
  # Epoch 1 < reid_start_epoch = 2: R is neither run nor updated, and reports nothing.
  assert first["reid_ce"] == first["reid_triplet"] == first["reid_acc"] == 0
  assert not _changed(method.init.params["reid"], state.params["reid"])
  assert not _changed(method.init.batch_stats["reid"], state.batch_stats["reid"])
  assert not _changed(method.init.opt_state["reid"], state.opt_state["reid"])


def test_learning_rates_follow_the_epoch_schedule(method, method_run):
  _, (first, second) = method_run
  lr = method.config.optim.generator.lr
  assert first["lr_generator"] == second["lr_generator"] == pytest.approx(lr)
  assert first["lr_reid"] == pytest.approx(lr)
  assert second["lr_reid"] == pytest.approx(lr * 0.1)  # milestone at epoch 1, one step per epoch
  assert second["reid_ce"] > 0 and second["reid_triplet"] >= 0


def test_compiles_once(method, method_run):
  method(num_steps=3, rng_seed=7)
  assert method.step._cache_size() == 1


def test_same_seed_same_result(method, method_run):
  state, history = method(num_steps=2)
  _assert_trees_close(state.params, method_run[0].params, rtol=0, atol=0)
  assert history == method_run[1]
  _, other = method(num_steps=1, rng_seed=2)  # other patch positions
  assert other[0]["nce"] != method_run[1][0]["nce"]


def _is_bias_before_instance_norm(path):
  """The residual blocks' second conv keeps its bias before an InstanceNorm (as the original): its gradient is
  zero up to rounding, and Adam turns that rounding noise into full-size steps of either sign."""
  keys = [getattr(k, "key", None) for k in path]
  return keys[0] == "generator" and keys[1].startswith("block_") and keys[-2:] == ["conv_1", "bias"]


@pytest.mark.slow
def test_four_devices_match_one(method, method_run):
  assert method.mesh.devices.size == 4
  single = Run(method.config, devices=jax.devices()[:1])
  state, history = single(num_steps=2)
  four = dict(jax.tree_util.tree_leaves_with_path(method_run[0].params))
  compared = 0
  for path, one in jax.tree_util.tree_leaves_with_path(state.params):
    if not _is_bias_before_instance_norm(path):
      np.testing.assert_allclose(one, four[path], rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
      compared += 1
  assert compared == len(four) - method.config.model.n_blocks
  _assert_trees_close(state.batch_stats, method_run[0].batch_stats, rtol=1e-5, atol=1e-6)
  for one, four in zip(history, method_run[1]):
    for name in one:
      assert one[name] == pytest.approx(four[name], rel=1e-5, abs=1e-6), name


@pytest.fixture(scope="module")
def nce_only_runs():
  """PatchNCE + re-ID only (no GAN, D or feature matching), in bfloat16: disjoint, joint, and no re-ID."""
  runs = {}
  for name, loss in [("disjoint", dict(guide_gen=False)), ("joint", dict(guide_gen=True)),
                     ("no_reid", dict(reid_ce=0.0))]:
    config = tiny_config(gan=0.0, dis=0.0, sim=0.0, **loss)
    config.model.dtype = "bfloat16"
    run = Run(config)
    runs[name] = (run, *run())
  return runs


def test_zero_weights_leave_the_discriminator_untouched(nce_only_runs):
  for run, state, (metrics,) in nce_only_runs.values():
    _assert_trees_close(state.params["discriminator"], run.init.params["discriminator"], rtol=0, atol=0)
    _assert_trees_close(state.opt_state["discriminator"], run.init.opt_state["discriminator"], rtol=0, atol=0)
    for name in ("gen_gan", "gen_sim", "nce_idt", "dis_real", "dis_fake", "dis_sim", "reid_triplet"):
      assert metrics[name] == 0, name
    assert np.isfinite(metrics["nce"]) and metrics["nce"] > 0


def test_disjoint_reid_does_not_train_the_generator(nce_only_runs):
  disjoint, joint, no_reid = (nce_only_runs[k][1] for k in ("disjoint", "joint", "no_reid"))
  _assert_trees_close(disjoint.params["generator"], no_reid.params["generator"], rtol=1e-6, atol=1e-7)
  assert _changed(no_reid.params["generator"], joint.params["generator"])  # joint: R's loss reaches G
  run = nce_only_runs["disjoint"][0]
  assert _changed(run.init.params["reid"], disjoint.params["reid"])
  assert not _changed(run.init.params["reid"], no_reid.params["reid"])
  # Same re-ID loss value either way (same R, same features); bf16 compute, float32 params.
  assert nce_only_runs["disjoint"][2][0]["reid_ce"] == pytest.approx(nce_only_runs["joint"][2][0]["reid_ce"])
  assert jax.tree.leaves(disjoint.params["generator"])[0].dtype == jnp.float32


def test_resnet50_baseline_step():
  config = tiny_config(gan=0.0, dis=0.0, nce=0.0, sim=0.0, reid_triplet=0.3)
  config.model.backbone = "resnet50"
  run = Run(config)
  state, (metrics,) = run()
  assert set(state.params) == {"stem", "reid"} == set(state.batch_stats)
  assert _changed(run.init.params["stem"], state.params["stem"])
  assert _changed(run.init.params["reid"], state.params["reid"])
  assert _changed(run.init.batch_stats["stem"], state.batch_stats["stem"])
  assert metrics["reid_ce"] > 0 and metrics["reid_triplet"] >= 0 and metrics["gen_gan"] == 0
  assert metrics["lr_reid"] == pytest.approx(config.optim.reid.lr)


def test_create_train_state_layout():
  config = tiny_config()
  state, optimizers = initial_state(_register(config))
  assert set(state.params) == set(state.opt_state) == set(optimizers) == {
      "generator", "discriminator", "projector", "reid"}
  assert set(state.batch_stats) == {"reid"}
  assert int(state.step) == 0


def test_indivisible_batch_is_an_error():
  config = tiny_config()
  config.train.batch_size = 6
  with pytest.raises(ValueError, match="multiple of 4"):
    train_step.make_train_step(config, build_models(config, NUM_CLASSES), {}, 1, sharding.create_mesh())
