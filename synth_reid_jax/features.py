"""Test-time re-ID features: R(encoder(x)) (the BNNeck output, or the pooled feature of resnet50_plain; eval
mode), + R(encoder(flip(x))) with eval flip.

As torchreid's engine with eval_flip, the two features are summed (not averaged, not concatenated).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from synth_reid_jax import compile_options, sharding


def _sub(variables, name):
  """The variables of one network ({"params": ..., "batch_stats": ...} where it has statistics)."""
  out = {"params": variables["params"][name]}
  if name in variables.get("batch_stats", {}):
    out["batch_stats"] = variables["batch_stats"][name]
  return out


def encode(models, variables, images):
  """images (N,H,W,3) in [-1, 1] -> R's input (N,H/4,W/4,C): G's encoder, or the baseline's ResNet stem."""
  if models.stem is not None:
    return models.stem.apply(_sub(variables, "stem"), images, train=False)
  return models.generator.apply(_sub(variables, "generator"), images,
                                method=type(models.generator).encoder_output)


def embed(models, variables, images, flip):
  """(N,H,W,3) -> (N,D) float32 test features."""
  def feature(x):
    return models.reid.apply(_sub(variables, "reid"), encode(models, variables, x), train=False)
  features = feature(images)
  if flip:
    features = features + feature(images[:, :, ::-1])
  return features.astype(jnp.float32)


def make_feature_fn(models, config, mesh):
  """jit((variables, images) -> features), variables replicated, the batch split over the mesh's devices."""
  flip = bool(config.eval.flip)
  return jax.jit(lambda variables, images: embed(models, variables, images, flip),
                 in_shardings=(sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh),
                 compiler_options=compile_options.compiler_options())


def to_host(x):
  """A global array (or this process's numpy share) as the whole batch in numpy, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compute_features(feature_fn, variables, batches, mesh, keys=("pid", "camid")):
  """Runs `feature_fn` over an eval pipeline's batches; -> {"features": (N,D), "index", **keys} in dataset
  order ("index": each row's position in the dataset).

  Batches carry "image", "mask" (False on the padding of the last batch), "index" (position in the dataset)
  and the `keys`; padded rows are dropped and rows are put back in dataset order by "index".
  """
  outputs = {"features": [], "mask": [], "index": []} | {k: [] for k in keys}
  pending = None  # the previous batch's features, still computing while the next batch loads

  def collect(result):
    features, batch = result
    outputs["features"].append(to_host(features))
    for key in ("mask", "index", *keys):
      outputs[key].append(to_host(np.asarray(batch[key])))

  for batch in batches:
    images = sharding.make_global_batch(np.asarray(batch["image"], np.float32), mesh)
    current = (feature_fn(variables, images), batch)
    if pending is not None:
      collect(pending)
    pending = current
  if pending is not None:
    collect(pending)
  if not outputs["features"]:
    raise ValueError("compute_features got no batches: the evaluation split is empty.")
  stacked = {k: np.concatenate(v) for k, v in outputs.items()}
  keep = stacked.pop("mask").astype(bool)
  order = np.argsort(stacked["index"][keep], kind="stable")
  return {k: v[keep][order] for k, v in stacked.items()}
