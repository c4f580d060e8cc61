"""launch.py as a real process survives SIGKILL mid-save and SIGTERM; config mistakes fail before compiling.

Exact resume (stop at a checkpoint, resume, same numbers) and SIGTERM inside the loop are covered in
test_trainer.py; the unknown dataset, indivisible batch and foreign workdir errors in test_launch.py.
"""

import os
import signal
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from processes import checkpoint_entries, finish, steps_logged, wait_for  # noqa: E402

from configs import default, gta2duke  # noqa: E402
from synth_reid_jax import config_checks, trainer  # noqa: E402


@pytest.mark.slow
def test_sigkill_during_a_save_then_rerun_completes_each_step_once(launcher, tmp_path):
  num_steps = 6
  overrides = (f"--config.train.num_steps={num_steps}", "--config.train.checkpoint_every_steps=1")
  proc = launcher(tmp_path, *overrides)
  try:
    # The first entry under checkpoints/ is the save of step 1 in progress (Orbax's tmp directory).
    wait_for(lambda: checkpoint_entries(tmp_path), proc)
    proc.send_signal(signal.SIGKILL)
    seen = checkpoint_entries(tmp_path)
  finally:
    rc, out = finish(proc)
  assert rc == -signal.SIGKILL, out[-3000:]
  killed_at = {"checkpoints": seen, "steps logged": steps_logged(tmp_path)}
  print(f"SIGKILL hit: {killed_at}")

  rc, out = finish(launcher(tmp_path, *overrides))
  assert rc == 0, out[-3000:]
  assert steps_logged(tmp_path) == list(range(1, num_steps + 1)), (killed_at, out[-3000:])
  entries = checkpoint_entries(tmp_path)
  assert str(num_steps) in entries and not [e for e in entries if "tmp" in e], entries


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(launcher, tmp_path):
  proc = launcher(tmp_path, "--config.train.num_steps=1000", "--config.train.checkpoint_every_steps=1000")
  try:
    wait_for(lambda: steps_logged(tmp_path), proc)
    proc.send_signal(signal.SIGTERM)
  finally:
    rc, out = finish(proc)
  assert rc == 0, out[-3000:]
  assert "Stop requested" in out
  logged = steps_logged(tmp_path)
  assert logged == list(range(1, len(logged) + 1)) and len(logged) < 1000
  assert checkpoint_entries(tmp_path) == [str(logged[-1])]  # the step the run stopped at


def tiny_config(**changes):
  config = gta2duke.get_config("tiny")
  for key, value in changes.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.mark.parametrize("changes, message", [
    ({"data.height": 30}, "config.data.height=30; allowed: an integer >= 4, a multiple of 4"),
    ({"data.width": 18}, "config.data.width=18; allowed: an integer >= 4, a multiple of 4"),
    ({"loss.nce_layers": (0, 2, 9)}, r"config.loss.nce_layers=\(0, 2, 9\): \[9\] out of range"),
    ({"loss.dis_layers": (1, 6)}, r"config.loss.dis_layers=\(1, 6\); allowed: .* an integer in \[0, 5\]"),
    ({"data.source": "gta"}, "config.data.source='gta'; allowed: a dataset name"),
])
def test_config_mistakes_are_named_before_any_data_or_compile(changes, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(tiny_config(**changes), str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written, nothing built


def test_every_mistake_is_listed_at_once():
  with pytest.raises(ValueError) as error:
    config_checks.validate_config(tiny_config(**{"data.height": 30, "loss.nce_layers": (0, 9)}),
                            reference=default.get_config())
  assert "data.height=30" in str(error.value) and "nce_layers" in str(error.value)
