"""The jitted train step on tiny networks: what each step trains, zero weights, modes, sharding, determinism.

Compiling a step costs seconds on CPU, so each test compiles its configs once and checks everything they
show; steps compile without XLA's backend optimisations (same semantics, half the compile time).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from synth_reid_jax import losses, sharding, train_state, train_step
from synth_reid_jax.models import BASELINE_BACKBONES, build_models

NUM_CLASSES = 3
BATCH = 4
HEIGHT, WIDTH = 32, 16
NETWORKS = ("generator", "discriminator", "projector", "reid")
METRIC_NAMES = set(train_step.LOSS_METRICS) | {"reid_acc", "nonfinite"} | {f"lr_{name}" for name in NETWORKS}
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny_config(**loss):
  """The method at a size that compiles fast: one residual block, one ResNet stage."""
  config = default.get_config()
  config.data.height, config.data.width = HEIGHT, WIDTH
  # A projector narrower than ~32 may map a patch to exactly 0 (all its ReLUs off), where the L2 norm's
  # gradient is NaN - as in the original; at the real width (256) that does not happen.
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


class Run:
  """One config's initial state (kept on the host: the step donates its input) and compiled step."""

  def __init__(self, config, init=None, devices=None, steps_per_epoch=1):
    if init is None:
      state, self.optimizers = train_state.create_train_state(config, jax.random.key(0), NUM_CLASSES)
      init = jax.device_get(state)
    else:
      self.optimizers = train_state.create_optimizers(config, init.params)
    self.config, self.init = config, init
    self.mesh = sharding.create_mesh(devices)
    self.step = train_step.make_train_step(config, build_models(config, NUM_CLASSES), self.optimizers,
                                           steps_per_epoch, self.mesh, compiler_options=FAST_COMPILE)

  def __call__(self, num_steps=1, rng_seed=1):
    """Runs from the initial state; -> (final state on the host, [metrics of each step])."""
    state = sharding.replicate(self.init, self.mesh)
    batch = sharding.make_global_batch(fake_batch(), self.mesh)
    history = []
    for i in range(num_steps):
      state, metrics = self.step(state, batch, jax.random.fold_in(jax.random.key(rng_seed), i))
      history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def _changed(before, after):
  pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
  return any(not np.array_equal(a, b) for a, b in pairs)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _is_bias_before_instance_norm(path):
  """The residual blocks' second conv keeps its bias before an InstanceNorm (as the original): its gradient is
  zero up to rounding, and Adam turns that rounding noise into full-size steps of either sign."""
  keys = [getattr(k, "key", None) for k in path]
  return keys[0] == "generator" and keys[1].startswith("block_") and keys[-2:] == ["conv_1", "bias"]


