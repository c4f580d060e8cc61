"""Evaluation: distances, CMC / mAP (Market, CUHK03) and re-ranking against straightforward references."""

import warnings

import numpy as np
import pytest

from synth_reid_jax import evaluation

# ----------------------------------------------------------------------------------------------------------
# Straightforward references, one query (or one row) at a time, written from the protocol's definition.
# ----------------------------------------------------------------------------------------------------------


def kept_labels(dist_row, q_pid, q_cam, g_pids, g_cams, kind=None):
  """Match labels of the gallery in ranking order (np.argsort), same pid + camid removed."""
  order = np.argsort(dist_row, kind=kind)
  kept = [g for g in order if not (g_pids[g] == q_pid and g_cams[g] == q_cam)]
  return [int(g_pids[g] == q_pid) for g in kept], [g_pids[g] for g in kept]


def average_precision(labels):
  hits, precisions = 0, []
  for position, label in enumerate(labels, start=1):
    if label:
      hits += 1
      precisions.append(hits / position)
  return sum(precisions) / len(precisions)


def reference_market(dist, q_pids, g_pids, q_cams, g_cams, max_rank, kind=None):
  curves, aps = [], []
  for q in range(dist.shape[0]):
    labels, _ = kept_labels(dist[q], q_pids[q], q_cams[q], g_pids, g_cams, kind)
    if not any(labels):
      continue
    first = labels.index(1)
    curves.append([1.0 if k >= first else 0.0 for k in range(max_rank)])
    aps.append(average_precision(labels))
  return np.mean(curves, axis=0), float(np.mean(aps))


def reference_cuhk03(dist, q_pids, g_pids, q_cams, g_cams, max_rank, repeats=10):
  """One random image per gallery identity (identities in order of first appearance), np.random.choice."""
  curves, aps = [], []
  for q in range(dist.shape[0]):
    labels, pids = kept_labels(dist[q], q_pids[q], q_cams[q], g_pids, g_cams)
    if not any(labels):
      continue
    positions_of = {}
    for position, pid in enumerate(pids):
      positions_of.setdefault(pid, []).append(position)
    curve = np.zeros(max_rank)
    for _ in range(repeats):
      picked = sorted(np.random.choice(positions) for positions in positions_of.values())
      first = [labels[p] for p in picked].index(1)
      curve += [1.0 if k >= first else 0.0 for k in range(max_rank)]
    curves.append(curve / repeats)
    aps.append(average_precision(labels))
  return np.mean(curves, axis=0), float(np.mean(aps))


def random_problem(rng, num_q, num_g, num_ids, num_cams=3, ties=False):
  q_pids = rng.integers(0, num_ids, num_q)
  g_pids = rng.integers(0, num_ids, num_g)
  q_cams = rng.integers(0, num_cams, num_q)
  g_cams = rng.integers(0, num_cams, num_g)
  if ties:  # few distinct values: many ties between matches and non-matches
    dist = rng.integers(0, 4, (num_q, num_g)).astype(np.float32)
  else:
    dist = rng.random((num_q, num_g), dtype=np.float32)
  return dist, q_pids, g_pids, q_cams, g_cams


# ----------------------------------------------------------------------------------------------------------
# evaluate_rank, Market protocol
# ----------------------------------------------------------------------------------------------------------


