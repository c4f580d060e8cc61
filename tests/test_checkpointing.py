"""Orbax checkpoints: round trip of state, iterator and rng; retention; clear errors; inference layout."""

import logging
import os
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synth_reid_jax import checkpointing, sharding
from synth_reid_jax.train_state import TrainState


def make_state(num_classes=5, offset=0.0):
  """A small TrainState with the real layout (params per network, reid batch stats, Adam states)."""
  params = {
      "generator": {"conv": {"kernel": jnp.full((3, 3, 3, 4), 1.0 + offset)}},
      "discriminator": {"conv": {"kernel": jnp.full((4, 4, 3, 2), 2.0 + offset)}},
      "projector": {"mlp": {"kernel": jnp.full((4, 8), 3.0 + offset)}},
      "reid": {"classifier": {"kernel": jnp.full((16, num_classes), 4.0 + offset),
                              "bias": jnp.zeros((num_classes,))}},
  }
  batch_stats = {"reid": {"bnneck": {"mean": jnp.full((16,), offset), "var": jnp.ones((16,))}}}
  opt_state = {name: optax.adam(1e-3).init(p) for name, p in params.items()}
  state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=opt_state)
  return sharding.replicate(state, sharding.create_mesh())


def make_iterator():
  return iter(grain.MapDataset.range(1000).shuffle(seed=3).batch(4).to_iter_dataset())


def test_round_trip_restores_state_iterator_and_rng(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, keep=2, async_save=True, iterator_names=("source",))
  state = make_state(offset=0.5).replace(step=jnp.asarray(7, jnp.int32))
  iterator, rng = make_iterator(), jax.random.key(42)
  for _ in range(3):
    next(iterator)
  ckpt.save(7, state, iterators={"source": iterator}, rng=rng, metadata={"num_classes": 5, "epoch": 1.5})
  expected_next = next(iterator)
  ckpt.wait_until_finished()
  ckpt.close()

  fresh = checkpointing.Checkpointer(tmp_path, iterator_names=("source",))
  assert fresh.latest_step() == 7
  new_iterator = make_iterator()
  restored, new_rng, metadata = fresh.restore_training(make_state(), iterators={"source": new_iterator},
                                                       rng=jax.random.key(0))
  fresh.close()
  assert int(restored.step) == 7
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert restored.params["reid"]["classifier"]["kernel"].sharding.is_equivalent_to(
      sharding.replicated_sharding(sharding.create_mesh()), 2)
  np.testing.assert_array_equal(next(new_iterator), expected_next)
  np.testing.assert_array_equal(jax.random.key_data(new_rng), jax.random.key_data(rng))
  assert metadata == {"num_classes": 5, "epoch": 1.5, "kind": "train", "step": 7}


def test_keeps_latest_and_best(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, keep=2, async_save=False, iterator_names=())
  state = make_state()
  maps = {1: None, 2: 0.6, 3: 0.2, 4: None, 5: 0.3, 6: None}
  for step, mean_ap in maps.items():
    ckpt.save(step, state, metadata={"num_classes": 5}, metrics=None if mean_ap is None else {"mAP": mean_ap})
  ckpt.wait_until_finished()
  assert ckpt.steps() == [2, 5, 6]  # the best (mAP 0.6) and the two latest
  ckpt.close()


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, iterator_names=())
  ckpt.save(1, make_state(num_classes=5), metadata={"num_classes": 5})
  ckpt.wait_until_finished()
  with pytest.raises(ValueError, match=r"params/reid/classifier/kernel: shape \(16, 5\) in the checkpoint, "
                                       r"\(16, 7\) in the current model"):
    ckpt.restore_training(make_state(num_classes=7))
  ckpt.close()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path / "empty", iterator_names=())
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*Train first"):
    ckpt.restore_training(make_state())
  ckpt.save(3, make_state(), metadata={"num_classes": 5})
  ckpt.wait_until_finished()
  with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 9 .*available steps: \[3\]"):
    ckpt.metadata(9)
  ckpt.close()


