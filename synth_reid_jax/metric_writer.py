"""Where a run's numbers go: metrics.jsonl (one JSON object per logged step), TensorBoard and the console."""

import contextlib
import json
import math
import os
import time

import numpy as np
import tqdm

from synth_reid_jax import storage
from synth_reid_jax.errors import MetricsFileError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Losses shown on the progress bar (everything is in metrics.jsonl and TensorBoard).
CONSOLE_KEYS = ("gen_gan", "nce", "dis_real", "dis_fake", "reid_ce", "reid_acc")


def _json_number(value):
  """An int or float for JSON; None for NaN/inf (JSON has no such numbers)."""
  if isinstance(value, (int, np.integer)):
    return int(value)
  value = float(value)
  return value if math.isfinite(value) else None


def _read_rows(path):
  """-> (the rows of a metrics.jsonl, whether its last line was cut short and left out)."""
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for number, line in enumerate(lines, start=1):
    try:
      rows.append(json.loads(line))
    except ValueError as e:
      if number == len(lines) and not line.endswith("\n"):
        return rows, True
      raise MetricsFileError(f"{path}, line {number}, cannot be read ({e}); fix or remove that line.") from e
  return rows, bool(lines) and not lines[-1].endswith("\n")


def read_metrics(workdir):
  """Every row of <workdir>/metrics.jsonl, in order. A last line cut short (a full disk or a kill while it
  was written) is left out; a damaged line before it is an error."""
  path = os.path.join(workdir, METRICS_FILE)
  return _read_rows(path)[0] if os.path.exists(path) else []


def truncate_metrics(workdir, last_step):
  """Drops rows logged after `last_step` (a resumed run repeats those steps), and a last row cut short;
  -> how many rows were dropped. The file is replaced in one rename: a failure keeps the old one."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  rows, cut_short = _read_rows(path)
  kept = [row for row in rows if row["step"] <= last_step]
  if len(kept) != len(rows) or cut_short:
    storage.write_file(path, "".join(json.dumps(row) + "\n" for row in kept))
  return len(rows) - len(kept)


class _EventFile:
  """A TensorBoard event file written on the caller's thread.

  tensorboardX's SummaryWriter writes from a thread of its own: a full disk kills that thread silently and
  the next events then block the run forever. Here a failed write raises where the run can report it.
  Events reach the disk at each flush (at most every FLUSH_SECONDS, and on close)."""

  FLUSH_SECONDS = 10.0

  def __init__(self, logdir, purge_step):
    from tensorboardX.event_file_writer import EventsWriter  # imported lazily: only process 0 writes events
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import scalar
    self._event_pb2, self._scalar = event_pb2, scalar
    os.makedirs(logdir, exist_ok=True)
    # The process id in the name: a run resumed within the same second never truncates its predecessor's file.
    self._writer = EventsWriter(os.path.join(logdir, "events"), filename_suffix=f".{os.getpid()}")
    # TensorBoard drops the events of steps >= purge_step written before this START (a resumed run).
    self._writer.write_event(event_pb2.Event(
        step=purge_step, wall_time=time.time(),
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    try:
      self.flush()
    except OSError:
      with contextlib.suppress(OSError):  # closing flushes the same bytes again
        self._writer.close()
      raise

  def add_scalar(self, tag, value, step):
    self._writer.write_event(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                                   summary=self._scalar(tag, float(value))))
    if time.monotonic() >= self._next_flush:
      self.flush()

  def flush(self):
    self._writer.flush()
    self._next_flush = time.monotonic() + self.FLUSH_SECONDS

  def close(self):
    try:
      self.flush()
    finally:
      self._writer.close()


class MetricWriter:
  """Writes scalars to metrics.jsonl and TensorBoard and keeps a tqdm bar; a no-op writer when not `enabled`.

  Only process 0 should pass enabled=True. `initial_step` (resume) drops jsonl rows and TensorBoard events
  logged after it, so a resumed run never holds a step twice.
  """

  def __init__(self, workdir, *, enabled=True, initial_step=0, total_steps=None, tensorboard=True):
    self.enabled = enabled
    self._jsonl = self._tb = self._bar = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_metrics(workdir, initial_step)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
    if tensorboard:
      try:
        self._tb = _EventFile(os.path.join(workdir, TENSORBOARD_DIR), purge_step=initial_step + 1)
      except BaseException:
        self.close()
        raise
    if total_steps is not None:
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                            smoothing=0.1)

  def write_scalars(self, step, scalars, *, prefix="train"):
    """One metrics.jsonl row {"step", **scalars} and one TensorBoard scalar per key (under `prefix`/)."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _json_number(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(f"{prefix}/{key}", value, step)
    if self._bar is not None:
      shown = {k: f"{float(scalars[k]):.3g}" for k in CONSOLE_KEYS if k in scalars}
      if "images_per_sec" in scalars:
        shown["img/s"] = f"{float(scalars['images_per_sec']):.1f}"
      self._bar.set_postfix(shown, refresh=False)

  def write_summary(self, step, scalars, *, prefix):
    """TensorBoard only (eval results go to eval/<dataset>.json)."""
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(f"{prefix}/{key}", value, step)

  def advance(self, step):
    """Moves the progress bar to `step`."""
    if self._bar is not None and step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def print(self, message):
    """Prints without breaking the progress bar."""
    if self.enabled:
      (self._bar.write if self._bar is not None else print)(message)

  def close(self):
    try:
      if self._bar is not None:
        self._bar.close()
      if self._tb is not None:
        self._tb.close()
    finally:
      jsonl, self._jsonl = self._jsonl, None
      self._tb = self._bar = None
      if jsonl is not None:
        jsonl.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