def test_hand_computed_example():
  # gallery:        g0        g1        g2        g3        g4
  g_pids = np.array([1, 1, 2, 1, 3])
  g_cams = np.array([0, 1, 1, 2, 0])
  q_pids, q_cams = np.array([1, 2, 9]), np.array([0, 0, 0])
  dist = np.array([[0.1, 0.5, 0.2, 0.4, 0.3],  # g0 same pid+cam (dropped); kept order g2 g4 g3 g1 -> 0 0 1 1
                   [0.3, 0.2, 0.1, 0.4, 0.5],  # g2 first -> 1 0 0 0 0
                   [0.1, 0.2, 0.3, 0.4, 0.5]],  # pid 9 is not in the gallery: skipped
                  np.float32)
  cmc, mean_ap = evaluation.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=4)
  np.testing.assert_array_equal(cmc, np.array([0.5, 0.5, 1.0, 1.0], np.float32))
  ap_first = (1 / 3 + 2 / 4) / 2
  assert mean_ap == pytest.approx((ap_first + 1.0) / 2, abs=1e-15)
  assert cmc.dtype == np.float32 and isinstance(mean_ap, float)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_market_matches_reference(seed, ties):
  rng = np.random.default_rng(seed)
  num_q, num_g = int(rng.integers(1, 25)), int(rng.integers(30, 80))
  problem = random_problem(rng, num_q, num_g, num_ids=int(rng.integers(2, 10)), ties=ties)
  if seed % 2:  # distractor-like identities that no query has
    problem[2][: num_g // 4] = -1
  max_rank = 10
  try:
    expected = reference_market(*problem, max_rank)
  except ZeroDivisionError:
    pytest.skip("no valid query drawn")
  cmc, mean_ap = evaluation.evaluate_rank(*problem, max_rank=max_rank)
  np.testing.assert_allclose(cmc, expected[0], rtol=0, atol=1e-6)
  assert mean_ap == pytest.approx(expected[1], abs=1e-12)


def test_ties_follow_argsort_order():
  """A match tied with a non-match: argsort's order decides the numbers, and is reproduced."""
  rng = np.random.default_rng(0)
  num_g = 500
  dist = rng.integers(0, 3, (6, num_g)).astype(np.float32)  # heavy ties
  g_pids = rng.integers(0, 4, num_g)
  g_cams = np.ones(num_g, np.int64)
  q_pids, q_cams = np.arange(6) % 4, np.zeros(6, np.int64)
  cmc, mean_ap = evaluation.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=5)
  expected = reference_market(dist, q_pids, g_pids, q_cams, g_cams, 5)
  np.testing.assert_allclose(cmc, expected[0], atol=1e-6)
  assert mean_ap == pytest.approx(expected[1], abs=1e-12)
  # a stable sort gives other numbers here, so the tie order is really being tested
  stable = reference_market(dist, q_pids, g_pids, q_cams, g_cams, 5, kind="stable")
  assert stable[1] != pytest.approx(mean_ap, abs=1e-6)


def test_large_rows_with_few_ties_match_reference():
  """Realistic sizes: counting path for most rows, argsort fallback for rows with a tie or a NaN."""
  rng = np.random.default_rng(3)
  dist, q_pids, g_pids, q_cams, g_cams = random_problem(rng, 40, 3000, num_ids=60, num_cams=6)
  dist = np.round(dist * 2000) / 2000  # some exact ties
  dist[5, 7] = np.nan
  cmc, mean_ap = evaluation.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50)
  expected = reference_market(dist, q_pids, g_pids, q_cams, g_cams, 50)
  np.testing.assert_allclose(cmc, expected[0], atol=1e-6)
  assert mean_ap == pytest.approx(expected[1], abs=1e-12)


def test_float64_and_integer_distances():
  rng = np.random.default_rng(4)
  dist, *ids = random_problem(rng, 10, 50, num_ids=5)
  expected = reference_market(dist.astype(np.float64), *ids, 10)
  cmc, mean_ap = evaluation.evaluate_rank(dist.astype(np.float64), *ids, max_rank=10)
  np.testing.assert_allclose(cmc, expected[0], atol=1e-6)
  assert mean_ap == pytest.approx(expected[1], abs=1e-12)
  int_dist = (dist * 5).astype(np.int64)
  cmc, mean_ap = evaluation.evaluate_rank(int_dist, *ids, max_rank=10)
  expected = reference_market(int_dist, *ids, 10)
  np.testing.assert_allclose(cmc, expected[0], atol=1e-6)
  assert mean_ap == pytest.approx(expected[1], abs=1e-12)


def test_small_gallery_warns_and_shortens_the_curve():
  rng = np.random.default_rng(5)
  problem = random_problem(rng, 8, 12, num_ids=3)
  with pytest.warns(UserWarning, match="max_rank=50"):
    cmc, _ = evaluation.evaluate_rank(*problem)
  assert cmc.shape == (12,)
  assert cmc[-1] == 1.0


def test_no_valid_query_is_an_error():
  dist = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="No query has a correct match"):
    evaluation.evaluate_rank(dist, [1, 2], [3, 4, 5], [0, 0], [1, 1, 1], max_rank=3)
  with pytest.raises(ValueError, match="No query has a correct match"):  # only same-camera matches
    evaluation.evaluate_rank(dist, [1, 2], [1, 2, 5], [0, 0], [0, 0, 1], max_rank=3)