@pytest.mark.slow
def test_method_step():
  """Joint mode, GAN + feature matching + PatchNCE + CE + triplet; re-ID from epoch 2, when R's lr decays."""
  config = tiny_config(reid_triplet=0.5, reid_start_epoch=2)
  config.optim.reid.milestones = (1,)
  run = Run(config)  # 4 devices, one step per epoch
  init = run.init
  assert set(init.params) == set(init.opt_state) == set(run.optimizers) == set(NETWORKS)
  assert set(init.batch_stats) == {"reid"} and int(init.step) == 0

  # Epoch 1 (before reid_start_epoch): G, D and F train; R is neither run nor updated and reports nothing.
  state, (first,) = run(num_steps=1)
  assert set(first) == METRIC_NAMES and all(np.isfinite(v) for v in first.values()), first
  for name in ("gen_gan", "gen_sim", "nce", "dis_real", "dis_fake", "dis_sim"):
    assert first[name] > 0, name
  assert first["reid_ce"] == first["reid_triplet"] == first["reid_acc"] == first["nce_idt"] == 0
  for name in ("generator", "discriminator", "projector"):
    assert _changed(init.params[name], state.params[name]), name
  _assert_trees_equal(init.params["reid"], state.params["reid"])
  _assert_trees_equal(init.batch_stats["reid"], state.batch_stats["reid"])
  _assert_trees_equal(init.opt_state["reid"], state.opt_state["reid"])

  # Epoch 2: R trains (BatchNorm statistics too) at its decayed learning rate; the BNNeck shift stays.
  state, (first_again, second) = run(num_steps=2)
  assert all(np.isfinite(v) for v in second.values()), second
  assert int(state.step) == 2
  assert second["reid_ce"] > 0 and second["reid_triplet"] >= 0 and 0 <= second["reid_acc"] <= 100
  assert _changed(init.params["reid"], state.params["reid"])
  assert _changed(init.batch_stats["reid"], state.batch_stats["reid"])
  np.testing.assert_array_equal(state.params["reid"]["bnneck"]["bias"], init.params["reid"]["bnneck"]["bias"])
  lr = config.optim.generator.lr
  assert first["lr_reid"] == second["lr_generator"] == pytest.approx(lr)
  assert second["lr_reid"] == pytest.approx(lr * config.optim.reid.gamma)
  assert all(jax.tree.leaves(state.params[n])[0].dtype == jnp.float32 for n in NETWORKS)

  # Same seed, same result; another rng draws other patch positions. All of it from one compilation.
  assert first_again == first
  _, (other,) = run(num_steps=1, rng_seed=2)
  assert other["nce"] != first["nce"] and other["gen_gan"] == first["gen_gan"]
  assert run.step._cache_size() == 1

  # The same two steps on one device: the batch statistics (BatchNorm, PatchNCE, means) are global.
  single = Run(config, init=init, devices=jax.devices()[:1])
  single_state, single_history = single(num_steps=2)
  sharded = dict(jax.tree_util.tree_leaves_with_path(state.params))
  max_lr = max(config.optim[n].lr for n in NETWORKS)
  mismatched = total = 0
  for path, value in jax.tree_util.tree_leaves_with_path(single_state.params):
    if _is_bias_before_instance_norm(path):
      continue
    # A gradient that is zero up to rounding becomes an Adam step of +-lr whose sign depends on the order of
    # the cross-device sums; such entries may differ by at most two steps, every other entry must agree.
    diff = np.abs(np.asarray(value) - np.asarray(sharded[path]))
    close = diff <= 1e-6 + 1e-5 * np.abs(np.asarray(value))
    assert np.all(diff <= 2 * max_lr + 1e-6), jax.tree_util.keystr(path)
    mismatched += int(np.sum(~close))
    total += close.size
  assert mismatched <= 1e-3 * total, (mismatched, total)
  for a, b in zip(jax.tree.leaves(single_state.batch_stats), jax.tree.leaves(state.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for one, four in zip(single_history, (first_again, second)):
    for name in one:
      assert one[name] == pytest.approx(four[name], rel=1e-5, abs=1e-6), name


@pytest.mark.slow
def test_modes_and_zero_weights():
  """PatchNCE + re-ID only (GAN, D and feature matching weighted 0), bfloat16 compute: disjoint vs joint (with
  identity NCE) vs no re-ID."""
  runs = {}
  init = None
  for mode, loss in [("disjoint", dict(guide_gen=False)), ("joint", dict(guide_gen=True, nce_idt=0.5)),
                     ("no_reid", dict(reid_ce=0.0))]:
    config = tiny_config(gan=0.0, dis=0.0, sim=0.0, **loss)
    config.model.dtype = "bfloat16"
    run = Run(config, init=init)
    init = run.init
    runs[mode] = run()
  for mode, (state, (metrics,)) in runs.items():
    # Zero weights: D is never run, so neither its params nor its optimizer state move.
    _assert_trees_equal(state.params["discriminator"], init.params["discriminator"])
    _assert_trees_equal(state.opt_state["discriminator"], init.opt_state["discriminator"])
    for name in ("gen_gan", "gen_sim", "dis_real", "dis_fake", "dis_sim", "reid_triplet"):
      assert metrics[name] == 0, (mode, name)
    assert np.isfinite(metrics["nce"]) and metrics["nce"] > 0
    assert all(jax.tree.leaves(state.params[n])[0].dtype == jnp.float32 for n in NETWORKS)
  disjoint, joint, no_reid = (runs[k][0] for k in ("disjoint", "joint", "no_reid"))
  # Disjoint: R trains on stopped features, G gets exactly the update it gets without any re-ID loss.
  _assert_trees_equal(disjoint.params["generator"], no_reid.params["generator"])
  assert _changed(init.params["reid"], disjoint.params["reid"])
  _assert_trees_equal(init.params["reid"], no_reid.params["reid"])
  # Joint: the re-ID loss reaches G.
  assert _changed(no_reid.params["generator"], joint.params["generator"])
  assert runs["joint"][1][0]["nce_idt"] > 0
  assert runs["disjoint"][1][0]["reid_ce"] == pytest.approx(runs["joint"][1][0]["reid_ce"], rel=1e-6)


@pytest.mark.parametrize("backbone", BASELINE_BACKBONES)
def test_resnet50_baseline_step(backbone):
  config = tiny_config(gan=0.0, dis=0.0, nce=0.0, sim=0.0, reid_triplet=0.3)
  config.model.backbone = backbone
  run = Run(config)
  state, (metrics,) = run()
  assert set(state.params) == set(state.opt_state) == set(state.batch_stats) == {"stem", "reid"}
  for name in ("stem", "reid"):
    assert _changed(run.init.params[name], state.params[name]), name
    assert _changed(run.init.batch_stats[name], state.batch_stats[name]), name
  assert metrics["reid_ce"] > 0 and metrics["reid_triplet"] >= 0 and metrics["gen_gan"] == 0
  assert metrics["lr_reid"] == pytest.approx(config.optim.reid.lr)


def test_indivisible_batch_is_an_error():
  config = tiny_config()
  config.train.batch_size = 6
  with pytest.raises(ValueError, match="multiple of 4"):
    train_step.make_train_step(config, build_models(config, NUM_CLASSES), {}, 1, sharding.create_mesh())


def test_shared_discriminator_pass_gives_each_update_its_own_gradient():
  """One pass of D serves G's and D's objectives: G and D move exactly as under separate jax.grad calls of the
  original's two objectives (D frozen in G's, G(s) stopped in D's), both reading D from before the step."""
  config = tiny_config(gan=1.0, sim=0.5, dis=0.5, nce=0.0, reid_ce=0.0)
  run = Run(config, devices=jax.devices()[:1])
  state, (metrics,) = run()
  models, init, w = build_models(config, NUM_CLASSES), run.init, config.loss
  batch = fake_batch()
  d_layers = tuple(w.dis_layers) + (train_step.DIS_SCORE_LAYER,)
  discriminate = lambda d, x: models.discriminator.apply({"params": d}, x, layers=d_layers)
  translate = lambda g: models.generator.apply({"params": g}, batch["source"], layers=(0,))[0]

  def generator_loss(g):
    *fake_feats, fake_score = discriminate(init.params["discriminator"], translate(g))
    real_feats = discriminate(init.params["discriminator"], batch["target"])[:-1]
    return (losses.lsgan_loss(fake_score, True) * w.gan
            + losses.feature_matching_loss(real_feats, fake_feats, w.sim_type) * w.sim)

  def discriminator_loss(d):
    *fake_feats, fake_score = discriminate(d, translate(init.params["generator"]))
    *source_feats, _ = discriminate(d, batch["source"])
    real_score = discriminate(d, batch["target"])[-1]
    return ((losses.lsgan_loss(real_score, True) + losses.lsgan_loss(fake_score, False)) * w.dis
            + losses.feature_matching_loss(source_feats, fake_feats, w.sim_type) * w.sim)

  for name, loss in (("generator", generator_loss), ("discriminator", discriminator_loss)):
    grads = jax.grad(loss)(init.params[name])
    want, _ = train_step._update(run.optimizers[name], init.params[name], grads, init.opt_state[name],
                                 metrics[f"lr_{name}"])
    for path, value in jax.tree_util.tree_leaves_with_path(want):
      if _is_bias_before_instance_norm((jax.tree_util.DictKey(name), *path)):
        continue
      got = state.params[name]
      for key in path:
        got = got[key.key]
      np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert metrics["gen_gan"] == pytest.approx(float(generator_loss(init.params["generator"]))
                                             - metrics["gen_sim"], rel=1e-5)


@pytest.mark.parametrize("guard", ["select", "cond"])
def test_nonfinite_step_changes_nothing_but_the_step_counter(guard):
  """A NaN in the input makes every loss and gradient non-finite: the guard inside the step keeps params,
  optimiser states and BatchNorm statistics, counts the step and reports it; the next good step updates."""
  config = tiny_config()
  config.train.nonfinite_guard = guard
  run = Run(config)
  state = sharding.replicate(run.init, run.mesh)
  bad = fake_batch()
  bad["source"][0, 0, 0, 0] = np.nan
  state, metrics = run.step(state, sharding.make_global_batch(bad, run.mesh), jax.random.key(0))
  metrics = jax.device_get(metrics)
  assert metrics[train_step.NONFINITE_METRIC] == 1.0 and np.isnan(metrics["nce"])
  state = jax.device_get(state)
  assert int(state.step) == 1
  _assert_trees_equal((state.params, state.opt_state, state.batch_stats),
                      (run.init.params, run.init.opt_state, run.init.batch_stats))
  good = sharding.make_global_batch(fake_batch(), run.mesh)
  state, metrics = run.step(sharding.replicate(state, run.mesh), good, jax.random.key(0))
  assert jax.device_get(metrics)[train_step.NONFINITE_METRIC] == 0.0
  assert int(state.step) == 2 and _changed(run.init.params, jax.device_get(state.params))


def test_both_guard_forms_give_the_same_state():
  """The select and cond forms of the non-finite guard (forms.nonfinite_guard): the same params, optimiser
  states and BatchNorm statistics after good steps, with R held back by loss.reid_start_epoch and then not."""
  config = tiny_config()
  config.loss.reid_start_epoch = 2  # steps_per_epoch 2: R frozen for steps 0-1, trained from step 2
  states = {}
  for guard in ("select", "cond"):
    config.train.nonfinite_guard = guard
    run = Run(config, steps_per_epoch=2)
    states[guard], history = run(num_steps=3)
    assert [m[train_step.NONFINITE_METRIC] for m in history] == [0.0, 0.0, 0.0]
  for a, b in zip(jax.tree.leaves(states["select"]), jax.tree.leaves(states["cond"])):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-6)
  assert _changed(run.init.params["reid"], states["cond"].params["reid"])


def test_auto_guard_per_backend():
  from synth_reid_jax.models import forms

  assert forms.nonfinite_guard("auto", "cpu") == "cond"
  assert forms.nonfinite_guard("auto", "gpu") == forms.nonfinite_guard("auto", "tpu") == "select"
  assert forms.nonfinite_guard("select", "cpu") == "select"
  with pytest.raises(ValueError, match="nonfinite_guard='where'"):
    forms.nonfinite_guard("where")
