"""How much of the device's speed the training loop keeps: the real loop against the bare jitted step.

python benchmarks/loop_overhead.py [--config=configs/demo.py --steps=120 --data_dir=<dir> --json]
                                   [--config.<key>=<value>]

1. The real loop: `trainer.train_and_evaluate` on a fresh workdir (data pipeline, prefetching of global
   batches, metric handling, metrics.jsonl, TensorBoard, the progress bar). Its steps/s come from the
   metrics.jsonl rows after the first (the first holds the warm-up), each row's images/s covering the steps
   since the previous row; evaluation, samples and checkpoints happen outside those intervals.
2. The bare step: the same compiled step function, state and batches (the first `--steps` batches of the same
   stream, placed on the devices beforehand), called in a tight loop and waited for once at the end; timed
   before and after the real loop(s), the mean of the two taken (a shared machine's speed drifts).
3. The real loop again with the input pipeline replaced by batches already on the devices (`--cached`, on by
   default): what the loop itself costs, apart from building batches. On a machine whose cores also run the
   step (a CPU backend), building batches takes cycles from the step; on a GPU host it should not.

The last stdout line (with --json) is one JSON object with `loop_steps_per_s`, `bare_steps_per_s` and
`ratio` (= loop / bare), and `loop_cached_steps_per_s` and `ratio_cached`. A small config (the demo's 64x32
images and narrow networks by default) makes the host's share visible: at full size a CPU step takes seconds
and any loop looks free.
"""

import contextlib
import itertools
import json
import os
import sys
import tempfile
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from synth_reid_jax import (  # noqa: E402
    config_checks,
    input_pipeline,
    metric_writer,
    sharding,
    train_step,
    trainer,
)
from synth_reid_jax.models import build_models  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config (default: the demo).")
flags.DEFINE_integer("steps", 120, "Train steps of each run.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the config's data.data_dir).")
flags.DEFINE_string("workdir", None, "Workdir of the real loop (default: a temporary directory).")
flags.DEFINE_bool("cached", True, "Also time the real loop on batches already on the devices.")
flags.DEFINE_string("trace_dir", None, "Write a jax.profiler trace of the real loop here.")
flags.DEFINE_bool("json", False, "End with one JSON line of the measurements.")

# Every periodic job other than logging happens once, after the last step, outside the timed intervals.
NEVER = 10 ** 9


def build_config():
  config = _CONFIG.value
  with config.unlocked():
    config.train.num_steps = FLAGS.steps
    config.train.eval_every_epochs = NEVER
    config.train.checkpoint_every_steps = NEVER
    config.train.sample_every_steps = NEVER
    config.eval.visrank_topk = 0
    if FLAGS.data_dir:
      config.data.data_dir = FLAGS.data_dir
  return config


def loop_rate(config, workdir):
  """Steps/s of the real loop over the logged intervals after the first; -> (steps/s, steps counted)."""
  start = time.perf_counter()
  trainer.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  rows = metric_writer.read_metrics(workdir)
  if len(rows) < 3:
    raise SystemExit(f"Only {len(rows)} metrics rows: use more --steps than 2 x config.train.log_every_steps "
                     f"({config.train.log_every_steps}).")
  steps = seconds = 0.0
  for previous, row in zip(rows[1:], rows[2:]):
    n = row["step"] - previous["step"]
    steps += n
    seconds += n * config.train.batch_size / row["images_per_sec"]
  return steps / seconds, int(steps), wall


def device_batches(config, steps):
  """The first `steps` global batches of the config's streams, on the devices."""
  mesh = sharding.create_mesh()
  source = input_pipeline.create_source_pipeline(config)
  target = None
  if config_checks.needs_target(config):
    target = input_pipeline.create_target_pipeline(config, source_steps_per_epoch=source.steps_per_epoch)
  return source, [trainer.next_batch(source, target, mesh) for _ in range(steps)]


@contextlib.contextmanager
def cached_batches(batches):
  """The trainer's batches come from `batches` (cycled) instead of its input pipeline."""
  cycle = itertools.cycle(batches)
  original = trainer.next_batch
  trainer.next_batch = lambda source, target, mesh: next(cycle)
  try:
    yield
  finally:
    trainer.next_batch = original


def bare_timer(config, source, batches):
  """A function -> steps/s of the compiled step in a tight loop over batches already on the devices
  (compiled here, once; each call continues from the state the previous one left)."""
  mesh = sharding.create_mesh()
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  state, optimizers = trainer.create_replicated_state(config, init_rng, source.num_classes, mesh)
  step_fn = train_step.make_train_step(config, build_models(config, source.num_classes), optimizers,
                                       source.steps_per_epoch, mesh)
  state, metrics = step_fn(state, batches[0], train_rng)  # compiles
  jax.block_until_ready(metrics)
  holder = [state]

  def rate():
    state = holder[0]
    start = time.perf_counter()
    for batch in batches[1:]:
      state, metrics = step_fn(state, batch, train_rng)
    jax.block_until_ready((state, metrics))
    holder[0] = state
    return (len(batches) - 1) / (time.perf_counter() - start)

  return rate


def main(argv):
  del argv
  config = build_config()
  source, batches = device_batches(config, FLAGS.steps)
  bare_rate = bare_timer(config, source, batches)
  # The bare step is timed before and after the real loops, and the ratios use the mean: a shared machine's
  # speed drifts over the minutes a run takes (bare_steps_per_s_before/_after show by how much).
  bare_before = bare_rate()
  with tempfile.TemporaryDirectory() as scratch:
    workdir = FLAGS.workdir or os.path.join(scratch, "run")
    tracing = jax.profiler.trace(FLAGS.trace_dir) if FLAGS.trace_dir else contextlib.nullcontext()
    with tracing:
      loop, counted, wall = loop_rate(config, workdir)
  cached = None
  if FLAGS.cached:
    with tempfile.TemporaryDirectory() as scratch, cached_batches(batches):
      cached = loop_rate(config, os.path.join(scratch, "run"))[0]
  bare_after = bare_rate()
  bare = (bare_before + bare_after) / 2
  results = {
      "config": config_flags.get_config_filename(FLAGS["config"]),
      "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "devices": jax.device_count(),
      "batch_size": config.train.batch_size,
      "height": config.data.height,
      "width": config.data.width,
      "steps": FLAGS.steps,
      "loop_steps_counted": counted,
      "loop_wall_seconds": wall,
      "loop_steps_per_s": loop,
      "bare_steps_per_s": bare,
      "bare_steps_per_s_before": bare_before,
      "bare_steps_per_s_after": bare_after,
      "ratio": loop / bare,
      "loop_cached_steps_per_s": cached,
      "ratio_cached": cached / bare if cached else None,
      "load_average": os.getloadavg()[0],
  }
  print(f"loop overhead: {results['config']}, batch {config.train.batch_size}, {config.data.height}x"
        f"{config.data.width}, {results['devices']} {results['backend']} device(s), "
        f"load {results['load_average']:.2f}")
  print(f"  real loop   {loop:8.2f} steps/s ({counted} steps after the first log row)")
  print(f"  bare step   {bare:8.2f} steps/s (mean of {bare_before:.2f} before and {bare_after:.2f} after)")
  print(f"  ratio       {loop / bare:8.3f}")
  if cached:
    print(f"  real loop on cached batches {cached:8.2f} steps/s, ratio {cached / bare:.3f}")
  if FLAGS.json:
    print(json.dumps(results))


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
