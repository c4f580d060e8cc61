"""What happens when things go wrong (README): every case with real files, real checkpoints, real processes.

translate/extract never touch their input nor overwrite without --overwrite, and skip (and list) unreadable
images; damaged checkpoints are detected, set aside and training resumes from the previous one; one run per
workdir; Ctrl-C saves; a failed save, a diverging run and the known errors are each a line or a few.
"""

import functools
import hashlib
import json
import os
import shutil
import signal
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import fakes  # noqa: E402
from processes import finish, steps_logged, wait_for  # noqa: E402

from configs import gta2duke  # noqa: E402
from synth_reid_jax import (  # noqa: E402
    checkpointing,
    errors,
    evaluator,
    inference,
    metric_writer,
    train_step,
    trainer,
    workdir_lock,
)

FAST_COMPILE = {"xla_backend_optimization_level": 0}
LOSSES = train_step.LOSS_METRICS


def tiny_config(data_dirs, **train):
  config = gta2duke.get_config("tiny")
  config.data.manual_dir, config.data.data_dir = data_dirs
  config.data.eval_datasets = ("market1501",)
  config.train.keep_checkpoints = 10
  config.train.update(train)
  return config


@pytest.fixture(scope="module")
def data_dirs(fake_manual_dir, fake_data_dir):
  return fake_manual_dir, fake_data_dir


@pytest.fixture(scope="module")
def trained(data_dirs, tmp_path_factory):
  """A 4-step run with checkpoints at 2 and 4 (fast compiles)."""
  workdir = tmp_path_factory.mktemp("trained")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_step, "make_train_step",
                  functools.partial(train_step.make_train_step, compiler_options=FAST_COMPILE))
    trainer.train_and_evaluate(tiny_config(data_dirs), str(workdir))
  return workdir


