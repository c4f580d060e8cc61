"""Entry point: `python launch.py --config=configs/<experiment>.py --workdir=<dir> [--mode=...]`.

Modes: train (default; resumes from the latest checkpoint in workdir), eval (latest or --step checkpoint),
translate (G(x) for every image under --input_dir into --output_dir), extract (re-ID features of every
image under --input_dir into the --output .npz) and export (the feature function as embedder.stablehlo,
embedder.onnx and embedder.json in the --output folder).
"""

import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "eval", "translate", "extract", "export")
INTERRUPTED = 130  # the shell's exit status for a process stopped by SIGINT

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/gta2market.py or configs/demo.py:tiny; override "
    "any key with --config.<key>=<value> (e.g. --config.train.batch_size=16).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, metrics, samples, eval results.")
flags.DEFINE_enum("mode", "train", MODES, "What to do with the workdir.")
flags.DEFINE_integer("step", None, "eval/translate/extract/export: the checkpoint step (default: latest).")
flags.DEFINE_string("input_dir", None, "translate/extract: directory of images (searched recursively).")
flags.DEFINE_string("output_dir", None, "translate: where the translated images go (same relative names).")
flags.DEFINE_string("output", None, "extract: the .npz file to write (features, paths, pids, camids); "
                    "export: the folder for embedder.stablehlo, embedder.onnx and embedder.json.")
