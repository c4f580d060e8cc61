"""The training loop: the jitted step over the source and target streams, with evaluation, sample grids,
checkpoints and metrics.

The loop does not wait for the devices between two fetches. The next global batch is read, decoded and placed
on the devices by a background thread (prefetch.py) while the current step runs; the step's metrics stay on
the devices and are fetched every train.log_every_steps steps and before any sample grid, evaluation or
checkpoint; the step's random key is folded in inside the step. A step with a non-finite loss or gradient
changes nothing but the step counter (train_step.py), so the state - and every checkpoint - stays finite;
with train.on_nonfinite="stop" the loop stops at the fetch that sees such a step, before saving anything.
"""

import os
import signal
import threading
import time

import jax
import numpy as np

from synth_reid_jax import checkpointing, config_checks, features, input_pipeline, sharding, train_state
from synth_reid_jax import train_step as train_step_lib
from synth_reid_jax.errors import NonFiniteLossError
from synth_reid_jax.evaluator import Evaluator
from synth_reid_jax.inference import prepare
from synth_reid_jax.metric_writer import MetricWriter
from synth_reid_jax.models import build_models
from synth_reid_jax.prefetch import Prefetcher
from synth_reid_jax.storage import storage_errors
from synth_reid_jax.tools.import_torch import missing_imagenet_notice
from synth_reid_jax.transforms import to_uint8
from synth_reid_jax.workdir_lock import WorkdirLock

SAMPLES_DIR = "samples"
# Global batches prepared ahead of the running step (each holds a source and a target batch on the devices).
PREFETCH_BATCHES = 2


def num_train_steps(config, steps_per_epoch):
  """config.train.num_steps when set, else num_epochs whole epochs over the source."""
  return config.train.num_steps or config.train.num_epochs * steps_per_epoch


def next_batch(source, target, mesh):
  """The global train batch {"source", "pid", "target"}; target is None when no loss reads real images."""
  s = next(source.iterator)
  batch = sharding.make_global_batch({"source": s["image"], "pid": s["pid"]}, mesh)
  batch["target"] = None
  if target is not None:
    batch["target"] = sharding.make_global_batch(next(target.iterator)["image"], mesh)
  return batch


def create_replicated_state(config, rng, num_classes, mesh):
  """create_train_state as one compiled program whose output lands replicated on the mesh."""
  optimizers = {}

  def init(key):
    state, built = train_state.create_train_state(config, key, num_classes)
    optimizers.update(built)  # plain Python objects made from the config while tracing
    return state

  state = jax.jit(init, out_shardings=sharding.replicated_sharding(mesh))(rng)
  return state, optimizers