def test_bad_shapes_are_errors():
  with pytest.raises(ValueError, match="g_pids has 2 entries"):
    evaluation.evaluate_rank(np.zeros((2, 3)), [1, 2], [1, 2], [0, 0], [1, 1, 1], max_rank=3)


# ----------------------------------------------------------------------------------------------------------
# evaluate_rank, CUHK03 single-gallery-shot
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_cuhk03_matches_reference_with_the_same_random_draws(seed, ties):
  rng = np.random.default_rng(100 + seed)
  problem = random_problem(rng, int(rng.integers(2, 15)), int(rng.integers(40, 70)), num_ids=8, ties=ties)
  max_rank = 5  # < number of gallery identities, so every curve is complete
  np.random.seed(seed)
  expected = reference_cuhk03(*problem, max_rank)
  after_reference = np.random.random()
  np.random.seed(seed)
  cmc, mean_ap = evaluation.evaluate_rank(*problem, max_rank=max_rank, use_metric_cuhk03=True)
  np.testing.assert_allclose(cmc, expected[0], atol=1e-6)
  assert mean_ap == pytest.approx(expected[1], abs=1e-12)
  assert np.random.random() == after_reference  # the global stream was consumed exactly as the reference


def test_cuhk03_with_one_image_per_identity_equals_market():
  rng = np.random.default_rng(7)
  num_g = 30
  dist = rng.random((12, num_g), dtype=np.float32)
  g_pids, g_cams = np.arange(num_g), np.ones(num_g, np.int64)
  q_pids, q_cams = rng.integers(0, num_g, 12), np.zeros(12, np.int64)
  market = evaluation.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
  cuhk03 = evaluation.evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, use_metric_cuhk03=True)
  np.testing.assert_allclose(cuhk03[0], market[0], atol=1e-6)
  assert cuhk03[1] == pytest.approx(market[1], abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------------------


def test_distance_matrix_definitions():
  rng = np.random.default_rng(8)
  a, b = rng.standard_normal((7, 16)), rng.standard_normal((11, 16))
  squared = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  np.testing.assert_allclose(evaluation.distance_matrix(a, b), squared, rtol=1e-5, atol=1e-4)
  an = a / np.linalg.norm(a, axis=1, keepdims=True)
  bn = b / np.linalg.norm(b, axis=1, keepdims=True)
  np.testing.assert_allclose(evaluation.distance_matrix(a, b, "cosine"), 1 - an @ bn.T, atol=1e-6)
  assert evaluation.distance_matrix(a, b).dtype == np.float32
  # a zero feature is normalised with torch's eps (no NaN)
  assert np.all(evaluation.distance_matrix(np.zeros((1, 16)), b, "cosine") == 1.0)
  with pytest.raises(ValueError, match="Unknown distance metric"):
    evaluation.distance_matrix(a, b, "manhattan")


@pytest.mark.parametrize("metric", evaluation.DISTANCE_METRICS)
def test_distance_matrix_chunking_invariance(metric):
  rng = np.random.default_rng(9)
  a, b = rng.standard_normal((23, 32)).astype(np.float32), rng.standard_normal((17, 32)).astype(np.float32)
  whole = evaluation.distance_matrix(a, b, metric, chunk_size=1000)
  for chunk_size in (1, 5, 22):
    np.testing.assert_allclose(evaluation.distance_matrix(a, b, metric, chunk_size=chunk_size), whole,
                               rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Re-ranking
# ----------------------------------------------------------------------------------------------------------


def reference_re_ranking(q_g, q_q, g_g, k1, k2, lam):
  """Zhong et al.'s k-reciprocal re-ranking, written densely one row at a time."""
  num_q = q_g.shape[0]
  full = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64)
  d = np.square(full).astype(np.float32)
  d = (d / d.max(axis=0)).T  # row i scaled by the largest squared distance of image i
  num = d.shape[0]
  rank = np.argsort(d, axis=1)

  def reciprocal(i, k):
    return {int(j) for j in rank[i, :k + 1] if i in rank[j, :k + 1]}

  half = int(np.around(k1 / 2))
  weights = np.zeros((num, num))
  for i in range(num):
    r = reciprocal(i, k1)
    expanded = set(r)
    for c in r:
      rc = reciprocal(c, half)
      if len(rc & r) > 2 / 3 * len(rc):
        expanded |= rc
    idx = np.array(sorted(expanded))
    w = np.exp(-d[i, idx].astype(np.float64))
    weights[i, idx] = w / w.sum()
  if k2 != 1:
    weights = np.stack([weights[rank[i, :k2]].mean(axis=0) for i in range(num)])
  jaccard = np.zeros((num_q, num))
  for i in range(num_q):
    shared = np.minimum(weights[i][None, :], weights).sum(axis=1)
    jaccard[i] = 1 - shared / (2 - shared)
  final = jaccard * (1 - lam) + d[:num_q] * lam
  return final[:, num_q:]


@pytest.mark.parametrize("k1,k2", [(20, 6), (5, 2), (4, 1)])
@pytest.mark.parametrize("duplicates", [False, True])
def test_re_ranking_matches_reference(k1, k2, duplicates):
  rng = np.random.default_rng(k1 + k2)
  qf, gf = rng.standard_normal((9, 8)).astype(np.float32), rng.standard_normal((40, 8)).astype(np.float32)
  if duplicates:  # identical images: ties in the neighbour lists
    gf[20:30] = gf[:10]
    qf[:4] = gf[:4]
  q_g, q_q, g_g = (evaluation.distance_matrix(x, y) for x, y in ((qf, gf), (qf, qf), (gf, gf)))
  ours = evaluation.re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=0.3)
  assert ours.shape == (9, 40) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, reference_re_ranking(q_g, q_q, g_g, k1, k2, 0.3), atol=1e-5)


