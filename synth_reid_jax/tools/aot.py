"""Compiles the train step and the test-time feature extractor for a Cloud TPU topology, from any machine.

  python -m synth_reid_jax.tools.aot --config=configs/gta2duke.py[:tiny] --topology=v5e:2x2 [--json]
      [--serialize=<file>] [--num_classes=538] [--config.<key>=<value>]

libtpu (the `[tpu]` extra) describes the chips of a topology as compile-only devices; this compiles for them
the program training would run - the same make_train_step, shardings and donation, the "auto" forms resolved
for TPU - over an abstract train state (jax.eval_shape: nothing is materialised), and evaluation's feature
extractor. It reports per chip what XLA:TPU's buffer assignment needs (arguments, outputs, temporaries, peak)
against the chip's HBM, the FLOPs and HBM bytes of one step, and a floor on the step time from the chip's
published peaks (CHIPS); and checks the compiled program for what would fail or crawl on a TPU: float64,
host callbacks, custom calls that are not XLA:TPU's own. The floor is a bound (every FLOP at the MXU's peak,
every byte at full HBM bandwidth, not both at once), not a prediction. --json ends stdout with one JSON
object. --serialize writes the compiled train step for a TPU VM with the same jax, jaxlib and libtpu to load
(docs/cloud_tpu.md).
"""

import contextlib
import json
import os
import pickle
import re
import sys
import tempfile
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags, defined when the tool runs, not on import: launch.py defines --config too, and
  the tests import both into one process."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/gta2duke.py (or configs/gta2duke.py:tiny); "
      "override any key with --config.<key>=<value>.", lock_config=True)
  flags.DEFINE_string("topology", None, "libtpu topology name: <generation>:<chips per axis>, e.g. v5e:2x2, "
                      "v5e:4x4, v6e:2x2, v4:2x2x1, v5p:2x2x1 (v4 and v5p count one device per chip, "
                      "megacore).")
  flags.DEFINE_integer("num_classes", 538, "Source identities (the re-ID classifier's width).")
  flags.DEFINE_bool("json", False, "End stdout with one JSON object of the results.")
  flags.DEFINE_string("serialize", None, "Write the compiled train step to this file (jax's "
                      "serialize_executable, pickled), for a TPU VM with the same jax/jaxlib/libtpu and "
                      "topology to load.")
  flags.mark_flags_as_required(["config", "topology"])


INSTALL_LINE = 'pip install "synth-reid-jax[tpu]" (or pip install "jax[tpu]=={version}")'
# libtpu's pattern for topology names ("v5litepod-8"-style accelerator types are not topologies).
TOPOLOGY_NAME = re.compile(r"^([a-zA-Z0-9_ ]+)[=_:]([0-9x]+)(_twisted|_untwisted)?$")
# v4 and v5p chips hold two TensorCores that JAX runs as one device ("megacore"); libtpu describes v4 per
# core unless asked for the megacore chip config.
MEGACORE_GENERATIONS = ("v4", "v5", "v5p")
# libtpu's default chips per host; a smaller topology (v5e:1x1) is one host of its own shape.
CHIPS_PER_HOST = (2, 2, 1)
STEPS_PER_EPOCH = 1000  # only the learning-rate schedule reads it; any value gives the same program

GIB = 2 ** 30
# Per chip, from Google Cloud's system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e,
# read 2026-12): peak bfloat16 FLOP/s of the MXUs, HBM capacity and HBM bandwidth in bytes/s. Keyed by
# jax's device_kind. The pages give v5e 16 GB and v6e 32 GB; XLA:TPU's buffer limit is 16 / 32 GiB.
CHIPS = {
    "TPU v4": {"name": "v4", "bf16_flops": 275e12, "hbm_bytes": 32 * GIB, "hbm_bandwidth": 1200e9},
    "TPU v5 lite": {"name": "v5e", "bf16_flops": 197e12, "hbm_bytes": 16 * GIB, "hbm_bandwidth": 819e9},
    "TPU v5": {"name": "v5p", "bf16_flops": 459e12, "hbm_bytes": 95 * 10 ** 9, "hbm_bandwidth": 2765e9},
    "TPU v6 lite": {"name": "v6e", "bf16_flops": 918e12, "hbm_bytes": 32 * GIB, "hbm_bandwidth": 1638e9},
}
# MXU passes of one float32 product per jax_default_matmul_precision: TPUs multiply bfloat16 only; by
# default a float32 convolution or matmul takes one pass over its inputs rounded to bfloat16, "high" three
# (bf16_3x), "highest" six (float32 accuracy). bfloat16 products always take one.
FLOAT32_PASSES = {None: 1, "default": 1, "bfloat16": 1, "high": 3, "tensorfloat32": 3, "bfloat16_3x": 3,
                  "highest": 6, "float32": 6}
