"""Optimisers of the method: torch-style Adam (L2 decay added to the gradient) and multi-step decay by epoch.

The learning rate lives in the optimizer state (optax.inject_hyperparams) and the train step sets it from the
global step every step: the schedule follows epochs of the whole run (torch steps every scheduler once per
epoch), while Adam's own step count (its bias correction) only advances when the model is actually updated.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

_TRAINABLE, _FROZEN = "trainable", "frozen"


def _torch_adam(learning_rate, b1, b2, eps, weight_decay, frozen):
  """Adam as torch.optim.Adam(weight_decay=...): g + wd * p feeds the moments; frozen leaves stay put."""
  adam = optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.scale_by_learning_rate(learning_rate),
  )
  if frozen is None:
    return adam

  def labels(params):
    mask = frozen(params) if callable(frozen) else frozen
    return jax.tree.map(lambda is_frozen: _FROZEN if is_frozen else _TRAINABLE, mask)

  return optax.multi_transform({_TRAINABLE: adam, _FROZEN: optax.set_to_zero()}, labels)


def torch_adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, frozen: Any = None) -> optax.GradientTransformation:
  """torch.optim.Adam with L2 `weight_decay`; `frozen` (bool pytree, or params -> bool pytree) masks leaves.

  Frozen leaves get neither an update nor weight decay. The learning rate is a hyperparameter of the state:
  change it with `set_learning_rate`.
  """
  return optax.inject_hyperparams(_torch_adam, static_args=("b1", "b2", "eps", "weight_decay", "frozen"))(
      learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, frozen=frozen)


def create_optimizer(optim_config, frozen: Any = None) -> optax.GradientTransformation:
  """The torch-style Adam of one model from its `config.optim.<model>` block."""
  return torch_adam(learning_rate=optim_config.lr, b1=optim_config.b1, b2=optim_config.b2,
                    eps=optim_config.eps, weight_decay=optim_config.weight_decay, frozen=frozen)


def set_learning_rate(opt_state, learning_rate):
  """Returns `opt_state` (of a `torch_adam`) with its learning rate replaced."""
  hyperparams = dict(opt_state.hyperparams, learning_rate=jnp.asarray(learning_rate, jnp.float32))
  return opt_state._replace(hyperparams=hyperparams)


def multistep_schedule(base_lr: float, milestones: Sequence[int], gamma: float,
                       steps_per_epoch: int) -> Callable[[Any], jax.Array]:
  """torch MultiStepLR stepped once per epoch: lr = base_lr * gamma ** #(milestones <= epoch), epoch 0-based.

  With milestones (40,) the 40 first epochs (0..39) use base_lr and the 41st onwards base_lr * gamma: optax's
  piecewise-constant schedule with its boundaries at the first step of each milestone epoch.
  """
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
  if list(milestones) != sorted(milestones):
    raise ValueError(f"Learning-rate milestones must be increasing epochs, got {tuple(milestones)}.")
  scales = {}
  for milestone in milestones:  # a repeated milestone decays twice, as in torch
    boundary = int(milestone) * steps_per_epoch
    scales[boundary] = scales.get(boundary, 1.0) * gamma
  schedule = optax.piecewise_constant_schedule(base_lr, scales)
  return lambda step: jnp.asarray(schedule(step), jnp.float32)


def create_learning_rate_fn(optim_config, steps_per_epoch: int) -> Callable[[Any], jax.Array]:
  """The multi-step schedule (global step -> lr) of one model from its `config.optim.<model>` block."""
  return multistep_schedule(optim_config.lr, optim_config.milestones, optim_config.gamma, steps_per_epoch)