def test_re_ranking_shape_errors():
  with pytest.raises(ValueError, match="g_g_dist"):
    evaluation.re_ranking(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((2, 2)))


# ----------------------------------------------------------------------------------------------------------
# The trainer's helpers
# ----------------------------------------------------------------------------------------------------------


def test_compute_metrics_and_results_table():
  rng = np.random.default_rng(11)
  centres = rng.standard_normal((5, 16)).astype(np.float32)
  q_pids, g_pids = np.arange(10) % 5, np.arange(60) % 5
  qf = centres[q_pids] + 0.3 * rng.standard_normal((10, 16)).astype(np.float32)
  gf = centres[g_pids] + 0.3 * rng.standard_normal((60, 16)).astype(np.float32)
  q_cams, g_cams = np.zeros(10, np.int64), np.ones(60, np.int64)
  results = evaluation.compute_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, metric="cosine",
                                       normalize=True)
  assert set(results) == {"mAP", "cmc", "num_query", "num_gallery"}
  assert (results["num_query"], results["num_gallery"], len(results["cmc"])) == (10, 60, 50)
  assert results["mAP"] == pytest.approx(1.0) and results["cmc"][0] == 1.0  # well-separated identities
  reranked = evaluation.compute_metrics(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank=True,
                                        cuhk03_metric=False, ranks=(1, 5))
  assert 0.0 < reranked["mAP"] <= 1.0
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a gallery smaller than 50 shortens the curve without a warning
    small = evaluation.compute_metrics(qf, gf[:20], q_pids, g_pids[:20], q_cams, g_cams[:20])
  assert len(small["cmc"]) == 20
  table = evaluation.format_results(results, ranks=(1, 5, 10, 20), name="market1501")
  assert table.splitlines() == ["** Results (market1501) **", "mAP: 100.0%", "CMC curve", "Rank-1  : 100.0%",
                                "Rank-5  : 100.0%", "Rank-10 : 100.0%", "Rank-20 : 100.0%"]


# ----------------------------------------------------------------------------------------------------------
# compute_metrics from features (blocks, re-ranking without matrices) against the whole-matrix path
# ----------------------------------------------------------------------------------------------------------


def feature_problem(seed, num_q=23, num_g=71, dim=12, duplicates=False, nan=False, num_ids=7):
  rng = np.random.default_rng(seed)
  q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
  centres = rng.standard_normal((num_ids, dim)).astype(np.float32)
  qf = centres[q_pids] + rng.standard_normal((num_q, dim)).astype(np.float32)
  gf = centres[g_pids] + rng.standard_normal((num_g, dim)).astype(np.float32)
  if duplicates:  # identical images: exact ties in every ranking and in the k-nearest lists
    gf[num_g // 2:num_g // 2 + 10] = gf[:10]
    qf[:5] = gf[10:15]
    qf[5:8] = np.round(qf[5:8])  # small integers: ties between distances of different images too
    gf[20:40] = np.round(gf[20:40])
  if nan:
    gf[3, 2] = np.nan
    qf[4, 0] = np.nan
  return qf, gf, q_pids, g_pids, rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)


