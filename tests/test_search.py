"""tools/search: the top k of every query from extract files, in evaluation's order; bad input: one line."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from synth_reid_jax import evaluation
from synth_reid_jax.tools import search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_extract(path, features, prefix):
  n = len(features)
  np.savez(path, features=np.asarray(features, np.float32),
           paths=np.asarray([f"{prefix}/{i:04d}_c1_x.jpg" for i in range(n)]), pids=np.arange(n),
           camids=np.zeros(n, np.int64))
  return str(path)


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(0)
  qf, gf = rng.standard_normal((7, 16)), rng.standard_normal((40, 16))
  gf[30:33] = gf[0]  # exact ties in the ranking
  return (write_extract(tmp_path / "q.npz", qf, "query"), write_extract(tmp_path / "g.npz", gf, "gallery"),
          qf.astype(np.float32), gf.astype(np.float32))


def argsort_top(dist, k):
  return np.argsort(dist, axis=1)[:, :k]


@pytest.mark.parametrize("rerank", [False, True])
@pytest.mark.parametrize("metric", evaluation.DISTANCE_METRICS)
def test_json_output_is_the_argsort_ranking(files, tmp_path, rerank, metric):
  q, g, qf, gf = files
  out = tmp_path / "out" / "ranks.json"
  search.main([f"--query={q}", f"--gallery={g}", "--topk=5", f"--metric={metric}", f"--output={out}"]
              + (["--rerank"] if rerank else []))
  result = json.loads(out.read_text())
  dist = evaluation.distance_matrix(qf, gf, metric)
  if rerank:
    dist = evaluation.re_ranking(dist, evaluation.distance_matrix(qf, qf, metric),
                                 evaluation.distance_matrix(gf, gf, metric))
  top = argsort_top(dist, 5)
  assert (result["topk"], result["rerank"], result["metric"]) == (5, rerank, metric)
  assert [r["query"] for r in result["results"]] == [f"query/{i:04d}_c1_x.jpg" for i in range(7)]
  for i, record in enumerate(result["results"]):
    assert record["gallery"] == [f"gallery/{j:04d}_c1_x.jpg" for j in top[i]]
    np.testing.assert_array_equal(np.float32(record["distances"]), dist[i, top[i]])


def test_csv_output_and_a_gallery_smaller_than_topk(files, tmp_path):
  q, _, qf, gf = files
  small = write_extract(tmp_path / "small.npz", gf[:3], "gallery")
  out = tmp_path / "ranks.csv"
  search.main([f"--query={q}", f"--gallery={small}", "--topk=10", f"--output={out}"])
  rows = list(csv.reader(out.open()))
  assert rows[0] == ["query", "rank", "gallery", "distance"]
  assert len(rows) == 1 + 7 * 3
  top = argsort_top(evaluation.distance_matrix(qf, gf[:3]), 3)
  assert [r[2] for r in rows[1:4]] == [f"gallery/{j:04d}_c1_x.jpg" for j in top[0]]
  assert [r[1] for r in rows[1:4]] == ["1", "2", "3"]


def test_printed_ranking(files, capsys):
  q, g, *_ = files
  search.main([f"--query={q}", f"--gallery={g}", "--topk=2"])
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 7 * 3 and lines[0] == "query/0000_c1_x.jpg" and lines[1].split()[0] == "1"


def fatal(capsys, argv):
  with pytest.raises(SystemExit) as exit_info:
    search.main(argv)
  message = str(exit_info.value.code)
  assert message.startswith("FATAL ") and "\n" not in message
  return message


def test_bad_input_is_one_fatal_line(files, tmp_path, capsys):
  q, g, qf, gf = files
  narrow = write_extract(tmp_path / "narrow.npz", gf[:, :8], "gallery")
  assert "16-d but --gallery features 8-d" in fatal(capsys, [f"--query={q}", f"--gallery={narrow}"])
  assert "no such file" in fatal(capsys, [f"--query={tmp_path / 'none.npz'}", f"--gallery={g}"])
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  assert "cannot be read" in fatal(capsys, [f"--query={tmp_path / 'junk.npz'}", f"--gallery={g}"])
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  assert "has no features, paths" in fatal(capsys, [f"--query={tmp_path / 'other.npz'}", f"--gallery={g}"])
  bad = qf.copy()
  bad[2, 0] = np.nan
  assert "not finite" in fatal(capsys, [f"--query={write_extract(tmp_path / 'nan.npz', bad, 'q')}",
                                        f"--gallery={g}"])
  assert "--topk=0" in fatal(capsys, [f"--query={q}", f"--gallery={g}", "--topk=0"])
  assert "--metric=l1" in fatal(capsys, [f"--query={q}", f"--gallery={g}", "--metric=l1"])
  assert ".json or .csv" in fatal(capsys, [f"--query={q}", f"--gallery={g}", "--output=ranks.txt"])


def test_command_line_refusal_has_no_traceback(files, tmp_path):
  q, _, _, gf = files
  narrow = write_extract(tmp_path / "narrow.npz", gf[:, :8], "gallery")
  done = subprocess.run([sys.executable, "-m", "synth_reid_jax.tools.search", f"--query={q}",
                         f"--gallery={narrow}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode != 0
  assert done.stderr.strip().startswith("FATAL ") and len(done.stderr.strip().splitlines()) == 1
  assert "Traceback" not in done.stderr
