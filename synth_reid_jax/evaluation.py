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
* From features (compute_metrics, top_k). The distances are computed in blocks of rows against the whole
  other set on the default device (CHUNK_BYTES each), moved to the host one at a time and ranked at once; no
  query x gallery matrix exists. Re-ranking from features streams the blocks of the three matrices
  re_ranking would take (q x g, q x q, g x g) once to keep every joint row's maximum and nearest entries,
  reads again only what that pass cannot settle, and ranks the final distances block by block. The numbers
  are those of distance_matrix [-> re_ranking] -> evaluate_rank, bit for bit (tests compare the two paths).
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

_CHUNK_BYTES = 64 * 2**20  # working-set size of one chunk of rows (sorting, re-ranking)
# Memory budget of one distance block (rows x the whole other set, float32), on the device and on the host:
# it sets the block height (at MSMT17's 82,161 gallery images, 202 query rows; at Market's 15,913, 3,368
# queries in four blocks). compute_metrics holds a few such blocks at a time.
CHUNK_BYTES = 64 * 2**20
# re-ranking from features keeps this many nearest entries of every row of the joint set (at least k1 + 2):
# the Gaussian weights of most expansion entries are read from them instead of recomputed (at 96, about a
# third of the gallery rows still have an entry to recompute on identity-clustered 2048-d features).
RERANK_CANDIDATES = 96
ENTRY_BLOCK_ROWS = 256  # the height of the blocks that recompute scattered entries
# Re-ranking of sets small enough that the three distance matrices fit in this many bytes uses them (about
# 8,000 images); larger sets are re-ranked from features. Both give the same numbers.
RERANK_MATRIX_BYTES = 256 * 2**20


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


@functools.cache
def _thread_pool():
  # One pool for the process: fresh threads for every block would each take a malloc arena of their own, and
  # the memory those arenas keep after a block grows the process by hundreds of MB at MSMT17 size.
  return concurrent.futures.ThreadPoolExecutor(_num_threads(), thread_name_prefix="evaluation")


def _map_in_threads(fn, items):
  """[fn(x) for x in items], in order, on a thread pool (numpy's sorts and ufuncs release the GIL). fn must
  not call _map_in_threads itself."""
  items = list(items)
  if len(items) <= 1 or _num_threads() == 1:
    return [fn(x) for x in items]
  return list(_thread_pool().map(fn, items))


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


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffer, rows, start):
  return jax.lax.dynamic_update_slice(buffer, rows, (start, 0))


