"""The trainer: config checks, the training loop with evaluation, and the eval / translate / extract modes.

Small functions first; `train_and_evaluate` (the loop) and the other modes sit at the bottom.
"""

import dataclasses
import difflib
import json
import os
import re
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from PIL import Image

from synth_reid_jax import (
    checkpointing,
    compile_options,
    evaluation,
    features,
    input_pipeline,
    sharding,
    train_state,
    train_step,
)
from synth_reid_jax.metric_writer import MetricWriter
from synth_reid_jax.models import BACKBONES, build_models
from synth_reid_jax.models.discriminator import NUM_LAYERS as DISCRIMINATOR_LAYERS
from synth_reid_jax.models.generator import FIRST_BLOCK_LAYER

CONFIG_FILE = "config.json"
EVAL_DIR = "eval"
SAMPLES_DIR = "samples"
VISRANK_DIR = "visrank"  # eval/visrank/<dataset>/<query file>.png
# Encoded images translate/extract read from --input_dir (case-insensitive suffixes).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_QUALITY = 95  # translate: non-PNG outputs
# Keys whose values fix parameter shapes or the classifier width: a workdir trained with other values cannot
# be resumed or evaluated with this config.
SHAPE_KEYS = ("model.backbone", "model.ngf", "model.n_blocks", "model.ndf", "model.projector_dim",
              "model.reid_stages", "model.reid_width", "loss.nce_layers", "data.source", "data.combineall",
              "data.combineall_query")