@pytest.fixture(params=[64 * 71, 2**30], ids=["small_blocks", "one_block"])
def chunk_bytes(request, monkeypatch):
  """Distance blocks of a few rows (many blocks, a padded last one) or of the whole matrix; re-ranking from
  features however small the sets."""
  monkeypatch.setattr(evaluation, "CHUNK_BYTES", request.param)
  monkeypatch.setattr(evaluation, "RERANK_MATRIX_BYTES", 0)
  return request.param


def assert_same_metrics(new, old):
  assert new["cmc"] == old["cmc"]  # identical, not close
  assert new["mAP"] == pytest.approx(old["mAP"], abs=1e-15, rel=0)
  assert (new["num_query"], new["num_gallery"]) == (old["num_query"], old["num_gallery"])


@pytest.mark.parametrize("metric,normalize", [("euclidean", False), ("euclidean", True), ("cosine", False),
                                              ("cosine", True)])
@pytest.mark.parametrize("case", ["plain", "duplicates", "nan"])
@pytest.mark.parametrize("rerank", [False, True])
def test_compute_metrics_equals_the_whole_matrix_path(chunk_bytes, metric, normalize, case, rerank):
  problem = feature_problem(len(case) + normalize, duplicates=case == "duplicates", nan=case == "nan")
  kwargs = dict(metric=metric, normalize=normalize, rerank=rerank)
  assert_same_metrics(evaluation.compute_metrics(*problem, **kwargs),
                      evaluation._compute_metrics_from_matrices(*problem, **kwargs))


@pytest.mark.parametrize("rerank", [False, True])
@pytest.mark.parametrize("duplicates", [False, True])
def test_compute_metrics_cuhk03_equals_the_whole_matrix_path(chunk_bytes, rerank, duplicates):
  problem = feature_problem(5, duplicates=duplicates)
  np.random.seed(3)
  new = evaluation.compute_metrics(*problem, rerank=rerank, cuhk03_metric=True)
  after = np.random.random()
  np.random.seed(3)
  old = evaluation._compute_metrics_from_matrices(*problem, rerank=rerank, cuhk03_metric=True)
  assert_same_metrics(new, old)
  assert np.random.random() == after  # the same draws, in the same order


@pytest.mark.parametrize("cuhk03_metric", [False, True])
def test_small_sets_rerank_through_the_matrices_with_the_same_numbers(monkeypatch, cuhk03_metric):
  problem = feature_problem(6, duplicates=True)
  results = []
  for matrix_bytes in (2**30, 0):
    monkeypatch.setattr(evaluation, "RERANK_MATRIX_BYTES", matrix_bytes)
    np.random.seed(0)
    results.append(evaluation.compute_metrics(*problem, rerank=True, cuhk03_metric=cuhk03_metric))
  assert_same_metrics(*results)


def test_distance_blocks_have_the_bits_of_the_whole_matrix(monkeypatch):
  """Blocks of any height (and rows gathered from anywhere) against all of b: the same float32 bits."""
  rng = np.random.default_rng(12)
  a, b = rng.standard_normal((37, 64)).astype(np.float32), rng.standard_normal((53, 64)).astype(np.float32)
  for metric in evaluation.DISTANCE_METRICS:
    whole = evaluation.distance_matrix(a, b, metric, chunk_size=37)
    for chunk_size in (2, 5, 16):
      np.testing.assert_array_equal(evaluation.distance_matrix(a, b, metric, chunk_size=chunk_size), whole)
    distances = evaluation._Distances(evaluation._FeatureSet(a, metric), evaluation._FeatureSet(b, metric), 4)
    picks = rng.integers(0, 37, 200), rng.integers(0, 53, 200)
    np.testing.assert_array_equal(distances.entries(*picks), whole[picks])
    np.testing.assert_array_equal(distances.columns(np.array([0, 9, 52])), whole[:, [0, 9, 52]])


