"""Test-time re-ID features: R(encoder(x)) (the BNNeck output, or the pooled feature of resnet50_plain; eval
mode), + R(encoder(flip(x))) with eval flip; and R's BatchNorm statistics re-estimated on other images
(AdaBN, config.eval.adabn).

As torchreid's engine with eval_flip, the two features are summed (not averaged, not concatenated).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from synth_reid_jax import compile_options, sharding
from synth_reid_jax.models import forms
from synth_reid_jax.models.layers import BN_MOMENTUM


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
  return _jit_over_batch(lambda variables, images: embed(models, variables, images, flip), mesh,
                         sharding.batch_sharding(mesh))


def _jit_over_batch(fn, mesh, out_shardings):
  """jit((variables, images) -> ...) traced for the mesh's platform: variables replicated, the batch split
  over the mesh's devices."""
  return jax.jit(forms.traced_for(fn, mesh),
                 in_shardings=(sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=out_shardings, compiler_options=compile_options.compiler_options(target=mesh))


def to_host(x):
  """A global array (or this process's numpy share), or a tree of them, as the whole batch in numpy on every
  process (one collective for the whole tree)."""
  if jax.process_count() > 1:
    x = multihost_utils.process_allgather(x, tiled=True)
  return jax.tree.map(np.asarray, x)


class _Rows:
  """Rows written at their dataset index into arrays allocated once (for `num_rows` rows when the stream
  says how many it has, else grown by doubling); -> the rows in dataset order, those never written dropped."""

  def __init__(self, num_rows=None):
    self.num_rows, self.arrays, self.written = num_rows, None, None

  def write(self, index, values: dict):
    if self.arrays is None:
      size = self.num_rows or max(1024, 2 * int(index.max(initial=0)) + 2)
      self.arrays = {k: np.empty((size, *v.shape[1:]), v.dtype) for k, v in values.items()}
      self.written = np.zeros(size, bool)
    needed = int(index.max(initial=-1)) + 1
    if needed > self.written.size:
      size = max(needed, 2 * self.written.size)
      self.arrays = {k: np.resize(v, (size, *v.shape[1:])) for k, v in self.arrays.items()}
      self.written = np.concatenate([self.written, np.zeros(size - self.written.size, bool)])
    for k, v in values.items():
      self.arrays[k][index] = v
    self.written[index] = True

  def result(self) -> dict:
    kept = np.flatnonzero(self.written)
    if kept.size == self.written.size:  # every row: the arrays themselves, no copy
      return {**self.arrays, "index": kept}
    return {**{k: v[kept] for k, v in self.arrays.items()}, "index": kept}


def compute_features(feature_fn, variables, batches, mesh, keys=("pid", "camid"), keep=True):
  """Runs `feature_fn` over an eval pipeline's batches; -> {"features": (N,D), "index", **keys} in dataset
  order ("index": each row's position in the dataset).

  With several processes every one must run this (each batch's features are gathered across them); one
  with `keep=False` takes part but keeps no rows and returns None, so only the process that ranks holds
  the whole split.

  Batches carry "image", "mask" (False on the padding of the last batch and on skipped images), "index"
  (position in the dataset) and the `keys`. Each batch's rows are written at their index into arrays
  allocated once for the stream's `num_images` (a large split is never held twice), padded rows dropped.
  """
  rows = _Rows(getattr(batches, "num_images", None))
  pending = None  # the previous batch's features, still computing while the next batch loads

  def collect(result):
    features, batch = result
    gathered = to_host({"features": features} | {k: np.asarray(batch[k]) for k in ("mask", "index", *keys)})
    if not keep:
      return
    real = gathered["mask"].astype(bool)
    values = {k: gathered[k][real] for k in ("features", *keys)}
    rows.write(gathered["index"][real].astype(np.int64), values)

  for batch in batches:
    images = sharding.make_global_batch(np.asarray(batch["image"], np.float32), mesh)
    current = (feature_fn(variables, images), batch)
    if pending is not None:
      collect(pending)
    pending = current
  if pending is not None:
    collect(pending)
  if pending is None:
    raise ValueError("compute_features got no batches: the evaluation split is empty.")
  return rows.result() if keep else None


def make_batch_stats_fn(models, mesh):
  """jit((variables, images) -> R's BatchNorm statistics of that batch), variables replicated, the batch
  split over the mesh's devices: R in train mode on the encoder features, every BatchNorm normalising with
  (and reporting) the whole global batch's mean and unbiased variance, as in training."""
  def batch_stats(variables, images):
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"]["reid"])
    _, new = models.reid.apply({"params": variables["params"]["reid"], "batch_stats": zeros},
                               encode(models, variables, images), train=True, mutable=["batch_stats"])
    # From zero, one update leaves BN_MOMENTUM x the batch's statistics (layers.BatchNorm's running update).
    return jax.tree.map(lambda x: x / BN_MOMENTUM, new["batch_stats"])

  return _jit_over_batch(batch_stats, mesh, sharding.replicated_sharding(mesh))


def adapted_batch_stats(batch_stats_fn, variables, batches, mesh):
  """AdaBN: R's BatchNorm statistics averaged over the whole batches of an eval pipeline (PreciseBN's
  equal-weight mean of each batch's mean and variance); a batch holding padding (the last one, unless the
  stream divides evenly) is left out, so a stream needs at least one whole batch. -> R's batch_stats."""
  total, count = None, 0
  for batch in batches:
    if not np.all(to_host(np.asarray(batch["mask"]))):
      continue
    images = sharding.make_global_batch(np.asarray(batch["image"], np.float32), mesh)
    stats = batch_stats_fn(variables, images)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  if count == 0:
    raise ValueError("AdaBN (config.eval.adabn) got no whole batch of target images: the target's training "
                     "set is smaller than one evaluation batch.")
  return jax.tree.map(lambda x: x / count, total)
