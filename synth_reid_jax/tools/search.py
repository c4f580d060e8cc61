"""Retrieval with extracted features: the top k gallery images of every query, in bounded memory.

  python -m synth_reid_jax.tools.search --query=<q.npz> --gallery=<g.npz> --topk=10 [--rerank]
      [--metric=euclidean|cosine] [--normalize] [--output=ranks.json|ranks.csv]

Both files are `launch.py --mode=extract` outputs (`features` N x D float32, `paths`, `pids`, `camids`). The
ranking is evaluation.compute_metrics' (euclidean = squared distance, argsort's order), computed from distance
blocks: memory holds the features and a few blocks (evaluation.CHUNK_BYTES), never the query x gallery
matrix; --rerank applies k-reciprocal re-ranking from the features the same way. Nothing is excluded (the
ids of extracted files are often unknown). Without --output the ranking is printed; --output writes JSON
({"query_file", "gallery_file", "topk", "metric", "rerank", "results": [{"query", "gallery": [...],
"distances": [...]}]}) or CSV (query,rank,gallery,distance; rank from 1). Bad input stops with one line
`FATAL <what is wrong and how to fix it>` and exit status 1.
"""

import argparse
import csv
import json
import os
import sys
import zipfile
from collections.abc import Sequence

import numpy as np

from synth_reid_jax import storage
from synth_reid_jax.errors import UserError

OUTPUT_FORMATS = (".json", ".csv")
FIELDS = ("features", "paths")  # what ranking needs from an extract file; pids / camids are optional


class SearchError(UserError, ValueError):
  """A search input or option that cannot be used."""


def load_extract(path: str, flag: str) -> dict:
  """An extract .npz -> {"features": (N, D) float32, "paths": (N,) str}, checked."""
  if not os.path.isfile(path):
    raise SearchError(f"{flag}={path}: no such file; give a .npz written by launch.py --mode=extract.")
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [field for field in FIELDS if field not in data.files]
      if missing:
        raise SearchError(f"{flag}={path} has no {', '.join(missing)} (it holds {', '.join(data.files)}); "
                          "give a .npz written by launch.py --mode=extract.")
      features, paths = data["features"], data["paths"]
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    if isinstance(e, SearchError):
      raise
    raise SearchError(f"{flag}={path} cannot be read as a .npz ({type(e).__name__}: {e}); give a file "
                      "written by launch.py --mode=extract.") from None
  if features.ndim != 2 or not features.shape[0] or not features.shape[1]:
    raise SearchError(f"{flag}={path}: features have shape {features.shape}, expected (num_images, dim) "
                      "with at least one image.")
  if not np.issubdtype(features.dtype, np.floating):
    raise SearchError(f"{flag}={path}: features are {features.dtype}, expected float32.")
  if paths.shape != (features.shape[0],):
    raise SearchError(f"{flag}={path}: {paths.shape} paths for {features.shape[0]} features; the file is "
                      "damaged, extract it again.")
  features = np.asarray(features, np.float32)
  finite = np.isfinite(features).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise SearchError(f"{flag}={path}: {bad.size} feature rows are not finite (first: {paths[bad[0]]}); "
                      "extract them again.")
  return {"features": features, "paths": paths.astype(str)}


def search(query: dict, gallery: dict, topk: int, *, metric="euclidean", normalize=False, rerank=False):
  """-> (indices (Q, k), distances (Q, k)) of the k nearest gallery images of every query."""
  from synth_reid_jax import evaluation
  dim_q, dim_g = query["features"].shape[1], gallery["features"].shape[1]
  if dim_q != dim_g:
    raise SearchError(f"--query features are {dim_q}-d but --gallery features {dim_g}-d: extract both with "
                      "the same model and config.")
  return evaluation.top_k(query["features"], gallery["features"], topk, metric=metric, normalize=normalize,
                          rerank=rerank)


def write_results(output, query, gallery, indices, distances, meta):
  records = []
  for q, (row, dist) in enumerate(zip(indices, distances)):
    kept = row >= 0
    records.append({"query": str(query["paths"][q]), "gallery": [str(p) for p in gallery["paths"][row[kept]]],
                    "distances": [float(d) for d in dist[kept]]})
  if output is None:
    for record in records:
      print(record["query"])
      for rank, (path, dist) in enumerate(zip(record["gallery"], record["distances"]), start=1):
        print(f"  {rank:>4}  {dist:12.6g}  {path}")
    return
  directory = os.path.dirname(os.path.abspath(output))
  os.makedirs(directory, exist_ok=True)
  if output.lower().endswith(".json"):
    storage.write_file(output, json.dumps({**meta, "results": records}, indent=1))
  else:
    with storage.replaced(output) as temporary, open(temporary, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["query", "rank", "gallery", "distance"])
      for record in records:
        for rank, (path, dist) in enumerate(zip(record["gallery"], record["distances"]), start=1):
          writer.writerow([record["query"], rank, path, repr(dist)])
  print(f"Wrote the top {meta['topk']} of {len(records)} queries to {output}.")


def main(argv: Sequence[str] | None = None) -> None:
  from synth_reid_jax import evaluation
  parser = argparse.ArgumentParser(prog="python -m synth_reid_jax.tools.search",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--query", required=True, help="query features: a launch.py --mode=extract .npz")
  parser.add_argument("--gallery", required=True, help="gallery features: a launch.py --mode=extract .npz")
  parser.add_argument("--topk", type=int, default=10, help="gallery images per query")
  parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1=20, k2=6, 0.3)")
  parser.add_argument("--metric", default="euclidean", help=f"one of {evaluation.DISTANCE_METRICS}")
  parser.add_argument("--normalize", action="store_true", help="L2-normalise the features first")
  parser.add_argument("--output", help="write the ranking to a .json or .csv file instead of printing it")
  args = parser.parse_args(argv)
  try:
    if args.topk < 1:
      raise SearchError(f"--topk={args.topk}: give a number of gallery images >= 1.")
    if args.metric not in evaluation.DISTANCE_METRICS:
      raise SearchError(f"--metric={args.metric}: use one of {', '.join(evaluation.DISTANCE_METRICS)}.")
    if args.output is not None:
      if not args.output.lower().endswith(OUTPUT_FORMATS):
        raise SearchError(f"--output={args.output}: name a .json or .csv file.")
      if os.path.isdir(args.output):
        raise SearchError(f"--output={args.output} is a folder; name a .json or .csv file.")
    query, gallery = load_extract(args.query, "--query"), load_extract(args.gallery, "--gallery")
    indices, distances = search(query, gallery, args.topk, metric=args.metric, normalize=args.normalize,
                                rerank=args.rerank)
    meta = {"query_file": args.query, "gallery_file": args.gallery, "topk": int(indices.shape[1]),
            "metric": args.metric, "normalize": args.normalize, "rerank": args.rerank}
    write_results(args.output, query, gallery, indices, distances, meta)
  except UserError as e:
    sys.exit(f"FATAL {e}")
  except OSError as e:  # an output that cannot be written
    sys.exit(f"FATAL --output={args.output}: {e.strerror or e}; choose a writable path.")


if __name__ == "__main__":
  main()