NONFINITE_ACTIONS = ("stop", "skip")
SIM_TYPES = ("feat_match", "gram_match")
METRICS = ("euclidean", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
# "0002_c1s1_000451_03.jpg", "0001_c2_f0046182.jpg", "0001_c1_1.png" (Market, Duke, CUHK03-NP, reid_toy) and
# "42647445_sd000c08_0396.jpeg" (GTA): identity and 1-based camera, for extract's pids / camids.
FILENAME_PATTERNS = (re.compile(r"^(?P<pid>-?\d+)_c(?P<cam>\d+)"),
                     re.compile(r"^(?P<pid>\d+)_s[dn]\d+c(?P<cam>\d+)"))
UNPARSED = -1


# --- Config checks (before anything is compiled) ---------------------------------------------------


def _flatten(config, prefix=""):
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def needs_target(config):
  """Whether a loss reads real images: D's real term, feature matching, identity PatchNCE."""
  w = config.loss
  return config.model.backbone == "generator" and (w.dis > 0 or w.sim > 0 or (w.nce > 0 and w.nce_idt > 0))


def validate_config(config, reference=None):
  """Raises with the fix for every mistake a config can hold, before any data is read or code compiled.

  `reference` (configs/default.py's config) lists the known keys: others are typos.
  """
  problems = []
  if reference is not None:
    known = _flatten(reference)
    for key in sorted(set(_flatten(config)) - set(known)):
      close = difflib.get_close_matches(key, known, n=1)
      problems.append(f"unknown key config.{key}" + (f" (did you mean config.{close[0]}?)" if close else "")
                      + "; every key is documented in configs/default.py")
  from synth_reid_jax.datasets import DATASET_NAMES
  data, model, loss, train, ev = config.data, config.model, config.loss, config.train, config.eval

  def check_dataset(name, key):
    if name not in DATASET_NAMES:
      problems.append(f"config.{key}={name!r} is not a dataset; use one of {DATASET_NAMES}")

  check_dataset(data.source, "data.source")
  if needs_target(config):
    check_dataset(data.target, "data.target")
  for name in data.eval_datasets:
    check_dataset(name, "data.eval_datasets")
  for key in ("height", "width"):
    if data[key] <= 0 or data[key] % 4:
      problems.append(f"config.data.{key}={data[key]} must be a positive multiple of 4 (the generator "
                      f"downsamples twice), e.g. {max(4, data[key] // 4 * 4)}")
  if model.backbone not in BACKBONES:
    problems.append(f"config.model.backbone={model.backbone!r}; use one of {BACKBONES}")
  if model.dtype not in DTYPES:
    problems.append(f"config.model.dtype={model.dtype!r}; use one of {DTYPES}")
  num_layers = FIRST_BLOCK_LAYER + model.n_blocks
  bad = [layer for layer in loss.nce_layers if not 0 <= layer < num_layers]
  if loss.nce > 0 and bad:
    problems.append(f"config.loss.nce_layers {tuple(loss.nce_layers)}: {bad} out of range; the encoder with "
                    f"model.n_blocks={model.n_blocks} has layers 0..{num_layers - 1}")
  bad = [layer for layer in loss.dis_layers if not 0 <= layer < DISCRIMINATOR_LAYERS]
  if loss.sim > 0 and bad:
    problems.append(f"config.loss.dis_layers {tuple(loss.dis_layers)}: {bad} out of range; the "
                    f"discriminator has layers 0..{DISCRIMINATOR_LAYERS - 1}")
  if loss.sim_type not in SIM_TYPES:
    problems.append(f"config.loss.sim_type={loss.sim_type!r}; use one of {SIM_TYPES}")
  if model.backbone == "resnet50" and any(loss[k] > 0 for k in ("gan", "dis", "nce", "nce_idt", "sim")):
    problems.append("config.model.backbone='resnet50' (direct transfer) has no generator: set config.loss."
                    "{gan, dis, nce, nce_idt, sim} to 0 (see configs/baseline.py)")
  if loss.reid_ce <= 0 and loss.reid_triplet <= 0:
    problems.append("config.loss.reid_ce and reid_triplet are both 0: the re-ID network would never train")
  if train.batch_size <= 0:
    problems.append(f"config.train.batch_size={train.batch_size} must be positive")
  if train.num_steps is not None and train.num_steps <= 0:
    problems.append(f"config.train.num_steps={train.num_steps} must be positive (or None to use num_epochs)")
  if train.num_steps is None and train.num_epochs <= 0:
    problems.append(f"config.train.num_epochs={train.num_epochs} must be positive")
  for key in ("log_every_steps", "checkpoint_every_steps", "sample_every_steps", "eval_every_epochs",
              "keep_checkpoints"):
    if train[key] <= 0:
      problems.append(f"config.train.{key}={train[key]} must be positive")
  if train.on_nonfinite not in NONFINITE_ACTIONS:
    problems.append(f"config.train.on_nonfinite={train.on_nonfinite!r}; use one of {NONFINITE_ACTIONS}")
  if ev.metric not in METRICS:
    problems.append(f"config.eval.metric={ev.metric!r}; use one of {METRICS}")
  if not ev.ranks or any(r < 1 for r in ev.ranks):
    problems.append(f"config.eval.ranks={tuple(ev.ranks)} must be ranks >= 1, e.g. (1, 5, 10, 20)")
  if problems:
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))


