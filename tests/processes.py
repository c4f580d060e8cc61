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


def make_launcher(manual_dir, data_dir, cache_dir):
  """-> start(workdir, *args, config="configs/gta2duke.py:tiny"): launch.py (4 CPU devices, one compile
  cache) on the fake trees; returns the Popen (stdout and stderr together, as text)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE_FLAG}")

  def start(workdir, *args, config="configs/gta2duke.py:tiny"):
    command = [sys.executable, os.path.join(REPO, "launch.py"), f"--config={os.path.join(REPO, config)}",
               f"--workdir={workdir}", f"--config.data.manual_dir={manual_dir}",
               f"--config.data.data_dir={data_dir}", "--config.data.eval_datasets=()",
               "--config.train.sample_every_steps=1000", *args]
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
  """Polls until predicate() holds; fails if the process ends (or TIMEOUT passes) first."""
  deadline = time.monotonic() + TIMEOUT
  while not predicate():
    if proc.poll() is not None:
      pytest.fail(f"launch.py ended (rc {proc.returncode}) too early:\n{proc.stdout.read()[-3000:]}")
    if time.monotonic() > deadline:
      pytest.fail("timed out waiting for the run")
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
