"""Query-vs-gallery evaluation of the real datasets, during training and as the eval mode.

`Evaluator(config, models, mesh, workdir).run(variables, step)` evaluates every config.data.eval_datasets
dataset: test-time features (features.py), CMC and mAP (evaluation.py), `eval/<dataset>.json` and the
torchreid table from process 0, optionally torchreid's ranked-results pictures. It keeps each dataset's
pipelines between calls.
"""

import contextlib
import json
import os

import jax

from synth_reid_jax import evaluation, features, input_pipeline, sharding, storage
from synth_reid_jax.inference import prepare, restore_for_inference
from synth_reid_jax.workdir_lock import WorkdirLock

EVAL_DIR = "eval"
VISRANK_DIR = "visrank"  # eval/visrank/<dataset>/<query file>.png
SPLITS = ("query", "gallery")


def eval_path(workdir, dataset_name):
  """eval/<dataset>.json (a "/" in the name makes a subfolder)."""
  return os.path.join(workdir, EVAL_DIR, f"{dataset_name}.json")


class _ImageColumn:
  """The encoded images of a split's records, indexable like a list (read only when drawn)."""

  def __init__(self, records):
    self._records = records

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[int(index)]["image"]


class Evaluator:
  """Evaluates config.data.eval_datasets with a model's variables; process 0 writes the results."""

  def __init__(self, config, models, mesh, workdir, writer=None):
    self.config, self.mesh, self.workdir, self.writer = config, mesh, workdir, writer
    self.feature_fn = features.make_feature_fn(models, config, mesh)
    self._streams = {}  # {dataset: {split: EvalStream}}, built on first use

  def streams(self, dataset_name):
    if dataset_name not in self._streams:
      if self.config.data.get("val") and dataset_name == input_pipeline.val_name(self.config):
        self._streams[dataset_name] = input_pipeline.create_val_pipelines(self.config)
      else:
        self._streams[dataset_name] = {
            split: input_pipeline.create_eval_pipeline(self.config, dataset_name, split) for split in SPLITS}
    return self._streams[dataset_name]

  def selection_dataset(self):
    """Where the kept "best" checkpoint is ranked (by mAP): the validation split with config.data.val (the
    target's held-out identities, or the source's without a target), else the first evaluation dataset, a
    test set. The original keeps no best checkpoint (its engine saves every one with is_best=False): the
    ranking is ours."""
    if self.config.data.get("val"):
      return input_pipeline.val_name(self.config)
    return self.config.data.eval_datasets[0] if self.config.data.eval_datasets else None

  def evaluate_dataset(self, variables, dataset_name):
    """-> (results {"dataset", "mAP", "cmc", ...}, query features, gallery features).

    With several processes, process 0 alone holds the features and ranks (the others' memory stays at a
    batch); every process gets its results (they rank the best checkpoint alike), and None for the features.
    """
    streams = self.streams(dataset_name)
    ranks_here = jax.process_index() == 0
    q, g = (features.compute_features(self.feature_fn, variables, streams[s], self.mesh, keep=ranks_here)
            for s in SPLITS)
    ev = self.config.eval

    def rank():
      return evaluation.compute_metrics(
          q["features"], g["features"], q["pid"], g["pid"], q["camid"], g["camid"], metric=ev.metric,
          normalize=ev.normalize, rerank=ev.rerank, cuhk03_metric=ev.cuhk03_metric, ranks=ev.ranks)

    results = sharding.from_process_zero(rank if ranks_here else None, what=f"Evaluating {dataset_name}")
    return {"dataset": dataset_name, **results}, q, g

  def run(self, variables, step, visrank=False, validation=False):
    """Evaluates every dataset at `step` (first the validation split, eval/<target or source>-val.json, when
    `validation` and config.data.val) -> {dataset: results}. With `visrank` (and eval.visrank_topk > 0) also
    saves the ranked-results pictures of the test sets."""
    all_results = {}
    names = list(self.config.data.eval_datasets)
    if validation and self.config.data.get("val"):
      names.insert(0, input_pipeline.val_name(self.config))
    for name in names:
      results, q, g = self.evaluate_dataset(variables, name)
      results = {"dataset": name, "step": int(step), **{k: v for k, v in results.items() if k != "dataset"}}
      all_results[name] = results
      if jax.process_index() != 0:
        continue
      self._write(name, results, step)
      if visrank and self.config.eval.visrank_topk > 0 and name in self.config.data.eval_datasets:
        self.save_visrank(name, q, g, os.path.join(self.workdir, EVAL_DIR, VISRANK_DIR, name))
    return all_results

  def _write(self, name, results, step):
    ranks = self.config.eval.ranks
    message = evaluation.format_results(results, ranks, name=f"{name}, step {step}")
    if self.writer is None:
      print(message, flush=True)  # printed first: a storage error below still leaves the numbers on screen
    else:
      self.writer.print(message)
    path = eval_path(self.workdir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.write_file(path, json.dumps(results, indent=2))
    if self.writer is not None:
      scalars = {"mAP": results["mAP"], **{f"rank{r}": results["cmc"][r - 1] for r in ranks
                                           if r <= len(results["cmc"])}}
      self.writer.write_summary(step, scalars, prefix=f"eval/{name}")

  def save_visrank(self, dataset_name, q, g, save_dir):
    """torchreid's ranked results: one PNG per query with its top-k gallery images (green = same identity)."""
    from synth_reid_jax import visualize
    config = self.config
    # The top k of every query from distance blocks, as compute_metrics: no query x gallery matrix.
    ranked, _ = evaluation.top_k(q["features"], g["features"], config.eval.visrank_topk,
                                 metric=config.eval.metric, normalize=config.eval.normalize, q_pids=q["pid"],
                                 g_pids=g["pid"], q_camids=q["camid"], g_camids=g["camid"])
    images = {split: _ImageColumn(input_pipeline.load_split(config, dataset_name, split)) for split in SPLITS}
    names = [os.path.splitext(name)[0] for name in self.streams(dataset_name)["query"].labels.filenames]
    visualize.visrank(None, q["pid"], g["pid"], q["camid"], g["camid"], images["query"], images["gallery"],
                      save_dir, topk=config.eval.visrank_topk, height=config.data.height,
                      width=config.data.width, names=names, ranked=ranked)


def evaluate(config, workdir, step=None):
  """The eval mode: config.data.eval_datasets with the latest (or `step`) checkpoint -> {dataset: results}."""
  workdir, mesh = prepare(config, workdir)
  models, variables, step = restore_for_inference(config, workdir, step, mesh)
  # eval/ is written by process 0, as during training: not while another run writes this workdir.
  with WorkdirLock(workdir, "eval") if jax.process_index() == 0 else contextlib.nullcontext():
    if jax.process_index() == 0:
      print(f"Evaluating {workdir} at step {step}.", flush=True)
    with storage.storage_errors(workdir, f"The results printed above are not saved in {workdir}/{EVAL_DIR}; "
                                "free space (or fix the mount) and rerun --mode=eval."):
      return Evaluator(config, models, mesh, workdir).run(variables, step, visrank=True)
