"""Times evaluation: at Market-1501 size, ranking (ours vs a per-query numpy loop), distances, re-ranking,
compute_metrics from features vs the whole-matrix path, and the test-time feature extractor's throughput; at
MSMT17 size, the peak memory and seconds of compute_metrics, plain and re-ranked.

python benchmarks/evaluation.py [--size=market] [--num_query=3368 --num_gallery=15913 --repeats=3 --json]
python benchmarks/evaluation.py --size=msmt17 [--parts=plain,rerank --dim=2048 --fraction=1] --json
The per-query loop is the plain way to write the protocol (argsort each row, drop same pid + camid, cumsum,
AP); both run in the same process on the same distance matrix, alternately, and the best time of each counts.
compute_metrics and the whole-matrix path (distance_matrix [+ re_ranking] + evaluate_rank, as it was before)
also alternate and must give the same numbers.
--size=msmt17: random 2048-d features of 3,060 identities x 15 cameras, 11,659 queries x 82,161 gallery
images; each part runs in a fresh process that reports its peak RSS (resource.getrusage, the process's
lifetime peak, features included) and the seconds of compute_metrics.
With --json the last line of stdout is a JSON object of the measurements.
"""

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import default  # noqa: E402
from synth_reid_jax import evaluation, features, sharding  # noqa: E402
from synth_reid_jax.models import build_models  # noqa: E402

# Market-1501 test split: 750 identities (+ "0" distractors) seen from 6 cameras.
MARKET_QUERY, MARKET_GALLERY, MARKET_IDS, MARKET_CAMERAS, MARKET_DISTRACTORS = 3368, 15913, 751, 6, 2798
# MSMT17 test split: 3,060 identities seen from 15 cameras, no distractors.
MSMT17_QUERY, MSMT17_GALLERY, MSMT17_IDS, MSMT17_CAMERAS = 11659, 82161, 3060, 15
GIB = 2**30
# Per-image noise around the identity centre (unit normal per dimension): mAP ~0.3, rank-1 ~0.8 at 2048-d.
FEATURE_NOISE = 3.5


def market_like(num_query, num_gallery, num_ids, num_cams, num_distractors, dim, seed):
  """Features clustered by identity (so the ranking is neither perfect nor random), pids and camids."""
  rng = np.random.default_rng(seed)
  g_pids = np.concatenate([np.zeros(num_distractors, np.int64),
                           rng.integers(1, num_ids + 1, num_gallery - num_distractors)])
  q_pids = rng.integers(1, num_ids + 1, num_query)
  q_camids, g_camids = rng.integers(0, num_cams, num_query), rng.integers(0, num_cams, num_gallery)
  centres = rng.standard_normal((num_ids + 1, dim)).astype(np.float32)
  def features(pids):
    return centres[pids] + FEATURE_NOISE * rng.standard_normal((pids.size, dim)).astype(np.float32)
  gf = features(g_pids)
  gf[:num_distractors] = (np.sqrt(1 + FEATURE_NOISE**2)
                          * rng.standard_normal((num_distractors, dim)).astype(np.float32))
  return features(q_pids), gf, q_pids, g_pids, q_camids, g_camids


