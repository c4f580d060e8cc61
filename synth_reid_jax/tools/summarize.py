"""Mean +- std over seeds of the evaluation results of several runs, as a torchreid-like table.

  python -m synth_reid_jax.tools.summarize <workdir>... [--json] [--plot=cmc.png [--overwrite]]

Each workdir is one training run (`python launch.py --workdir=...`): its `config.json` and the latest
`eval/<dataset>.json` of every evaluated dataset. Runs whose configs are equal except for `seed` (and the keys
in NON_EXPERIMENT_KEYS, which move files or change logging but not the experiment) form one variant; a
variant is named by the config keys that differ between variants (`loss.sim=0.0`), or by the first
workdir's name when all runs are one variant. For every variant and dataset the table shows mAP and the
CMC at ranks 1/5/10/20 (those the runs' CMC reaches) in percent, as mean +- sample standard deviation over
the n runs (std 0 for one run). Runs of a variant evaluated at different steps, or sharing a seed, get a
warning line. Example, three seeds with and without feature matching:

  python -m synth_reid_jax.tools.summarize runs/demo_s1 runs/demo_s2 runs/demo_s3 \
      runs/nosim_s1 runs/nosim_s2 runs/nosim_s3 --plot=cmc.png

--json ends stdout with one JSON line: {"units": "percent", "variants": [{"name", "runs", "seeds",
"datasets": {dataset: {"mAP": {"mean", "std", "n", "values"}, "rank1": {...}, ..., "steps": [...]}}}],
"warnings": [...]}. --plot writes the CMC curves (mean over seeds, shaded +- std) of every variant and
dataset to a new PNG (--overwrite replaces an existing one).
"""

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
from collections.abc import Sequence

# The workdir layout written by synth_reid_jax/trainer.py (its CONFIG_FILE, EVAL_DIR and VISRANK_DIR); kept
# here so that summarising results needs no JAX (tests check that the two agree).
CONFIG_FILE = "config.json"
EVAL_DIR = "eval"
VISRANK_DIR = "visrank"  # eval/visrank/: ranked-results pictures, not results

SEED_KEY = "seed"
# Config keys that change where files live, how fast data is read or how often things are logged and saved,
# but not the trained model or its evaluation numbers: runs differing only in these (and the seed) are
# repeats of one experiment.
NON_EXPERIMENT_KEYS = (
    "data.manual_dir",
    "data.data_dir",
    "data.num_workers",
    "data.prefetch",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.sample_every_steps",
    "train.num_samples",
    "eval.batch_size",
    "eval.visrank_topk",
)
RANKS = (1, 5, 10, 20)  # the CMC ranks torchreid prints (and config.eval.ranks' default)
PLOT_MAX_RANK = 20
SHORT_LABEL = 40  # longer variant names are shown by a short label in the table (and in full above it)
RESULT_KEYS = ("dataset", "step", "mAP", "cmc")  # an eval/<dataset>.json has at least these
_MISSING = "<missing>"  # the value of a key one config has and another lacks


class SummaryError(ValueError):
  """A problem with the command line or a workdir; reported as one line."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One workdir: its flattened config and its latest result per evaluation dataset."""
  workdir: str
  config: dict  # {"loss.sim": 0.5, ...}
  results: dict  # {dataset: {"dataset", "step", "mAP", "cmc", ...}}

  @property
  def seed(self):
    return self.config.get(SEED_KEY)


@dataclasses.dataclass(frozen=True)
class Variant:
  """Runs of one experiment that differ only in seed."""
  name: str  # the config keys that set it apart, e.g. "loss.sim=0.0"
  runs: tuple[Run, ...]
  label: str = ""  # a short name for tables and plots (default: name)

  @property
  def short(self):
    return self.label or self.name

  @property
  def seeds(self):
    return [run.seed for run in self.runs]


def flatten(config: dict, prefix: str = "") -> dict:
  """{"loss": {"sim": 0.5}} -> {"loss.sim": 0.5}."""
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _is_result(data) -> bool:
  return (isinstance(data, dict) and all(key in data for key in RESULT_KEYS)
          and isinstance(data["cmc"], list) and isinstance(data["mAP"], int | float))