# Custom calls a program may carry on a TPU: JAX's sharding annotations (resolved by XLA's partitioner) and
# Pallas/Mosaic TPU kernels. Any other in the lowered program belongs to another backend or the host.
TPU_OWN_CUSTOM_CALLS = ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                        "annotate_device_placement", "MoveToHost", "MoveToDevice", "tpu_custom_call",
                        "ShardBarrierFrom", "ShardBarrierTo")
OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory")
# XLA:TPU's refusal: "... memory required for HLO temporaries (22.95G) exceeds available HBM (15.75G)"
HBM_REQUIRED = re.compile(r"\(([0-9.]+)([KMGT])\) exceeds available HBM \(([0-9.]+)([KMGT])\)")
UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def fatal(message: str):
  sys.exit(f"FATAL {message}")


@contextlib.contextmanager
def _captured_stderr():
  """Holds back what libtpu's C++ runtime writes to stderr (warnings about a missing TPU VM environment,
  meaningless for compile-only devices); yields a function returning the text."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as held:
    os.dup2(held.fileno(), 2)
    try:
      yield lambda: (held.seek(0), held.read().decode(errors="replace"))[1]
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def topology_devices(name: str):
  """The compile-only devices of libtpu's topology `name` (one per chip)."""
  import jax
  from jax.experimental import topologies

  match = TOPOLOGY_NAME.match(name)
  if match is None:
    fatal(f"--topology={name!r} is not a libtpu topology name; give <generation>:<chips per axis>, e.g. "
          "v5e:2x2 (4 chips), v5e:4x4, v6e:2x2, v4:2x2x1 or v5p:2x2x1 (accelerator types such as "
          "v5litepod-8 are not topology names).")
  shape = [int(n) for n in match.group(2).split("x") if n] + [1, 1, 1]
  options = {"chips_per_host_bounds": tuple(min(n, bound) for n, bound in zip(shape, CHIPS_PER_HOST))}
  if match.group(1).lower() in MEGACORE_GENERATIONS:
    options["chip_config_name"] = "megacore"
  # Compile-only devices open no TPU: let this run beside a training process or another compile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  with _captured_stderr():
    try:
      return topologies.get_topology_desc(topology_name=name, platform="tpu", **options).devices
    except RuntimeError as e:  # also jax.errors.JaxRuntimeError
      text = str(e)
  if "TPU support not installed" in text:
    fatal(f"--topology needs libtpu, which is not installed: {INSTALL_LINE.format(version=jax.__version__)}.")
  reason = text.splitlines()[0] if text else "libtpu refused it"
  fatal(f"--topology={name!r} is not a topology libtpu knows ({reason}); e.g. v5e:2x2, v6e:2x2, v4:2x2x1, "
        "v5p:2x2x1.")


def abstract_inputs(config, num_classes: int, mesh):
  """(state, batch, rng, optimizers, variables, images): the train step's and the feature extractor's
  arguments as shapes with their shardings - what training would pass, nothing allocated."""
  import jax
  import jax.numpy as jnp

  from synth_reid_jax import config_checks, sharding, train_state

  optimizers = {}

  def init(key):
    state, built = train_state.create_train_state(config, key, num_classes, pretrained=False)
    optimizers.update(built)  # plain Python objects made from the config while tracing
    return state

  replicated, split = sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)
  placed = lambda tree, where: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where),
                                            tree)
  rng = jax.eval_shape(jax.random.key, 0)
  state = placed(jax.eval_shape(init, rng), replicated)
  image = (config.data.height, config.data.width, 3)
  batch = {"source": jax.ShapeDtypeStruct((config.train.batch_size, *image), jnp.float32, sharding=split),
           "pid": jax.ShapeDtypeStruct((config.train.batch_size,), jnp.int32, sharding=split), "target": None}
  if config_checks.needs_target(config):
    batch["target"] = batch["source"]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  images = jax.ShapeDtypeStruct((config.eval.batch_size, *image), jnp.float32, sharding=split)
  return state, batch, placed(rng, replicated), optimizers, variables, images


