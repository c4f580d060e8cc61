"""The benchmarks as users run them, at tiny sizes: they run, and their JSON lines hold sane measurements."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.memory import generator_saved_bytes
from configs import gta2duke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(script, *args):
  """python benchmarks/<script> <args> --json in a fresh process; -> the JSON object of its last line."""
  done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args, "--json"], cwd=REPO,
                        text=True, capture_output=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_step():
  return run_json("train_step.py", f"--config={REPO}/configs/gta2duke.py:tiny", "--batch_size=2", "--steps=2",
                  "--matmul_size=256", "--matmul_repeats=2")


def test_train_step_benchmark_reports_the_issue_fields(tiny_step):
  r = tiny_step
  for key in ("step_seconds", "images_per_s", "flops_per_step", "peak_flops", "utilization"):
    assert isinstance(r[key], float) and r[key] > 0, key
  assert r["batch_size"] == 2 and r["devices"] == 1
  assert r["images_per_s"] == pytest.approx(2 / r["step_seconds"])
  assert r["utilization"] == pytest.approx(r["flops_per_step"] / r["step_seconds"] / r["peak_flops"])
  assert r["compile_seconds"] > 0 and r["xla_peak_memory_bytes"] > 0


def test_compile_only_run(tiny_step):
  r = run_json("train_step.py", f"--config={REPO}/configs/gta2duke.py:tiny", "--batch_size=2", "--steps=0",
               "--remat")
  assert r["step_seconds"] is None and r["utilization"] is None  # --steps=0 compiles only
  assert r["remat"] and r["flops_per_step"] > tiny_step["flops_per_step"]  # the recomputed forward passes


@pytest.mark.parametrize("dtype,remat,most", [("float32", True, 0.6), ("bfloat16", False, 0.8),
                                              ("bfloat16", True, 0.45)])
def test_saved_activations_shrink_with_bfloat16_and_remat(dtype, remat, most):
  """At full size (shapes only, nothing is computed): what G keeps for its backward pass, vs float32."""
  config = gta2duke.get_config()
  full = generator_saved_bytes(config, 8)
  config.model.dtype, config.model.remat = dtype, remat
  assert generator_saved_bytes(config, 8) < most * full


def test_evaluation_benchmark_agrees_with_the_reference_loop():
  r = run_json("evaluation.py", "--num_query=60", "--num_gallery=400", "--num_ids=40", "--num_distractors=20",
               "--dim=32", "--repeats=1", "--rerank_query=20", "--rerank_gallery=60",
               "--extract_images=4", "--extract_batch=2", "--extract_size=32x16")
  assert r["max_cmc_diff"] == 0.0 and r["mAP_diff"] < 1e-6  # the same numbers as the reference loop
  assert 0.0 < r["mAP"] <= 1.0 and r["speedup"] > 0
  assert r["extract_images_per_s"] > 0 and r["extract_images_per_s_flip"] > 0
  # compute_metrics from features and the whole-matrix path, side by side: the same numbers
  assert r["compute_metrics_same"] and r["compute_metrics_rerank_same"]
  for key in ("compute_metrics_s", "whole_matrix_s", "compute_metrics_rerank_s", "whole_matrix_rerank_s"):
    assert r[key] > 0, key


def test_evaluation_benchmark_msmt17_part_reports_memory_and_time(monkeypatch):
  """The --size=msmt17 child's measurements, on a shrunken problem."""
  from benchmarks import evaluation as bench
  monkeypatch.setattr(bench, "MSMT17_QUERY", 40)
  monkeypatch.setattr(bench, "MSMT17_GALLERY", 300)
  monkeypatch.setattr(bench, "MSMT17_IDS", 20)
  monkeypatch.setattr(bench.evaluation, "RERANK_MATRIX_BYTES", 0)  # from features, as at full size
  # progress=True wraps _Distances.blocks (as the child process does); monkeypatch puts it back afterwards
  monkeypatch.setattr(bench.evaluation._Distances, "blocks", bench.evaluation._Distances.blocks)
  plain, rerank = bench.msmt17_part("plain", 0), bench.msmt17_part("rerank", 0, progress=True)
  assert plain["blocks_bit_identical"]
  for r in (plain, rerank):
    assert r["seconds"] > 0 and r["peak_rss_gib"] >= r["rss_after_features_gib"] > 0
    assert r["features_gib"] == pytest.approx(340 * 2048 * 4 / 2**30)
    assert 0.0 < r["mAP"] <= 1.0 and r["block_rows"] >= 2
  assert rerank["rows_read_in_full"] >= 0 and rerank["entries_recomputed"] >= 0


@pytest.mark.slow
def test_loop_overhead_benchmark_compares_the_real_loop_with_the_bare_step(tmp_path):
  r = run_json("loop_overhead.py", f"--config={REPO}/configs/demo.py:tiny", "--steps=6",
               f"--data_dir={tmp_path / 'tfds'}")
  assert r["backend"] == "cpu" and r["steps"] == 6 and r["loop_steps_counted"] == 4  # rows after the first
  for key in ("loop_steps_per_s", "bare_steps_per_s_before", "bare_steps_per_s_after",
              "loop_cached_steps_per_s"):
    assert isinstance(r[key], float) and r[key] > 0, key
  before, after = r["bare_steps_per_s_before"], r["bare_steps_per_s_after"]
  assert r["bare_steps_per_s"] == pytest.approx((before + after) / 2)
  assert r["ratio"] == pytest.approx(r["loop_steps_per_s"] / r["bare_steps_per_s"])
  assert r["ratio_cached"] == pytest.approx(r["loop_cached_steps_per_s"] / r["bare_steps_per_s"])