@pytest.mark.parametrize("symmetric", [True, False])
def test_rerank_from_features_equals_re_ranking_and_reads_few_rows_again(monkeypatch, symmetric):
  """The final distances themselves, bit for bit, with ties in the neighbour lists (rows read in full: by
  symmetry, or - when the rows read that way disagree with the kept entries - from a full pass) and
  expansion entries outside the kept nearest (recomputed)."""
  if not symmetric:
    rows = evaluation._JointDistances._rows

    def disagreeing_rows(stream, wanted):
      out = rows(stream, wanted)
      return out + 1.0 if stream.a is stream.b else out

    monkeypatch.setattr(evaluation._JointDistances, "_rows", staticmethod(disagreeing_rows))
  monkeypatch.setattr(evaluation, "CHUNK_BYTES", 4 * 90 * 7)
  monkeypatch.setattr(evaluation, "RERANK_CANDIDATES", 1)  # the bare k1 + 2: many entries recomputed
  monkeypatch.setattr(evaluation, "ENTRY_BLOCK_ROWS", 3)  # in blocks of another height than the pass's
  qf, gf, *_ = feature_problem(9, num_q=30, num_g=90, duplicates=True)
  q_g, q_q, g_g = (evaluation.distance_matrix(x, y) for x, y in ((qf, gf), (qf, qf), (gf, gf)))
  expected = evaluation.re_ranking(q_g, q_q, g_g)
  reranking = evaluation._ReRanking(qf, gf, "euclidean")
  blocks = list(reranking.blocks())
  assert len(blocks) > 1
  np.testing.assert_array_equal(np.concatenate([block for _, block in blocks]), expected)
  assert reranking.stats["rows_read_in_full"] > 0 and reranking.stats["entries_recomputed"] > 0
  if not symmetric:  # (with real rows, whether the shortcut holds is the machine's matmul's business)
    assert reranking.stats["rows_read_by_symmetry"] == 0


def test_compute_metrics_bad_input():
  qf, gf, *ids = feature_problem(0)
  with pytest.raises(ValueError, match="same dim"):
    evaluation.compute_metrics(qf, gf[:, :5], *ids)
  with pytest.raises(ValueError, match="g_pids has 70 entries"):
    evaluation.compute_metrics(qf, gf, ids[0], ids[1][:70], *ids[2:])
  with pytest.raises(ValueError, match="at least one query"):
    evaluation.compute_metrics(qf[:0], gf, ids[0][:0], ids[1], ids[2][:0], ids[3])
  with pytest.raises(ValueError, match="Unknown distance metric"):
    evaluation.compute_metrics(qf, gf, *ids, metric="manhattan")


# ----------------------------------------------------------------------------------------------------------
# Test-time features: rows written where they belong
# ----------------------------------------------------------------------------------------------------------


class FakeStream:
  """Batches of an eval pipeline out of dataset order, the last one padded, one image skipped (mask False)."""

  def __init__(self, num_images=11, batch_size=4, dim=3, skipped=(), with_size=True):
    self.batch_size, self.dim, self.skipped = batch_size, dim, set(skipped)
    self.order = np.random.default_rng(0).permutation(num_images)
    if with_size:
      self.num_images = num_images

  def __iter__(self):
    for s in range(0, len(self.order), self.batch_size):
      index = np.full(self.batch_size, -1)
      chunk = self.order[s:s + self.batch_size]
      index[:chunk.size] = chunk
      mask = (index >= 0) & ~np.isin(index, list(self.skipped))
      image = np.broadcast_to(index[:, None, None, None], (self.batch_size, 2, 2, 3)).astype(np.float32)
      yield {"image": image, "mask": mask, "index": index, "pid": index * 10, "camid": index % 3}


@pytest.mark.parametrize("with_size", [True, False])
@pytest.mark.parametrize("skipped", [(), (5,)])
def test_compute_features_writes_rows_in_dataset_order(with_size, skipped):
  from synth_reid_jax import features, sharding
  mesh = sharding.create_mesh()

  def feature_fn(variables, images):  # a row's feature is its dataset index, 3 times
    return images[:, 0, 0, :] * variables

  out = features.compute_features(feature_fn, 1.0, FakeStream(skipped=skipped, with_size=with_size), mesh)
  expected = np.array([i for i in range(11) if i not in skipped])
  np.testing.assert_array_equal(out["index"], expected)
  np.testing.assert_array_equal(out["features"], np.repeat(expected[:, None], 3, axis=1).astype(np.float32))
  np.testing.assert_array_equal(out["pid"], expected * 10)
  np.testing.assert_array_equal(out["camid"], expected % 3)
  with pytest.raises(ValueError, match="got no batches"):
    features.compute_features(feature_fn, 1.0, [], mesh)
  # A process that does not rank runs every batch (its collectives) and keeps nothing.
  seen = []
  assert features.compute_features(lambda v, x: seen.append(1) or feature_fn(v, x), 1.0,
                                   FakeStream(skipped=skipped, with_size=with_size), mesh, keep=False) is None
  assert len(seen) == 3  # 11 rows in batches of 4


