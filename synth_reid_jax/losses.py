"""The method's losses as pure functions: LSGAN, PatchNCE, discriminator feature matching, re-ID CE, triplet.

Every loss computes in float32 whatever the compute dtype of its inputs, and returns float32.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# PatchNCE: the logit of a patch against itself among the negatives is replaced by this value (before the
# division by the temperature), so exp() of it is ~0 and the positive is not counted twice.
NCE_SELF_NEGATIVE_LOGIT = -10.0
# Triplet: squared distances are clamped here before the square root (keeps the gradient finite at 0).
TRIPLET_MIN_SQUARED_DISTANCE = 1e-12

FEATURE_MATCHING_KINDS = ("feat_match", "gram_match")


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def lsgan_loss(pred, target_is_real: bool):
  """Least-squares GAN loss: mean((pred - target)^2), target 1 for real and 0 for fake."""
  target = 1.0 if target_is_real else 0.0
  return jnp.mean(jnp.square(_f32(pred) - target))


def patch_nce_loss(feat_q, feat_k, batch_size: int, temperature: float = 0.07):
  """PatchNCE: each query patch must pick its own key among the other patches of the same image.

  feat_q, feat_k: (N * P, D) projected, L2-normalised patch features (image-major, the same P positions in
  every image). Keys are stopped. Returns the per-patch cross-entropy, shape (N * P,).
  """
  feat_q = _f32(feat_q)
  feat_k = jax.lax.stop_gradient(_f32(feat_k))
  if feat_q.shape != feat_k.shape or feat_q.ndim != 2:
    raise ValueError(f"patch_nce_loss needs queries and keys of the same (N*P, D) shape, got {feat_q.shape} "
                     f"and {feat_k.shape}.")
  if feat_q.shape[0] % batch_size:
    raise ValueError(f"patch_nce_loss: {feat_q.shape[0]} patches is not a multiple of "
                     f"batch_size={batch_size}; pass the number of images the patches were sampled from.")
  dim = feat_q.shape[1]
  l_pos = jnp.sum(feat_q * feat_k, axis=-1, keepdims=True)  # (N*P, 1)
  q = feat_q.reshape(batch_size, -1, dim)
  k = feat_k.reshape(batch_size, -1, dim)
  num_patches = q.shape[1]
  l_neg = jnp.einsum("npd,nqd->npq", q, k)  # (N, P, P): every query against every key of its image
  l_neg = jnp.where(jnp.eye(num_patches, dtype=bool), NCE_SELF_NEGATIVE_LOGIT, l_neg)
  logits = jnp.concatenate([l_pos, l_neg.reshape(-1, num_patches)], axis=1) / temperature
  # Cross-entropy with the positive (column 0) as the target.
  return jax.nn.logsumexp(logits, axis=1) - logits[:, 0]


def _gram_matrix(feat):
  """(N, H, W, C) -> (N, C, C) feature correlations."""
  n, c = feat.shape[0], feat.shape[-1]
  flat = feat.reshape(n, -1, c)
  return jnp.einsum("nxc,nxd->ncd", flat, flat)


def feature_matching_loss(feats_a: Sequence, feats_b: Sequence, kind: str = "feat_match"):
  """Adversarial feature matching, averaged over layers: MSE of features, or MSE of Gram matrices / (C*HW)."""
  if kind not in FEATURE_MATCHING_KINDS:
    raise ValueError(f"Unknown feature matching kind {kind!r}; use one of {FEATURE_MATCHING_KINDS} "
                     "(config.loss.sim_type).")
  if len(feats_a) != len(feats_b) or not feats_a:
    raise ValueError(f"feature_matching_loss needs the same non-zero number of layers on both sides, got "
                     f"{len(feats_a)} and {len(feats_b)}.")
  total = 0.0
  for a, b in zip(feats_a, feats_b):
    a, b = _f32(a), _f32(b)
    if kind == "feat_match":
      total += jnp.mean(jnp.square(a - b))
    else:
      channels, positions = a.shape[-1], a.shape[1] * a.shape[2]
      total += jnp.mean(jnp.square(_gram_matrix(a) - _gram_matrix(b))) / (channels * positions)
  return total / len(feats_a)


def cross_entropy_loss(logits, labels, label_smoothing: float = 0.1):
  """Cross-entropy with label smoothing as torchreid: targets (1 - eps) * onehot + eps / K, batch mean."""
  logits = _f32(logits)
  num_classes = logits.shape[-1]
  targets = (1.0 - label_smoothing) * jax.nn.one_hot(labels, num_classes) + label_smoothing / num_classes
  return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def triplet_loss(features, labels, margin: float = 0.3):
  """Batch-hard triplet loss: hardest positive and hardest negative per anchor, hinge with `margin`, mean.

  An anchor without any negative in the batch contributes 0.
  """
  x = _f32(features)
  sq_norm = jnp.sum(jnp.square(x), axis=1)
  sq_dist = sq_norm[:, None] + sq_norm[None, :] - 2.0 * x @ x.T
  dist = jnp.sqrt(jnp.maximum(sq_dist, TRIPLET_MIN_SQUARED_DISTANCE))
  same = labels[:, None] == labels[None, :]
  hardest_positive = jnp.max(jnp.where(same, dist, -jnp.inf), axis=1)
  hardest_negative = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
  return jnp.mean(jnp.maximum(hardest_positive - hardest_negative + margin, 0.0))
