"""The patch projector F (CUT's PatchSampleF): samples feature-map positions, embeds each with an MLP."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synth_reid_jax.models.layers import Dtype, dense

L2_NORM_EPS = 1e-7  # the original divides by (norm + 1e-7)


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / (||x||_2 + 1e-7) over the last axis, in float32, as the original's Normalize.

  An all-zero vector (a patch whose MLP hidden units are all off, with zero biases) maps to zero, as in the
  original; its gradient takes the norm's subgradient 0 there, where sqrt's derivative would give inf * 0 =
  NaN (the original's pow(0.5) has the same NaN) and stop training.
  """
  x = x.astype(jnp.float32)
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  nonzero = squared > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 0.0)
  return x / (norm + L2_NORM_EPS)


def sample_patch_ids(rng: jax.Array, feats: Sequence[jax.Array], num_patches: int) -> list[jax.Array]:
  """Random positions in H*W per feature map, without replacement and shared by every image of the batch.

  Returns one int32 array of min(num_patches, H*W) flat (row-major over H, W) indices per feature map: the
  positions of the largest of H*W uniform draws, i.e. a uniformly random ordered subset, as the first entries
  of a random permutation (the original's randperm) are, at the cost of one top-k instead of
  jax.random.permutation's rounds of sorting.
  """
  if num_patches <= 0:
    raise ValueError(f"num_patches must be positive, got {num_patches}")
  ids = []
  for key, feat in zip(jax.random.split(rng, len(feats)), feats):
    positions = feat.shape[1] * feat.shape[2]
    _, top = jax.lax.top_k(jax.random.uniform(key, (positions,)), min(num_patches, positions))
    ids.append(top.astype(jnp.int32))
  return ids


class PatchMLP(nn.Module):
  """Linear(C, dim) - ReLU - Linear(dim, dim)."""
  dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(dense(self.dim, dtype=self.dtype, name="dense_0")(x))
    return dense(self.dim, dtype=self.dtype, name="dense_1")(x)


class Projector(nn.Module):
  """F: one PatchMLP per feature map (e.g. per NCE layer); outputs are L2-normalised float32 embeddings."""
  dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], patch_ids: Sequence[jax.Array] | None = None):
    """feats [(N,H,W,C)], patch_ids [(P,)] -> [(N*P, dim)], image-major; patch_ids=None: every position."""
    if patch_ids is not None and len(patch_ids) != len(feats):
      raise ValueError(f"got {len(feats)} feature maps but {len(patch_ids)} patch id arrays; "
                       "pass one per map")
    out = []
    for i, feat in enumerate(feats):
      n, h, w, c = feat.shape
      x = feat.reshape(n, h * w, c)
      if patch_ids is not None:
        x = jnp.take(x, patch_ids[i], axis=1)
      x = PatchMLP(self.dim, dtype=self.dtype, name=f"mlp_{i}")(x.reshape(-1, c))
      out.append(l2_normalize(x))
    return out