def load_results(workdir: str) -> dict:
  """{dataset: result} of every eval/**/*.json result file (eval/visrank/ and other files skipped)."""
  eval_dir = os.path.join(workdir, EVAL_DIR)
  results = {}
  for root, folders, names in os.walk(eval_dir):
    if root == eval_dir and VISRANK_DIR in folders:
      folders.remove(VISRANK_DIR)
    folders.sort()
    for name in sorted(names):
      if not name.endswith(".json"):
        continue
      path = os.path.join(root, name)
      try:
        with open(path) as f:
          data = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # Not a result; possibly one being written right now (the trainer writes it in place).
        print(f"summarize: skipping {path}: not valid JSON ({e})", file=sys.stderr)
        continue
      if _is_result(data):
        results[data["dataset"]] = data
  return dict(sorted(results.items()))


def load_run(workdir: str) -> Run:
  """The config and eval results of one workdir; SummaryError naming the path and what is missing."""
  if not os.path.isdir(workdir):
    raise SummaryError(f"{workdir}: not a directory (give training workdirs, e.g. runs/demo_s1)")
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise SummaryError(f"{workdir}: no {CONFIG_FILE} (not a training workdir?)")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise SummaryError(f"{config_path}: not valid JSON ({e})") from e
  results = load_results(workdir)
  if not results:
    raise SummaryError(f"{workdir}: no evaluation results ({EVAL_DIR}/<dataset>.json); evaluate it with "
                       f"python launch.py --mode=eval --config=... --workdir={workdir}")
  return Run(workdir=workdir, config=flatten(config), results=results)


def compared_keys(runs: Sequence[Run]) -> list[str]:
  """The config keys that tell experiments apart: in every run's config, but the seed and
  NON_EXPERIMENT_KEYS. A key only some configs hold (one added to the project between runs) is not compared:
  see uncompared_keys."""
  common = set.intersection(*(set(run.config) for run in runs))
  return sorted(common - {SEED_KEY} - set(NON_EXPERIMENT_KEYS))


def uncompared_keys(runs: Sequence[Run]) -> list[str]:
  """Keys some configs hold and others lack (left out of the grouping)."""
  every = set.union(*(set(run.config) for run in runs))
  return sorted(every - set.intersection(*(set(run.config) for run in runs)))


def experiment_key(run: Run, keys: Sequence[str] | None = None) -> str:
  """The run's config at `keys` (default: all but the seed and NON_EXPERIMENT_KEYS), comparable."""
  keys = compared_keys([run]) if keys is None else keys
  return json.dumps({k: run.config.get(k, _MISSING) for k in keys}, sort_keys=True)


def _format_value(value) -> str:
  """A config value as an ml_collections override would spell it: 0.5, True, reid_toy/real, (0, 2)."""
  if isinstance(value, list):
    return "(" + ", ".join(_format_value(v) for v in value) + ")"
  return str(value)


def group_runs(runs: Sequence[Run]) -> list[Variant]:
  """Variants (in order of first appearance), each named by the config keys that differ between them."""
  keys = compared_keys(runs)
  groups = {}
  for run in runs:
    groups.setdefault(experiment_key(run, keys), []).append(run)
  by_seed = lambda run: (not isinstance(run.seed, int), run.seed if isinstance(run.seed, int) else 0)
  groups = [sorted(group, key=by_seed) for group in groups.values()]
  if len(groups) == 1:
    name = os.path.basename(os.path.normpath(groups[0][0].workdir))
    return [Variant(name=name, runs=tuple(groups[0]))]
  differing = [key for key in keys
               if len({json.dumps(group[0].config.get(key, _MISSING)) for group in groups}) > 1]
  names = [", ".join(f"{key}={_format_value(group[0].config.get(key, _MISSING))}" for key in differing)
           for group in groups]
  labels = short_labels(names, groups)
  return [Variant(name=name, runs=tuple(group), label=label)
          for name, group, label in zip(names, groups, labels)]


def _workdir_stem(runs: Sequence[Run]) -> str:
  """What the workdirs of one variant share, less a trailing seed: demo_s0, demo_s10 -> "demo"."""
  stem = os.path.commonprefix([os.path.basename(os.path.normpath(run.workdir)) for run in runs])
  return re.sub(r"[-_.]*(seed|s)?\d*$", "", stem, flags=re.IGNORECASE)


