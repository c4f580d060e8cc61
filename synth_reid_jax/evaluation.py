"""Re-ID evaluation: distance matrices, CMC / mAP (Market and CUHK03 protocols), k-reciprocal re-ranking.

The numbers are torchreid's (its pure-numpy `evaluate_rank`, which the original code uses, and Zhong et al.'s
re-ranking as shipped with torchreid), computed without a Python loop over queries:

* Ranking. torchreid sorts every distance row with `np.argsort` (the default, unstable kind), drops the
  gallery images with the query's identity and camera, and reads CMC and AP off the remaining sequence of
  match / non-match labels. That sequence only depends on the order of a true match relative to the other kept
  images, so for every true match we count the kept non-matches strictly closer to the query (one `np.sort` of
  the row and a binary search). A true match tied at exactly the same distance as a kept non-match is the one
  case where argsort's tie-breaking changes the numbers; those rows (and rows holding NaN) are ranked with the
  very `np.argsort` torchreid calls, so the result is the same on every machine torchreid would run on.
* Re-ranking. The k-nearest lists come from `np.argpartition` (again with argsort's own order wherever
  distances tie at a list boundary), the k-reciprocal sets and the Jaccard distance from sparse matrices.
  Memory stays O((num_query + num_gallery) * k) plus the inputs and the output.
"""

import concurrent.futures
import functools
import os
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

DISTANCE_METRICS = ("euclidean", "cosine")
CMC_MAX_RANK = 50  # torchreid's default length of the CMC curve
# CUHK03 single-gallery-shot protocol: the CMC is averaged over this many random draws of one gallery image
# per identity.
CUHK03_REPEATS = 10
# torchreid's F.normalize: x / max(||x||, eps).
NORMALIZE_EPS = 1e-12
# Zhong et al.: a candidate's k1/2-reciprocal set joins the expansion when more than this fraction of it
# already lies in the query's k1-reciprocal set.
RERANK_EXPANSION_OVERLAP = 2.0 / 3.0

_CHUNK_BYTES = 64 * 2**20  # working-set size of one chunk of rows (distances, sorting, re-ranking)


def _num_threads() -> int:
  return max(1, min(os.cpu_count() or 1, 8))


