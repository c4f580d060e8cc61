"""Times the full train step (G, D, F, R, every loss and optimiser) at full size on random data.

python benchmarks/train_step.py --config=configs/gta2duke.py [--batch_size=2 --steps=5 --num_classes=538
                                --dtype=bfloat16 --remat --all_losses --json] [--config.<key>=<value>]
Reports the compile time, the median step time (wall and process CPU seconds: on a shared machine the CPU time
is the steadier one), images/s, the FLOPs of one step from XLA's cost analysis of the compiled step, its peak
memory (XLA's buffer assignment, and the process's peak RSS) and the utilisation: FLOPs per step / step time /
the peak FLOP rate of a large float32 matmul measured in the same process with the same threads. With --json
the last line of stdout is one JSON object of the measurements.
"""

import functools
import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.memory import generator_saved_bytes  # noqa: E402
from synth_reid_jax import sharding, train_state, train_step  # noqa: E402
from synth_reid_jax.models import build_models  # noqa: E402

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/gta2duke.py.")
flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's train.batch_size).")
flags.DEFINE_integer("steps", 5, "Timed steps after the warm-up step.")
flags.DEFINE_integer("num_classes", 538, "Source identities (the re-ID classifier's width).")
flags.DEFINE_string("dtype", None, "Compute dtype: float32 or bfloat16 (default: the config's model.dtype).")
flags.DEFINE_bool("remat", None, "Rematerialise the generator's residual blocks (default: model.remat).")
flags.DEFINE_bool("all_losses", False, "Also switch on the optional identity PatchNCE and triplet terms.")
flags.DEFINE_integer("matmul_size", 4096, "Side of the square float32 matmul measuring the peak FLOP rate.")
flags.DEFINE_integer("matmul_repeats", 5, "Matmuls timed for the peak; the best counts.")
flags.DEFINE_bool("json", False, "End with one JSON line of the measurements.")
flags.mark_flags_as_required(["config"])

STEPS_PER_EPOCH = 1000  # only the learning-rate schedule reads it; any value > 1 step gives the same work
BYTES_PER_KIB = 1024
OPTIONAL_LOSS_WEIGHT = 0.5  # --all_losses: weight of the identity PatchNCE and the triplet loss


def _flops(compiled) -> float:
  """Floating-point operations of one call, from XLA's cost analysis (a multiply-add counts as two)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):  # older jax: one dict per computation
    return float(sum(a.get("flops", 0.0) for a in analysis))
  return float(analysis.get("flops", 0.0))


def _xla_peak_bytes(compiled) -> int | None:
  """Arguments + outputs (minus the donated ones they alias) + temporaries of XLA's buffer assignment."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes)