def digest(folder):
  """{relative path: sha256} of every file under folder."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def image_folder(root, names=("0001_c1s1_000001_01.jpg", "sub/0002_c2s1_000002_01.png")):
  for name in names:
    fakes.write_image(os.path.join(root, name))
  return root


# --- translate / extract: inputs and outputs ----------------------------------------------------------


@pytest.mark.parametrize("inside", [False, True])
def test_translate_refuses_an_output_in_its_input(data_dirs, tmp_path, inside):
  images = image_folder(str(tmp_path / "images"))
  before = digest(images)
  output = os.path.join(images, "translated") if inside else images
  with pytest.raises(errors.InputFilesError, match="--output_dir .* --input_dir .*outside the input folder"):
    inference.translate(tiny_config(data_dirs), str(tmp_path / "no_run"), images, output)
  assert digest(images) == before  # checked before anything was read, compiled or written


def test_translate_and_extract_never_overwrite_unless_asked(data_dirs, tmp_path):
  images = image_folder(str(tmp_path / "images"))
  out = tmp_path / "out"
  out.mkdir()
  (out / "0001_c1s1_000001_01.jpg").write_bytes(b"mine")
  with pytest.raises(errors.InputFilesError, match="already holds 1 of the 2 output files.*--overwrite"):
    inference.translate(tiny_config(data_dirs), str(tmp_path / "no_run"), images, str(out))
  assert (out / "0001_c1s1_000001_01.jpg").read_bytes() == b"mine"
  (tmp_path / "feats.npz").write_bytes(b"mine")
  with pytest.raises(errors.InputFilesError, match="feats.npz exists; pass --overwrite"):
    inference.extract(tiny_config(data_dirs), str(tmp_path / "no_run"), images, str(tmp_path / "feats"))
  assert (tmp_path / "feats.npz").read_bytes() == b"mine"


def test_extract_output_is_checked_before_any_work(tmp_path):
  images = image_folder(str(tmp_path / "images"))
  expected = str(tmp_path / "a" / "feat.npz")  # ".npz" added, as numpy does, and the real name reported
  assert inference.extract_output_path(str(tmp_path / "a" / "feat"), images) == expected
  with pytest.raises(errors.InputFilesError, match="lies inside --input_dir"):
    inference.extract_output_path(os.path.join(images, "feat.npz"), images)
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.InputFilesError, match="is a file, so the folder .* cannot be made"):
    inference.extract_output_path(str(tmp_path / "file" / "sub" / "feat.npz"), images)


@pytest.mark.slow
def test_unreadable_images_are_named_skipped_and_listed(trained, data_dirs, tmp_path):
  images = image_folder(str(tmp_path / "images"))
  fakes.write_broken_image(os.path.join(images, "0003_c1s1_000003_01.jpg"))  # truncated JPEG
  with open(os.path.join(images, "sub", "notes.jpg"), "w") as f:
    f.write("not an image")
  config = tiny_config(data_dirs)
  with pytest.raises(errors.InputFilesError) as caught:
    inference.translate(config, str(trained), images, str(tmp_path / "out"))
  message = str(caught.value)
  assert "2 of 4 images could not be read" in message
  assert "0003_c1s1_000003_01.jpg" in message and "sub/notes.jpg" in message
  assert sorted(digest(tmp_path / "out")) == ["0001_c1s1_000001_01.jpg", "sub/0002_c2s1_000002_01.png"]

  with pytest.raises(errors.InputFilesError, match=r"Cannot read .*0003_c1s1_000003_01.jpg.*--strict"):
    inference.extract(config, str(trained), images, str(tmp_path / "strict.npz"), strict=True)
  assert not (tmp_path / "strict.npz").exists()  # --strict looks at every image before computing
  with pytest.raises(errors.InputFilesError, match="2 of 4 images"):
    inference.extract(config, str(trained), images, str(tmp_path / "feats.npz"))
  out = np.load(tmp_path / "feats.npz")
  assert list(out["paths"]) == ["0001_c1s1_000001_01.jpg", "sub/0002_c2s1_000002_01.png"]
  assert out["features"].shape[0] == 2 and list(out["pids"]) == [1, 2]


# --- Checkpoints that check themselves --------------------------------------------------------------


def rows(workdir):
  return {row["step"]: row for row in metric_writer.read_metrics(str(workdir))}


@pytest.mark.slow
def test_a_flipped_checkpoint_is_set_aside_and_training_resumes_from_the_previous(trained, data_dirs,
                                                                                  tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  checkpoints = workdir / checkpointing.CHECKPOINT_DIR
  fakes.flip_bytes(checkpoints / "4" / checkpointing.MODEL)
  config = tiny_config(data_dirs)
  with pytest.raises(errors.CheckpointDamagedError, match=r"Checkpoint .*/4 (is damaged|cannot be read).*"
                                                          r"newest intact checkpoint before it is step 2"):
    evaluator.evaluate(config, str(workdir))

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_step, "make_train_step",
                  functools.partial(train_step.make_train_step, compiler_options=FAST_COMPILE))
    trainer.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert "Checkpoint" in out and "Renamed it to" in out and "Resumed from" in out and "/2 (epoch" in out
  assert sorted(os.listdir(checkpoints)) == ["2", "4", "4.damaged"]  # the damaged one kept, not deleted
  a, b = rows(trained), rows(workdir)
  assert sorted(b) == [1, 2, 3, 4]
  for step in (3, 4):  # the resumed steps repeat the uninterrupted run's numbers
    for key in LOSSES:
      assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.slow
def test_a_truncated_checkpoint_file_is_one_clear_error(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  metadata = workdir / checkpointing.CHECKPOINT_DIR / "4" / checkpointing.TRAIN_STATE / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:50])
  from synth_reid_jax import train_state
  state, _ = train_state.create_train_state(gta2duke.get_config("tiny"), jax.random.key(0), 6)
  checkpointer = checkpointing.Checkpointer(str(workdir))
  try:
    with pytest.raises(errors.CheckpointDamagedError, match=r"Checkpoint .*/4 cannot be read") as caught:
      checkpointer.restore_training(state, rng=jax.random.key(0), step=4)
    assert "\n" not in str(caught.value)
    restored, _, _ = checkpointer.restore_training(state, rng=jax.random.key(0), step=2)
    assert int(restored.step) == 2
  finally:
    checkpointer.close()


def test_checksums_catch_a_changed_value():
  tree = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  manifest = {"model": checkpointing.checksums(tree)}
  checkpointing.verify({"model": tree}, manifest, "here", 7)
  tree["params"]["w"][1, 2] = np.nextafter(np.float32(5), np.float32(6))
  with pytest.raises(errors.CheckpointDamagedError, match="model/params/w does not match") as caught:
    checkpointing.verify({"model": tree}, manifest, "here", 7)
  assert caught.value.step == 7


def test_eval_without_checkpoints_creates_nothing(data_dirs, tmp_path):
  workdir = tmp_path / "empty"
  workdir.mkdir()
  with pytest.raises(errors.CheckpointMissingError, match="No checkpoint in .*Train first"):
    evaluator.evaluate(tiny_config(data_dirs), str(workdir))
  assert os.listdir(workdir) == []


# --- One writer per workdir -----------------------------------------------------------------------------


def test_a_held_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path), "train"):
    busy = rf"workdir {tmp_path} is in use by process {os.getpid()}"
    with pytest.raises(errors.WorkdirBusyError, match=busy):
      workdir_lock.WorkdirLock(str(tmp_path), "eval").acquire()
  assert (tmp_path / ".lock").read_text() == ""  # released cleanly
  (tmp_path / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "mode": "train", "started": 0}))
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert lock.took_over.startswith("process 999999 on gone")


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_at_once(launcher, tmp_path):
  first = launcher(tmp_path, "--config.train.num_steps=1000", "--config.train.checkpoint_every_steps=1000")
  try:
    wait_for(lambda: steps_logged(tmp_path), first)
    rc, out = finish(launcher(tmp_path, "--config.train.num_steps=1000"))
    assert first.poll() is None  # still training
    first.send_signal(signal.SIGTERM)
  finally:
    rc_first, out_first = finish(first)
  assert rc != 0 and "is in use by process" in out and "Traceback" not in out, out[-2000:]
  assert rc_first == 0 and "Stop requested" in out_first, out_first[-3000:]
  logged = steps_logged(tmp_path)  # the first run went on untouched: each step once, its checkpoint written
  assert logged == list(range(1, len(logged) + 1))
  assert os.listdir(tmp_path / "checkpoints") == [str(logged[-1])]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint(launcher, tmp_path):
  proc = launcher(tmp_path, "--config.train.num_steps=1000", "--config.train.checkpoint_every_steps=1000")
  try:
    wait_for(lambda: steps_logged(tmp_path), proc)
    proc.send_signal(signal.SIGINT)
  finally:
    rc, out = finish(proc)
  assert rc == 0 and "Ctrl-C: stopping after this step" in out and "Traceback" not in out, out[-3000:]
  logged = steps_logged(tmp_path)
  assert os.listdir(tmp_path / "checkpoints") == [str(logged[-1])]

  # Ctrl-C before the loop (here: while the step compiles) stops at once, without a traceback.
  other = tmp_path / "other"
  proc = launcher(other, "--config.train.num_steps=1000")
  try:
    wait_for(lambda: os.path.exists(other / "config.json"), proc)
    proc.send_signal(signal.SIGINT)
  finally:
    rc, out = finish(proc)
  assert rc == 130 and "Interrupted" in out and "Traceback" not in out, out[-3000:]


class Writer:
  def print(self, message):
    self.message = message


@pytest.fixture
def sigint(request):
  """Sets SIGINT's disposition for the test (a test run started in the background inherits it ignored)."""
  def set_to(handler):
    signal.signal(signal.SIGINT, handler)
  before = signal.getsignal(signal.SIGINT)
  yield set_to
  signal.signal(signal.SIGINT, before)