def eval_due(done, steps_per_epoch, num_steps, eval_every_epochs):
  """After the last step, and at the end of every eval_every_epochs-th epoch."""
  epoch_end = done % steps_per_epoch == 0
  return done == num_steps or (epoch_end and (done // steps_per_epoch) % eval_every_epochs == 0)


# --- Samples ---------------------------------------------------------------------------------------


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
    visualize.save_image_grid([to_uint8(images, config.data.mean, config.data.std) for images in rows], path)


# --- Metrics and signals ---------------------------------------------------------------------------


class TrainMetrics:
  """The step metrics between fetches (on the devices), their averages between log rows, and images/s over
  the time the loop spent stepping (evaluation, samples and checkpoints excluded)."""

  def __init__(self, batch_size):
    self.batch_size = batch_size
    self._pending = []  # (step, device metrics) since the last fetch
    self._sums, self._count, self._images, self._seconds = {}, 0, 0, 0.0
    self._since = None

  def add(self, step, metrics):
    self._pending.append((step, metrics))
    self._images += self.batch_size

  def resume(self):
    """The loop starts (again) dispatching steps."""
    self._since = time.perf_counter()

  def fetch(self):
    """Waits for the pending steps and reads their metrics: -> [(step, {name: float})]. Skipped steps do not
    enter the averages."""
    steps = [step for step, _ in self._pending]
    values = jax.device_get([metrics for _, metrics in self._pending])
    fetched = [(step, {k: float(v) for k, v in host.items()}) for step, host in zip(steps, values)]
    self._pending = []
    if self._since is not None:
      self._seconds += time.perf_counter() - self._since
      self._since = None
    for _, values in fetched:
      if values.get(train_step_lib.NONFINITE_METRIC, 0.0) > 0:
        continue
      for key, value in values.items():
        self._sums[key] = self._sums.get(key, 0.0) + value
      self._count += 1
    return fetched

  def row(self, epoch):
    """The averages since the last row (steps skipped by the non-finite guard counted in "nonfinite")."""
    row = {"epoch": epoch, **{k: v / max(self._count, 1) for k, v in self._sums.items()},
           "images_per_sec": self._images / max(self._seconds, 1e-9)}
    self._sums, self._count, self._images, self._seconds = {}, 0, 0, 0.0
    return row


def nonfinite_losses(metrics):
  """Names of the loss terms (host values) that are NaN or infinite."""
  return [k for k in train_step_lib.LOSS_METRICS if k in metrics and not np.isfinite(metrics[k])]


def check_nonfinite(fetched, config, steps_per_epoch, checkpointer, writer):
  """Acts on the steps the non-finite guard skipped: raises (on_nonfinite="stop") or reports them."""
  skipped = [(step, values) for step, values in fetched
             if values.get(train_step_lib.NONFINITE_METRIC, 0.0) > 0]
  if not skipped:
    return
  step, values = skipped[0]
  names = ", ".join(f"{k} = {values[k]}" for k in nonfinite_losses(values)) or "a gradient"
  if config.train.on_nonfinite == "stop":
    checkpointer.wait_until_finished()
    latest = checkpointer.latest_step()
    kept = (f"the newest checkpoint (step {latest}) holds no non-finite values" if latest is not None
            else "no checkpoint was written yet")
    raise NonFiniteLossError(
        f"Non-finite loss at step {step} (epoch {(step - 1) // steps_per_epoch + 1}): {names}. The step's "
        f"update was skipped and training stopped; {kept}. Lower the learning rates or loss weights, or set "
        "config.train.on_nonfinite='skip' to skip such steps.")
  for step, values in skipped:
    names = ", ".join(f"{k} = {values[k]}" for k in nonfinite_losses(values)) or "a gradient"
    writer.print(f"Step {step}: skipped (non-finite {names}).")


class DivergenceWatch:
  """Warns once when a logged loss grows past `factor` times its first logged value (a finite run can
  still diverge: losses of 1e14 are finite); the rows from then on carry "diverging": 1."""

  def __init__(self, factor):
    self.factor, self.first, self.warned = factor, {}, False

  def check(self, step, row, writer):
    diverged = []
    for key in train_step_lib.LOSS_METRICS:
      value = row.get(key)
      if value is None or not np.isfinite(value) or value == 0:
        continue
      first = self.first.setdefault(key, abs(value))
      if abs(value) > self.factor * first:
        diverged.append((key, value, first))
    if diverged:
      row["diverging"] = 1.0
      if not self.warned:
        self.warned = True
        key, value, first = max(diverged, key=lambda d: d[1] / d[2])
        writer.print(f"WARNING: step {step}: {key} = {value:.4g}, {value / first:.3g} times its first logged "
                     f"value ({first:.4g}): training is diverging. Lower the learning rates "
                     "(config.optim.*.lr) or the loss weights (this warning: "
                     f"config.train.divergence_factor={self.factor:g}).")
    return row


class StopRequest:
  """Set by SIGTERM or a first Ctrl-C (single process), or a preemption notice reached by every host
  (multi-host). A second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint.

  A process started with SIGINT ignored (`nohup`, a background job of a script) keeps ignoring it, as the
  one who started it asked: SIGTERM still stops it with a checkpoint.
  """

  def __init__(self, checkpointer, writer):
    self._checkpointer, self._writer, self._flag = checkpointer, writer, threading.Event()
    self._previous = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
      if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

  def _interrupt(self, *_):
    if self._flag.is_set():
      raise KeyboardInterrupt
    self._flag.set()
    self._writer.print("Ctrl-C: stopping after this step with a checkpoint; press Ctrl-C again to quit at "
                       "once (losing the steps since the last checkpoint).")

  def __call__(self, step):
    if jax.process_count() > 1:
      return self._checkpointer.reached_preemption(step)
    return self._flag.is_set()

  def close(self):
    for number, handler in self._previous.items():
      signal.signal(number, handler)


# --- The loop ----------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir):
  """Trains on config.data.source with config.data.target alongside, evaluating every eval_every_epochs.

  Resumes from the latest checkpoint in workdir (state, data iterators, rng and metrics.jsonl), refusing a
  config that changes what its checkpoints mean (config_checks.RESUMABLE_KEYS lists what may change).
  Returns the final state.
  """
  config_checks.validate_config(config)
  config_checks.check_workdir_config(config, workdir, resume=True)
  workdir, mesh = prepare(config, workdir)
  # Process 0 writes the workdir (config.json, metrics, samples, eval/): one run at a time.
  lock = WorkdirLock(workdir, "train") if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
    if lock.took_over:
      print(f"Took over the workdir lock of {lock.took_over}, which is no longer running.", flush=True)
  try:
    # A full disk or lost permissions while writing metrics, samples or config.json: one line.
    with storage_errors(workdir, "Training stopped; the checkpoints written before it are intact: "
                        "free space (or fix the permissions) and rerun the same command to resume."):
      return _train(config, workdir, mesh)
  finally:
    if lock is not None:
      lock.release()


def open_eval_datasets(evaluator, config):
  """Reads every evaluated split's labels now, so that a dataset that cannot be read stops the run before it
  trains rather than at its first evaluation."""
  names = list(config.data.eval_datasets)
  if config.data.get("val"):
    names.insert(0, input_pipeline.val_name(config))
  for name in names:
    evaluator.streams(name)


def make_adabn(config, models, mesh):
  """config.eval.adabn: -> state -> the state with R's BatchNorm statistics re-estimated on the target's
  training images (features.adapted_batch_stats over input_pipeline.create_target_train_pipeline); None when
  off. The target is opened here, so that an unreadable one stops the run before it trains."""
  if not config.eval.get("adabn"):
    return None
  stream = input_pipeline.create_target_train_pipeline(config, config.eval.batch_size, mesh.devices.size)
  batch_stats_fn = features.make_batch_stats_fn(models, mesh)

  def adapt(state):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    stats = features.adapted_batch_stats(batch_stats_fn, variables, stream, mesh)
    return state.replace(batch_stats={**state.batch_stats, "reid": stats})

  return adapt


def _train(config, workdir, mesh):
  is_main = jax.process_index() == 0
  # The data first: what only it can judge (validation identities, identities per PK batch, a batch larger
  # than the dataset) is checked as its labels are read, before config.json is written or anything compiles,
  # so that a failed start leaves the workdir as it was.
  source = input_pipeline.create_source_pipeline(config)
  target = None
  if config_checks.needs_target(config):
    target = input_pipeline.create_target_pipeline(config, source_steps_per_epoch=source.steps_per_epoch)
  iterators = {"source": source.iterator} | ({"target": target.iterator} if target is not None else {})
  steps_per_epoch = source.steps_per_epoch
  num_steps = num_train_steps(config, steps_per_epoch)
  if is_main:
    print(f"Source {config.data.source}: {source.num_images} images, {source.num_classes} identities, "
          f"{steps_per_epoch} steps/epoch; {num_steps} steps in all"
          + (f"; target {config.data.target}: {target.num_images} images" if target is not None else ""),
          flush=True)
    if notice := missing_imagenet_notice(config):  # a baseline without the original's ImageNet start
      print(notice, flush=True)
  models = build_models(config, source.num_classes)
  evaluator = Evaluator(config, models, mesh, workdir)
  open_eval_datasets(evaluator, config)
  adabn = make_adabn(config, models, mesh)
  if is_main:
    config_checks.write_config(config, workdir)  # the run starts: every check passed

  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state, optimizers = create_replicated_state(config, init_rng, source.num_classes, mesh)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                            iterator_names=tuple(iterators))
  if checkpointer.latest_step() is not None:
    report = lambda line: print(line, flush=True) if is_main else None
    resumed = checkpointer.restore_newest_intact(state, iterators=iterators, rng=train_rng, report=report)
    if resumed is not None:
      state, train_rng, restored = resumed
      epoch = restored.get("epoch", 0)
      report(f"Resumed from {checkpointer.directory}/{int(state.step)} (epoch {epoch:.2f}).")
    else:
      report("No intact checkpoint left: training starts from step 0.")
  start_step = int(state.step)
  if start_step >= num_steps:
    if is_main:
      print(f"Training already reached step {start_step} of {num_steps}; nothing to do (--mode=eval "
            "evaluates).")
    checkpointer.close()
    return state

  step_fn = train_step_lib.make_train_step(config, models, optimizers, steps_per_epoch, mesh)
  translate_fn = make_translate_fn(models) if config.model.backbone == "generator" else None
  metadata = {"num_classes": source.num_classes, "steps_per_epoch": steps_per_epoch,
              "config": config_checks.config_json(config)}
  train = config.train

  writer = MetricWriter(workdir, enabled=is_main, initial_step=start_step, total_steps=num_steps)
  evaluator.writer = writer
  stop = StopRequest(checkpointer, writer)
  divergence = DivergenceWatch(train.divergence_factor)
  train_metrics = TrainMetrics(train.batch_size)
  batches = Prefetcher(lambda: next_batch(source, target, mesh),
                       lambda: {name: iterator.get_state() for name, iterator in iterators.items()},
                       PREFETCH_BATCHES)
  try:
    train_metrics.resume()
    for step in range(start_step, num_steps):
      batch, iterator_states = next(batches)
      state, metrics = step_fn(state, batch, train_rng)
      done, epoch = step + 1, step // steps_per_epoch + 1
      train_metrics.add(done, metrics)
      writer.advance(done)

      log = done % train.log_every_steps == 0 or done == num_steps
      sample = translate_fn is not None and (done % train.sample_every_steps == 0 or done == num_steps)
      evaluate = eval_due(done, steps_per_epoch, num_steps, train.eval_every_epochs)
      stopping = stop(done)
      checkpoint = evaluate or stopping or done % train.checkpoint_every_steps == 0 or done == num_steps
      if not (log or sample or evaluate or checkpoint):
        continue
      # Everything below reads the state or the metrics: wait for the steps dispatched so far.
      check_nonfinite(train_metrics.fetch(), config, steps_per_epoch, checkpointer, writer)
      if log:
        writer.write_scalars(done, divergence.check(done, train_metrics.row(epoch), writer))
      if sample:
        save_samples(config, translate_fn, state, batch, done, workdir)
      if adabn is not None and (evaluate or checkpoint):  # what is evaluated is what is saved
        state = adabn(state)
      results, failed = None, None
      if evaluate:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        try:
          results = evaluator.run(variables, done, visrank=done == num_steps, validation=True)
        except Exception as e:  # saved first, raised below: a failed evaluation must not lose the training
          failed = e
      if checkpoint:
        # The kept "best" checkpoint is ranked on the validation split when config.data.val is on.
        selected = evaluator.selection_dataset()
        best = {"mAP": results[selected]["mAP"]} if results and selected in results else None
        selection = {"selected_on": selected, **(best or {})}
        checkpointer.save(done, state, iterator_states=iterator_states, rng=train_rng, metrics=best,
                          metadata=dict(metadata, epoch=done / steps_per_epoch, selection=selection))
      if failed is not None:
        checkpointer.wait_until_finished()
        writer.print(f"Evaluation at step {done} failed; the training up to it is saved (checkpoint {done}): "
                     "rerun the same command to resume once the error below is fixed.")
        raise failed
      if stopping:
        checkpointer.wait_until_finished()
        writer.print(f"Stop requested (SIGTERM, Ctrl-C or preemption): checkpoint saved at step {done}; "
                     "rerun the same command to resume.")
        break
      train_metrics.resume()
  finally:
    batches.close()
    stop.close()
    try:
      writer.close()  # its last events and rows reach the disk here; a full disk raises
    finally:
      try:
        checkpointer.wait_until_finished()
      finally:
        checkpointer.close()
  return state