def _chunks(num_rows: int, row_bytes: int, chunk_size: int | None = None):
  """[start, stop) row ranges so that one chunk holds about _CHUNK_BYTES."""
  if chunk_size is None:
    chunk_size = max(1, _CHUNK_BYTES // max(row_bytes, 1))
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  return [(s, min(s + chunk_size, num_rows)) for s in range(0, num_rows, chunk_size)]


def _balanced_chunks(work_per_row, row_size, work_budget=2**21):
  """[start, stop) row ranges of about work_budget units of work and at most _CHUNK_BYTES of float64 rows."""
  max_rows = max(1, _CHUNK_BYTES // (8 * max(row_size, 1)))
  chunks, start, total = [], 0, 0
  for row, work in enumerate(work_per_row):
    total += int(work)
    if total >= work_budget or row + 1 - start >= max_rows:
      chunks.append((start, row + 1))
      start, total = row + 1, 0
  if start < len(work_per_row):
    chunks.append((start, len(work_per_row)))
  return chunks


def _map_in_threads(fn, items):
  """[fn(x) for x in items], in order, on a thread pool (numpy's sorts and ufuncs release the GIL)."""
  items = list(items)
  if len(items) <= 1 or _num_threads() == 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(_num_threads()) as pool:
    return list(pool.map(fn, items))


# ----------------------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------------------


def normalize_features(x) -> np.ndarray:
  """L2-normalises rows as torch's F.normalize(p=2, dim=1) (float32)."""
  x = np.asarray(x, np.float32)
  norm = np.sqrt(np.einsum("ij,ij->i", x, x))
  return x / np.maximum(norm, NORMALIZE_EPS)[:, None]


@functools.partial(jax.jit, static_argnames="metric")
def _distance_block(a, b, b_sq, metric):
  """One chunk of rows of the distance matrix (a: (chunk, D); b: (G, D); b_sq: (G,) squared norms)."""
  dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  if metric == "cosine":
    return 1.0 - dots
  # torchreid adds -2 a.b to (||a||^2 + ||b||^2) (addmm); keep that association.
  return (jnp.sum(a * a, axis=1)[:, None] + b_sq[None, :]) - 2.0 * dots


def distance_matrix(a, b, metric: str = "euclidean", *, chunk_size: int | None = None) -> np.ndarray:
  """(len(a), len(b)) float32 distances with torchreid's definitions.

  euclidean: the *squared* distance ||a||^2 + ||b||^2 - 2 a.b (as torchreid's addmm); cosine: 1 - a_n.b_n with
  L2-normalised rows. Runs on JAX's default device (on CPU as fast as or faster than NumPy's BLAS, see
  benchmarks/evaluation.py) over chunks of `chunk_size` rows of `a`, all of one padded shape (one
  compilation); only the output, `b` and one chunk are in memory.
  """
  if metric not in DISTANCE_METRICS:
    raise ValueError(f"Unknown distance metric {metric!r}; use one of {DISTANCE_METRICS}.")
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"distance_matrix needs two 2-D feature matrices with the same width, got shapes "
                     f"{a.shape} and {b.shape}.")
  if metric == "cosine":
    a, b = normalize_features(a), normalize_features(b)
  num_a, num_b = a.shape[0], b.shape[0]
  out = np.empty((num_a, num_b), np.float32)
  if num_a == 0 or num_b == 0:
    return out
  chunks = _chunks(num_a, 4 * num_b * 3, chunk_size)
  rows = chunks[0][1]
  b_device = jnp.asarray(b)
  b_sq = jnp.sum(b_device * b_device, axis=1)
  for start, stop in chunks:
    block = a[start:stop]
    if block.shape[0] < rows:
      block = np.pad(block, ((0, rows - block.shape[0]), (0, 0)))
    out[start:stop] = np.asarray(_distance_block(block, b_device, b_sq, metric))[:stop - start]
  return out


# ----------------------------------------------------------------------------------------------------------
# CMC and mAP
# ----------------------------------------------------------------------------------------------------------


def _count_sorted_below(sorted_flat, lo, hi, values, inclusive: bool):
  """Per element: how many of sorted_flat[lo:hi] are < value (<= if inclusive); a vectorised bisection."""
  start = lo
  lo, hi = lo.copy(), hi.copy()
  last = sorted_flat.shape[0] - 1
  steps = int(np.max(hi - lo, initial=0)).bit_length() + 1
  for _ in range(steps):
    active = lo < hi
    mid = (lo + hi) // 2
    probe = sorted_flat[np.minimum(mid, last)]
    right = (probe <= values) if inclusive else (probe < values)
    lo, hi = np.where(right & active, mid + 1, lo), np.where(~right & active, mid, hi)
  return lo - start


def _match_ranks_by_argsort(dist, same_pid, kept):
  """torchreid's ranking: (row, 0-based rank among the kept gallery) of every true match, by full argsort."""
  order = np.argsort(dist, axis=1)
  kept_sorted = np.take_along_axis(kept, order, axis=1)
  match_sorted = np.take_along_axis(same_pid & kept, order, axis=1)
  kept_rank = np.cumsum(kept_sorted, axis=1) - 1
  rows, cols = np.nonzero(match_sorted)
  return rows, kept_rank[rows, cols]


def _same_identity_cells(q_pids, g_order, g_sorted_pids):
  """(row, gallery index) of every gallery image sharing the query's identity, from a pid-sorted gallery."""
  lo = np.searchsorted(g_sorted_pids, q_pids, side="left")
  lengths = np.searchsorted(g_sorted_pids, q_pids, side="right") - lo
  rows = np.repeat(np.arange(q_pids.shape[0]), lengths)
  within = np.arange(rows.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  return rows, g_order[np.repeat(lo, lengths) + within]


def _protocol_masks(q_pids, g_pids, q_camids, g_camids):
  """(same identity, kept) boolean (num_query, num_gallery) masks of the Market protocol."""
  same_pid = q_pids[:, None] == g_pids[None, :]
  kept = ~(same_pid & (q_camids[:, None] == g_camids[None, :]))
  return same_pid, kept


def _match_ranks(dist, q_pids, q_camids, g_pids, g_camids, g_order):
  """(row, 0-based rank among the kept gallery) of every true match, sorted; torchreid's order (see the module
  docstring): counts closer non-matches, and falls back to argsort for rows where that is ambiguous."""
  num_rows, num_g = dist.shape
  rows, cols = _same_identity_cells(q_pids, g_order, g_pids[g_order])
  # The non-matches of each row, sorted; same-identity images are pushed to the end as +inf.
  negatives = np.array(dist, dtype=np.result_type(dist.dtype, np.float32))
  negatives[rows, cols] = np.inf
  negatives.sort(axis=1)
  num_negatives = num_g - np.bincount(rows, minlength=num_rows)
  is_match = g_camids[cols] != q_camids[rows]  # same identity, other camera: kept, a true match
  rows, cols = rows[is_match], cols[is_match]
  values = dist[rows, cols].astype(negatives.dtype)
  lo = rows.astype(np.int64) * num_g
  hi = lo + num_negatives[rows]
  flat = negatives.reshape(-1)
  closer = _count_sorted_below(flat, lo, hi, values, inclusive=False)
  tied = closer != _count_sorted_below(flat, lo, hi, values, inclusive=True)
  # NaN sorts last, after the +inf padding: a NaN anywhere in a row shows in its last column or in values.
  redo_row = np.isnan(negatives[:, -1])
  redo_row[rows[tied | np.isnan(values)]] = True
  exact_rows = np.flatnonzero(redo_row)
  if exact_rows.size:
    keep = ~redo_row[rows]
    rows, closer = rows[keep], closer[keep]
  # The k-th closest match (0-based) of a row sits behind k matches and `closer` non-matches.
  order = np.lexsort((closer, rows))
  rows, closer = rows[order], closer[order]
  starts = np.searchsorted(rows, rows, side="left")
  ranks = closer + (np.arange(rows.size) - starts)
  if exact_rows.size:
    same_pid, kept = _protocol_masks(q_pids[exact_rows], g_pids, q_camids[exact_rows], g_camids)
    ex_rows, ex_ranks = _match_ranks_by_argsort(dist[exact_rows], same_pid, kept)
    rows = np.concatenate([rows, exact_rows[ex_rows]])
    ranks = np.concatenate([ranks, ex_ranks])
    order = np.lexsort((ranks, rows))
    rows, ranks = rows[order], ranks[order]
  return rows, ranks


def _average_precision(rows, ranks, num_rows):
  """Per-row AP from the sorted 0-based ranks of the true matches: mean over matches of hits / position."""
  counts = np.bincount(rows, minlength=num_rows)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  hits = np.arange(rows.size) - starts[rows] + 1
  precision = hits.astype(np.float64) / (ranks + 1).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.bincount(rows, weights=precision, minlength=num_rows) / counts, counts


def _check_rank_inputs(distmat, q_pids, g_pids, q_camids, g_camids):
  distmat = np.asarray(distmat)
  if distmat.ndim != 2:
    raise ValueError(f"distmat must be (num_query, num_gallery), got shape {distmat.shape}.")
  num_q, num_g = distmat.shape
  arrays = [np.asarray(x).reshape(-1) for x in (q_pids, g_pids, q_camids, g_camids)]
  for name, x, n in zip(("q_pids", "g_pids", "q_camids", "g_camids"), arrays, (num_q, num_g, num_q, num_g)):
    if x.shape[0] != n:
      raise ValueError(f"{name} has {x.shape[0]} entries but distmat {distmat.shape} needs {n}.")
  return (distmat, *arrays)


def _no_valid_query_error():
  return ValueError("No query has a correct match in the gallery (gallery images with the query's identity "
                    "and camera are excluded): check that query and gallery come from the same dataset and "
                    "that pids / camids are passed in the right order.")


def _eval_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
  num_q, num_g = distmat.shape
  g_order = np.argsort(g_pids, kind="stable")

  def rank_chunk(chunk):
    start, stop = chunk
    rows, ranks = _match_ranks(distmat[start:stop], q_pids[start:stop], q_camids[start:stop],
                               g_pids, g_camids, g_order)
    return rows + start, ranks

  parts = _map_in_threads(rank_chunk, _chunks(num_q, 16 * max(num_g, 1)))
  rows = np.concatenate([p[0] for p in parts])
  ranks = np.concatenate([p[1] for p in parts])
  ap, counts = _average_precision(rows, ranks, num_q)
  valid = counts > 0
  num_valid = int(valid.sum())
  if not num_valid:
    raise _no_valid_query_error()
  first_rank = ranks[np.concatenate([[0], np.cumsum(counts)[:-1]])[valid]]
  # CMC(k) = fraction of valid queries whose first true match is within the top k+1. (A query with fewer
  # than max_rank kept gallery images still has its match among them, so its curve stays at 1.)
  hits = np.cumsum(np.bincount(np.minimum(first_rank, max_rank), minlength=max_rank + 1)[:max_rank])
  cmc = hits.astype(np.float32) / float(num_valid)
  return cmc, float(np.mean(ap[valid]))


def _eval_cuhk03(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
  """Single-gallery-shot CMC: one random gallery image per identity, CUHK03_REPEATS draws, as torchreid.

  The draws come from NumPy's global legacy RandomState, in torchreid's order (query, repeat, gallery identity
  in order of first appearance in the ranking), so a seeded run gives torchreid's numbers. mAP uses the full
  gallery, as the Market protocol.
  """
  num_q, num_g = distmat.shape
  all_cmc, all_ap = [], []

  def sort_chunk(chunk):
    start, stop = chunk
    order = np.argsort(distmat[start:stop], axis=1)
    sorted_pids = g_pids[order]
    kept = ~((sorted_pids == q_pids[start:stop, None]) & (g_camids[order] == q_camids[start:stop, None]))
    return sorted_pids, kept

  chunks = _chunks(num_q, 24 * max(num_g, 1))
  for (start, _), (sorted_pids, kept) in zip(chunks, _map_in_threads(sort_chunk, chunks)):
    for row in range(sorted_pids.shape[0]):
      q_pid = q_pids[start + row]
      kept_pids = sorted_pids[row][kept[row]]
      match = kept_pids == q_pid
      if not match.any():
        continue
      positions = np.flatnonzero(match)
      all_ap.append(np.mean((np.arange(positions.size) + 1.0) / (positions + 1.0)))
      pids, first, inverse, sizes = np.unique(kept_pids, return_index=True, return_inverse=True,
                                              return_counts=True)
      appearance = np.argsort(first)  # torchreid walks the identities in order of first appearance
      members = np.argsort(inverse, kind="stable")  # kept positions grouped by identity, ascending
      offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
      draws = np.random.randint(0, np.tile(sizes[appearance], CUHK03_REPEATS))
      picked = members[offsets[appearance] + draws.reshape(CUHK03_REPEATS, -1)]  # (repeats, identities)
      own = picked[:, np.flatnonzero(pids[appearance] == q_pid)[0]]  # the query identity's pick
      rank = np.count_nonzero(picked < own[:, None], axis=1)
      hits = np.count_nonzero(rank[:, None] <= np.arange(max_rank)[None, :], axis=0)
      all_cmc.append(hits.astype(np.float32) / CUHK03_REPEATS)
  if not all_cmc:
    raise _no_valid_query_error()
  # torchreid sums the per-query float32 curves in query order; do the same to get its rounding.
  cmc = np.asarray(all_cmc, np.float32).sum(0) / float(len(all_cmc))
  return cmc, float(np.mean(all_ap))


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, use_metric_cuhk03=False):
  """CMC curve (length max_rank) and mAP of a query x gallery distance matrix, as torchreid.

  Gallery images with the query's pid *and* camid are ignored; queries left without a correct match are
  skipped (an error if none is left). A gallery smaller than max_rank shortens the curve, with a warning.
  use_metric_cuhk03: the CUHK03 single-gallery-shot CMC, which draws from np.random's global state.
  """
  distmat, q_pids, g_pids, q_camids, g_camids = _check_rank_inputs(
      distmat, q_pids, g_pids, q_camids, g_camids)
  num_g = distmat.shape[1]
  if max_rank < 1:
    raise ValueError(f"max_rank must be >= 1, got {max_rank}.")
  if num_g < max_rank:
    warnings.warn(f"The gallery has only {num_g} images, fewer than max_rank={max_rank}: the CMC curve stops "
                  f"at rank {num_g}.", stacklevel=2)
    max_rank = num_g
  evaluate = _eval_cuhk03 if use_metric_cuhk03 else _eval_market1501
  return evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)


# ----------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (Zhong et al., CVPR 2017)
# ----------------------------------------------------------------------------------------------------------


class _OriginalDistance:
  """Rows of the re-ranking's "original distance": d^2 over the joint (query + gallery) set, each row divided
  by its maximum, in float32 (the reference squares, casts to float32, divides by column maxima, transposes).

  Built on demand from the three input blocks so the (N, N) matrix never exists.
  """

  def __init__(self, q_g, q_q, g_g):
    self.dtype = np.result_type(q_g, q_q, g_g)
    self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
    self.num_q = q_g.shape[0]
    self.num = q_g.shape[0] + q_g.shape[1]
    # max of the squares = square of the largest magnitude (rounding is monotone).
    def magnitude(x, axis):
      return np.maximum(np.max(x, axis=axis, initial=-np.inf), -np.min(x, axis=axis, initial=np.inf))
    query_max = np.maximum(magnitude(q_q, 0), magnitude(q_g, 1))
    gallery_max = np.maximum(magnitude(q_g, 0), magnitude(g_g, 0))
    self.row_max = self._square(np.concatenate([query_max, gallery_max]))

  def _square(self, x):
    return np.square(np.asarray(x, self.dtype)).astype(np.float32)

  def rows(self, start, stop):
    """Rows start:stop, (stop - start, N) float32."""
    q = self.num_q
    parts = []
    if start < q:
      s, e = start, min(stop, q)
      parts.append(np.concatenate([self.q_q[:, s:e].T, self.q_g[s:e]], axis=1))
    if stop > q:
      s, e = max(start, q) - q, stop - q
      parts.append(np.concatenate([self.q_g[:, s:e].T, self.g_g[:, s:e].T], axis=1))
    block = self._square(np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0])
    block /= self.row_max[start:stop, None]
    return block

  def entries(self, rows, cols):
    """Entries (rows[i], cols[i]); the row is the column of the squared input matrix."""
    q = self.num_q
    values = np.empty(rows.shape, self.dtype)
    for row_in_q in (True, False):
      for col_in_q in (True, False):
        sel = ((rows < q) == row_in_q) & ((cols < q) == col_in_q)
        r = rows[sel] - (0 if row_in_q else q)
        c = cols[sel] - (0 if col_in_q else q)
        if col_in_q and row_in_q:
          values[sel] = self.q_q[c, r]
        elif col_in_q:
          values[sel] = self.q_g[c, r]
        elif row_in_q:
          values[sel] = self.q_g[r, c]
        else:
          values[sel] = self.g_g[c, r]
    return self._square(values) / self.row_max[rows]