def short_labels(names: Sequence[str], groups: Sequence[Sequence[Run]]) -> list[str]:
  """Table labels: the differing keys when short; else the workdirs' shared stem when the stems tell the
  variants apart; else "variant 1", "variant 2", ... (the Variants section gives each label's keys)."""
  if all(len(name) <= SHORT_LABEL for name in names):
    return list(names)
  stems = [_workdir_stem(group) for group in groups]
  if all(stems) and len(set(stems)) == len(stems):
    return stems
  return [f"variant {i}" for i in range(1, len(names) + 1)]


def _stats(values: Sequence[float]) -> dict:
  """{"mean", "std" (sample, ddof=1; 0 for one value), "n", "values"}."""
  values = list(values)
  return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
          "n": len(values), "values": values}


def summarize(variant: Variant) -> tuple[dict, list[str]]:
  """({dataset: {"mAP": stats, "rank1": stats, ..., "steps": [...]}}, warnings) in percent.

  A rank is reported when every run's CMC reaches it; a dataset's n counts the runs that evaluated it.
  """
  datasets, warnings = {}, []
  seeds = variant.seeds
  repeated = sorted({str(seed) for seed in seeds if seeds.count(seed) > 1})
  if repeated:
    warnings.append(f"variant {variant.name}: several runs with seed {', '.join(repeated)}: "
                    + ", ".join(run.workdir for run in variant.runs))
  names = list(dict.fromkeys(name for run in variant.runs for name in run.results))
  for name in names:
    runs = [run for run in variant.runs if name in run.results]
    results = [run.results[name] for run in runs]
    if len(runs) < len(variant.runs):
      missing = [run.workdir for run in variant.runs if name not in run.results]
      warnings.append(f"variant {variant.name}, {name}: evaluated in {len(runs)} of {len(variant.runs)} runs "
                      f"(not in {', '.join(missing)})")
    steps = [int(r["step"]) for r in results]
    if len(set(steps)) > 1:
      warnings.append(f"variant {variant.name}, {name}: runs evaluated at different steps: "
                      + ", ".join(f"{step} ({run.workdir})" for step, run in zip(steps, runs)))
    entry = {"mAP": _stats(100.0 * r["mAP"] for r in results)}
    shortest = min(len(r["cmc"]) for r in results)
    for rank in RANKS:
      if rank <= shortest:
        entry[f"rank{rank}"] = _stats(100.0 * r["cmc"][rank - 1] for r in results)
    entry["steps"] = steps
    datasets[name] = entry
  return datasets, warnings


def _cell(stats: dict | None) -> str:
  return "-" if stats is None else f"{stats['mean']:.1f} +- {stats['std']:.1f}"


def _steps_cell(steps: Sequence[int]) -> str:
  low, high = min(steps), max(steps)
  return str(low) if low == high else f"{low}-{high}"


def format_table(variants: Sequence[Variant], summaries: Sequence[dict]) -> str:
  """The runs of each variant, then one row per (variant, dataset): n, step, mAP and ranks, in percent."""
  lines = ["** Variants **"]
  for variant in variants:
    keys = "" if variant.short == variant.name else f" = {variant.name}"
    lines.append(f"  {variant.short}{keys}: seeds {', '.join(str(seed) for seed in variant.seeds)}")
    lines.extend(f"    {run.workdir}" for run in variant.runs)
  header = ["variant", "dataset", "n", "step", "mAP"] + [f"Rank-{rank}" for rank in RANKS]
  rows = []
  for variant, datasets in zip(variants, summaries):
    for dataset, entry in datasets.items():
      rows.append([variant.short, dataset, str(entry["mAP"]["n"]), _steps_cell(entry["steps"]),
                   _cell(entry["mAP"])] + [_cell(entry.get(f"rank{rank}")) for rank in RANKS])
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  format_row = lambda row: "  " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
  rule = "  " + "-" * (sum(widths) + 3 * (len(widths) - 1))
  lines += ["** Results (mean +- std over seeds, %) **", rule, format_row(header), rule]
  lines += [format_row(row) for row in rows]
  lines.append(rule)
  return "\n".join(lines)


def to_json(variants: Sequence[Variant], summaries: Sequence[dict], warnings: Sequence[str]) -> dict:
  """The --json object: percent units, the variants with their runs, seeds and per-dataset statistics."""
  return {"units": "percent",
          "variants": [{"name": v.name, "label": v.short, "runs": [run.workdir for run in v.runs],
                        "seeds": v.seeds, "datasets": datasets} for v, datasets in zip(variants, summaries)],
          "warnings": list(warnings)}