def test_a_second_ctrl_c_in_the_loop_quits_at_once(sigint):
  sigint(signal.default_int_handler)
  writer = Writer()
  stop = trainer.StopRequest(checkpointer=None, writer=writer)
  try:
    signal.raise_signal(signal.SIGINT)
    assert stop(1) and "press Ctrl-C again to quit at once" in writer.message
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  finally:
    stop.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(sigint):
  """nohup / a script's background job: Ctrl-C stays ignored, as asked; SIGTERM still stops with a save."""
  sigint(signal.SIG_IGN)
  before_term = signal.getsignal(signal.SIGTERM)
  stop = trainer.StopRequest(checkpointer=None, writer=Writer())
  try:
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.raise_signal(signal.SIGINT)
    assert not stop(1)
    signal.raise_signal(signal.SIGTERM)
    assert stop(1)
  finally:
    stop.close()
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == before_term


# --- Known errors are a line or a few ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (("--config.data.manual_dir=/nonexistent", "--config.data.data_dir={tmp}/tfds"),
     "manual_dir /nonexistent does not exist or is empty"),
    (("--config=configs/nope.py",), "nope.py"),
    (("--config=configs/gta2duke.py:tiyn",), "Unknown config argument 'tiyn'"),
    (("--mode=eval",), "No checkpoint in"),
])
def test_known_errors_print_without_a_traceback(launcher, tmp_path, args, message):
  config_args = [a for a in args if a.startswith("--config=")]
  other = [a.format(tmp=tmp_path) for a in args if not a.startswith("--config=")]
  kwargs = {"config": config_args[0].split("=", 1)[1]} if config_args else {}
  rc, out = finish(launcher(tmp_path / "run", *other, **kwargs))
  assert rc != 0 and message in out, out[-3000:]
  assert "Traceback" not in out and len(out.strip().splitlines()) <= 12, out[-3000:]