def _nearest(dist_rows, k):
  """Indices of the k smallest entries of each row, in np.argsort's order (ties broken as argsort does)."""
  num = dist_rows.shape[1]
  if k >= num:
    return np.argsort(dist_rows, axis=1)[:, :k]
  candidates = np.argpartition(dist_rows, k, axis=1)[:, :k + 1]
  values = np.take_along_axis(dist_rows, candidates, axis=1)
  order = np.argsort(values, axis=1, kind="stable")
  candidates = np.take_along_axis(candidates, order, axis=1)
  values = np.take_along_axis(values, order, axis=1)
  # With distinct values among the k+1 smallest, every prefix of the list is unambiguous; otherwise ask the
  # argsort the reference uses.
  ambiguous = (values[:, 1:] == values[:, :-1]).any(axis=1) | np.isnan(values).any(axis=1)
  nearest = candidates[:, :k]
  if ambiguous.any():
    nearest[ambiguous] = np.argsort(dist_rows[ambiguous], axis=1)[:, :k]
  return nearest


def _neighbour_matrix(nearest, num, dtype=np.float32):
  """Sparse (num, num) matrix with ones at (i, nearest[i, :])."""
  rows = np.repeat(np.arange(num), nearest.shape[1])
  data = np.ones(rows.size, dtype)
  return scipy.sparse.csr_matrix((data, (rows, nearest.reshape(-1))), shape=(num, num))