def check_plot_path(path: str, overwrite: bool = False) -> None:
  """Refuses (SummaryError) a non-.png name, a missing folder, or an existing file without overwrite."""
  if not path.lower().endswith(".png"):
    raise SummaryError(f"--plot={path}: the plot is a PNG; give a file name ending in .png")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise SummaryError(f"--plot={path}: the folder {folder} does not exist; create it first")
  if os.path.exists(path) and not overwrite:
    raise SummaryError(f"--plot={path}: the file exists; pass --overwrite to replace it, or use another name")


def cmc_curve(runs: Sequence[Run], dataset: str, max_rank: int = PLOT_MAX_RANK) -> dict:
  """{"mean", "std"} (percent, ranks 1..k) of `dataset`'s CMC over the runs that evaluated it; k is the
  shortest CMC, at most max_rank."""
  curves = [run.results[dataset]["cmc"] for run in runs if dataset in run.results]
  length = min(max_rank, *(len(curve) for curve in curves))
  per_rank = [_stats(100.0 * curve[i] for curve in curves) for i in range(length)]
  return {"mean": [s["mean"] for s in per_rank], "std": [s["std"] for s in per_rank], "n": len(curves)}


def plot_cmc(variants: Sequence[Variant], path: str, max_rank: int = PLOT_MAX_RANK) -> None:
  """A PNG of the CMC curves: one line per (variant, dataset), the mean over seeds shaded +- std."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  from matplotlib.ticker import MaxNLocator

  figure, axes = plt.subplots(figsize=(7, 5))
  for variant in variants:
    for dataset in dict.fromkeys(name for run in variant.runs for name in run.results):
      curve = cmc_curve(variant.runs, dataset, max_rank)
      ranks = list(range(1, len(curve["mean"]) + 1))
      low = [m - s for m, s in zip(curve["mean"], curve["std"])]
      high = [m + s for m, s in zip(curve["mean"], curve["std"])]
      label = f"{dataset}" if len(variants) == 1 else f"{variant.short} | {dataset}"
      (line,) = axes.plot(ranks, curve["mean"], marker="o", markersize=3, label=f"{label} (n={curve['n']})")
      axes.fill_between(ranks, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
  axes.xaxis.set_major_locator(MaxNLocator(integer=True))
  axes.set_xlabel("Rank")
  axes.set_ylabel("Matching rate (%)")
  axes.set_title("CMC (mean \u00b1 std over seeds)")
  axes.grid(True, alpha=0.3)
  axes.legend(fontsize="small")
  figure.tight_layout()
  figure.savefig(path, format="png", dpi=100)
  plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m synth_reid_jax.tools.summarize",
      description="Mean +- std over seeds of the evaluation results of training workdirs.")
  parser.add_argument("workdirs", nargs="+", metavar="workdir", help="training workdirs (config.json, eval/)")
  parser.add_argument("--json", action="store_true", help="end stdout with one JSON line of the numbers")
  parser.add_argument("--plot", metavar="PNG", help="write the CMC curves to this new .png file")
  parser.add_argument("--overwrite", action="store_true", help="let --plot replace an existing file")
  args = parser.parse_args(argv)
  try:
    if args.plot is not None:
      check_plot_path(args.plot, args.overwrite)
    paths = [os.path.realpath(workdir) for workdir in args.workdirs]
    repeated = sorted({w for w, p in zip(args.workdirs, paths) if paths.count(p) > 1})
    if repeated:
      raise SummaryError(f"{', '.join(repeated)}: given more than once; list each workdir once")
    variants = group_runs([load_run(workdir) for workdir in args.workdirs])
  except SummaryError as e:
    sys.exit(f"summarize: error: {e}")
  summaries, warnings = [], []
  runs = [run for variant in variants for run in variant.runs]
  if uncompared_keys(runs):
    warnings.append(f"not compared, as only some runs' config.json hold them (keys added since): "
                    f"{', '.join(uncompared_keys(runs))}")
  for variant in variants:
    datasets, variant_warnings = summarize(variant)
    summaries.append(datasets)
    warnings += variant_warnings
  for warning in warnings:
    print(f"WARNING: {warning}")
  print(format_table(variants, summaries))
  if args.plot is not None:
    plot_cmc(variants, args.plot)
    print(f"CMC plot: {args.plot}")
  if args.json:
    print(json.dumps(to_json(variants, summaries, warnings)), flush=True)


if __name__ == "__main__":
  main()
