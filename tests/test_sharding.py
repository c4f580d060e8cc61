"""The data-parallel mesh, replicated state and global batches (4 forced CPU devices, see conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth_reid_jax import sharding


def test_mesh_spans_all_devices():
  mesh = sharding.create_mesh()
  assert mesh.axis_names == (sharding.DATA_AXIS,)
  assert mesh.devices.size == jax.device_count() == 4
  assert sharding.create_mesh(jax.devices()[:1]).devices.size == 1


def test_global_batch_is_split_over_devices():
  mesh = sharding.create_mesh()
  local = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "pid": np.arange(8, dtype=np.int32)}
  batch = sharding.make_global_batch(local, mesh)
  assert batch["image"].shape == (8, 3) and batch["pid"].dtype == jnp.int32
  assert batch["image"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  assert [s.data.shape for s in batch["image"].addressable_shards] == [(2, 3)] * 4
  np.testing.assert_array_equal(batch["image"], local["image"])


def test_indivisible_batch_names_the_fix():
  with pytest.raises(ValueError, match=r"batch size 6 .* 4 devices.*multiple of 4"):
    sharding.make_global_batch({"image": np.zeros((6, 2), np.float32)}, sharding.create_mesh())


def test_replicate_puts_the_whole_tree_everywhere():
  mesh = sharding.create_mesh()
  tree = sharding.replicate({"w": jnp.arange(5.0), "step": jnp.int32(3)}, mesh)
  assert tree["w"].sharding.is_fully_replicated
  assert len(tree["w"].addressable_shards) == 4
  np.testing.assert_array_equal(tree["w"].addressable_shards[3].data, np.arange(5.0))
