"""Where a run's numbers go: metrics.jsonl (one JSON object per logged step), TensorBoard and the console."""

import json
import math
import os

import numpy as np
import tqdm

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


def read_metrics(workdir):
  """Every row of <workdir>/metrics.jsonl, in order."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir, last_step):
  """Drops rows logged after `last_step` (a resumed run repeats those steps); -> how many were dropped."""
  path = os.path.join(workdir, METRICS_FILE)
  rows = read_metrics(workdir)
  kept = [row for row in rows if row["step"] <= last_step]
  if len(kept) != len(rows):
    with open(path, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in kept)
  return len(rows) - len(kept)


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
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes events
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=initial_step + 1)
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
        self._tb.add_scalar(f"{prefix}/{key}", float(value), int(step))
    if self._bar is not None:
      shown = {k: f"{float(scalars[k]):.3g}" for k in CONSOLE_KEYS if k in scalars}
      if "images_per_sec" in scalars:
        shown["img/s"] = f"{float(scalars['images_per_sec']):.1f}"
      self._bar.set_postfix(shown, refresh=False)

  def write_summary(self, step, scalars, *, prefix):
    """TensorBoard only (eval results go to eval/<dataset>.json)."""
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(f"{prefix}/{key}", float(value), int(step))

  def advance(self, step):
    """Moves the progress bar to `step`."""
    if self._bar is not None and step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def print(self, message):
    """Prints without breaking the progress bar."""
    if self.enabled:
      (self._bar.write if self._bar is not None else print)(message)

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
    self._jsonl = self._tb = self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