def _to_device(x: np.ndarray):
  """x on the default device, sent CHUNK_BYTES at a time into one buffer (jnp.asarray of a large array briefly
  holds it twice)."""
  step = max(1, CHUNK_BYTES // max(4 * x.shape[1], 1))
  if x.shape[0] <= step:
    return jnp.asarray(x)
  buffer = jnp.zeros(x.shape, x.dtype)
  for start in range(0, x.shape[0], step):
    start = min(start, x.shape[0] - step)  # one shape: the last chunk overlaps the one before
    buffer = _write_rows(buffer, x[start:start + step], start)
  return buffer


@jax.jit
def _squared_norms(x):
  """jnp.sum(x * x, axis=1) in one fusion: the bits of the two separate operations, no (N, D) temporary."""
  return jnp.sum(x * x, axis=1)


class _FeatureSet:
  """One side of the distances: float32 rows (L2-normalised for cosine) on the host and on the default device,
  with their squared norms computed there once."""

  def __init__(self, x, metric):
    x = np.asarray(x, np.float32)
    self.host = normalize_features(x) if metric == "cosine" else x
    self.metric = metric
    self._device = None

  def __len__(self):
    return self.host.shape[0]

  def device(self):
    """(rows on the device, their squared norms); built on first use and kept."""
    if self._device is None:
      rows = _to_device(self.host)
      self._device = rows, _squared_norms(rows)
    return self._device


class _Distances:
  """Blocks of rows of the (len(a), len(b)) distance matrix, each (rows, D) x (len(b), D) in one jitted shape.

  The whole of `b` is the right-hand side of every block, as in distance_matrix: on CPU, XLA's float32 matmul
  gives an entry the same bits whatever the number and position of the left-hand rows (two or more), but not
  whatever the number of right-hand rows, so `b` is never split and any rows of `a` - a chunk, or rows
  gathered from anywhere - reproduce the matrix's entries exactly. The block height follows CHUNK_BYTES, not
  the size of `a`; while the host works on one block, the device computes the next.
  """

  def __init__(self, a: _FeatureSet, b: _FeatureSet, chunk_size: int | None = None):
    self.a, self.b = a, b
    num_a, num_b = len(a), len(b)
    if chunk_size is None:
      chunk_size = max(2, CHUNK_BYTES // (4 * max(num_b, 1)))
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    # Equal chunks (less padding); a one-row set keeps its one-row shape (a matrix-vector product), as before.
    num_chunks = -(-num_a // chunk_size) if num_a else 0
    self.rows = -(-num_a // num_chunks) if num_chunks else 1

  def chunks(self):
    num_a = len(self.a)
    return [slice(s, min(s + self.rows, num_a)) for s in range(0, num_a, self.rows)]

  def blocks(self, row_groups=None, height=None):
    """Yields (rows, (len(rows), len(b)) float32 host block) per group of rows of `a` (a slice or a sorted
    index array of at most `height` (default self.rows) rows; default: consecutive chunks of all rows)."""
    b_rows, b_sq = self.b.device()
    height = height or self.rows
    pending = None
    for rows in self.chunks() if row_groups is None else row_groups:
      block = self.a.host[rows]
      count = block.shape[0]
      if count < height:
        block = np.pad(block, ((0, height - count), (0, 0)))
      current = rows, count, _distance_block(block, b_rows, b_sq, self.b.metric)
      if pending is not None:
        yield pending[0], np.asarray(pending[2])[:pending[1]]
      pending = current
    if pending is not None:
      yield pending[0], np.asarray(pending[2])[:pending[1]]

  def gathered(self, a_indices, height=None):
    """Row groups of at most `height` (default self.rows) of the given rows of `a` (sorted, unique)."""
    height = height or self.rows
    return [a_indices[s:s + height] for s in range(0, len(a_indices), height)]

  def entries(self, a_idx, b_idx) -> np.ndarray:
    """The matrix's entries (a_idx[i], b_idx[i]), from blocks of the rows they need."""
    values = np.empty(a_idx.shape, np.float32)
    if not a_idx.size:
      return values
    order = np.argsort(a_idx, kind="stable")
    sorted_a = a_idx[order]
    needed = np.unique(sorted_a)
    # Scattered rows: blocks no taller than ENTRY_BLOCK_ROWS, so few entries do not cost a tall block.
    height = min(self.rows, max(2, ENTRY_BLOCK_ROWS)) if self.rows > 1 else 1
    for rows, block in self.blocks(self.gathered(needed, height), height):
      sel = order[np.searchsorted(sorted_a, rows[0]):np.searchsorted(sorted_a, rows[-1], side="right")]
      values[sel] = block[np.searchsorted(rows, a_idx[sel]), b_idx[sel]]
    return values

  def columns(self, b_indices) -> np.ndarray:
    """(len(a), len(b_indices)) columns of the matrix (one pass over all of `a`)."""
    out = np.empty((len(self.a), len(b_indices)), np.float32)
    for rows, block in self.blocks():
      out[rows] = block[:, b_indices]
    return out


def distance_matrix(a, b, metric: str = "euclidean", *, chunk_size: int | None = None) -> np.ndarray:
  """(len(a), len(b)) float32 distances with torchreid's definitions.

  euclidean: the *squared* distance ||a||^2 + ||b||^2 - 2 a.b (as torchreid's addmm); cosine: 1 - a_n.b_n with
  L2-normalised rows. Runs on JAX's default device over blocks of `chunk_size` rows of `a` (default: as many
  as CHUNK_BYTES of distances hold) against all of `b`, all of one padded shape (one compilation). This
  materialises the whole matrix; compute_metrics never does.
  """
  if metric not in DISTANCE_METRICS:
    raise ValueError(f"Unknown distance metric {metric!r}; use one of {DISTANCE_METRICS}.")
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"distance_matrix needs two 2-D feature matrices with the same width, got shapes "
                     f"{a.shape} and {b.shape}.")
  out = np.empty((a.shape[0], b.shape[0]), np.float32)
  if not out.size:
    return out
  for rows, block in _Distances(_FeatureSet(a, metric), _FeatureSet(b, metric), chunk_size).blocks():
    out[rows] = block
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


class _MarketRanking:
  """Market-protocol CMC and mAP fed with blocks of distance rows in query order (only the per-match ranks
  are kept between blocks)."""

  def __init__(self, q_pids, g_pids, q_camids, g_camids, max_rank):
    self.ids = q_pids, g_pids, q_camids, g_camids
    self.max_rank = max_rank
    self.g_order = np.argsort(g_pids, kind="stable")
    self.parts = []

  def add(self, start, dist_rows):
    q_pids, g_pids, q_camids, g_camids = self.ids
    num_g = dist_rows.shape[1]

    def rank_chunk(chunk):
      s, e = chunk
      rows, ranks = _match_ranks(dist_rows[s:e], q_pids[start + s:start + e], q_camids[start + s:start + e],
                                 g_pids, g_camids, self.g_order)
      return rows + start + s, ranks

    self.parts += _map_in_threads(rank_chunk, _chunks(dist_rows.shape[0], 16 * max(num_g, 1)))

  def result(self):
    num_q = self.ids[0].shape[0]
    rows = np.concatenate([p[0] for p in self.parts] or [np.zeros(0, np.int64)])
    ranks = np.concatenate([p[1] for p in self.parts] or [np.zeros(0, np.int64)])
    ap, counts = _average_precision(rows, ranks, num_q)
    valid = counts > 0
    num_valid = int(valid.sum())
    if not num_valid:
      raise _no_valid_query_error()
    first_rank = ranks[np.concatenate([[0], np.cumsum(counts)[:-1]])[valid]]
    # CMC(k) = fraction of valid queries whose first true match is within the top k+1. (A query with fewer
    # than max_rank kept gallery images still has its match among them, so its curve stays at 1.)
    max_rank = self.max_rank
    hits = np.cumsum(np.bincount(np.minimum(first_rank, max_rank), minlength=max_rank + 1)[:max_rank])
    cmc = hits.astype(np.float32) / float(num_valid)
    return cmc, float(np.mean(ap[valid]))


class _CUHK03Ranking:
  """Single-gallery-shot CMC: one random gallery image per identity, CUHK03_REPEATS draws, as torchreid.

  The draws come from NumPy's global legacy RandomState, in torchreid's order (query, repeat, gallery identity
  in order of first appearance in the ranking), so a seeded run gives torchreid's numbers; blocks must come in
  query order. mAP uses the full gallery, as the Market protocol.
  """

  def __init__(self, q_pids, g_pids, q_camids, g_camids, max_rank):
    self.ids = q_pids, g_pids, q_camids, g_camids
    self.max_rank = max_rank
    self.all_cmc, self.all_ap = [], []

  def add(self, start, dist_rows):
    q_pids, g_pids, q_camids, g_camids = self.ids
    num_g = dist_rows.shape[1]

    def sort_chunk(chunk):
      s, e = chunk
      order = np.argsort(dist_rows[s:e], axis=1)
      sorted_pids = g_pids[order]
      rows = slice(start + s, start + e)
      kept = ~((sorted_pids == q_pids[rows, None]) & (g_camids[order] == q_camids[rows, None]))
      return sorted_pids, kept

    chunks = _chunks(dist_rows.shape[0], 24 * max(num_g, 1))
    for (s, _), (sorted_pids, kept) in zip(chunks, _map_in_threads(sort_chunk, chunks)):
      for row in range(sorted_pids.shape[0]):
        self._add_row(q_pids[start + s + row], sorted_pids[row][kept[row]])

  def _add_row(self, q_pid, kept_pids):
    match = kept_pids == q_pid
    if not match.any():
      return
    positions = np.flatnonzero(match)
    self.all_ap.append(np.mean((np.arange(positions.size) + 1.0) / (positions + 1.0)))
    pids, first, inverse, sizes = np.unique(kept_pids, return_index=True, return_inverse=True,
                                            return_counts=True)
    appearance = np.argsort(first)  # torchreid walks the identities in order of first appearance
    members = np.argsort(inverse, kind="stable")  # kept positions grouped by identity, ascending
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    draws = np.random.randint(0, np.tile(sizes[appearance], CUHK03_REPEATS))
    picked = members[offsets[appearance] + draws.reshape(CUHK03_REPEATS, -1)]  # (repeats, identities)
    own = picked[:, np.flatnonzero(pids[appearance] == q_pid)[0]]  # the query identity's pick
    rank = np.count_nonzero(picked < own[:, None], axis=1)
    hits = np.count_nonzero(rank[:, None] <= np.arange(self.max_rank)[None, :], axis=0)
    self.all_cmc.append(hits.astype(np.float32) / CUHK03_REPEATS)

  def result(self):
    if not self.all_cmc:
      raise _no_valid_query_error()
    # torchreid sums the per-query float32 curves in query order; do the same to get its rounding.
    cmc = np.asarray(self.all_cmc, np.float32).sum(0) / float(len(self.all_cmc))
    return cmc, float(np.mean(self.all_ap))


def _ranking(cuhk03_metric, q_pids, g_pids, q_camids, g_camids, max_rank):
  kind = _CUHK03Ranking if cuhk03_metric else _MarketRanking
  return kind(q_pids, g_pids, q_camids, g_camids, max_rank)


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
  ranking = _ranking(use_metric_cuhk03, q_pids, g_pids, q_camids, g_camids, max_rank)
  ranking.add(0, distmat)
  return ranking.result()


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


def _k_reciprocal_rows(nearest, entries, num, k_forward, k_half, k_expand, k2):
  """Zhong et al.'s encoding V (sparse CSR (num, num), rows sum to 1) from the k-nearest lists of the joint
  set; entries(rows, cols) -> the original distances at those cells."""
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
  weights = np.exp(-entries(rows, cols))
  totals = np.bincount(rows, weights=weights, minlength=num).astype(np.float32)
  encoding = scipy.sparse.csr_matrix((weights / totals[rows], (rows, cols)), shape=(num, num))
  if k2 != 1:  # local query expansion: average the encodings of the k2 nearest neighbours
    encoding = (_neighbour_matrix(nearest[:, :k_expand], num) @ encoding) / np.float32(k_expand)
    encoding = encoding.tocsr()
  encoding.eliminate_zeros()
  return encoding


class _Jaccard:
  """Jaccard distances between the query and gallery encodings, row block by row block.

  1 - sum(min) / sum(max), sum(max) = 2 - sum(min) as rows sum to 1. sum_l min(V[i, l], V[j, l]) runs over
  the (i, l, j) triples where both entries are non-zero: for each query entry (i, l), the gallery entries of
  column l.
  """

  def __init__(self, encoding, num_q):
    self.query_enc = encoding[:num_q].tocsr()
    self.gallery_enc = encoding[num_q:].tocsc()
    self.num_g = encoding.shape[0] - num_q
    self.column_sizes = np.diff(self.gallery_enc.indptr)
    query_rows = np.repeat(np.arange(num_q), np.diff(self.query_enc.indptr))
    self.pairs_per_query = np.bincount(query_rows, weights=self.column_sizes[self.query_enc.indices],
                                       minlength=num_q)

  def rows(self, start, stop):
    """(stop - start, num_gallery) float32."""
    num_g, gallery_enc = self.num_g, self.gallery_enc
    block = self.query_enc[start:stop].tocoo()
    lengths = self.column_sizes[block.col]
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
    return 1 - shared / (2.0 - shared)

  def row_chunks(self, start, stop):
    """Row ranges of [start, stop) balanced by work, each at most _CHUNK_BYTES of float64 rows."""
    return [(start + s, start + e) for s, e in _balanced_chunks(self.pairs_per_query[start:stop], self.num_g)]


def _rerank_sizes(k1, k2, num):
  if k1 < 1 or k2 < 1:
    raise ValueError(f"re_ranking needs k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}.")
  k_forward = min(k1 + 1, num)
  k_half = min(int(np.around(k1 / 2.0)) + 1, num)  # the reference rounds k1 / 2 half to even
  k_expand = min(k2, num)
  return k_forward, k_half, k_expand


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3) -> np.ndarray:
  """k-reciprocal re-ranking (Zhong et al.) of a query x gallery distance matrix, as torchreid's re_ranking.

  Returns (num_query, num_gallery) float32: (1 - lambda) * Jaccard distance of the k-reciprocal encodings
  + lambda * original distance (the squared input distance, each row divided by its maximum). Needs the three
  matrices; compute_metrics(rerank=True) re-ranks from features without them.
  """
  q_g, q_q, g_g = (np.asarray(x) for x in (q_g_dist, q_q_dist, g_g_dist))
  if q_g.ndim != 2:
    raise ValueError(f"q_g_dist must be (num_query, num_gallery), got shape {q_g.shape}.")
  num_q, num_g = q_g.shape
  if q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
    raise ValueError(f"re_ranking needs q_q_dist {(num_q, num_q)} and g_g_dist {(num_g, num_g)} to match "
                     f"q_g_dist {q_g.shape}; got {q_q.shape} and {g_g.shape}.")
  original = _OriginalDistance(q_g, q_q, g_g)
  num = original.num
  k_forward, k_half, k_expand = _rerank_sizes(k1, k2, num)
  k_max = max(k_forward, k_half, k_expand)

  def nearest_chunk(chunk):
    return _nearest(original.rows(*chunk), k_max)

  nearest = np.concatenate(_map_in_threads(nearest_chunk, _chunks(num, 8 * num)))
  encoding = _k_reciprocal_rows(nearest, original.entries, num, k_forward, k_half, k_expand, k2)
  jaccard = _Jaccard(encoding, num_q)
  final = np.empty((num_q, num_g), np.float32)

  def final_chunk(chunk):
    start, stop = chunk
    final[start:stop] = (jaccard.rows(start, stop) * (1 - lambda_value)
                         + original.rows(start, stop)[:, num_q:] * lambda_value)

  _map_in_threads(final_chunk, jaccard.row_chunks(0, num_q))
  return final


# ----------------------------------------------------------------------------------------------------------
# Re-ranking from features
# ----------------------------------------------------------------------------------------------------------


class _JointDistances:
  """re_ranking's input over the joint (query + gallery) set, from features, in blocks: never a matrix.

  Joint entry (r, c) is the input entry re_ranking reads for it - q_q[c, r], q_g[r, c - Q], q_g[c, r - Q] or
  g_g[c - Q, r - Q] (Q queries) - computed by the same blocks as distance_matrix(qf, qf), (qf, gf), (gf, gf),
  so with the same bits.
  """

  def __init__(self, qf, gf, metric):
    q, g = _FeatureSet(qf, metric), _FeatureSet(gf, metric)
    self.q_q, self.q_g, self.g_g = _Distances(q, q), _Distances(q, g), _Distances(g, g)
    self.num_q, self.num = len(q), len(q) + len(g)

  def nearest_pass(self, k):
    """One pass over the three matrices -> (largest |entry| of each joint row (N,), the k smallest squared
    entries of each row (N, k) float32, their columns (N, k); -1 / inf where a row has fewer)."""
    num, num_q = self.num, self.num_q
    self.sq = np.full((num, k), np.inf, np.float32)
    self.cols = np.full((num, k), -1, np.int64)
    self.threshold = np.full(num, np.inf, np.float32)  # the k-th smallest so far
    self.maxabs = np.full(num, -np.inf, np.float32)
    self.symmetric_rows = 0
    for rows, block in self.q_g.blocks():  # query rows' gallery part; gallery rows' query part
      joint_rows = np.arange(num)[rows]
      self._row_update(joint_rows, block, num_q)
      self._column_update(num_q, block, joint_rows)
    for rows, block in self.q_q.blocks():  # query rows' query part
      self._column_update(0, block, np.arange(num)[rows])
    for rows, block in self.g_g.blocks():  # gallery rows' gallery part
      self._column_update(num_q, block, np.arange(num_q, num)[rows])
    return self.maxabs, self.sq, self.cols

  def _merge(self, rows, sq, cols):
    """Keeps the k smallest of the kept and the new (sq, cols) of `rows`."""
    k = self.sq.shape[1]
    merged_sq = np.concatenate([self.sq[rows], sq], axis=1)
    merged_cols = np.concatenate([self.cols[rows], np.broadcast_to(cols, sq.shape)], axis=1)
    part = np.argpartition(merged_sq, k - 1, axis=1)[:, :k]
    self.sq[rows] = merged_sq = np.take_along_axis(merged_sq, part, axis=1)
    self.cols[rows] = np.take_along_axis(merged_cols, part, axis=1)
    self.threshold[rows] = merged_sq.max(axis=1)

  def _row_update(self, joint_rows, block, col_offset):
    """Block rows are joint rows; its columns the joint columns col_offset + j."""
    self.maxabs[joint_rows] = np.maximum(self.maxabs[joint_rows],
                                         np.maximum(block.max(axis=1), -block.min(axis=1)))
    sq = np.square(block)
    k = self.sq.shape[1]
    if sq.shape[1] > k:
      part = np.argpartition(sq, k - 1, axis=1)[:, :k]
      sq, cols = np.take_along_axis(sq, part, axis=1), part + col_offset
    else:
      cols = np.arange(sq.shape[1]) + col_offset
    self._merge(joint_rows, sq, cols)

  def _column_update(self, row_offset, block, joint_cols):
    """Block columns are the joint rows row_offset + j; its rows the joint columns joint_cols."""
    span = slice(row_offset, row_offset + block.shape[1])
    self.maxabs[span] = np.maximum(self.maxabs[span], np.maximum(block.max(axis=0), -block.min(axis=0)))
    sq = np.square(block)
    # Only rows with a new entry below their k-th smallest change (NaN compares False: such rows are
    # re-ranked from their full row anyway).
    changed = np.flatnonzero(sq.min(axis=0) < self.threshold[span])
    batch = max(1, _CHUNK_BYTES // (12 * (sq.shape[0] + self.sq.shape[1])))
    for s in range(0, changed.size, batch):
      cols = changed[s:s + batch]
      self._merge(cols + row_offset, np.ascontiguousarray(sq[:, cols].T), joint_cols)

  def full_rows(self, joint_rows) -> np.ndarray:
    """(len(joint_rows), N) joint rows, from full passes over the matrices they need."""
    num_q = self.num_q
    out = np.empty((len(joint_rows), self.num), np.float32)
    query, gallery = joint_rows < num_q, joint_rows >= num_q
    if query.any():
      rows = joint_rows[query]
      out[query, :num_q] = self._symmetric_columns(self.q_q, rows, rows, 0)
      out[query, num_q:] = self._rows(self.q_g, rows)
    if gallery.any():
      rows = joint_rows[gallery] - num_q
      out[gallery, :num_q] = self.q_g.columns(rows).T
      out[gallery, num_q:] = self._symmetric_columns(self.g_g, rows, joint_rows[gallery], num_q)
    return out

  @staticmethod
  def _rows(stream, rows):
    """Rows `rows` (sorted) of a stream's matrix, from gathered blocks."""
    out = np.empty((rows.size, len(stream.b)), np.float32)
    for group, block in stream.blocks(stream.gathered(rows)):
      out[np.searchsorted(rows, group)] = block
    return out

  def _symmetric_columns(self, stream, rows, joint_rows, col_offset):
    """Columns `rows` of q x q or g x g, transposed: (len(rows), N_set).

    The matmul of x_c with x_r has given the same bits as that of x_r with x_c whenever both run in blocks of
    the same shapes (measured on CPU), so the columns are first read as rows - one gathered block instead of a
    pass over the whole matrix - and kept only if they equal every exact entry the pass kept for these rows;
    otherwise they come from the pass.
    """
    swapped = self._rows(stream, rows)
    cols = self.cols[joint_rows] - col_offset
    known = (cols >= 0) & (cols < swapped.shape[1])
    picked = np.take_along_axis(swapped, np.where(known, cols, 0), axis=1)
    if np.array_equal(np.square(picked)[known], self.sq[joint_rows][known], equal_nan=True):
      self.symmetric_rows += rows.size
      return swapped
    return stream.columns(rows).T

  def entries(self, rows, cols) -> np.ndarray:
    """Joint entries (rows[i], cols[i]): those among the kept nearest from the pass, the others recomputed
    from blocks of the feature rows they need."""
    num, num_q = self.num, self.num_q
    kept = self.cols >= 0
    keys = (np.arange(num)[:, None] * num + self.cols)[kept]
    order = np.argsort(keys)
    keys, kept_sq = keys[order], self.sq[kept][order]
    wanted = rows.astype(np.int64) * num + cols
    pos = np.minimum(np.searchsorted(keys, wanted), max(keys.size - 1, 0))
    found = keys[pos] == wanted if keys.size else np.zeros(wanted.shape, bool)
    sq = np.empty(rows.shape, np.float32)
    sq[found] = kept_sq[pos[found]]
    missing = np.flatnonzero(~found)
    r, c = rows[missing], cols[missing]
    values = np.empty(missing.shape, np.float32)
    for sel, stream, a, b in (((r < num_q) & (c < num_q), self.q_q, c, r),
                              ((r < num_q) & (c >= num_q), self.q_g, r, c - num_q),
                              ((r >= num_q) & (c < num_q), self.q_g, c, r - num_q),
                              ((r >= num_q) & (c >= num_q), self.g_g, c - num_q, r - num_q)):
      if sel.any():
        values[sel] = stream.entries(a[sel], b[sel])
    sq[missing] = np.square(values)
    self.recomputed = int(missing.size)
    return sq


class _ReRanking:
  """re_ranking(distance_matrix(qf, gf), (qf, qf), (gf, gf)) from features, as query x gallery row blocks.

  One pass over the joint set keeps the row maxima and the RERANK_CANDIDATES smallest entries of every row.
  A row whose k-nearest sets end in an exact tie (or that holds NaN) is read again in full and ordered by
  argsort, as re_ranking does; the Gaussian weights of expansion entries outside the kept ones are recomputed
  from their feature rows. blocks() then yields the final distances from a pass over the query x gallery
  distances. Memory: O((Q + G) * RERANK_CANDIDATES) plus the sparse encodings and one block.
  """
  last_stats = None  # the latest instance's stats, for benchmarks/evaluation.py

  def __init__(self, qf, gf, metric, k1=20, k2=6, lambda_value=0.3):
    self.joint = joint = _JointDistances(qf, gf, metric)
    self.lambda_value = lambda_value
    num, num_q = joint.num, joint.num_q
    k_forward, k_half, k_expand = _rerank_sizes(k1, k2, num)
    k_max = max(k_forward, k_half, k_expand)
    maxabs, sq, cols = joint.nearest_pass(max(k_max + 1, RERANK_CANDIDATES))
    self.row_max = row_max = np.square(maxabs)
    original = sq / row_max[:, None]
    order = np.argsort(original, axis=1, kind="stable")
    original, nearest = np.take_along_axis(original, order, axis=1), np.take_along_axis(cols, order, axis=1)
    # Only the sets of the first k_forward, k_half and k_expand matter: ambiguous when a tie straddles one.
    ambiguous = np.isnan(original[:, :min(k_max + 1, num)]).any(axis=1)
    for k in {k_forward, k_half, k_expand}:
      if k < num:
        ambiguous |= original[:, k - 1] == original[:, k]
    nearest = nearest[:, :k_max]
    redo = np.flatnonzero(ambiguous)
    group = max(1, CHUNK_BYTES // (4 * num))
    for s in range(0, redo.size, group):
      rows = redo[s:s + group]
      full = np.square(joint.full_rows(rows)) / row_max[rows, None]
      nearest[rows] = np.argsort(full, axis=1)[:, :k_max]

    def entries(rows, cols):
      return joint.entries(rows, cols) / row_max[rows]

    encoding = _k_reciprocal_rows(nearest, entries, num, k_forward, k_half, k_expand, k2)
    self.jaccard = _Jaccard(encoding, num_q)
    self.stats = {"rows_read_in_full": int(redo.size), "entries_recomputed": joint.recomputed,
                  "rows_read_by_symmetry": joint.symmetric_rows}
    type(self).last_stats = self.stats  # for benchmarks/evaluation.py

  def blocks(self):
    lam, jaccard, row_max = self.lambda_value, self.jaccard, self.row_max
    for rows, block in self.joint.q_g.blocks():
      final = np.empty(block.shape, np.float32)

      def final_chunk(chunk, start=rows.start, block=block, final=final):
        s, e = chunk[0] - start, chunk[1] - start
        final[s:e] = (jaccard.rows(*chunk) * (1 - lam)
                      + np.square(block[s:e]) / row_max[chunk[0]:chunk[1], None] * lam)

      _map_in_threads(final_chunk, jaccard.row_chunks(rows.start, rows.stop))
      yield rows, final


# ----------------------------------------------------------------------------------------------------------
# The trainer's entry points
# ----------------------------------------------------------------------------------------------------------


def _reranked_blocks(qf, gf, metric):
  """(query rows, re-ranked block) in query order: from the three matrices when they fit in
  RERANK_MATRIX_BYTES (re_ranking itself, fastest for small sets), else from features (_ReRanking)."""
  num_q, num_g = len(qf), len(gf)
  if 4 * (num_q + num_g) ** 2 > RERANK_MATRIX_BYTES:
    yield from _ReRanking(qf, gf, metric).blocks()
    return
  distances = [distance_matrix(a, b, metric) for a, b in ((qf, gf), (qf, qf), (gf, gf))]
  final = re_ranking(*distances)
  del distances
  for s in range(0, num_q, max(1, CHUNK_BYTES // (4 * num_g))):
    rows = slice(s, min(s + max(1, CHUNK_BYTES // (4 * num_g)), num_q))
    yield rows, final[rows]


def _check_features(qf, gf, q_pids, g_pids, q_camids, g_camids):
  qf, gf = np.asarray(qf, np.float32), np.asarray(gf, np.float32)
  if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
    raise ValueError(f"Query and gallery features must be (num, dim) with the same dim, got shapes "
                     f"{qf.shape} and {gf.shape}.")
  if not len(qf) or not len(gf):
    raise ValueError(f"Evaluation needs at least one query and one gallery image, got {len(qf)} and "
                     f"{len(gf)}.")
  ids = [np.asarray(x).reshape(-1) for x in (q_pids, g_pids, q_camids, g_camids)]
  for name, x, n in zip(("q_pids", "g_pids", "q_camids", "g_camids"), ids, (len(qf), len(gf)) * 2):
    if x.shape[0] != n:
      raise ValueError(f"{name} has {x.shape[0]} entries but there are {n} {name[0]} features.")
  return qf, gf, ids


def compute_metrics(qf, gf, q_pids, g_pids, q_camids, g_camids, *, metric: str = "euclidean",
                    normalize: bool = False, rerank: bool = False, cuhk03_metric: bool = False,
                    ranks: Sequence[int] = (1, 5, 10, 20)) -> dict:
  """Features -> {"mAP", "cmc", "num_query", "num_gallery"} as torchreid's test: optional L2 normalisation,
  distance, optional re-ranking, CMC (up to rank max(50, max(ranks)), fewer for a small gallery) and mAP.

  The numbers of distance_matrix -> [re_ranking ->] evaluate_rank, in bounded memory: blocks of query rows
  are ranked as they are computed, and re-ranking works from the features (see _ReRanking); no query x
  gallery (or larger) matrix is ever held. Memory: the features, one copy of them on the device, and a few
  blocks of CHUNK_BYTES.
  """
  if metric not in DISTANCE_METRICS:
    raise ValueError(f"Unknown distance metric {metric!r}; use one of {DISTANCE_METRICS}.")
  qf, gf, (q_pids, g_pids, q_camids, g_camids) = _check_features(qf, gf, q_pids, g_pids, q_camids, g_camids)
  if normalize:
    qf, gf = normalize_features(qf), normalize_features(gf)
  max_rank = min(max(CMC_MAX_RANK, *ranks) if ranks else CMC_MAX_RANK, len(gf))
  ranking = _ranking(cuhk03_metric, q_pids, g_pids, q_camids, g_camids, max_rank)
  if rerank:
    blocks = _reranked_blocks(qf, gf, metric)
  else:
    blocks = _Distances(_FeatureSet(qf, metric), _FeatureSet(gf, metric)).blocks()
  for rows, block in blocks:
    ranking.add(rows.start, block)
  cmc, mean_ap = ranking.result()
  return {"mAP": float(mean_ap), "cmc": [float(x) for x in cmc], "num_query": int(len(qf)),
          "num_gallery": int(len(gf))}


def _compute_metrics_from_matrices(qf, gf, q_pids, g_pids, q_camids, g_camids, *, metric="euclidean",
                                   normalize=False, rerank=False, cuhk03_metric=False, ranks=(1, 5, 10, 20)):
  """compute_metrics as it was before it worked from features: the whole matrices (q x g, and q x q, g x g to
  re-rank), then evaluate_rank. The reference the tests and benchmarks/evaluation.py compare with."""
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


def _top_k_rows(dist_rows, k, excluded=None):
  """Per row, the first k columns of np.argsort's order that are not `excluded` -> (indices (n, k), -1 where
  a row has fewer; distances). argpartition finds them; rows where ties or NaN make the order depend on
  argsort's tie-breaking are sorted in full, as torchreid's visrank does."""
  num_rows, num_cols = dist_rows.shape
  k = min(k, num_cols)
  indices = np.full((num_rows, k), -1, np.int64)
  if k == 0 or num_rows == 0:
    return indices, np.full((num_rows, k), np.nan, np.float32)
  masked = dist_rows if excluded is None else np.where(excluded, np.inf, dist_rows)
  if k < num_cols:
    candidates = np.argpartition(masked, k, axis=1)[:, :k + 1]
  else:
    candidates = np.broadcast_to(np.arange(num_cols), (num_rows, num_cols))
  values = np.take_along_axis(masked, candidates, axis=1)
  order = np.argsort(values, axis=1, kind="stable")
  candidates = np.take_along_axis(candidates, order, axis=1)
  values = np.take_along_axis(values, order, axis=1)
  # Distinct finite values: the order is unique. Otherwise (ties, NaN, or excluded cells among them) ask the
  # argsort of the full row.
  ambiguous = (values[:, 1:] == values[:, :-1]).any(axis=1) | ~np.isfinite(values).all(axis=1)
  indices[:] = candidates[:, :k]
  for row in np.flatnonzero(ambiguous):
    order = np.argsort(dist_rows[row])
    if excluded is not None:
      order = order[~excluded[row][order]]
    indices[row] = -1
    indices[row, :min(k, order.size)] = order[:k]
  distances = np.where(indices >= 0, np.take_along_axis(dist_rows, np.maximum(indices, 0), axis=1), np.nan)
  return indices, distances.astype(np.float32)


def top_k(qf, gf, k, *, metric="euclidean", normalize=False, rerank=False, q_pids=None, g_pids=None,
          q_camids=None, g_camids=None):
  """The k nearest gallery images of every query, in the order evaluate_rank ranks them -> (indices (Q, k)
  int64, distances (Q, k) float32; -1 / NaN where fewer). With the four id arrays, gallery images with the
  query's pid and camid are skipped (torchreid's visrank). Memory as compute_metrics: blocks, no matrix."""
  if metric not in DISTANCE_METRICS:
    raise ValueError(f"Unknown distance metric {metric!r}; use one of {DISTANCE_METRICS}.")
  if k < 1:
    raise ValueError(f"top_k needs k >= 1, got {k}.")
  with_ids = q_pids is not None
  if with_ids:
    qf, gf, (q_pids, g_pids, q_camids, g_camids) = _check_features(qf, gf, q_pids, g_pids, q_camids, g_camids)
  else:
    qf, gf, _ = _check_features(qf, gf, *(np.zeros(n) for n in (len(qf), len(gf), len(qf), len(gf))))
  if normalize:
    qf, gf = normalize_features(qf), normalize_features(gf)
  if rerank:
    blocks = _reranked_blocks(qf, gf, metric)
  else:
    blocks = _Distances(_FeatureSet(qf, metric), _FeatureSet(gf, metric)).blocks()
  k = min(k, len(gf))
  indices, distances = np.empty((len(qf), k), np.int64), np.empty((len(qf), k), np.float32)
  for rows, block in blocks:
    excluded = None
    if with_ids:
      excluded = (q_pids[rows, None] == g_pids[None, :]) & (q_camids[rows, None] == g_camids[None, :])
    indices[rows], distances[rows] = _top_k_rows(block, k, excluded)
  return indices, distances


def format_results(metrics: dict, ranks: Sequence[int] = (1, 5, 10, 20), name: str | None = None) -> str:
  """torchreid's printed summary: mAP then the CMC at each requested rank, in percent."""
  title = "** Results **" if name is None else f"** Results ({name}) **"
  lines = [title, f"mAP: {metrics['mAP']:.1%}", "CMC curve"]
  cmc = metrics["cmc"]
  for r in ranks:
    if 1 <= r <= len(cmc):
      lines.append(f"Rank-{r:<3}: {cmc[r - 1]:.1%}")
  return "\n".join(lines)
