"""launch.py as a real process on the fake dataset trees: start it, wait for it, read what it left."""

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds for any one process; each takes well under a minute
POLL_SECONDS = 0.005
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


# Runs a script with the signal dispositions of a foreground shell, whatever the test run inherited (a
# background job or a scheduler starts it with SIGINT ignored, and exec keeps "ignored"): Ctrl-C raises
# KeyboardInterrupt, SIGTERM is the default. Done in the child itself: preexec_fn is unsafe in a test process
# that runs threads (JAX's).
FOREGROUND = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "signal.signal(signal.SIGTERM, signal.SIG_DFL); sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
# The same start as a `nohup ... &` run: SIGINT ignored.
SIGINT_IGNORED = FOREGROUND.replace("signal.default_int_handler", "signal.SIG_IGN")


def script_command(script, *args, dispositions=FOREGROUND):
  """The command that runs `script` with `args` under `dispositions` (FOREGROUND or SIGINT_IGNORED)."""
  return [sys.executable, "-c", dispositions, script, *args]


def make_launcher(manual_dir, data_dir, cache_dir):
  """-> start(workdir, *args, config="configs/gta2duke.py:tiny", dispositions=FOREGROUND): launch.py (4 CPU
  devices, one compile cache) on the fake trees; returns the Popen (stdout and stderr together, as text)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE_FLAG}")

  def start(workdir, *args, config="configs/gta2duke.py:tiny", dispositions=FOREGROUND):
    command = script_command(
        os.path.join(REPO, "launch.py"), f"--config={os.path.join(REPO, config)}", f"--workdir={workdir}",
        f"--config.data.manual_dir={manual_dir}", f"--config.data.data_dir={data_dir}",
        "--config.data.eval_datasets=()", "--config.train.sample_every_steps=1000", *args,
        dispositions=dispositions)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return start


def finish(proc):
  """Waits for `proc` (killing it on timeout); -> (returncode, output)."""
  try:
    out, _ = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  return proc.returncode, out


def wait_for(predicate, proc):
  """Waits for the event predicate() tells (a file written, a step logged), however slow a loaded machine
  is; fails with the process's output if it ends first, or if TIMEOUT passes (the process is then killed)."""
  deadline = time.monotonic() + TIMEOUT
  while not predicate():
    if proc.poll() is not None:
      pytest.fail(f"launch.py ended (rc {proc.returncode}) too early:\n{proc.stdout.read()[-3000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"timed out waiting for the run; its output:\n{proc.communicate()[0][-3000:]}")
    time.sleep(POLL_SECONDS)


def steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def checkpoint_entries(workdir):
  path = os.path.join(workdir, "checkpoints")
  return os.listdir(path) if os.path.isdir(path) else []