def test_unfinished_save_is_ignored(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, iterator_names=())
  ckpt.save(2, make_state(), metadata={"num_classes": 5})
  ckpt.wait_until_finished()
  ckpt.close()
  # What an interrupted save leaves behind: a temporary directory that never got renamed to its step.
  os.makedirs(tmp_path / checkpointing.CHECKPOINT_DIR / "4.orbax-checkpoint-tmp-1234" / "model")
  fresh = checkpointing.Checkpointer(tmp_path, iterator_names=())
  assert fresh.latest_step() == 2
  assert int(fresh.restore_training(make_state())[0].step) == 0
  fresh.close()


def test_inference_checkpoint_restores_for_eval_but_not_training(tmp_path):
  state = make_state(offset=1.0)
  params = {k: v for k, v in state.params.items() if k in ("generator", "reid")}  # no D or F
  checkpointing.save_inference_checkpoint(tmp_path, jax.device_get(params), jax.device_get(state.batch_stats),
                                          step=30, metadata={"num_classes": 5, "source": "torch"})
  ckpt = checkpointing.Checkpointer(tmp_path, iterator_names=())
  assert ckpt.metadata()["kind"] == "inference"
  template = {"params": make_state().params, "batch_stats": make_state().batch_stats}
  variables, metadata = ckpt.restore_variables(template, networks=("generator", "reid"))
  assert metadata["num_classes"] == 5 and metadata["step"] == 30
  assert sorted(variables["params"]) == ["generator", "reid"]
  np.testing.assert_array_equal(variables["params"]["generator"]["conv"]["kernel"], 2.0)
  with pytest.raises(ValueError, match="only inference weights"):
    ckpt.restore_training(make_state())
  # A network the mode needs must be complete; one asked for but absent is named too.
  template["params"]["generator"]["extra"] = {"kernel": jnp.zeros((2,))}
  with pytest.raises(ValueError, match="params/generator/extra/kernel: missing in the checkpoint"):
    ckpt.restore_variables(template, networks=("generator", "reid"))
  with pytest.raises(ValueError, match="params/discriminator/conv/kernel: missing in the checkpoint"):
    ckpt.restore_variables(template)
  ckpt.close()


def test_save_inference_checkpoint_needs_num_classes(tmp_path):
  with pytest.raises(ValueError, match="num_classes"):
    checkpointing.save_inference_checkpoint(tmp_path, {}, {}, step=1, metadata={})


def test_the_echoes_of_a_failed_save_are_dropped_and_other_unraisable_errors_still_shown(monkeypatch, capfd):
  """An I/O completion that finds its event loop closed (tensorstore finishing the writes of a save that
  failed) prints nothing once a Checkpointer exists; any other unraisable error is still printed."""
  import asyncio

  import tensorstore as ts
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  checkpointing.quiet_failed_save_echoes()
  checkpointing.quiet_failed_save_echoes()  # installed once however often it is called
  assert sys.unraisablehook.drops_closed_loop_callbacks

  promise, future = ts.Promise.new()

  async def wait():
    await future

  loop = asyncio.new_event_loop()
  task = loop.create_task(wait())
  loop.run_until_complete(asyncio.sleep(0.01))
  loop.close()
  promise.set_result(1)  # tensorstore calls the closed loop's call_soon_threadsafe
  time.sleep(0.2)
  task._log_destroy_pending = False  # the task never ends (its loop is closed): no warning when collected

  class Noisy:
    def __del__(self):
      raise ValueError("a real problem")

  Noisy()
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err, err
  assert "a real problem" in err, err


def test_asyncio_reports_of_failed_writes_are_dropped_and_its_other_errors_kept(caplog):
  """The other writes of a failed save end as tasks nobody awaits: asyncio's "never retrieved" report of
  each is dropped when its error is a storage one; every other asyncio error is still logged."""
  import asyncio
  checkpointing.quiet_failed_save_echoes()
  loop = asyncio.new_event_loop()

  def report(error):
    loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": error})

  with caplog.at_level(logging.ERROR, logger="asyncio"):
    report(ValueError('RESOURCE_EXHAUSTED: Error writing "params.reid.k/.zarray": No space left on device'))
    report(OSError(30, "Read-only file system"))
    report(ValueError("a bug in a coroutine"))
  loop.close()
  assert [str(record.exc_info[1]) for record in caplog.records] == ["a bug in a coroutine"]
