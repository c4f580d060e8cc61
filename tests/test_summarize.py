"""tools/summarize.py: runs grouped by config, mean +- std over seeds, the JSON line, the CMC plot, errors."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import demo  # noqa: E402
from synth_reid_jax.tools import summarize  # noqa: E402

DATASET = "reid_toy/real"
# Three seeds of the demo and two without feature matching; fractions, as eval/<dataset>.json holds them.
RUNS = {
    "demo_s1": {"seed": 1, "sim": 0.5, "mAP": 0.40, "rank1": 0.60},
    "demo_s2": {"seed": 2, "sim": 0.5, "mAP": 0.42, "rank1": 0.62},
    "demo_s3": {"seed": 3, "sim": 0.5, "mAP": 0.44, "rank1": 0.67},
    "nosim_s1": {"seed": 1, "sim": 0.0, "mAP": 0.30, "rank1": 0.50},
    "nosim_s2": {"seed": 2, "sim": 0.0, "mAP": 0.35, "rank1": 0.55},
}


def write_eval(workdir, dataset, mAP, cmc, step=4):
  path = os.path.join(workdir, "eval", f"{dataset}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"dataset": dataset, "step": step, "mAP": mAP, "cmc": cmc, "num_query": 8, "num_gallery": 40},
              f)


def cmc_from(rank1, length=20):
  """A CMC curve rising from rank1 by 1 point per rank (capped at 1)."""
  return [min(1.0, rank1 + 0.01 * i) for i in range(length)]


def make_workdir(root, name, seed, sim, mAP, rank1, step=4, cmc_length=20):
  """A finished run's workdir: config.json (demo:tiny, seed, loss.sim), eval json, visrank and other files."""
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  config = demo.get_config("tiny")
  config.seed = seed
  config.loss.sim = sim
  config.data.manual_dir = f"/data/{name}"  # a key that does not change the experiment
  with open(os.path.join(workdir, summarize.CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  write_eval(workdir, DATASET, mAP, cmc_from(rank1, cmc_length), step)
  visrank = os.path.join(workdir, "eval", "visrank", DATASET)
  os.makedirs(visrank)
  with open(os.path.join(visrank, "0001_c1.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n")
  with open(os.path.join(workdir, "eval", "notes.json"), "w") as f:
    json.dump({"comment": "not a result"}, f)
  return workdir


@pytest.fixture
def workdirs(tmp_path):
  return [make_workdir(str(tmp_path), name, **run) for name, run in RUNS.items()]


def test_layout_constants_match_trainer():
  from synth_reid_jax import config_checks, evaluator

  assert (summarize.CONFIG_FILE, summarize.EVAL_DIR, summarize.VISRANK_DIR) == (
      config_checks.CONFIG_FILE, evaluator.EVAL_DIR, evaluator.VISRANK_DIR)


def test_load_run_reads_results_only(workdirs):
  run = summarize.load_run(workdirs[0])
  assert run.seed == 1
  assert run.config["loss.sim"] == 0.5
  assert list(run.results) == [DATASET]  # not eval/notes.json, nothing from eval/visrank/
  assert run.results[DATASET]["mAP"] == 0.40


def test_group_runs_by_config_except_seed(workdirs):
  variants = summarize.group_runs([summarize.load_run(w) for w in workdirs])
  assert [v.name for v in variants] == ["loss.sim=0.5", "loss.sim=0.0"]
  assert [v.seeds for v in variants] == [[1, 2, 3], [1, 2]]
  assert [[os.path.basename(r.workdir) for r in v.runs] for v in variants] == [
      ["demo_s1", "demo_s2", "demo_s3"], ["nosim_s1", "nosim_s2"]]


def test_a_key_added_between_runs_does_not_split_a_group(workdirs):
  """A config key the project gained after some runs (absent from their config.json) is not compared."""
  path = os.path.join(workdirs[0], summarize.CONFIG_FILE)
  config = json.load(open(path))
  del config["train"]["divergence_factor"]
  json.dump(config, open(path, "w"))
  runs = [summarize.load_run(w) for w in workdirs]
  assert [v.seeds for v in summarize.group_runs(runs)] == [[1, 2, 3], [1, 2]]
  assert summarize.uncompared_keys(runs) == ["train.divergence_factor"]


def test_variants_that_differ_in_many_keys_get_short_labels(tmp_path):
  """Long key lists stay in the Variants section; the table shows the workdirs' stem, seeds sorted."""
  runs = []
  runs_made = (("full_s10", 10, 0.5, 8), ("full_s2", 2, 0.5, 8), ("plain-seed1", 1, 0.0, 16))
  for name, seed, sim, width in runs_made:
    workdir = make_workdir(str(tmp_path), name, seed, sim, 0.4, 0.5)
    path = os.path.join(workdir, summarize.CONFIG_FILE)
    config = json.load(open(path))
    config["model"]["ngf"], config["data"]["pad_size"] = width, width
    json.dump(config, open(path, "w"))
    runs.append(summarize.load_run(workdir))
  variants = summarize.group_runs(runs)
  assert [(v.short, v.seeds) for v in variants] == [("full", [2, 10]), ("plain", [1])]
  assert variants[0].name == "data.pad_size=8, loss.sim=0.5, model.ngf=8"
  table = summarize.format_table(variants, [summarize.summarize(v)[0] for v in variants])
  assert "  full = data.pad_size=8, loss.sim=0.5, model.ngf=8: seeds 2, 10" in table
  assert f"\n  full    | {DATASET} | 2 |" in table
  # Stems that do not tell the variants apart give numbered labels.
  assert summarize.short_labels(["x" * 50, "y" * 50], [runs[:1], runs[1:2]]) == ["variant 1", "variant 2"]


def test_one_variant_is_named_after_its_first_workdir(workdirs):
  variants = summarize.group_runs([summarize.load_run(w) for w in workdirs[:3]])
  assert [(v.name, v.seeds) for v in variants] == [("demo_s1", [1, 2, 3])]


def test_summarize_mean_and_sample_std_in_percent(workdirs):
  variants = summarize.group_runs([summarize.load_run(w) for w in workdirs])
  datasets, warnings = summarize.summarize(variants[0])
  assert warnings == []
  entry = datasets[DATASET]
  assert entry["mAP"]["values"] == pytest.approx([40.0, 42.0, 44.0])
  assert entry["mAP"]["mean"] == pytest.approx(42.0)
  assert entry["mAP"]["std"] == pytest.approx(2.0)  # ddof=1
  assert entry["mAP"]["n"] == 3
  assert entry["rank1"]["mean"] == pytest.approx(63.0)
  assert entry["rank1"]["std"] == pytest.approx(3.605551275)  # sqrt(((-3)^2 + 1^2 + 4^2) / 2)
  assert entry["rank5"]["mean"] == pytest.approx(67.0)
  assert entry["rank10"]["mean"] == pytest.approx(72.0)
  assert entry["rank20"]["mean"] == pytest.approx(82.0)
  assert entry["steps"] == [4, 4, 4]
  one, _ = summarize.summarize(summarize.Variant("one", variants[0].runs[:1]))
  assert (one[DATASET]["mAP"]["mean"], one[DATASET]["mAP"]["std"], one[DATASET]["mAP"]["n"]) == (
      pytest.approx(40.0), 0.0, 1)


def test_short_cmc_reports_the_ranks_it_reaches(tmp_path):
  run = summarize.load_run(make_workdir(str(tmp_path), "short", 1, 0.5, 0.4, 0.6, cmc_length=5))
  datasets, _ = summarize.summarize(summarize.Variant("short", (run,)))
  assert [key for key in datasets[DATASET] if key.startswith("rank")] == ["rank1", "rank5"]
  assert summarize.cmc_curve([run], DATASET)["mean"] == pytest.approx([60.0, 61.0, 62.0, 63.0, 64.0])


def test_warns_about_different_steps_and_repeated_seeds(tmp_path):
  runs = [summarize.load_run(make_workdir(str(tmp_path), name, 1, 0.5, 0.4, 0.6, step=step))
          for name, step in (("a", 4), ("b", 8))]
  variant, = summarize.group_runs(runs)
  datasets, warnings = summarize.summarize(variant)
  assert datasets[DATASET]["steps"] == [4, 8]
  assert len(warnings) == 2
  assert "seed 1" in warnings[0]
  assert "different steps" in warnings[1] and "4 (" in warnings[1] and "8 (" in warnings[1]
  assert "| 4-8 " in summarize.format_table([variant], [datasets])


def test_format_table(workdirs):
  variants = summarize.group_runs([summarize.load_run(w) for w in workdirs])
  table = summarize.format_table(variants, [summarize.summarize(v)[0] for v in variants])
  print(table)
  rows = [line for line in table.splitlines() if DATASET in line]
  assert len(rows) == 2
  assert rows[0].split(" | ")[:5] == ["  loss.sim=0.5", DATASET, "3", "4   ", "42.0 +- 2.0"]
  assert "63.0 +- 3.6" in rows[0]
  assert "32.5 +- 3.5" in rows[1]  # mAP 30, 35
  assert "seeds 1, 2, 3" in table and workdirs[0] in table


def test_cli_json_line_and_plot(workdirs, tmp_path):
  plot = tmp_path / "cmc.png"
  done = subprocess.run([sys.executable, "-m", "synth_reid_jax.tools.summarize", *workdirs, "--json",
                         f"--plot={plot}"], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["units"] == "percent"
  assert summary["warnings"] == []
  first, second = summary["variants"]
  assert (first["name"], first["runs"], first["seeds"]) == ("loss.sim=0.5", workdirs[:3], [1, 2, 3])
  assert (second["name"], second["seeds"]) == ("loss.sim=0.0", [1, 2])
  metrics = first["datasets"][DATASET]
  assert metrics["mAP"]["mean"] == pytest.approx(42.0) and metrics["mAP"]["std"] == pytest.approx(2.0)
  assert metrics["rank1"]["values"] == pytest.approx([60.0, 62.0, 67.0])
  assert {"rank1", "rank5", "rank10", "mAP"} <= set(metrics)
  assert second["datasets"][DATASET]["rank1"]["mean"] == pytest.approx(52.5)
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(plot) > 1000


def test_cli_error_is_one_line(tmp_path):
  missing = str(tmp_path / "nowhere")
  done = subprocess.run([sys.executable, "-m", "synth_reid_jax.tools.summarize", missing], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert done.returncode != 0
  assert done.stdout == ""
  assert done.stderr.strip().splitlines() == [f"summarize: error: {missing}: not a directory "
                                              "(give training workdirs, e.g. runs/demo_s1)"]


def error_of(argv):
  with pytest.raises(SystemExit) as raised:
    summarize.main(argv)
  return str(raised.value.code)


def test_errors_name_the_path_and_what_is_missing(workdirs, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  assert f"{empty}: no config.json" in error_of([workdirs[0], str(empty)])
  no_eval = tmp_path / "no_eval"
  (no_eval / "eval" / "visrank").mkdir(parents=True)
  (no_eval / "config.json").write_text("{}")
  assert f"{no_eval}: no evaluation results" in error_of([str(no_eval)])
  assert "given more than once" in error_of([workdirs[0], workdirs[0] + "/"])


def test_plot_path_is_refused_before_any_work(workdirs, tmp_path):
  existing = tmp_path / "cmc.png"
  existing.write_bytes(b"keep me")
  assert "exists; pass --overwrite" in error_of([*workdirs, f"--plot={existing}"])
  assert existing.read_bytes() == b"keep me"
  assert "does not exist" in error_of([*workdirs, f"--plot={tmp_path / 'no_folder' / 'cmc.png'}"])
  assert "ending in .png" in error_of([*workdirs, f"--plot={tmp_path / 'cmc.pdf'}"])
  summarize.main([*workdirs[:1], f"--plot={existing}", "--overwrite"])
  assert existing.read_bytes()[:4] == b"\x89PNG"