def _reciprocal(nearest, num):
  """k-reciprocal neighbours: j is in R(i) iff j is among i's nearest and i among j's."""
  forward = _neighbour_matrix(nearest, num)
  return forward.multiply(forward.T).tocsr()


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3) -> np.ndarray:
  """k-reciprocal re-ranking (Zhong et al.) of a query x gallery distance matrix, as torchreid's re_ranking.

  Returns (num_query, num_gallery) float32: (1 - lambda) * Jaccard distance of the k-reciprocal encodings
  + lambda * original distance (the squared input distance, each row divided by its maximum).
  """
  q_g, q_q, g_g = (np.asarray(x) for x in (q_g_dist, q_q_dist, g_g_dist))
  if q_g.ndim != 2:
    raise ValueError(f"q_g_dist must be (num_query, num_gallery), got shape {q_g.shape}.")
  num_q, num_g = q_g.shape
  if q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
    raise ValueError(f"re_ranking needs q_q_dist {(num_q, num_q)} and g_g_dist {(num_g, num_g)} to match "
                     f"q_g_dist {q_g.shape}; got {q_q.shape} and {g_g.shape}.")
  if k1 < 1 or k2 < 1:
    raise ValueError(f"re_ranking needs k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}.")
  original = _OriginalDistance(q_g, q_q, g_g)
  num = original.num
  k_forward = min(k1 + 1, num)
  k_half = min(int(np.around(k1 / 2.0)) + 1, num)  # the reference rounds k1 / 2 half to even
  k_expand = min(k2, num)
  k_max = max(k_forward, k_half, k_expand)

  def nearest_chunk(chunk):
    return _nearest(original.rows(*chunk), k_max)

  nearest = np.concatenate(_map_in_threads(nearest_chunk, _chunks(num, 8 * num)))

  # k-reciprocal sets R(i, k1), expanded by R(c, k1/2) of members c that overlap R(i, k1) enough.
  recip = _reciprocal(nearest[:, :k_forward], num)
  recip_half = _reciprocal(nearest[:, :k_half], num)
  overlap = (recip @ recip_half.T).multiply(recip).tocoo()
  half_sizes = np.diff(recip_half.indptr)
  joins = overlap.data > RERANK_EXPANSION_OVERLAP * half_sizes[overlap.col]
  join = scipy.sparse.csr_matrix((np.ones(joins.sum(), np.float32), (overlap.row[joins], overlap.col[joins])),
                                 shape=(num, num))
  expansion = (recip + join @ recip_half).tocsr()
  expansion.sort_indices()
  rows = np.repeat(np.arange(num), np.diff(expansion.indptr))
  cols = expansion.indices

  # V: Gaussian-kernel weights over the expanded set, normalised per row.
  weights = np.exp(-original.entries(rows, cols))
  totals = np.bincount(rows, weights=weights, minlength=num).astype(np.float32)
  encoding = scipy.sparse.csr_matrix((weights / totals[rows], (rows, cols)), shape=(num, num))
  if k2 != 1:  # local query expansion: average the encodings of the k2 nearest neighbours
    encoding = (_neighbour_matrix(nearest[:, :k_expand], num) @ encoding) / np.float32(k_expand)
    encoding = encoding.tocsr()
  encoding.eliminate_zeros()

  # Jaccard distance query x gallery: 1 - sum(min) / sum(max), sum(max) = 2 - sum(min) as rows sum to 1.
  # sum_l min(V[i, l], V[j, l]) runs over the (i, l, j) triples where both entries are non-zero: for each
  # query entry (i, l), the gallery entries of column l.
  query_enc = encoding[:num_q].tocsr()
  gallery_enc = encoding[num_q:].tocsc()
  column_sizes = np.diff(gallery_enc.indptr)
  query_rows = np.repeat(np.arange(num_q), np.diff(query_enc.indptr))
  pairs_per_query = np.bincount(query_rows, weights=column_sizes[query_enc.indices], minlength=num_q)
  final = np.empty((num_q, num_g), np.float32)

  def jaccard_chunk(chunk):
    start, stop = chunk
    block = query_enc[start:stop].tocoo()
    lengths = column_sizes[block.col]
    nonempty = lengths > 0
    rows, cols, values = block.row[nonempty], block.col[nonempty], block.data[nonempty]
    lengths = lengths[nonempty]
    # Positions of the gallery entries of each query entry's column, concatenated: consecutive runs
    # indptr[col] .. indptr[col] + length - 1, built with one cumulative sum.
    steps = np.ones(int(lengths.sum()), np.int64)
    run_starts = np.cumsum(lengths) - lengths
    first = gallery_enc.indptr[cols].astype(np.int64)
    if steps.size:
      steps[0] = first[0]
      steps[run_starts[1:]] = first[1:] - (first[:-1] + lengths[:-1] - 1)
    pos = np.cumsum(steps)
    mins = np.minimum(np.repeat(values, lengths), gallery_enc.data[pos])
    flat = np.repeat(rows.astype(np.int64) * num_g, lengths) + gallery_enc.indices[pos]
    shared = np.bincount(flat, weights=mins, minlength=(stop - start) * num_g)
    shared = shared.reshape(stop - start, num_g).astype(np.float32)
    jaccard = 1 - shared / (2.0 - shared)
    final[start:stop] = jaccard * (1 - lambda_value) + original.rows(start, stop)[:, num_q:] * lambda_value

  _map_in_threads(jaccard_chunk, _balanced_chunks(pairs_per_query, num_g))
  return final


