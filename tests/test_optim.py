"""torch-style Adam (L2 decay in the gradient, torch's bias correction), frozen leaves, multi-step decay."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from synth_reid_jax import optim


def _np_torch_adam(param, grads, lrs, b1, b2, eps, wd):
  """torch.optim.Adam(weight_decay=wd) written out from its documented update rule."""
  m, v = np.zeros_like(param), np.zeros_like(param)
  param = param.astype(np.float64)
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    g = g + wd * param
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
    param = param - lr / (1 - b1**t) * m / denom
  return param


def _run(tx, params, grads, lrs):
  state = tx.init(params)
  update = jax.jit(lambda p, g, s, lr: _apply(tx, p, g, s, lr))
  for g, lr in zip(grads, lrs):
    params, state = update(params, g, state, lr)
  return params, state


def _apply(tx, params, grads, state, lr):
  state = optim.set_learning_rate(state, lr)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_matches_torch_adam_rule_with_changing_lr():
  rng = np.random.default_rng(0)
  param = rng.normal(size=(7,)).astype(np.float32)
  grads = [rng.normal(size=(7,)).astype(np.float32) for _ in range(5)]
  lrs = [2e-2, 2e-2, 2e-2, 2e-3, 2e-3]
  tx = optim.torch_adam(learning_rate=lrs[0], b1=0.5, b2=0.999, eps=1e-8, weight_decay=5e-2)
  got, _ = _run(tx, {"w": jnp.asarray(param)}, [{"w": g} for g in grads], lrs)
  expected = _np_torch_adam(param, grads, lrs, 0.5, 0.999, 1e-8, 5e-2)
  np.testing.assert_allclose(got["w"], expected, rtol=1e-5, atol=1e-7)


def test_frozen_leaf_gets_no_update_and_no_decay():
  params = {"kernel": jnp.ones((3,)), "shift": jnp.full((3,), 0.25)}
  frozen = {"kernel": False, "shift": True}
  tx = optim.torch_adam(learning_rate=0.1, b1=0.5, weight_decay=0.5, frozen=frozen)
  grads = [{"kernel": jnp.ones((3,)), "shift": jnp.ones((3,))}] * 3
  got, _ = _run(tx, params, grads, [0.1] * 3)
  np.testing.assert_array_equal(got["shift"], params["shift"])
  assert not np.allclose(got["kernel"], params["kernel"])
  # The mask may also be a function of the params' structure.
  tx_fn = optim.torch_adam(learning_rate=0.1, b1=0.5, weight_decay=0.5,
                           frozen=lambda p: {name: name == "shift" for name in p})
  got_fn, _ = _run(tx_fn, params, grads, [0.1] * 3)
  np.testing.assert_array_equal(got_fn["shift"], params["shift"])


def test_create_optimizer_reads_config_block():
  block = ml_collections.ConfigDict(
      dict(lr=1e-2, b1=0.5, b2=0.99, eps=1e-8, weight_decay=5e-3, milestones=(2,), gamma=0.1))
  tx = optim.create_optimizer(block)
  state = tx.init({"w": jnp.zeros(2)})
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
  param = np.array([0.3, -0.2], np.float32)
  grads = [np.array([0.1, 0.2], np.float32)] * 2
  got, _ = _run(tx, {"w": jnp.asarray(param)}, [{"w": g} for g in grads], [1e-2] * 2)
  expected = _np_torch_adam(param, grads, [1e-2] * 2, 0.5, 0.99, 1e-8, 5e-3)
  np.testing.assert_allclose(got["w"], expected, rtol=1e-5)


def test_multistep_schedule_boundaries():
  # torch MultiStepLR stepped after every epoch: epoch e (0-based) uses base * gamma ** #(milestones <= e).
  schedule = optim.multistep_schedule(2e-4, milestones=(30, 40), gamma=0.1, steps_per_epoch=10)
  for step, expected in [(0, 2e-4), (299, 2e-4), (300, 2e-5), (399, 2e-5), (400, 2e-6), (10_000, 2e-6)]:
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6), step
  assert float(jax.jit(schedule)(jnp.int32(300))) == pytest.approx(2e-5, rel=1e-6)
  constant = optim.multistep_schedule(1e-3, milestones=(), gamma=0.1, steps_per_epoch=3)
  assert float(constant(10**6)) == pytest.approx(1e-3)


def test_multistep_schedule_rejects_bad_arguments():
  with pytest.raises(ValueError, match="increasing"):
    optim.multistep_schedule(1.0, (40, 30), 0.1, 10)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.multistep_schedule(1.0, (40,), 0.1, 0)


@pytest.mark.torch
def test_matches_torch_adam():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  param = rng.normal(size=(4, 3)).astype(np.float32)
  grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(4)]
  w = torch.nn.Parameter(torch.tensor(param))
  opt = torch.optim.Adam([w], lr=2e-2, betas=(0.5, 0.99), eps=1e-8, weight_decay=5e-3)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.1)
  lrs = []
  for epoch, g in enumerate(grads):
    lrs.append(opt.param_groups[0]["lr"])
    w.grad = torch.tensor(g)
    opt.step()
    sched.step()  # one step per "epoch"
    del epoch
  schedule = optim.multistep_schedule(2e-2, (1,), 0.1, steps_per_epoch=1)
  np.testing.assert_allclose([float(schedule(i)) for i in range(4)], lrs, rtol=1e-6)
  tx = optim.torch_adam(2e-2, b1=0.5, b2=0.99, eps=1e-8, weight_decay=5e-3)
  got, _ = _run(tx, {"w": jnp.asarray(param)}, [{"w": g} for g in grads], lrs)
  np.testing.assert_allclose(got["w"], w.detach().numpy(), rtol=1e-5, atol=1e-7)