# --- A start that fails leaves the workdir as it was; a resume keeps what the checkpoints mean ------------


def assert_fatal(rc, out, *named):
  """A known error: non-zero exit, a FATAL message of a few lines naming `named`, no traceback."""
  assert rc not in (0, None) and "Traceback" not in out and "FATAL " in out, out[-3000:]
  fatal = out[out.index("FATAL "):].strip().splitlines()
  assert len(fatal) <= 6, out[-3000:]
  for text in named:
    assert text in out, out[-3000:]


@pytest.fixture(scope="module")
def launched(launcher, tmp_path_factory):
  """A workdir launch.py trained for 2 steps (checkpoint 2)."""
  workdir = tmp_path_factory.mktemp("launched")
  rc, out = finish(launcher(workdir, "--config.train.num_steps=2"))
  assert rc == 0 and os.listdir(workdir / "checkpoints") == ["2"], out[-3000:]
  return workdir


@pytest.mark.slow
def test_a_value_the_data_refuses_stops_before_config_json_and_the_fix_runs(launcher, tmp_path):
  # The fake GTA train split has 3 identities: holding 3 out for validation leaves none to train.
  rc, out = finish(launcher(tmp_path, "--config.data.val=True", "--config.data.val_ids=3"))
  assert_fatal(rc, out, "config.data.val_ids=3", "3 identities")
  assert not os.path.exists(tmp_path / "config.json") and not os.path.exists(tmp_path / "checkpoints")
  # The corrected command (no validation) runs on the same workdir: the failed start bound it to nothing.
  rc, out = finish(launcher(tmp_path, "--config.train.num_steps=2"))
  assert rc == 0 and os.listdir(tmp_path / "checkpoints") == ["2"], out[-3000:]
  assert json.loads((tmp_path / "config.json").read_text())["data"]["val"] is False


