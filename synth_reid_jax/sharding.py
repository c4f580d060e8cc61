"""Data parallelism: a 1-D device mesh, the replicated train state, global batches from per-process data."""

import json
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from synth_reid_jax.errors import UserError

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named "data" over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("create_mesh needs at least one device.")
  # Auto axes: shardings are chosen by the jit's in/out shardings (the train step states them all).
  return jax.make_mesh((len(devices),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,), devices=devices)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (the train state)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split over the "data" axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
  """Places every array of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated_sharding(mesh))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Raises if the global batch cannot be split evenly over the mesh's devices."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(
        f"The global batch size {global_batch_size} is not divisible by the {num_devices} devices of the "
        f"mesh; set config.train.batch_size to a multiple of {num_devices} (or run on fewer devices).")


def make_global_batch(local_batch, mesh: Mesh):
  """Assembles this process's share of a batch (numpy arrays, leading axis = local batch) into global arrays.

  Every process passes its own slice; the result is sharded along the batch axis over all devices of `mesh`,
  so the same code runs on one host or many.
  """
  sharding = batch_sharding(mesh)
  num_processes = len({d.process_index for d in mesh.devices.flat})

  def to_global(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("make_global_batch needs arrays with a leading batch axis, got a scalar.")
    check_batch_size(x.shape[0] * num_processes, mesh)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(to_global, local_batch)


def from_process_zero(compute: Callable[[], object] | None, *, what: str):
  """compute() run on process 0 alone (the others pass None) -> its result (JSON-able) on every process.

  A failure there reaches every process, so none waits for a result that never comes: process 0 raises its
  own error, the others one naming it (a UserError where process 0's was one). `what` names the work."""
  if jax.process_count() == 1:
    return compute()
  from jax.experimental import multihost_utils
  error = None
  if jax.process_index() == 0:
    try:
      message = {"result": compute()}
    except Exception as e:  # noqa: BLE001 - handed to the other processes, then raised here as it is
      error = e
      message = {"error": f"{type(e).__name__}: {e}", "user_error": isinstance(e, UserError)}
    payload = np.frombuffer(json.dumps(message).encode(), np.uint8)
  else:
    payload = np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(payload.size)))
  buffer = payload if payload.size == size else np.zeros(size, np.uint8)
  received = multihost_utils.broadcast_one_to_all(buffer)
  message = json.loads(np.asarray(received, np.uint8).tobytes())
  if error is not None:
    raise error
  if "error" in message:
    kind = UserError if message["user_error"] else RuntimeError
    raise kind(f"{what} failed on process 0: {message['error']}")
  return message["result"]