def structured_features(num_query, num_gallery, num_ids, num_cams, dim, seed, rows_per_step=8192):
  """Identity-clustered float32 features written into preallocated arrays a few thousand rows at a time (the
  peak memory is the features, not their generation); -> qf, gf, q_pids, g_pids, q_camids, g_camids."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
  def split(num):
    pids = rng.integers(0, num_ids, num)
    features = np.empty((num, dim), np.float32)
    for s in range(0, num, rows_per_step):
      e = min(s + rows_per_step, num)
      features[s:e] = centres[pids[s:e]] + FEATURE_NOISE * rng.standard_normal((e - s, dim), dtype=np.float32)
    return features, pids, rng.integers(0, num_cams, num)
  (qf, q_pids, q_camids), (gf, g_pids, g_camids) = split(num_query), split(num_gallery)
  return qf, gf, q_pids, g_pids, q_camids, g_camids


def peak_rss_bytes():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def report_blocks(start):
  """Prints to stderr, every 25 blocks, how far the distance passes have come (for long runs)."""
  blocks = evaluation._Distances.blocks
  count = [0]

  def counted(self, row_groups=None, height=None):
    total = len(self.chunks() if row_groups is None else row_groups)
    for i, item in enumerate(blocks(self, row_groups, height)):
      count[0] += 1
      if count[0] % 25 == 0 or i + 1 == total:
        seconds = time.perf_counter() - start
        print(f"  {seconds:8.1f} s: block {i + 1}/{total} of a {len(self.a)} x {len(self.b)} pass "
              f"({count[0]} blocks so far)", file=sys.stderr, flush=True)
      yield item

  evaluation._Distances.blocks = counted


def msmt17_part(part, seed, progress=False, dim=2048, fraction=1.0):
  """One compute_metrics at MSMT17 size (or a fraction of its queries, gallery and identities) in this
  process -> its measurements."""
  sizes = [max(2, round(fraction * n)) for n in (MSMT17_QUERY, MSMT17_GALLERY, MSMT17_IDS)]
  qf, gf, *ids = structured_features(*sizes, MSMT17_CAMERAS, dim, seed)
  result = {"part": part, "dim": dim, "num_query": len(qf), "num_gallery": len(gf),
            "features_gib": (qf.nbytes + gf.nbytes) / GIB, "rss_after_features_gib": peak_rss_bytes() / GIB}
  start = time.perf_counter()
  if progress:
    report_blocks(start)
  metrics = evaluation.compute_metrics(qf, gf, *ids, rerank=part == "rerank")
  result.update(seconds=time.perf_counter() - start, peak_rss_gib=peak_rss_bytes() / GIB, mAP=metrics["mAP"],
                rank1=metrics["cmc"][0], chunk_bytes=evaluation.CHUNK_BYTES, block_rows=evaluation._Distances(
                    evaluation._FeatureSet(qf, "euclidean"), evaluation._FeatureSet(gf, "euclidean")).rows)
  if part == "rerank":
    result.update(evaluation._ReRanking.last_stats)
  if part == "plain":  # after the peak was read: the block height changes no bit of the first rows' distances
    old_rows = 64 * 2**20 // (12 * len(gf))  # the block height distance_matrix had before
    old = evaluation.distance_matrix(qf[:old_rows], gf, chunk_size=old_rows)
    new = next(evaluation._Distances(evaluation._FeatureSet(qf, "euclidean"),
                                     evaluation._FeatureSet(gf, "euclidean")).blocks())[1][:old_rows]
    result["blocks_bit_identical"] = bool(np.array_equal(old, new))
  return result


def run_msmt17(args):
  """Each part in a fresh process (its own peak RSS)."""
  results = {"size": "msmt17", "fraction": args.fraction, "dim": args.dim,
             "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()[0]}
  for part in args.parts.split(","):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--size=msmt17", f"--part={part}",
                           f"--seed={args.seed}", f"--dim={args.dim}", f"--fraction={args.fraction}"],
                          stdout=subprocess.PIPE,
                          text=True)  # its progress lines go to stderr
    if done.returncode:
      sys.exit(f"FATAL the {part} part failed (its messages are above).")
    part_result = json.loads(done.stdout.strip().splitlines()[-1])
    results[part] = part_result
    r = part_result
    print(f"MSMT17 size, {part:<6}: {r['seconds']:8.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB (features "
          f"{r['features_gib']:.2f} GiB), mAP {r['mAP']:.4f}, rank-1 {r['rank1']:.4f}", flush=True)
  results["load_average_after"] = os.getloadavg()[0]
  if args.json:
    print(json.dumps(results))


def per_query_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=evaluation.CMC_MAX_RANK):
  """The protocol written per query with vectorised numpy inside the loop (the baseline)."""
  cmc_sum, aps = np.zeros(max_rank), []
  for q in range(distmat.shape[0]):
    order = np.argsort(distmat[q])
    pids = g_pids[order]
    kept = ~((pids == q_pids[q]) & (g_camids[order] == q_camids[q]))
    match = pids[kept] == q_pids[q]
    if not match.any():
      continue
    hits = np.cumsum(match)
    cmc_sum += np.minimum(hits[:max_rank], 1)
    aps.append(np.sum(hits[match] / (np.flatnonzero(match) + 1.0)) / hits[-1])
  return (cmc_sum / len(aps)).astype(np.float32), float(np.mean(aps))


def numpy_squared_distance(a, b):
  """The same distance with NumPy's BLAS (the alternative to evaluation.distance_matrix's jax.jit)."""
  return (np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :]) - 2.0 * (a @ b.T)


def best_time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return min(times), out


def extraction_images_per_s(num_images, batch_size, height, width, flip, repeats):
  """Throughput of features.make_feature_fn (the evaluation's extractor) on random images, randomly
  initialised networks (the thesis' sizes, 538 classes), all local devices; the first batch compiles."""
  config = default.get_config()
  config.eval.flip = flip
  models = build_models(config, 538)
  key = jax.random.key(0)
  images = jnp.zeros((1, height, width, 3))
  g_vars = models.generator.init(key, images)
  r_vars = models.reid.init(key, models.generator.apply(g_vars, images, method=type(models.generator)
                                                        .encoder_output), train=False)
  variables = {"params": {"generator": g_vars["params"], "reid": r_vars["params"]},
               "batch_stats": {"reid": r_vars["batch_stats"]}}
  mesh = sharding.create_mesh()
  variables = jax.device_put(variables, sharding.replicated_sharding(mesh))
  feature_fn = features.make_feature_fn(models, config, mesh)
  batch = sharding.make_global_batch(
      np.random.default_rng(0).uniform(-1, 1, (batch_size, height, width, 3)).astype(np.float32), mesh)
  jax.block_until_ready(feature_fn(variables, batch))
  batches = max(1, num_images // batch_size)
  def run():
    for _ in range(batches):
      out = feature_fn(variables, batch)
    return jax.block_until_ready(out)
  seconds, _ = best_time(run, repeats)
  return batches * batch_size / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_query", type=int, default=MARKET_QUERY)
  parser.add_argument("--num_gallery", type=int, default=MARKET_GALLERY)
  parser.add_argument("--num_ids", type=int, default=MARKET_IDS)
  parser.add_argument("--num_cams", type=int, default=MARKET_CAMERAS)
  parser.add_argument("--num_distractors", type=int, default=MARKET_DISTRACTORS)
  parser.add_argument("--dim", type=int, default=2048, help="feature size (ResNet-50 BNNeck: 2048)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rerank_query", type=int, default=500, help="re-ranking problem size")
  parser.add_argument("--rerank_gallery", type=int, default=3000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--extract_images", type=int, default=64, help="images for the extractor; 0 skips it")
  parser.add_argument("--extract_batch", type=int, default=32)
  parser.add_argument("--extract_size", default="256x128", help="height x width")
  parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
  parser.add_argument("--size", choices=("market", "msmt17"), default="market")
  parser.add_argument("--parts", default="plain,rerank", help="--size=msmt17: which compute_metrics to run")
  parser.add_argument("--fraction", type=float, default=1.0, help="--size=msmt17: scale the sizes by this")
  parser.add_argument("--part", help=argparse.SUPPRESS)  # one msmt17 part, in the child process
  args = parser.parse_args()
  if args.part:
    print(json.dumps(msmt17_part(args.part, args.seed, progress=True, dim=args.dim, fraction=args.fraction)))
    return
  if args.size == "msmt17":
    run_msmt17(args)
    return

  qf, gf, q_pids, g_pids, q_camids, g_camids = market_like(
      args.num_query, args.num_gallery, args.num_ids, args.num_cams, args.num_distractors, args.dim,
      args.seed)
  rows, results = [], {"num_query": args.num_query, "num_gallery": args.num_gallery}

  evaluation.distance_matrix(qf[:1], gf)  # compile
  dist_times, numpy_times = [], []
  for _ in range(args.repeats):
    t, distmat = best_time(lambda: evaluation.distance_matrix(qf, gf), 1)
    dist_times.append(t)
    numpy_times.append(best_time(lambda: numpy_squared_distance(qf, gf), 1)[0])
  t_dist, t_numpy = min(dist_times), min(numpy_times)
  rows += [("distance_matrix (jax.jit, chunked)", t_dist), ("distance with numpy BLAS", t_numpy)]

  ours_times, loop_times = [], []
  for _ in range(args.repeats):  # alternate, so both see the same machine load
    t, ours = best_time(lambda: evaluation.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids), 1)
    ours_times.append(t)
    t, loop = best_time(lambda: per_query_loop(distmat, q_pids, g_pids, q_camids, g_camids), 1)
    loop_times.append(t)
  t_ours, t_loop = min(ours_times), min(loop_times)
  rows += [("evaluate_rank (ours)", t_ours), ("per-query numpy loop", t_loop)]
  results.update(distance_s=t_dist, distance_numpy_s=t_numpy, evaluate_rank_s=t_ours, per_query_loop_s=t_loop,
                 speedup=t_loop / t_ours, mAP=ours[1], rank1=float(ours[0][0]),
                 max_cmc_diff=float(np.abs(ours[0] - loop[0]).max()), mAP_diff=abs(ours[1] - loop[1]))

  # compute_metrics from features vs the whole-matrix path (plain at full size; re-ranked on the re-ranking
  # subset below), alternately, best time of each; the numbers must be the same.
  ids = q_pids, g_pids, q_camids, g_camids
  n_q, n_g = min(args.rerank_query, args.num_query), min(args.rerank_gallery, args.num_gallery)
  rerank_ids = q_pids[:n_q], g_pids[:n_g], q_camids[:n_q], g_camids[:n_g]
  for name, rerank, problem in (("", False, (qf, gf, *ids)),
                                ("_rerank", True, (qf[:n_q], gf[:n_g], *rerank_ids))):
    new_times, old_times = [], []
    # (re-ranking this small would go through the matrices; time the path from features)
    evaluation.RERANK_MATRIX_BYTES = 0
    run_new = functools.partial(evaluation.compute_metrics, *problem, rerank=rerank)
    run_old = functools.partial(evaluation._compute_metrics_from_matrices, *problem, rerank=rerank)
    for _ in range(args.repeats):
      t, new = best_time(run_new, 1)
      new_times.append(t)
      t, old = best_time(run_old, 1)
      old_times.append(t)
    label = f"{len(problem[0])} x {len(problem[1])}" + (", re-ranked" if rerank else "")
    rows += [(f"compute_metrics {label} (from features)", min(new_times)),
             (f"compute_metrics {label} (whole matrices)", min(old_times))]
    results.update({f"compute_metrics{name}_s": min(new_times), f"whole_matrix{name}_s": min(old_times),
                    f"compute_metrics{name}_same": new["cmc"] == old["cmc"] and abs(new["mAP"] - old["mAP"])
                    <= 1e-15})

  n_q, n_g = min(args.rerank_query, args.num_query), min(args.rerank_gallery, args.num_gallery)
  rq, rg = qf[:n_q], gf[:n_g]
  q_g, q_q, g_g = (evaluation.distance_matrix(a, b) for a, b in ((rq, rg), (rq, rq), (rg, rg)))
  t_rerank, _ = best_time(lambda: evaluation.re_ranking(q_g, q_q, g_g), args.repeats)
  rows.append((f"re_ranking {n_q} x {n_g} (k1=20, k2=6)", t_rerank))
  results.update(rerank_query=n_q, rerank_gallery=n_g, rerank_s=t_rerank)

  if args.extract_images > 0:
    height, width = (int(v) for v in args.extract_size.split("x"))
    for flip in (False, True):
      rate = extraction_images_per_s(args.extract_images, args.extract_batch, height, width, flip, 1)
      rows.append((f"features {height}x{width}, batch {args.extract_batch}{', flip' if flip else ''} (img/s)",
                   rate))
      results["extract_images_per_s" + ("_flip" if flip else "")] = rate

  print(f"Market-sized ranking: {args.num_query} queries x {args.num_gallery} gallery, {args.num_ids} ids, "
        f"{args.num_cams} cameras, best of {args.repeats}")
  print(f"{'step':<58}{'seconds':>10}")
  for name, seconds in rows:
    print(f"{name:<58}{seconds:>10.3f}" if "img/s" not in name else f"{name:<58}{seconds:>10.1f}")
  print(f"evaluate_rank speed-up over the per-query loop: {t_loop / t_ours:.2f}x "
        f"(mAP {ours[1]:.4f}, rank-1 {ours[0][0]:.4f}; max |CMC diff| {results['max_cmc_diff']:.1e}, "
        f"|mAP diff| {results['mAP_diff']:.1e})")
  if args.json:
    print(json.dumps(results))


if __name__ == "__main__":
  main()