def test_results_from_process_zero_in_one_process_are_computed_here():
  from synth_reid_jax import sharding
  from synth_reid_jax.errors import DatasetError
  assert sharding.from_process_zero(lambda: {"mAP": 0.5}, what="Evaluating x") == {"mAP": 0.5}

  def fails():
    raise DatasetError("no match")

  with pytest.raises(DatasetError, match="^no match$"):
    sharding.from_process_zero(fails, what="Evaluating x")


def test_features_reach_the_device_in_chunks_unchanged(monkeypatch):
  monkeypatch.setattr(evaluation, "CHUNK_BYTES", 4 * 8 * 3)  # 3 rows at a time; 10 rows: an overlapping last
  x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(evaluation._to_device(x)), x)
  np.testing.assert_array_equal(np.asarray(evaluation._to_device(x[:2])), x[:2])


@pytest.mark.parametrize("rerank", [False, True])
def test_top_k_is_the_argsort_order_of_the_whole_matrix(chunk_bytes, rerank):
  qf, gf, q_pids, g_pids, q_cams, g_cams = feature_problem(4, duplicates=True)
  dist = evaluation.distance_matrix(qf, gf)
  if rerank:
    dist = evaluation.re_ranking(dist, evaluation.distance_matrix(qf, qf), evaluation.distance_matrix(gf, gf))
  indices, distances = evaluation.top_k(qf, gf, 9, rerank=rerank, q_pids=q_pids, g_pids=g_pids,
                                        q_camids=q_cams, g_camids=g_cams)
  for q in range(len(qf)):
    order = np.argsort(dist[q])
    order = order[~((g_pids[order] == q_pids[q]) & (g_cams[order] == q_cams[q]))][:9]
    np.testing.assert_array_equal(indices[q], order)
    np.testing.assert_array_equal(distances[q], dist[q, order])
  unfiltered, _ = evaluation.top_k(qf, gf, 200, rerank=rerank)  # k > gallery: the whole ranking
  np.testing.assert_array_equal(unfiltered, np.argsort(dist, axis=1))


def test_adabn_statistics_are_the_batches_own_and_padded_batches_are_left_out():
  """make_batch_stats_fn reports each BatchNorm's mean and unbiased variance over the batch (checked on the
  BNNeck against R's pooled feature); adapted_batch_stats averages whole batches and skips padded ones."""
  import jax
  import jax.numpy as jnp

  from configs import demo
  from synth_reid_jax import features, sharding, train_state
  from synth_reid_jax.models import build_models

  config = demo.get_config("tiny")
  models = build_models(config, 5)
  state, _ = train_state.create_train_state(config, jax.random.key(0), 5)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  mesh = sharding.create_mesh()
  rng = np.random.default_rng(0)
  shape = (8, config.data.height, config.data.width, 3)
  a, b, c = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
  stats_fn = features.make_batch_stats_fn(models, mesh)

  (_, pooled), _ = models.reid.apply({
      "params": variables["params"]["reid"], "batch_stats": variables["batch_stats"]["reid"]},
      features.encode(models, variables, jnp.asarray(a)), train=True, mutable=["batch_stats"])
  pooled = np.asarray(pooled, np.float64)
  stats_a = stats_fn(variables, a)
  np.testing.assert_allclose(stats_a["bnneck"]["mean"], pooled.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats_a["bnneck"]["var"], pooled.var(0, ddof=1), rtol=1e-3, atol=1e-6)

  whole = np.ones(8, bool)
  padded = np.array([True] * 5 + [False] * 3)
  stream = [{"image": a, "mask": whole}, {"image": b, "mask": whole}, {"image": c, "mask": padded}]
  averaged = features.adapted_batch_stats(stats_fn, variables, stream, mesh)
  expected = jax.tree.map(lambda x, y: (x + y) / 2, stats_a, stats_fn(variables, b))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), averaged, expected)
  with pytest.raises(ValueError, match="no whole batch of target images"):
    features.adapted_batch_stats(stats_fn, variables, stream[2:], mesh)