def _cost(compiled) -> dict[str, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else {}
  return analysis or {}


def memory(compiled) -> dict[str, int]:
  """XLA's buffer assignment for one chip: arguments, outputs, temporaries and the peak they reach together
  (donated arguments counted once)."""
  stats = compiled.memory_analysis()
  sizes = {"arguments": int(stats.argument_size_in_bytes), "outputs": int(stats.output_size_in_bytes),
           "aliased": int(stats.alias_size_in_bytes), "temporaries": int(stats.temp_size_in_bytes),
           "generated_code": int(stats.generated_code_size_in_bytes)}
  total = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
  sizes["peak"] = max(int(getattr(stats, "peak_memory_in_bytes", 0) or 0), total)
  return sizes


def peak_flops(chip: dict[str, Any], dtype: str, precision: str | None) -> float:
  """The chip's peak FLOP/s for products in `dtype` at jax_default_matmul_precision `precision`."""
  if dtype == "bfloat16":
    return chip["bf16_flops"]
  return chip["bf16_flops"] / FLOAT32_PASSES.get(precision, 1)


def step_floor(flops: float, bytes_accessed: float, chip: dict[str, Any], dtype: str, precision) -> float:
  """A lower bound on one call's time on one chip: every FLOP at peak or every byte at full bandwidth."""
  return max(flops / peak_flops(chip, dtype, precision), bytes_accessed / chip["hbm_bandwidth"])


def program_checks(lowered_text: str, compiled_text: str) -> dict[str, list[str]]:
  """What would fail or crawl on a TPU: float64 values, host callbacks, custom calls of other backends."""
  calls = set(re.findall(r"stablehlo\.custom_call @([\w.$-]+)", lowered_text))
  calls |= set(re.findall(r'custom_call_target="([^"]+)"', lowered_text))
  callbacks = sorted(c for c in calls if "callback" in c.lower())
  if re.search(r"is_host_transfer=true", compiled_text):
    callbacks.append("host send/recv")
  foreign = sorted(c for c in calls if c not in TPU_OWN_CUSTOM_CALLS and "callback" not in c.lower())
  float64 = sorted(set(re.findall(r"\bf64\[[0-9,]*\]", compiled_text)))
  return {"float64": float64, "host_callbacks": callbacks, "foreign_custom_calls": foreign}


def convolution_count(compiled_text: str) -> int:
  return len(re.findall(r"\bconvolution\(", compiled_text))


def compile_program(jitted, args, name: str) -> dict[str, Any]:
  """Lowers and compiles `jitted` for `args`; -> the compiled program's report (or why it does not fit)."""
  lowered = jitted.lower(*args)
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - only running out of HBM is a result, anything else is raised
    if not OUT_OF_MEMORY.search(str(e)):
      raise
    message = " ".join(str(e).split())
    required = HBM_REQUIRED.search(message)
    return {"program": name, "fits": False, "compile_seconds": time.perf_counter() - start,
            "error": message[:2000], "compiled": None, "memory_per_device": None,
            "hbm_required_per_device": int(float(required[1]) * UNITS[required[2]]) if required else None,
            "hbm_available_per_device": int(float(required[3]) * UNITS[required[4]]) if required else None}
  seconds = time.perf_counter() - start
  text = compiled.as_text()
  cost = _cost(compiled)
  return {"program": name, "compiled": compiled, "compile_seconds": seconds, "memory_per_device":
          memory(compiled), "flops_per_device": float(cost.get("flops", 0.0)),
          "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
          "convolutions": convolution_count(text), "checks": program_checks(lowered.as_text(), text)}


def serialize(compiled, path: str) -> int:
  """Pickles jax's serialized executable with its argument and result trees; -> bytes written."""
  from jax.experimental import serialize_executable

  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  with open(path, "wb") as f:
    pickle.dump({"executable": payload, "in_tree": in_tree, "out_tree": out_tree}, f)
  return os.path.getsize(path)


def compile_for_topology(config, topology: str, num_classes: int, serialize_to: str | None = None
                         ) -> dict[str, Any]:
  """Compiles the train step and the feature extractor of `config` for `topology`; -> the report."""
  import jax

  from synth_reid_jax import config_checks, features, sharding, train_step
  from synth_reid_jax.models import build_models, forms

  devices = topology_devices(topology)
  config_checks.validate_for_devices(config, len(devices))
  mesh = sharding.create_mesh(devices)
  kind = devices[0].device_kind
  chip = CHIPS.get(kind)
  state, batch, rng, optimizers, variables, images = abstract_inputs(config, num_classes, mesh)
  models = build_models(config, num_classes)
  step = train_step.make_train_step(config, models, optimizers, STEPS_PER_EPOCH, mesh)
  with _captured_stderr():
    train = compile_program(step, (state, batch, rng), "train_step")
    extract = compile_program(features.make_feature_fn(models, config, mesh), (variables, images),
                              "feature_extractor")
  precision = jax.config.jax_default_matmul_precision
  dtype = config.model.dtype
  hbm = chip["hbm_bytes"] if chip else None
  for program in (train, extract):
    if program["compiled"] is None:
      continue
    program["fits"] = hbm is None or program["memory_per_device"]["peak"] <= hbm
    program["step_seconds_floor"] = (step_floor(program["flops_per_device"],
                                                program["bytes_accessed_per_device"], chip, dtype, precision)
                                     if chip else None)
  report = {
      "topology": topology,
      "device_kind": kind,
      "num_devices": len(devices),
      "global_batch": config.train.batch_size,
      "per_device_batch": config.train.batch_size // len(devices),
      "dtype": dtype,
      "conv_impl": forms.conv_impl_name(config.model.conv_impl, mesh),
      "nonfinite_guard": forms.nonfinite_guard(config.train.get("nonfinite_guard", "auto"), mesh),
      "hbm_per_device": hbm,
      "peak_flops_per_device": peak_flops(chip, dtype, precision) if chip else None,
      "hbm_bandwidth_per_device": chip["hbm_bandwidth"] if chip else None,
      "matmul_precision": precision or "default",
      "fits": train["fits"],
      "memory_per_device": train.get("memory_per_device"),
      "flops_per_device": train.get("flops_per_device"),
      # XLA's cost analysis is of one chip's program; the chips run theirs side by side.
      "flops_per_step": train["flops_per_device"] * len(devices) if "flops_per_device" in train else None,
      "bytes_accessed_per_device": train.get("bytes_accessed_per_device"),
      "step_seconds_floor": train.get("step_seconds_floor"),
      "compile_seconds": train["compile_seconds"],
      "convolutions": train.get("convolutions"),
      "checks": train.get("checks"),
      "error": train.get("error"),
      "hbm_required_per_device": train.get("hbm_required_per_device"),
      "feature_extractor": {key: value for key, value in extract.items()
                            if key not in ("compiled", "program")} | {"batch": config.eval.batch_size},
      "serialized": None,
  }
  if serialize_to and train["compiled"] is not None:
    report["serialized"] = {"path": serialize_to, "bytes": serialize(train["compiled"], serialize_to)}
  return report


def _gib(value) -> str:
  return "-" if value is None else f"{value / GIB:.2f} GiB"


def print_report(report: dict[str, Any]) -> None:
  r = report
  print(f"{r['topology']}: {r['num_devices']} x {r['device_kind']}, global batch {r['global_batch']} "
        f"({r['per_device_batch']} per chip), {r['dtype']}; conv_impl -> {r['conv_impl']}, "
        f"nonfinite_guard -> {r['nonfinite_guard']}")
  for name, program in (("train step", r), ("feature extractor", r["feature_extractor"])):
    if program.get("memory_per_device") is None:
      print(f"  {name}: DOES NOT FIT: needs {_gib(program.get('hbm_required_per_device'))} of "
            f"{_gib(program.get('hbm_available_per_device'))} HBM per chip ({program['error'][:200]})")
      continue
    m = program["memory_per_device"]
    floor = program.get("step_seconds_floor")
    print(f"  {name}: per chip arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])}, temporaries "
          f"{_gib(m['temporaries'])}, peak {_gib(m['peak'])} of {_gib(r['hbm_per_device'])} HBM "
          f"({'fits' if program['fits'] else 'DOES NOT FIT'}); "
          f"{program['flops_per_device'] / 1e12:.3f} TFLOP per chip, floor "
          f"{'-' if floor is None else f'{floor * 1e3:.2f} ms'}; compiled in "
          f"{program['compile_seconds']:.1f} s")
    for check, found in program["checks"].items():
      if found:
        print(f"  WARNING {name}: {check.replace('_', ' ')}: {', '.join(found[:10])}")
  if r["serialized"]:
    print(f"  train step serialized to {r['serialized']['path']} ({r['serialized']['bytes']} bytes)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax

  # The host only compiles: keep JAX's own backend on the CPU (no TPU runtime start-up on a TPU VM either).
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  from configs import default
  from synth_reid_jax import config_checks
  from synth_reid_jax.errors import UserError

  config = FLAGS.config
  try:
    config_checks.validate_config(config, reference=default.get_config())
    report = compile_for_topology(config, FLAGS.topology, FLAGS.num_classes, FLAGS.serialize)
  except UserError as e:
    fatal(str(e))
  print_report(report)
  if FLAGS.json:
    print(json.dumps(report))


if __name__ == "__main__":
  define_flags()
  app.run(main)