def _timed(fn):
  """(result, wall seconds, process CPU seconds) of fn()."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  jax.block_until_ready([leaf for leaf in jax.tree.leaves(out) if isinstance(leaf, jax.Array)])
  return out, time.perf_counter() - wall, time.process_time() - cpu


def peak_matmul_flops(size: int, repeats: int) -> tuple[float, float]:
  """Best FLOP rate of a float32 (size x size) @ (size x size) matmul: the machine's practical peak.

  Returns (FLOP per wall second, FLOP per process CPU second); the second is what one busy thread reaches.
  """
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), jnp.float32) for k in keys)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  jax.block_until_ready(matmul(a, b))
  times = [_timed(lambda: matmul(a, b))[1:] for _ in range(repeats)]
  flops = 2.0 * size ** 3
  return flops / min(wall for wall, _ in times), flops / min(cpu for _, cpu in times)


def build_config():
  config = _CONFIG.value
  with config.unlocked():
    if FLAGS.batch_size is not None:
      config.train.batch_size = FLAGS.batch_size
    if FLAGS.dtype is not None:
      config.model.dtype = FLAGS.dtype
    if FLAGS.remat is not None:
      config.model.remat = FLAGS.remat
    if FLAGS.all_losses:
      config.loss.nce_idt = OPTIONAL_LOSS_WEIGHT
      config.loss.reid_triplet = OPTIONAL_LOSS_WEIGHT
  return config


def random_batch(config, num_classes, mesh):
  """A batch of uniform [-1, 1] source and target images and random identities."""
  rng = np.random.default_rng(0)
  shape = (config.train.batch_size, config.data.height, config.data.width, 3)
  return sharding.make_global_batch({
      "source": rng.uniform(-1, 1, shape).astype(np.float32),
      "pid": rng.integers(0, num_classes, shape[0]).astype(np.int32),
      "target": rng.uniform(-1, 1, shape).astype(np.float32),
  }, mesh)


def time_steps(compiled, state, batch, steps: int):
  """Runs one warm-up step, then `steps` timed ones: ([wall seconds], [CPU seconds], [minor page faults])."""
  state, metrics = compiled(state, batch, jax.random.key(0))
  jax.block_until_ready(metrics)
  walls, cpus, faults = [], [], []
  for i in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (state, metrics), wall, cpu = _timed(functools.partial(compiled, state, batch, jax.random.key(i + 1)))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    walls.append(wall)
    cpus.append(cpu)
  nonfinite = [name for name, value in metrics.items() if not np.isfinite(float(value))]
  if nonfinite:
    raise RuntimeError(f"the benchmark step produced non-finite metrics {nonfinite}")
  return walls, cpus, faults


def main(argv):
  del argv
  config = build_config()
  num_classes = FLAGS.num_classes
  mesh = sharding.create_mesh()

  (state, optimizers), init_seconds, init_cpu = _timed(
      lambda: train_state.create_train_state(config, jax.random.key(0), num_classes))
  state = sharding.replicate(state, mesh)
  batch = random_batch(config, num_classes, mesh)
  step = train_step.make_train_step(config, build_models(config, num_classes), optimizers, STEPS_PER_EPOCH,
                                    mesh)

  start = time.perf_counter()
  compiled = step.lower(state, batch, jax.random.key(0)).compile()
  compile_seconds = time.perf_counter() - start
  flops = _flops(compiled) * mesh.devices.size  # the cost analysis is of one device's program
  # XLA:GPU's cost analysis leaves out the convolutions it hands to cuDNN (19 of 2,227 GFLOP at batch 8 on an
  # H200): there the utilisation would be meaningless. The CPU count of the same step is the one to use.
  flops_complete = jax.default_backend() == "cpu"
  xla_peak = _xla_peak_bytes(compiled)

  results = {
      "config": config_flags.get_config_filename(FLAGS["config"]),
      "batch_size": config.train.batch_size,
      "height": config.data.height,
      "width": config.data.width,
      "dtype": config.model.dtype,
      "remat": bool(config.model.remat),
      "all_losses": FLAGS.all_losses,
      "devices": mesh.devices.size,
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "init_seconds": init_seconds,
      "init_cpu_seconds": init_cpu,
      "compile_seconds": compile_seconds,
      "flops_per_step": flops,
      "flops_complete": flops_complete,
      "xla_peak_memory_bytes": xla_peak,
      "generator_saved_bytes": generator_saved_bytes(config, config.train.batch_size),
  }
  if FLAGS.steps > 0:
    # The matmul peak is taken before and after the steps (best of both), so that a burst of load from other
    # jobs on a shared machine during one of them does not lower it.
    peaks = [peak_matmul_flops(FLAGS.matmul_size, FLAGS.matmul_repeats)]
    walls, cpus, faults = time_steps(compiled, state, batch, FLAGS.steps)
    peaks.append(peak_matmul_flops(FLAGS.matmul_size, FLAGS.matmul_repeats))
    peak_flops = max(wall for wall, _ in peaks)
    peak_flops_per_cpu_second = max(cpu for _, cpu in peaks)
    step_seconds, step_cpu_seconds = statistics.median(walls), statistics.median(cpus)
    results.update(
        step_seconds=step_seconds,
        step_seconds_min=min(walls),
        step_seconds_all=walls,
        step_cpu_seconds=step_cpu_seconds,
        images_per_s=config.train.batch_size / step_seconds,
        peak_flops=peak_flops,
        utilization=flops / step_seconds / peak_flops if flops_complete else None,
        # The same ratio in CPU time (FLOP per CPU second of the step vs of the matmul): how well each busy
        # thread is used, much less sensitive to other jobs on the machine than the wall-clock one.
        peak_flops_per_cpu_second=peak_flops_per_cpu_second,
        utilization_cpu=(flops / step_cpu_seconds / peak_flops_per_cpu_second if flops_complete else None),
        page_faults_per_step=statistics.median(faults),
    )
  else:  # --steps=0: compile only (memory and FLOPs), e.g. for a dtype / remat comparison
    results.update({key: None for key in ("step_seconds", "images_per_s", "peak_flops", "utilization")})
  results["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * BYTES_PER_KIB
  results["peak_memory_bytes"] = xla_peak if xla_peak is not None else results["max_rss_bytes"]
  results["load_average"] = os.getloadavg()[0]
  print_summary(results)
  if FLAGS.json:
    print(json.dumps(results))


def print_summary(r):
  gib = lambda n: f"{n / 2 ** 30:.2f} GiB" if n is not None else "n/a"
  print(f"train step: batch {r['batch_size']}, {r['height']}x{r['width']}, {r['dtype']}, remat={r['remat']}, "
        f"all_losses={r['all_losses']}, {r['devices']} device(s), {os.cpu_count()} cpus, load average "
        f"{r['load_average']:.2f}")
  print(f"  init              {r['init_seconds']:8.2f} s   (cpu {r['init_cpu_seconds']:.2f} s)")
  print(f"  compile           {r['compile_seconds']:8.2f} s")
  print(f"  GFLOP per step    {r['flops_per_step'] / 1e9:8.1f}   (XLA cost analysis)")
  if r["step_seconds"] is not None:
    print(f"  step (median)     {r['step_seconds']:8.3f} s   (min {r['step_seconds_min']:.3f} s; cpu "
          f"{r['step_cpu_seconds']:.3f} s; {FLAGS.steps} steps; {r['page_faults_per_step']:.0f} page faults)")
    print(f"  images/s          {r['images_per_s']:8.2f}")
    print(f"  peak GFLOP/s      {r['peak_flops'] / 1e9:8.1f}   ({FLAGS.matmul_size}^2 float32 matmul, "
          f"best of {FLAGS.matmul_repeats})")
    if r["utilization"] is None:
      print("  utilization           n/a   (this backend's cost analysis misses library convolutions)")
    else:
      print(f"  utilization       {r['utilization']:8.2f}   (cpu time: {r['utilization_cpu']:.2f} of "
            f"{r['peak_flops_per_cpu_second'] / 1e9:.1f} GFLOP per cpu second)")
  print(f"  peak memory       {gib(r['xla_peak_memory_bytes'])} (XLA buffers), "
        f"max RSS {gib(r['max_rss_bytes'])}")
  print(f"  G saved for bwd   {gib(r['generator_saved_bytes'])} (activations G's backward pass reads)")


if __name__ == "__main__":
  app.run(main)
