"""Memory the benchmarks report from shapes alone (no computation), on any backend."""

import jax
import jax.numpy as jnp
import numpy as np

from synth_reid_jax.models import build_models


def generator_saved_bytes(config, batch_size: int) -> int:
  """Bytes of the activations G's forward keeps for its backward pass (the residuals of jax.vjp), counted
  from shapes alone: what the bf16 path and remat change, on any backend. (XLA:CPU's buffer assignment does
  not reflect rematerialisation, so its peak is not the number to read for them.)"""
  generator = build_models(config, 1).generator
  size = (config.data.height, config.data.width, 3)
  params = jax.eval_shape(lambda: generator.init(jax.random.key(0), jnp.zeros((1, *size)))["params"])
  images = jax.ShapeDtypeStruct((batch_size, *size), jnp.float32)
  vjp_fn = jax.eval_shape(lambda p, x: jax.vjp(lambda p, x: generator.apply({"params": p}, x), p, x)[1],
                          params, images)
  return int(sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp_fn)))