# ----------------------------------------------------------------------------------------------------------
# The trainer's entry points
# ----------------------------------------------------------------------------------------------------------


def compute_metrics(qf, gf, q_pids, g_pids, q_camids, g_camids, *, metric: str = "euclidean",
                    normalize: bool = False, rerank: bool = False, cuhk03_metric: bool = False,
                    ranks: Sequence[int] = (1, 5, 10, 20)) -> dict:
  """Features -> {"mAP", "cmc", "num_query", "num_gallery"} as torchreid's test: optional L2 normalisation,
  distance, optional re-ranking, CMC (up to rank max(50, max(ranks)), fewer for a small gallery) and mAP."""
  qf, gf = np.asarray(qf, np.float32), np.asarray(gf, np.float32)
  if normalize:
    qf, gf = normalize_features(qf), normalize_features(gf)
  distmat = distance_matrix(qf, gf, metric)
  if rerank:
    distmat = re_ranking(distmat, distance_matrix(qf, qf, metric), distance_matrix(gf, gf, metric))
  max_rank = min(max(CMC_MAX_RANK, *ranks) if ranks else CMC_MAX_RANK, len(gf))
  cmc, mean_ap = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank,
                               use_metric_cuhk03=cuhk03_metric)
  return {"mAP": float(mean_ap), "cmc": [float(x) for x in cmc], "num_query": int(len(qf)),
          "num_gallery": int(len(gf))}


def format_results(metrics: dict, ranks: Sequence[int] = (1, 5, 10, 20), name: str | None = None) -> str:
  """torchreid's printed summary: mAP then the CMC at each requested rank, in percent."""
  title = "** Results **" if name is None else f"** Results ({name}) **"
  lines = [title, f"mAP: {metrics['mAP']:.1%}", "CMC curve"]
  cmc = metrics["cmc"]
  for r in ranks:
    if 1 <= r <= len(cmc):
      lines.append(f"Rank-{r:<3}: {cmc[r - 1]:.1%}")
  return "\n".join(lines)