def validate_for_devices(config, num_devices):
  """Batches must split evenly over the devices."""
  for key in ("train.batch_size", "eval.batch_size"):
    section, name = key.split(".")
    value = config[section][name]
    if value % num_devices:
      suggestion = max(1, value // num_devices) * num_devices
      raise ValueError(f"config.{key}={value} is not divisible by the {num_devices} devices; set it to a "
                       f"multiple of {num_devices}, e.g. --config.{key}={suggestion}.")


def _config_json(config):
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def check_workdir_config(config, workdir):
  """Raises if `workdir` holds a run whose config.json builds other shapes than `config` does."""
  path = os.path.join(os.path.expanduser(workdir), CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = _flatten(json.load(f))
  new = _flatten(_config_json(config))
  differ = [f"{key}: {old[key]!r} in {path}, {new.get(key)!r} now"
            for key in SHAPE_KEYS if key in old and old[key] != new.get(key)]
  if differ:
    raise ValueError(f"The workdir {workdir} holds a run with a different model or identity set:\n  "
                     + "\n  ".join(differ) + "\nUse a fresh --workdir, or the config in that config.json.")


def write_config(config, workdir):
  """<workdir>/config.json: the config of the latest run in this workdir.

  Written to a temporary file and renamed, so that a reader (another process of a multi-host run checking
  the workdir, or a crash halfway) sees the old file or the new one, never a partial one.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  temporary = f"{path}.tmp{os.getpid()}"
  try:
    with open(temporary, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


# --- Data ------------------------------------------------------------------------------------------


def next_batch(source, target, mesh):
  """The global train batch {"source", "pid", "target"}; target is None when no loss reads real images."""
  s = next(source.iterator)
  batch = sharding.make_global_batch({"source": s["image"], "pid": s["pid"]}, mesh)
  batch["target"] = None
  if target is not None:
    batch["target"] = sharding.make_global_batch(next(target.iterator)["image"], mesh)
  return batch


def num_train_steps(config, steps_per_epoch):
  """config.train.num_steps when set, else num_epochs whole epochs over the source."""
  return config.train.num_steps or config.train.num_epochs * steps_per_epoch


def _loss_names(metrics):
  return [k for k in metrics if k in train_step.LOSS_METRICS]


def nonfinite_losses(metrics):
  """Names of the loss terms (host values) that are NaN or infinite."""
  return [k for k in _loss_names(metrics) if not np.isfinite(metrics[k])]


def skip_nonfinite(step_fn, mesh):
  """The train step, but a step with a non-finite loss leaves params and optimizer states as they were.

  The step counter still advances, so epochs and learning rates stay aligned with the data.
  """
  inner = getattr(step_fn, "__wrapped__", step_fn)

  def guarded(state, batch, rng):
    new_state, metrics = inner(state, batch, rng)
    finite = jnp.all(jnp.stack([jnp.isfinite(metrics[k]) for k in _loss_names(metrics)]))
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                        new_state.replace(step=state.step), state)
    return kept.replace(step=new_state.step), metrics

  replicated = sharding.replicated_sharding(mesh)
  return jax.jit(guarded, in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=compile_options.compiler_options())


# --- Evaluation --------------------------------------------------------------------------------------


def _eval_path(workdir, dataset_name):
  return os.path.join(workdir, EVAL_DIR, f"{dataset_name}.json")


def evaluate_dataset(config, feature_fn, variables, mesh, dataset_name, streams=None):
  """Query-vs-gallery CMC and mAP of one dataset; -> (results, query features, gallery features, streams).

  `streams` ({split: eval stream}) caches the pipelines between evaluations; missing ones are built.
  """
  streams = {} if streams is None else streams
  for split in ("query", "gallery"):
    if split not in streams:
      streams[split] = input_pipeline.create_eval_pipeline(config, dataset_name, split)
  q, g = (features.compute_features(feature_fn, variables, streams[s], mesh) for s in ("query", "gallery"))
  ev = config.eval
  results = evaluation.compute_metrics(
      q["features"], g["features"], q["pid"], g["pid"], q["camid"], g["camid"], metric=ev.metric,
      normalize=ev.normalize, rerank=ev.rerank, cuhk03_metric=ev.cuhk03_metric, ranks=ev.ranks)
  return {"dataset": dataset_name, **results}, q, g, streams


class _ImageColumn:
  """The encoded images of a split's records, indexable like a list (read only when drawn)."""

  def __init__(self, records):
    self._records = records

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[int(index)]["image"]


def save_visrank(config, dataset_name, q, g, streams, save_dir):
  """torchreid's ranked results: one PNG per query with its top-k gallery images (green = same identity)."""
  from synth_reid_jax import visualize
  qf, gf = q["features"], g["features"]
  if config.eval.normalize:
    qf, gf = evaluation.normalize_features(qf), evaluation.normalize_features(gf)
  distmat = evaluation.distance_matrix(qf, gf, config.eval.metric)
  images = {split: _ImageColumn(input_pipeline.load_split(config, dataset_name, split))
            for split in ("query", "gallery")}
  names = [os.path.splitext(name)[0] for name in streams["query"].labels.filenames]
  visualize.visrank(distmat, q["pid"], g["pid"], q["camid"], g["camid"], images["query"], images["gallery"],
                    save_dir, topk=config.eval.visrank_topk, height=config.data.height,
                    width=config.data.width, names=names)


def evaluate_all(config, feature_fn, variables, mesh, step, workdir, writer=None, visrank=False,
                 streams=None):
  """Evaluates config.data.eval_datasets; process 0 writes eval/<dataset>.json (+ visrank pictures).

  `streams` ({dataset: {split: stream}}) keeps the evaluation pipelines between calls.
  """
  all_results = {}
  streams = {} if streams is None else streams
  for name in config.data.eval_datasets:
    dataset_streams = streams.setdefault(name, {})
    results, q, g, _ = evaluate_dataset(config, feature_fn, variables, mesh, name, dataset_streams)
    results = {"dataset": name, "step": int(step), **{k: v for k, v in results.items() if k != "dataset"}}
    all_results[name] = results
    if jax.process_index() != 0:
      continue
    path = _eval_path(workdir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(results, f, indent=2)
    message = evaluation.format_results(results, config.eval.ranks, name=f"{name}, step {step}")
    ranks = {f"rank{r}": results["cmc"][r - 1] for r in config.eval.ranks if r <= len(results["cmc"])}
    if writer is not None:
      writer.print(message)
      writer.write_summary(step, {"mAP": results["mAP"], **ranks}, prefix=f"eval/{name}")
    else:
      print(message, flush=True)
    if visrank and config.eval.visrank_topk > 0:
      save_visrank(config, name, q, g, streams[name], os.path.join(workdir, EVAL_DIR, VISRANK_DIR, name))
  return all_results


# --- Samples ---------------------------------------------------------------------------------------


def _to_uint8(images, config):
  """Normalised float images -> uint8."""
  pixels = (images * np.asarray(config.data.std) + np.asarray(config.data.mean)) * 255.0
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _host_rows(x, n):
  """The first n rows of a (possibly multi-process) global batch, on every process."""
  return np.asarray(features.to_host(x))[:n]


def make_translate_fn(models):
  """jit((params, images) -> G(images)) for sample grids."""
  return jax.jit(lambda params, x: models.generator.apply({"params": params["generator"]}, x))


def save_samples(config, translate_fn, state, batch, step, workdir):
  """PNG grid, one row each: source, translated, target [, identity G(target)] (the batch's first images)."""
  n = config.train.num_samples
  source = _host_rows(batch["source"], n)
  target = None if batch["target"] is None else _host_rows(batch["target"], n)
  with_identity = target is not None and config.loss.nce_idt > 0
  inputs = np.concatenate([source, target]) if with_identity else source
  translated = np.asarray(translate_fn(state.params, inputs))
  rows = [source, translated[:len(source)]]
  if target is not None:
    rows.append(target)
  if with_identity:
    rows.append(translated[len(source):])
  if jax.process_index() == 0:
    from synth_reid_jax import visualize
    path = os.path.join(workdir, SAMPLES_DIR, f"step_{step:08d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    visualize.save_image_grid([_to_uint8(images, config) for images in rows], path)


# --- State and loop ----------------------------------------------------------------------------------


def create_replicated_state(config, rng, num_classes, mesh):
  """create_train_state as one compiled program whose output lands replicated on the mesh."""
  optimizers = {}

  def init(key):
    state, built = train_state.create_train_state(config, key, num_classes)
    optimizers.update(built)  # plain Python objects made from the config while tracing
    return state

  state = jax.jit(init, out_shardings=sharding.replicated_sharding(mesh))(rng)
  return state, optimizers


class TrainMetrics:
  """Averages the step metrics between two log rows and measures images/s over the time spent in steps."""

  def __init__(self, batch_size):
    self.batch_size = batch_size
    self.reset()

  def reset(self):
    self.sums, self.count, self.images, self.seconds = {}, 0, 0, 0.0

  def add(self, metrics, seconds, counted=True):
    self.images += self.batch_size
    self.seconds += seconds
    if counted:
      for key, value in metrics.items():
        self.sums[key] = self.sums.get(key, 0.0) + float(value)
      self.count += 1

  def row(self, epoch):
    row = {"epoch": epoch, **{k: v / max(self.count, 1) for k, v in self.sums.items()},
           "images_per_sec": self.images / max(self.seconds, 1e-9)}
    self.reset()
    return row


def eval_due(done, steps_per_epoch, num_steps, eval_every_epochs):
  """After the last step, and at the end of every eval_every_epochs-th epoch."""
  epoch_end = done % steps_per_epoch == 0
  return done == num_steps or (epoch_end and (done // steps_per_epoch) % eval_every_epochs == 0)


class StopRequest:
  """Set by SIGTERM (single process) or a preemption notice reached by every host (multi-host)."""

  def __init__(self, checkpointer):
    self._checkpointer, self._flag = checkpointer, threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

  def __call__(self, step):
    if jax.process_count() > 1:
      return self._checkpointer.reached_preemption(step)
    return self._flag.is_set()

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# --- Modes -------------------------------------------------------------------------------------------


def _prepare(config, workdir):
  """Every mode's checks: the config, the devices and the workdir's earlier config; -> (workdir, mesh)."""
  validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = sharding.create_mesh()
  validate_for_devices(config, mesh.devices.size)
  check_workdir_config(config, workdir)
  return workdir, mesh


def train_and_evaluate(config, workdir):
  """Trains on config.data.source with config.data.target alongside, evaluating every eval_every_epochs.

  Resumes from the latest checkpoint in workdir (state, data iterators, rng and metrics.jsonl).
  Returns the final state.
  """
  workdir, mesh = _prepare(config, workdir)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)

  source = input_pipeline.create_source_pipeline(config)
  target = input_pipeline.create_target_pipeline(config) if needs_target(config) else None
  iterators = {"source": source.iterator} | ({"target": target.iterator} if target is not None else {})
  steps_per_epoch = source.steps_per_epoch
  num_steps = num_train_steps(config, steps_per_epoch)
  if is_main:
    print(f"Source {config.data.source}: {source.num_images} images, {source.num_classes} identities, "
          f"{steps_per_epoch} steps/epoch; {num_steps} steps in all"
          + (f"; target {config.data.target}: {target.num_images} images" if target is not None else ""),
          flush=True)

  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state, optimizers = create_replicated_state(config, init_rng, source.num_classes, mesh)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                            iterator_names=tuple(iterators))
  if checkpointer.latest_step() is not None:
    state, train_rng, restored = checkpointer.restore_training(state, iterators=iterators, rng=train_rng)
    if is_main:
      epoch = restored.get("epoch", 0)
      print(f"Resumed from {checkpointer.directory}/{int(state.step)} (epoch {epoch:.2f}).", flush=True)
  start_step = int(state.step)
  if start_step >= num_steps:
    if is_main:
      print(f"Training already reached step {start_step} of {num_steps}; nothing to do (--mode=eval "
            "evaluates).")
    checkpointer.close()
    return state

  models = build_models(config, source.num_classes)
  step_fn = train_step.make_train_step(config, models, optimizers, steps_per_epoch, mesh)
  if config.train.on_nonfinite == "skip":
    step_fn = skip_nonfinite(step_fn, mesh)
  feature_fn = features.make_feature_fn(models, config, mesh)
  translate_fn = make_translate_fn(models) if config.model.backbone == "generator" else None
  metadata = {"num_classes": source.num_classes, "steps_per_epoch": steps_per_epoch,
              "config": _config_json(config)}
  eval_streams = {}  # built on the first evaluation, reused by the next ones

  writer = MetricWriter(workdir, enabled=is_main, initial_step=start_step, total_steps=num_steps)
  stop = StopRequest(checkpointer)
  train_metrics = TrainMetrics(config.train.batch_size)
  try:
    for step in range(start_step, num_steps):
      tic = time.perf_counter()
      batch = next_batch(source, target, mesh)
      state, metrics = step_fn(state, batch, jax.random.fold_in(train_rng, step))
      metrics = jax.device_get(metrics)
      done, epoch = step + 1, step // steps_per_epoch + 1
      bad = nonfinite_losses(metrics)
      if bad:
        names = ", ".join(f"{k} = {metrics[k]}" for k in bad)
        if config.train.on_nonfinite == "stop":
          checkpointer.wait_until_finished()
          raise FloatingPointError(
              f"Non-finite loss at step {done} (epoch {epoch}): {names}. Training stopped; the last "
              f"checkpoint (step {checkpointer.latest_step()}) is intact. Lower the learning rates or loss "
              "weights, or set config.train.on_nonfinite='skip' to skip such steps.")
        writer.print(f"Step {done}: skipped (non-finite {names}).")
      train_metrics.add(metrics, time.perf_counter() - tic, counted=not bad)
      writer.advance(done)
      if done % config.train.log_every_steps == 0 or done == num_steps:
        writer.write_scalars(done, train_metrics.row(epoch))
      if translate_fn is not None and (done % config.train.sample_every_steps == 0 or done == num_steps):
        save_samples(config, translate_fn, state, batch, done, workdir)

      results = None
      if eval_due(done, steps_per_epoch, num_steps, config.train.eval_every_epochs):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        results = evaluate_all(config, feature_fn, variables, mesh, done, workdir, writer,
                               visrank=done == num_steps, streams=eval_streams)
      stopping = stop(done)
      periodic = done % config.train.checkpoint_every_steps == 0
      if results is not None or stopping or periodic or done == num_steps:
        best = {"mAP": results[config.data.eval_datasets[0]]["mAP"]} if results else None
        checkpointer.save(done, state, iterators=iterators, rng=train_rng, metrics=best,
                          metadata=dict(metadata, epoch=done / steps_per_epoch))
      if stopping:
        writer.print(f"Stop requested (SIGTERM/preemption): checkpoint saved at step {done}; rerun the same "
                     "command to resume.")
        break
  finally:
    checkpointer.wait_until_finished()
    checkpointer.close()
    stop.close()
    writer.close()
  return state


def restore_for_inference(config, workdir, step=None, mesh=None):
  """The networks and their variables (replicated on `mesh`) from a train or inference checkpoint.

  Only what test-time features and translation need is read: the generator (or stem) and the re-ID network.
  -> (models, variables {"params", "batch_stats"}, step).
  """
  mesh = sharding.create_mesh() if mesh is None else mesh
  checkpointer = checkpointing.Checkpointer(workdir, iterator_names=())
  try:
    step = checkpointer.resolve_step(step)
    metadata = checkpointer.metadata(step)
    num_classes = int(metadata["num_classes"])
    abstract = jax.eval_shape(lambda key: train_state.create_train_state(config, key, num_classes)[0],
                              jax.random.key(0))
    replicated = sharding.replicated_sharding(mesh)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            {"params": abstract.params, "batch_stats": abstract.batch_stats})
    encoder = "stem" if config.model.backbone == "resnet50" else "generator"
    variables, _ = checkpointer.restore_variables(template, step=step, networks=(encoder, "reid"))
  finally:
    checkpointer.close()
  return build_models(config, num_classes), variables, step


def evaluate(config, workdir, step=None):
  """Evaluates config.data.eval_datasets with the latest (or `step`) checkpoint; -> {dataset: results}."""
  workdir, mesh = _prepare(config, workdir)
  models, variables, step = restore_for_inference(config, workdir, step, mesh)
  if jax.process_index() == 0:
    print(f"Evaluating {workdir} at step {step}.", flush=True)
  return evaluate_all(config, features.make_feature_fn(models, config, mesh), variables, mesh, step, workdir,
                      visrank=True)


@dataclasses.dataclass(frozen=True)
class _FileRecord:
  """An image file as an eval-pipeline record; the bytes are read only when the pipeline asks for them."""
  path: str
  pid: int
  camid: int
  filename: str

  def __getitem__(self, key):
    if key == "image":
      with open(self.path, "rb") as f:
        return f.read()
    return getattr(self, key)

  def get(self, key, default=None):
    return self[key] if key in ("image", "pid", "camid", "filename") else default


def list_image_files(input_dir):
  """Relative paths of every image under input_dir (recursively, sorted)."""
  input_dir = os.path.expanduser(input_dir)
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"--input_dir {input_dir} is not a directory.")
  paths = sorted(os.path.relpath(os.path.join(root, name), input_dir)
                 for root, _, names in os.walk(input_dir) for name in names
                 if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))
  if not paths:
    raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under --input_dir {input_dir}.")
  return paths


def parse_identity(filename):
  """(pid, 0-based camid) from a re-ID file name, or (-1, -1) when it follows no known pattern."""
  for pattern in FILENAME_PATTERNS:
    match = pattern.match(os.path.basename(filename))
    if match:
      return int(match.group("pid")), int(match.group("cam")) - 1
  return UNPARSED, UNPARSED


def _folder_stream(config, input_dir, paths):
  records = [_FileRecord(os.path.join(input_dir, p), *parse_identity(p), p) for p in paths]
  return input_pipeline.create_eval_pipeline(config, "input_dir", "images", records=records)


def translate(config, workdir, input_dir, output_dir, step=None):
  """Writes G(x) for every image under input_dir to output_dir (same relative names, at the config's size)."""
  workdir, mesh = _prepare(config, workdir)
  if config.model.backbone != "generator":
    raise ValueError(f"--mode=translate needs a generator; config.model.backbone={config.model.backbone!r}.")
  models, variables, step = restore_for_inference(config, workdir, step, mesh)
  input_dir = os.path.expanduser(input_dir)
  paths = list_image_files(input_dir)
  stream = _folder_stream(config, input_dir, paths)
  generate = jax.jit(lambda params, x: models.generator.apply({"params": params["generator"]}, x),
                     in_shardings=(sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)),
                     out_shardings=sharding.batch_sharding(mesh))
  is_main = jax.process_index() == 0
  for batch in tqdm.tqdm(stream, total=len(stream), unit="batch", disable=not is_main, desc="translate"):
    images = sharding.make_global_batch(np.asarray(batch["image"], np.float32), mesh)
    out = _to_uint8(features.to_host(generate(variables["params"], images)), config)
    mask, index = (features.to_host(np.asarray(batch[k])) for k in ("mask", "index"))
    if not is_main:
      continue
    for image, keep, i in zip(out, mask, index):
      if keep:
        path = os.path.join(os.path.expanduser(output_dir), paths[i])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        options = {} if path.lower().endswith(".png") else {"quality": JPEG_QUALITY}
        Image.fromarray(image).save(path, **options)
  if is_main:
    print(f"Translated {len(paths)} images with the step-{step} generator into {output_dir}.", flush=True)


def extract(config, workdir, input_dir, output, step=None):
  """Writes the re-ID features of every image under input_dir to an .npz (features, paths, pids, camids)."""
  workdir, mesh = _prepare(config, workdir)
  models, variables, step = restore_for_inference(config, workdir, step, mesh)
  input_dir = os.path.expanduser(input_dir)
  paths = list_image_files(input_dir)
  stream = _folder_stream(config, input_dir, paths)
  feature_fn = features.make_feature_fn(models, config, mesh)
  out = features.compute_features(feature_fn, variables, stream, mesh)
  if jax.process_index() == 0:
    output = os.path.expanduser(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    np.savez(output, features=out["features"].astype(np.float32), paths=np.asarray(paths),
             pids=out["pid"].astype(np.int64), camids=out["camid"].astype(np.int64))
    num, dim = out["features"].shape
    print(f"Wrote {num} x {dim} features (step {step}) to {output}.", flush=True)
  return out