flags.DEFINE_bool("overwrite", False, "translate/extract/export: replace output files that already exist.")
flags.DEFINE_bool("strict", False, "translate/extract: stop at the first unreadable image (default: skip it "
                  "and list it at the end).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.mark_flags_as_required(["config", "workdir"])

# Environment variables that announce a multi-process cluster jax.distributed.initialize() detects by itself.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def parse_flags(argv):
  """absl's flag parsing, with every command-line mistake (a config file that cannot be one, an override
  typo such as --config.train.batch_sise=8) reported in one line, without the flag list."""
  config_argument = _config_argument(argv)
  _check_config_file(config_argument)
  try:
    argv = FLAGS(argv)
  except OSError as e:  # overrides applied to a config file that could not be loaded
    _config_file_error(e)
  except flags.Error as e:
    # A config file's own error (e.g. an unknown ":variant") comes with its traceback as text: keep its
    # last line, which names the problem.
    text = str(e)
    reason = [line.strip() for line in text.splitlines() if re.match(r"\s*\w+(Error|Exception): ", line)]
    if "Error whilst parsing config file" in text and reason:
      flag = text.split(":", 1)[0]
      sys.exit(f"FATAL {flag}: {reason[-1]}")
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.")
  except (AttributeError, KeyError) as e:
    _config_code_error(e, config_argument)
    if "has no attribute 'get_config'" in str(e):
      sys.exit(f"FATAL --config: {config_argument} defines no get_config(); an experiment file "
               "returns its config from get_config(arg=None), as configs/gta2market.py does.")
    # ml_collections says "'batch_sise'\nDid you mean "batch_size" instead of "batch_sise"?" (quoted twice).
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    key = re.search(r"'(\w+)'", text)
    bad = [arg for arg in argv[1:] if arg.startswith("--config.") and (not key or key.group(1) in arg)]
    hint = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', text)
    sys.exit(f"FATAL Unknown config key in {' '.join(bad)}." + (f" {hint.group(0)}" if hint else "")
             + "\nEvery key is listed (and documented) in configs/default.py.")
  except Exception as e:
    _config_code_error(e, config_argument)
    raise
  if FLAGS.config is not None:
    try:
      config = _CONFIG.value
      config.keys()  # ml_collections reports a config file it could not load only when it is read
    except OSError as e:
      _config_file_error(e)
    except AttributeError:
      sys.exit(f"FATAL --config: get_config() of {config_argument} returned {type(config).__name__}, "
               "not an ml_collections.ConfigDict; start from configs/default.py's get_config().")
  return argv


def _config_code_error(error, argument):
  """Exits with one line when the --config file's own code raised `error` (anything else returns)."""
  path = os.path.abspath((argument or "").split(":", 1)[0])
  frames = [frame for frame in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(frame.filename) == path]
  if frames:
    sys.exit(f"FATAL --config: {argument}, line {frames[-1].lineno}: {type(error).__name__}: {error}")


def _config_argument(argv):
  """The value of --config in argv ("path[:argument]"), or None."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _check_config_file(argument):
  """Exits with one line when --config names no readable Python file (before ml_collections runs it)."""
  if not argument:
    return  # absl reports a missing --config
  path = argument.split(":", 1)[0]
  example = "give an experiment file such as configs/gta2market.py (or configs/demo.py:tiny)"
  if not os.path.exists(path):
    sys.exit(f"FATAL --config: {path} does not exist; {example}.")
  if os.path.isdir(path):
    sys.exit(f"FATAL --config: {path} is a folder; {example}.")
  try:
    with open(path, "rb") as f:
      source = f.read()
  except OSError as e:
    sys.exit(f"FATAL --config: cannot read {path} ({e.strerror or e}); {example}.")
  try:
    compile(source, path, "exec")
  except (SyntaxError, ValueError) as e:
    where = f", line {e.lineno}" if getattr(e, "lineno", None) else ""
    reason = getattr(e, "msg", None) or str(e)
    sys.exit(f"FATAL --config: {path} is not a Python file ({type(e).__name__}{where}: {reason}); {example}.")


def _config_file_error(error):
  """Exits with one line for a --config file that could not be loaded."""
  missing = re.search(r"No such file or directory: '([^']+)'", f"{error} {error.__cause__}")
  sys.exit(f"FATAL --config: {missing.group(1)} does not exist; give an experiment file such as "
           "configs/gta2market.py (or configs/demo.py:tiny)." if missing else f"FATAL --config: {error}")


def needs_distributed_init():
  """Whether this process is one of several: explicit flags, or a multi-task SLURM/MPI job, or a TPU pod."""
  if FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1:
    return True
  if any(int(os.environ.get(name, "1") or 1) > 1 for name in _CLUSTER_SIZE_VARIABLES):
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed():
  import jax
  if needs_distributed_init():
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def _require(*names):
  """Exits with one line naming the flags this mode needs but did not get."""
  missing = [f"--{name}" for name in names if not FLAGS[name].value]
  if missing:
    sys.exit(f"FATAL --mode={FLAGS.mode} needs {' and '.join(missing)}.")


def _stray_arguments(arguments):
  """Exits with one line for arguments that are not flags (a mode given without --mode=, a lost '=')."""
  hint = next((f" (did you mean --mode={arg}?)" for arg in arguments if arg in MODES), "")
  sys.exit(f"FATAL Unexpected argument(s) {' '.join(arguments)}: launch.py takes only flags{hint}; "
           "run with --helpshort to list them.")


def main(argv):
  if len(argv) > 1:
    _stray_arguments(argv[1:])
  config, workdir = _CONFIG.value, FLAGS.workdir
  if FLAGS.mode == "translate":
    _require("input_dir", "output_dir")
  elif FLAGS.mode == "extract":
    _require("input_dir", "output")
  elif FLAGS.mode == "export":
    _require("output")
  from synth_reid_jax.errors import UserError

  # Known errors (config, datasets, checkpoints, input files, a non-finite loss, a busy workdir) are their
  # message alone; anything else keeps its traceback.
  try:
    run(config, workdir)
  except UserError as e:
    sys.exit(f"FATAL {e}")
  except KeyboardInterrupt:
    print("Interrupted: work since the last checkpoint is lost; rerun the same command to resume from it.",
          file=sys.stderr)
    sys.exit(INTERRUPTED)


def run(config, workdir):
  from configs import default  # launch.py sits at the repository root, next to configs/
  from synth_reid_jax import config_checks, evaluator, inference, trainer

  # Everything that can be checked without compiling is checked before the first device is touched.
  config_checks.validate_config(config, reference=default.get_config())
  initialize_distributed()
  import jax
  config_checks.validate_for_devices(config, jax.device_count())
  config_checks.check_workdir_config(config, workdir, resume=FLAGS.mode == "train")
  if jax.process_index() == 0:
    devices = jax.devices()
    print(f"{jax.process_count()} process(es), {len(devices)} {devices[0].platform.upper()} device(s) "
          f"({jax.local_device_count()} local); global batch {config.train.batch_size} "
          f"({config.train.batch_size // len(devices)} per device); mode {FLAGS.mode}; workdir {workdir}",
          flush=True)

  if FLAGS.mode == "train":
    trainer.train_and_evaluate(config, workdir)
  elif FLAGS.mode == "eval":
    evaluator.evaluate(config, workdir, step=FLAGS.step)
  elif FLAGS.mode == "translate":
    inference.translate(config, workdir, FLAGS.input_dir, FLAGS.output_dir, step=FLAGS.step,
                        overwrite=FLAGS.overwrite, strict=FLAGS.strict)
  elif FLAGS.mode == "extract":
    inference.extract(config, workdir, FLAGS.input_dir, FLAGS.output, step=FLAGS.step,
                      overwrite=FLAGS.overwrite, strict=FLAGS.strict)
  elif FLAGS.mode == "export":
    from synth_reid_jax import export
    export.export(config, workdir, FLAGS.output, step=FLAGS.step, overwrite=FLAGS.overwrite,
                  config_name=config_flags.get_config_filename(FLAGS["config"]))


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=parse_flags)