@pytest.mark.slow
def test_a_bad_eval_value_is_refused_before_training_and_loses_nothing(launched, launcher, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(launched, workdir)
  before = digest(workdir)
  rc, out = finish(launcher(workdir, "--config.train.num_steps=4", "--config.eval.batch_size=0"))
  assert_fatal(rc, out, "config.eval.batch_size=0; allowed: an integer >= 1")
  assert digest(workdir) == before  # checkpoint, config.json and metrics untouched
  rc, out = finish(launcher(workdir, "--config.train.num_steps=4"))  # corrected: resumes from step 2
  assert rc == 0 and "Resumed from" in out, out[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"] and steps_logged(workdir) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_resume_that_changes_what_the_checkpoint_means_is_refused(launched, launcher, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(launched, workdir)
  before = digest(workdir)
  rc, out = finish(launcher(workdir, "--config.train.num_steps=4", "--config.train.batch_size=8",
                            "--config.data.target=market1501"))
  assert_fatal(rc, out, "Cannot resume", "train.batch_size: 4 in config.json, 8 now",
               "data.target: 'dukemtmc_reid' in config.json, 'market1501' now", "--workdir=<new folder>")
  assert digest(workdir) == before


def test_a_failed_evaluation_keeps_the_training(data_dirs, tmp_path, monkeypatch):
  """An error at an evaluation (here: a dataset gone since the start) saves that step's checkpoint first."""
  monkeypatch.setattr(train_step, "make_train_step", scripted(lambda n: 1.0))
  monkeypatch.setattr(trainer.train_state, "create_train_state", tiny_state)

  def gone(self, variables, step, **kwargs):
    raise errors.DatasetMissingError("market1501: the folder is gone")

  monkeypatch.setattr(evaluator.Evaluator, "run", gone)
  monkeypatch.setattr(trainer, "save_samples", lambda *args: None)  # the scripted state has no generator
  config = tiny_config(data_dirs, num_steps=3, checkpoint_every_steps=100, sample_every_steps=100)
  with pytest.raises(errors.DatasetMissingError, match="the folder is gone"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == ["3"]


# --- Failed saves and divergence (the real loop around a scripted step) ----------------------------------


def scripted(losses):
  """make_train_step stand-in: the n-th call reports losses(n) for every loss term."""
  def make(config, models, optimizers, steps_per_epoch, mesh):
    calls = []

    def step(state, batch, rng):
      calls.append(1)
      value = np.float32(losses(len(calls)))
      metrics = {k: value for k in LOSSES} | {"reid_acc": np.float32(0), "nonfinite": np.float32(0)}
      return state.replace(step=state.step + 1), metrics
    return step
  return make


def tiny_state(config, rng, num_classes, **kwargs):
  import jax.numpy as jnp

  from synth_reid_jax.train_state import TrainState
  return TrainState(step=jnp.zeros((), jnp.int32), params={"reid": {"w": jnp.ones((2, num_classes))}},
                    batch_stats={}, opt_state={}), {}


def test_a_failed_save_stops_in_one_line_naming_the_intact_checkpoint(data_dirs, tmp_path, monkeypatch):
  monkeypatch.setattr(train_step, "make_train_step", scripted(lambda n: 1.0))
  monkeypatch.setattr(trainer.train_state, "create_train_state", tiny_state)
  original = checkpointing.ocp.CheckpointManager.save

  def save(manager, step, *args, **kwargs):
    if step == 4:
      raise OSError(28, "RESOURCE_EXHAUSTED: tensorstore write failed: No space left on device [zarr ...]")
    return original(manager, step, *args, **kwargs)

  monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "save", save)
  config = tiny_config(data_dirs, num_steps=10, checkpoint_every_steps=2, sample_every_steps=100)
  with pytest.raises(errors.CheckpointError) as caught:
    trainer.train_and_evaluate(config, str(tmp_path))
  message = str(caught.value)
  assert "Saving checkpoint 4" in message and "No space left on device" in message and "\n" not in message
  assert "newest intact checkpoint is step 2" in message and "rerun the same command" in message
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_divergence_is_warned_once_and_marked_in_the_metrics(data_dirs, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(train_step, "make_train_step", scripted(lambda n: 10.0 ** (2 * n)))
  monkeypatch.setattr(trainer.train_state, "create_train_state", tiny_state)

  def on_row(step):  # stop before the final evaluation, which the scripted state cannot do
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  original = metric_writer.MetricWriter.write_scalars
  def write_scalars(self, step, scalars, **kwargs):
    original(self, step, scalars, **kwargs)
    on_row(step)

  monkeypatch.setattr(metric_writer.MetricWriter, "write_scalars", write_scalars)
  trainer.train_and_evaluate(tiny_config(data_dirs, num_steps=10, sample_every_steps=100), str(tmp_path))
  out = capsys.readouterr().out
  assert out.count("WARNING: step 2: gen_gan = 1e+04, 100 times") == 0  # 100x is the threshold, not above it
  assert out.count("training is diverging") == 1 and "WARNING: step 3:" in out
  logged = rows(tmp_path)
  assert "diverging" not in logged[2] and logged[3]["diverging"] == 1
