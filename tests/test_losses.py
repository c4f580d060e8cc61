"""The method's losses against independent numpy implementations (from the definitions) and by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synth_reid_jax import losses


def _l2_normalise(x):
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-7)


def _np_patch_nce(q, k, batch_size, tau):
  """Per patch: -log softmax over [q.k_own, q.k_other for the other patches of the image, -10 for itself]."""
  num_patches = q.shape[0] // batch_size
  out = np.zeros(q.shape[0])
  for n in range(batch_size):
    for i in range(num_patches):
      row = n * num_patches + i
      logits = [q[row] @ k[row]]
      for j in range(num_patches):
        logits.append(-10.0 if j == i else q[row] @ k[n * num_patches + j])
      logits = np.asarray(logits) / tau
      out[row] = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[0]
  return out


def _np_gram_loss_nchw(a, b):
  """The original's definition on NCHW: Gram (N, C, C) of (N, C, HW), MSE, divided by C * HW."""
  n, c = a.shape[:2]
  fa, fb = a.reshape(n, c, -1), b.reshape(n, c, -1)
  ga = np.einsum("ncx,ndx->ncd", fa, fa)
  gb = np.einsum("ncx,ndx->ncd", fb, fb)
  return np.mean((ga - gb) ** 2) / (c * fa.shape[2])


def _np_smoothed_ce(logits, labels, eps):
  k = logits.shape[1]
  total = 0.0
  for row, label in zip(logits, labels):
    log_p = row - np.log(np.sum(np.exp(row - row.max()))) - row.max()
    target = np.full(k, eps / k)
    target[label] += 1 - eps
    total += -np.sum(target * log_p)
  return total / len(labels)


def _np_batch_hard_triplet(x, labels, margin):
  n = len(labels)
  dist = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 1e-12))
  terms = []
  for i in range(n):
    positives = [dist[i, j] for j in range(n) if labels[j] == labels[i]]
    negatives = [dist[i, j] for j in range(n) if labels[j] != labels[i]]
    terms.append(max(max(positives) - min(negatives) + margin, 0.0))
  return np.mean(terms)


def test_lsgan_loss_values():
  pred = np.array([[0.5, 1.0], [2.0, -1.0]], np.float32)
  assert losses.lsgan_loss(pred, True) == pytest.approx(np.mean((pred - 1) ** 2))
  assert losses.lsgan_loss(pred, False) == pytest.approx(np.mean(pred**2))
  assert losses.lsgan_loss(jnp.asarray(pred, jnp.bfloat16), True).dtype == jnp.float32


def test_patch_nce_matches_numpy():
  rng = np.random.default_rng(0)
  batch, patches, dim = 3, 5, 8
  q = _l2_normalise(rng.normal(size=(batch * patches, dim))).astype(np.float32)
  k = _l2_normalise(rng.normal(size=(batch * patches, dim))).astype(np.float32)
  got = losses.patch_nce_loss(q, k, batch_size=batch, temperature=0.07)
  assert got.shape == (batch * patches,)
  np.testing.assert_allclose(got, _np_patch_nce(q, k, batch, 0.07), rtol=1e-5, atol=1e-5)


def test_patch_nce_by_hand_and_stopped_keys():
  # Two orthonormal patches per image, queries equal to their keys: positive logit 1, the other patch 0 and
  # the patch itself -10 -> loss = log(e^(1/t) + e^0 + e^(-10/t)) - 1/t.
  t = 0.5
  q = np.eye(2, dtype=np.float32)
  expected = np.log(np.exp(1 / t) + 1.0 + np.exp(-10 / t)) - 1 / t
  got = losses.patch_nce_loss(q, q, batch_size=1, temperature=t)
  np.testing.assert_allclose(got, [expected] * 2, rtol=1e-6)
  grad_k = jax.grad(lambda k: losses.patch_nce_loss(q, k, 1, t).sum())(q)
  np.testing.assert_array_equal(grad_k, 0.0)


def test_patch_nce_rejects_bad_batch():
  with pytest.raises(ValueError, match="batch_size=4"):
    losses.patch_nce_loss(np.ones((6, 3)), np.ones((6, 3)), batch_size=4)


def test_feature_matching_mse_averages_layers():
  rng = np.random.default_rng(1)
  a = [rng.normal(size=(2, 4, 3, c)).astype(np.float32) for c in (5, 7)]
  b = [rng.normal(size=(2, 4, 3, c)).astype(np.float32) for c in (5, 7)]
  expected = (np.mean((a[0] - b[0]) ** 2) + np.mean((a[1] - b[1]) ** 2)) / 2
  assert losses.feature_matching_loss(a, b, "feat_match") == pytest.approx(expected, rel=1e-6)


def test_gram_matching_matches_nchw_definition():
  rng = np.random.default_rng(2)
  a_nchw = [rng.normal(size=(2, c, 4, 3)).astype(np.float32) for c in (5, 6)]
  b_nchw = [rng.normal(size=(2, c, 4, 3)).astype(np.float32) for c in (5, 6)]
  expected = np.mean([_np_gram_loss_nchw(a, b) for a, b in zip(a_nchw, b_nchw)])
  nhwc = lambda xs: [x.transpose(0, 2, 3, 1) for x in xs]
  got = losses.feature_matching_loss(nhwc(a_nchw), nhwc(b_nchw), "gram_match")
  assert got == pytest.approx(expected, rel=1e-5)


def test_feature_matching_rejects_unknown_kind():
  with pytest.raises(ValueError, match="sim_type"):
    losses.feature_matching_loss([np.ones((1, 2, 2, 1))], [np.ones((1, 2, 2, 1))], "l1")


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_with_label_smoothing(eps):
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 11)).astype(np.float32) * 3
  labels = rng.integers(0, 11, size=6)
  got = losses.cross_entropy_loss(logits, labels, label_smoothing=eps)
  assert got == pytest.approx(_np_smoothed_ce(logits, labels, eps), rel=1e-5)


def test_cross_entropy_uniform_logits_is_log_k():
  assert losses.cross_entropy_loss(np.zeros((2, 8)), np.array([0, 3]), 0.1) == pytest.approx(np.log(8))


def test_triplet_matches_numpy():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(8, 5)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  got = losses.triplet_loss(x, labels, margin=0.3)
  assert got == pytest.approx(_np_batch_hard_triplet(x, labels, 0.3), rel=1e-5)
  assert np.all(np.isfinite(jax.grad(lambda f: losses.triplet_loss(f, labels, 0.3))(x)))


def test_triplet_by_hand():
  # On a line: a=0, a'=1 (same id), b=3: hardest positive 1, hardest negative 2 (from a') / 3 (from a).
  x = np.array([[0.0], [1.0], [3.0]], np.float32)
  labels = np.array([0, 0, 1])
  # anchors: a: max(1 - 3 + 2.5, 0) = 0.5; a': max(1 - 2 + 2.5, 0) = 1.5; b has no positive but itself
  # (distance ~1e-6) and hardest negative 2: max(1e-6 - 2 + 2.5, 0) = 0.5.
  assert losses.triplet_loss(x, labels, margin=2.5) == pytest.approx((0.5 + 1.5 + 0.5) / 3, abs=1e-5)


def test_triplet_without_negatives_is_zero():
  x = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
  assert losses.triplet_loss(x, np.zeros(4, int), margin=0.3) == 0.0
