"""The trainer end to end on fake dataset trees: train, resume, eval, translate, extract; clear errors."""

import functools
import json
import os
import shutil
import signal
import struct
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorboardX.record_writer
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import baseline, gta2duke  # noqa: E402
from synth_reid_jax import (  # noqa: E402
    checkpointing,
    config_checks,
    evaluator,
    inference,
    input_pipeline,
    metric_writer,
    sharding,
    train_step,
    trainer,
)
from synth_reid_jax.errors import ConfigError, MetricsFileError  # noqa: E402
from synth_reid_jax.tools import import_torch  # noqa: E402
from synth_reid_jax.train_state import TrainState  # noqa: E402

LOSSES = train_step.LOSS_METRICS
LEARNING_RATES = ("lr_generator", "lr_discriminator", "lr_projector", "lr_reid")
CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="session")
def data_dirs(fake_manual_dir, fake_data_dir):
  """(manual_dir with every fake release, the session's data_dir), see conftest.py."""
  return fake_manual_dir, fake_data_dir


def tiny_config(data_dirs, **train):
  config = gta2duke.get_config("tiny")
  config.data.manual_dir, config.data.data_dir = data_dirs
  config.data.eval_datasets = ("market1501",)
  config.train.keep_checkpoints = 10
  for key, value in train.items():
    config.train[key] = value
  return config


def rows_by_step(workdir):
  return {row["step"]: row for row in metric_writer.read_metrics(str(workdir))}


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """Faster compiles for the module: a persistent cache (the resumed run reuses the first run's executables)
  and the train step compiled without XLA's backend optimisations."""
  previous = {key: getattr(jax.config, key) for key in CACHE_OPTIONS}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_step, "make_train_step", functools.partial(train_step.make_train_step,
                                                                   compiler_options=FAST_COMPILE))
    yield
  for key, value in previous.items():
    jax.config.update(key, value)


@pytest.fixture(scope="module")
def trained(data_dirs, tmp_path_factory, compilation_cache):
  """A 4-step run (checkpoints at 2 and 4), then the same run resumed from step 2 in a copy of its workdir."""
  del compilation_cache
  root = tmp_path_factory.mktemp("runs")
  straight, resumed = root / "straight", root / "resumed"
  trainer.train_and_evaluate(tiny_config(data_dirs), str(straight))
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / checkpointing.CHECKPOINT_DIR / "4")
  trainer.train_and_evaluate(tiny_config(data_dirs), str(resumed))
  return straight, resumed


@pytest.mark.slow
def test_train_writes_the_workdir_layout(trained):
  straight, _ = trained
  assert sorted(os.listdir(straight)) == [".lock", "checkpoints", "config.json", "eval", "metrics.jsonl",
                                          "samples", "tensorboard"]
  assert (straight / ".lock").read_text() == ""  # released: emptied by the clean exit
  assert sorted(os.listdir(straight / "checkpoints")) == ["2", "4"]
  assert sorted(os.listdir(straight / "samples")) == ["step_00000002.png", "step_00000004.png"]
  grid = Image.open(straight / "samples" / "step_00000002.png")
  # Rows of 4 images: source, G(source), target.
  assert 3 * 32 < grid.height < 4 * 32 and 4 * 16 <= grid.width < 5 * 16
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(straight / "tensorboard"))
  assert json.load(open(straight / "config.json"))["data"]["target"] == "dukemtmc_reid"


@pytest.mark.slow
def test_metrics_rows_hold_every_finite_loss(trained):
  rows = rows_by_step(trained[0])
  assert sorted(rows) == [1, 2, 3, 4]
  for row in rows.values():
    for key in (*LOSSES, *LEARNING_RATES, "reid_acc", "images_per_sec", "epoch"):
      assert np.isfinite(row[key]), key
    assert row["images_per_sec"] > 0
  for key in ("gen_gan", "nce", "gen_sim", "dis_real", "dis_fake", "dis_sim", "reid_ce"):
    assert rows[1][key] > 0, key  # every loss of the thesis setting is on
  assert rows[1]["lr_reid"] == pytest.approx(2e-4)


@pytest.mark.slow
def test_resume_continues_the_same_run(trained):
  straight, resumed = trained
  a, b = rows_by_step(straight), rows_by_step(resumed)
  assert sorted(b) == [1, 2, 3, 4]  # rows 3-4 of the interrupted run were replaced, not duplicated
  with open(resumed / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
  for step in (3, 4):  # same data, same rng: the resumed steps repeat the straight run's numbers
    for key in LOSSES:
      assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.slow
def test_eval_json_and_eval_mode(trained, data_dirs):
  straight, _ = trained
  results = json.load(open(straight / "eval" / "market1501.json"))
  assert set(results) == {"dataset", "step", "mAP", "cmc", "num_query", "num_gallery"}
  assert results["dataset"] == "market1501" and results["step"] == 4
  assert (results["num_query"], results["num_gallery"]) == (4, 8)  # fakes.MARKET_EXPECTED
  assert 0 <= results["mAP"] <= 1 and np.all(np.diff(results["cmc"]) >= 0) and results["cmc"][-1] == 1.0
  again = evaluator.evaluate(tiny_config(data_dirs), str(straight), step=4)["market1501"]
  assert again["mAP"] == pytest.approx(results["mAP"], abs=1e-6)
  assert again["cmc"] == pytest.approx(results["cmc"], abs=1e-6)


@pytest.mark.slow
def test_translate_and_extract(trained, data_dirs, tmp_path):
  straight, _ = trained
  inputs = tmp_path / "in"
  names = ["0001_c2s1_000301_01.jpg", "sub/42647445_sd000c08_0396.png", "sub/other.png"]
  for name in names:
    os.makedirs(os.path.dirname(inputs / name), exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 20, 3), np.uint8)).save(inputs / name)
  config = tiny_config(data_dirs)
  inference.translate(config, str(straight), str(inputs), str(tmp_path / "out"))
  for name in names:
    image = Image.open(tmp_path / "out" / name)
    assert image.size == (config.data.width, config.data.height)
  inference.extract(config, str(straight), str(inputs), str(tmp_path / "feats.npz"))
  out = np.load(tmp_path / "feats.npz")
  assert list(out["paths"]) == sorted(names)
  assert out["features"].shape == (3, 8 * 8 * 4) and out["features"].dtype == np.float32
  assert list(out["pids"]) == [1, 42647445, -1] and list(out["camids"]) == [1, 7, -1]


@pytest.mark.slow
def test_baseline_trains_and_evaluates_through_the_resnet_stem(data_dirs, tmp_path, compilation_cache):
  del compilation_cache
  config = baseline.get_config("tiny")
  config.data.manual_dir, config.data.data_dir = data_dirs
  config.train.num_steps = 2
  trainer.train_and_evaluate(config, str(tmp_path))
  rows = rows_by_step(tmp_path)
  assert rows[2]["reid_ce"] > 0 and rows[2]["gen_gan"] == 0 and rows[2]["nce"] == 0
  assert not os.path.exists(tmp_path / "samples")  # nothing to translate
  results = json.load(open(tmp_path / "eval" / "market1501.json"))
  again = evaluator.evaluate(config, str(tmp_path))["market1501"]  # restores the stem and R
  assert again["mAP"] == pytest.approx(results["mAP"], abs=1e-6)
  with pytest.raises(ValueError, match="needs a generator"):
    inference.translate(config, str(tmp_path), str(tmp_path), str(tmp_path / "out"))


def test_eval_without_checkpoint_is_a_clear_error(data_dirs, tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*Train first"):
    evaluator.evaluate(tiny_config(data_dirs), str(tmp_path))


def test_workdir_from_another_config_is_refused(data_dirs, tmp_path):
  config = tiny_config(data_dirs)
  config_checks.write_config(config, str(tmp_path))
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)  # what the run left: a checkpoint of that config
  other = tiny_config(data_dirs)
  other.model.ngf = 16
  other.data.source = "market1501"
  with pytest.raises(ValueError) as error:
    trainer.train_and_evaluate(other, str(tmp_path))
  for line in ("model.ngf: 8 in config.json, 16 now",
               "data.source: 'gta_synthreid' in config.json, 'market1501' now"):
    assert line in str(error.value)
  config_checks.check_workdir_config(tiny_config(data_dirs), str(tmp_path))  # the same config is fine


def test_config_json_is_replaced_whole(data_dirs, tmp_path, monkeypatch):
  """Another process of a multi-host run reads config.json while process 0 rewrites it: it must see a whole
  file (a truncated one failed a two-process run with a JSON error); a failed write keeps the old file."""
  config = tiny_config(data_dirs)
  config_checks.write_config(config, str(tmp_path))
  before = (tmp_path / config_checks.CONFIG_FILE).read_text()

  def interrupted(src, dst):
    assert json.loads((tmp_path / config_checks.CONFIG_FILE).read_text())  # still the whole old file
    raise OSError("disk full")

  monkeypatch.setattr(config_checks.os, "replace", interrupted)
  other = tiny_config(data_dirs)
  other.model.ngf = 16
  with pytest.raises(OSError, match="disk full"):
    config_checks.write_config(other, str(tmp_path))
  assert (tmp_path / config_checks.CONFIG_FILE).read_text() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == [config_checks.CONFIG_FILE]  # no temporary left
  monkeypatch.undo()
  config_checks.write_config(other, str(tmp_path))
  assert json.loads((tmp_path / config_checks.CONFIG_FILE).read_text())["model"]["ngf"] == 16
  assert sorted(p.name for p in tmp_path.iterdir()) == [config_checks.CONFIG_FILE]


def test_unknown_dataset_and_batch_size_fail_before_compiling(data_dirs, tmp_path):
  config = tiny_config(data_dirs)
  config.data.eval_datasets = ("market",)
  with pytest.raises(ValueError, match=r"config.data.eval_datasets=\('market',\); allowed: .*a dataset name"):
    trainer.train_and_evaluate(config, str(tmp_path))
  config = tiny_config(data_dirs)
  config.train.batch_size = 6
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 devices"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_parse_identity():
  assert inference.parse_identity("0002_c1s1_000451_03.jpg") == (2, 0)
  assert inference.parse_identity("a/-1_c4s1_009451_01.jpg") == (-1, 3)
  assert inference.parse_identity("42647445_sd000c08_0396.jpeg") == (42647445, 7)
  assert inference.parse_identity("0001_c2_f0046182.jpg") == (1, 1)
  assert inference.parse_identity("holiday.png") == (-1, -1)


def test_metric_writer_truncates_on_resume(tmp_path):
  with metric_writer.MetricWriter(str(tmp_path), tensorboard=False) as writer:
    for step in (1, 2, 3):
      writer.write_scalars(step, {"nce": 1.0 * step, "epoch": 1, "bad": float("nan")})
  rows = metric_writer.read_metrics(str(tmp_path))
  assert rows[0] == {"step": 1, "nce": 1.0, "epoch": 1, "bad": None}
  with metric_writer.MetricWriter(str(tmp_path), tensorboard=False, initial_step=2) as writer:
    writer.write_scalars(3, {"nce": 9.0})
  assert [(r["step"], r["nce"]) for r in metric_writer.read_metrics(str(tmp_path))] == [(1, 1.0), (2, 2.0),
                                                                                          (3, 9.0)]


def fake_step_factory(on_call):
  """A make_train_step stand-in: no compilation, scripted losses; `on_call(n)` runs at the n-th call. As the
  real step, a non-finite loss is reported in "nonfinite"."""
  def make(config, models, optimizers, steps_per_epoch, mesh):
    calls = []

    def step(state, batch, rng):
      calls.append(1)
      loss = on_call(len(calls))
      metrics = {k: np.float32(loss) for k in LOSSES} | {k: np.float32(2e-4) for k in LEARNING_RATES}
      skipped = np.float32(not np.isfinite(loss))
      return state.replace(step=state.step + 1), metrics | {"reid_acc": np.float32(0), "nonfinite": skipped}
    return step
  return make


def fake_train_state(config, rng, num_classes, **kwargs):
  """A create_train_state stand-in: a tiny state, nothing to compile."""
  del config, rng
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"reid": {"w": jnp.zeros((2, num_classes))}},
                     batch_stats={}, opt_state={})
  return state, {}


def run_scripted(data_dirs, workdir, monkeypatch, on_call, **train):
  """The real loop (data, checkpoints, metrics, signals) around a scripted step; no sample grids."""
  monkeypatch.setattr(train_step, "make_train_step", fake_step_factory(on_call))
  monkeypatch.setattr(trainer.train_state, "create_train_state", fake_train_state)
  return trainer.train_and_evaluate(tiny_config(data_dirs, sample_every_steps=100, **train), str(workdir))


def test_nonfinite_loss_stops_naming_the_loss_and_step(data_dirs, tmp_path, monkeypatch):
  message = r"Non-finite loss at step 3 .*gen_gan = nan.*newest checkpoint \(step 2\) holds no non-finite"
  with pytest.raises(FloatingPointError, match=message):
    run_scripted(data_dirs, tmp_path, monkeypatch, lambda n: np.nan if n == 3 else 1.0)
  assert sorted(rows_by_step(tmp_path)) == [1, 2]
  assert os.listdir(tmp_path / "checkpoints") == ["2"]


def test_nonfinite_stop_is_decided_at_the_next_fetch(data_dirs, tmp_path, monkeypatch):
  """Metrics are fetched every log_every_steps steps: a bad step 1 is seen at the fetch of step 2 (a log and
  checkpoint step), before that checkpoint is written."""
  with pytest.raises(FloatingPointError, match=r"step 1 .*no checkpoint was written yet"):
    run_scripted(data_dirs, tmp_path, monkeypatch, lambda n: np.nan if n == 1 else 1.0, log_every_steps=2)
  assert rows_by_step(tmp_path) == {} and not os.listdir(tmp_path / "checkpoints")


def test_skipped_steps_are_reported_and_left_out_of_the_averages(data_dirs, tmp_path, monkeypatch, capsys):
  def on_call(n):
    if n == 4:  # ends the run before the final evaluation, which the scripted state could not do
      os.kill(os.getpid(), signal.SIGTERM)
    return np.inf if n == 2 else float(n)
  run_scripted(data_dirs, tmp_path, monkeypatch, on_call, log_every_steps=2, num_steps=10,
               on_nonfinite="skip")
  rows = rows_by_step(tmp_path)
  assert sorted(rows) == [2, 4]
  assert rows[2]["gen_gan"] == 1.0 and rows[4]["gen_gan"] == 3.5  # step 2 skipped; (3 + 4) / 2
  assert "Step 2: skipped (non-finite gen_gan = inf" in capsys.readouterr().out


def test_sigterm_saves_a_checkpoint_and_returns(data_dirs, tmp_path, monkeypatch):
  def on_call(n):
    if n == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return 1.0
  previous = signal.getsignal(signal.SIGTERM)
  state = run_scripted(data_dirs, tmp_path, monkeypatch, on_call, checkpoint_every_steps=100)
  assert int(state.step) == 1
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  assert sorted(rows_by_step(tmp_path)) == [1]
  assert signal.getsignal(signal.SIGTERM) == previous  # the trainer's handler is gone again


@pytest.fixture(scope="module")
def more_ids_dirs(tmp_path_factory):
  """(manual_dir, data_dir) of fake trees whose GTA and Duke train splits can lose identities to data.val."""
  import fakes
  return (fakes.make_more_ids(str(tmp_path_factory.mktemp("manual_more_ids"))),
          str(tmp_path_factory.mktemp("data_more_ids")))


def _selection(workdir, step):
  checkpointer = checkpointing.Checkpointer(str(workdir))
  try:
    return checkpointer.metadata(step)["selection"]
  finally:
    checkpointer.close()


@pytest.mark.slow
def test_method_validates_on_held_out_target_identities(more_ids_dirs, tmp_path, compilation_cache):
  """data.val on a method config is the original's adversarial val: val_ids identities of the target's train
  split leave the target stream and are evaluated (eval/<target>-val.json), ranking the kept "best"
  checkpoint; the source stays whole and has no validation."""
  del compilation_cache
  config = tiny_config(more_ids_dirs, num_steps=2)  # gta2duke:tiny
  config.data.val, config.data.val_ids = True, 3
  trainer.train_and_evaluate(config, str(tmp_path))
  results = json.load(open(tmp_path / "eval" / "dukemtmc_reid-val.json"))
  assert results["dataset"] == "dukemtmc_reid-val" and results["step"] == 2 and results["num_query"] > 0
  assert not os.path.exists(tmp_path / "eval" / "gta_synthreid-val.json")
  assert os.path.exists(tmp_path / "eval" / "market1501.json")  # the test set is still reported
  assert _selection(tmp_path, 2) == {"selected_on": "dukemtmc_reid-val", "mAP": pytest.approx(results["mAP"])}
  # What the run trained on: the target stream leaves the held-out identities out, the source keeps all.
  labels = input_pipeline.split_labels(config, "dukemtmc_reid", "train")
  examples = input_pipeline._target_examples(config, {"train": labels}, ("train",))
  held_out = set(examples.val_pids.tolist())
  assert len(held_out) == 3 and results["num_gallery"] == np.isin(labels.pids, list(held_out)).sum()
  assert held_out.isdisjoint(labels.pids[examples.record_index].tolist())
  target = input_pipeline.create_target_pipeline(config, 0, 1, source_steps_per_epoch=1)
  assert target.num_images == len(examples) == len(labels) - results["num_gallery"]
  source = input_pipeline.create_source_pipeline(config, 0, 1)
  whole = input_pipeline.create_source_pipeline(tiny_config(more_ids_dirs), 0, 1)
  assert (source.num_images, source.num_classes) == (whole.num_images, whole.num_classes)


@pytest.mark.slow
def test_adabn_evaluates_and_saves_target_statistics(more_ids_dirs, tmp_path, compilation_cache):
  """eval.adabn: R's BatchNorm statistics are re-estimated on the target's training images (without the
  held-out validation identities) before each evaluation and checkpoint, so eval mode on the checkpoint gives
  the numbers the run reported, and recomputing them from the saved weights gives the saved statistics."""
  del compilation_cache
  config = tiny_config(more_ids_dirs, num_steps=2)  # gta2duke:tiny
  config.data.val, config.data.val_ids = True, 3
  config.eval.adabn = True
  trainer.train_and_evaluate(config, str(tmp_path))
  reported = json.load(open(tmp_path / "eval" / "market1501.json"))
  again = evaluator.evaluate(config, str(tmp_path), step=2)["market1501"]
  assert again["mAP"] == pytest.approx(reported["mAP"], abs=1e-6)
  assert again["cmc"] == pytest.approx(reported["cmc"])
  models, variables, _ = inference.restore_for_inference(config, str(tmp_path), step=2)
  mesh = sharding.create_mesh()
  state = TrainState(step=jnp.int32(2), params=variables["params"], batch_stats=variables["batch_stats"],
                     opt_state={})
  recomputed = trainer.make_adabn(config, models, mesh)(state).batch_stats["reid"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               variables["batch_stats"]["reid"], recomputed)
  target = input_pipeline.create_target_pipeline(config, 0, 1, source_steps_per_epoch=1)
  stream = input_pipeline.create_target_train_pipeline(config, 4, 1)
  assert stream.num_images == target.num_images  # the held-out identities' images are left out
  # Without AdaBN the same run saves the training running averages instead.
  plain = tiny_config(more_ids_dirs, num_steps=2)
  plain.data.val, plain.data.val_ids = True, 3
  trainer.train_and_evaluate(plain, str(tmp_path / "plain"))
  _, plain_variables, _ = inference.restore_for_inference(plain, str(tmp_path / "plain"), step=2)
  for name in ("generator", "reid"):  # training itself is unchanged
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), variables["params"][name],
                 plain_variables["params"][name])
  differs = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"]["reid"],
                         plain_variables["batch_stats"]["reid"])
  assert all(jax.tree.leaves(differs))


def test_adabn_on_a_target_smaller_than_two_images_is_a_config_error(more_ids_dirs):
  config = tiny_config(more_ids_dirs)
  config.eval.adabn = True
  records = {"train": [{"image": b"", "pid": 1, "camid": 0, "filename": "0001_c1s1_000001_00.jpg"}]}
  with pytest.raises(ConfigError, match="adabn: the target 'dukemtmc_reid' has 1 training images"):
    input_pipeline.create_target_train_pipeline(config, 4, 1, data_sources=records)


@pytest.mark.slow
def test_baseline_validates_on_held_out_source_identities(more_ids_dirs, tmp_path, compilation_cache,
                                                          monkeypatch, capsys):
  """Without a target (the baseline) data.val holds source identities out (eval/gta_synthreid-val.json); a
  run from random weights where the original started from ImageNet says so in one line."""
  del compilation_cache
  config = baseline.get_config("tiny")
  config.data.manual_dir, config.data.data_dir = more_ids_dirs
  config.data.eval_datasets = ("market1501",)
  config.data.val, config.data.val_ids = True, 2
  config.train.num_steps = 2
  # The notice is for a ResNet-50 that ImageNet weights fit: let the tiny one stand for it.
  monkeypatch.setitem(import_torch.IMAGENET_RESNET50, "reid_width", config.model.reid_width)
  monkeypatch.setitem(import_torch.IMAGENET_RESNET50, "reid_stages", tuple(config.model.reid_stages))
  trainer.train_and_evaluate(config, str(tmp_path))
  results = json.load(open(tmp_path / "eval" / "gta_synthreid-val.json"))
  assert results["dataset"] == "gta_synthreid-val" and results["num_query"] > 0
  assert _selection(tmp_path, 2)["selected_on"] == "gta_synthreid-val"
  notices = [line for line in capsys.readouterr().out.splitlines() if "pretrained_reid is empty" in line]
  assert len(notices) == 1 and import_torch.CONVERT_COMMAND in notices[0]


def test_metrics_file_cut_short_is_mended_on_resume_and_a_damaged_line_is_named(tmp_path):
  path = tmp_path / metric_writer.METRICS_FILE
  path.write_text('{"step": 1, "nce": 1.0}\n{"step": 2, "nce": 2.0}\n{"step": 3, "n')  # the disk filled here
  assert [r["step"] for r in metric_writer.read_metrics(str(tmp_path))] == [1, 2]
  with metric_writer.MetricWriter(str(tmp_path), tensorboard=False, initial_step=2) as writer:
    writer.write_scalars(3, {"nce": 3.0})
  assert path.read_text() == '{"step": 1, "nce": 1.0}\n{"step": 2, "nce": 2.0}\n{"step": 3, "nce": 3.0}\n'
  path.write_text('{"step": 1, "nce": 1.0}\n{"step": 2, "n\n{"step": 3, "nce": 3.0}\n')
  with pytest.raises(MetricsFileError, match=r"metrics.jsonl, line 2, cannot be read .*fix or remove"):
    metric_writer.MetricWriter(str(tmp_path), tensorboard=False, initial_step=3)


def read_events(folder):
  """(step, tag, value) of every scalar in the TensorBoard event files under `folder` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  scalars = []
  for name in sorted(os.listdir(folder)):
    data = (folder / name).read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      scalars += [(event.step, value.tag, value.simple_value) for value in event.summary.value]
  return scalars


def test_tensorboard_events_are_written_on_the_callers_thread_and_a_full_disk_raises(tmp_path, monkeypatch):
  with metric_writer.MetricWriter(str(tmp_path)) as writer:
    writer.write_scalars(1, {"nce": 1.5})
    writer.write_summary(1, {"mAP": 0.25}, prefix="eval/market")
  assert read_events(tmp_path / metric_writer.TENSORBOARD_DIR) == [(1, "train/nce", 1.5),
                                                                   (1, "eval/market/mAP", 0.25)]
  # /dev/full fails every write with ENOSPC: the error reaches the run, no writer thread dies unseen.
  monkeypatch.setattr(tensorboardX.record_writer, "open_file", lambda path: open("/dev/full", "wb"))
  threads = threading.active_count()
  with pytest.raises(OSError, match="No space left"):
    metric_writer.MetricWriter(str(tmp_path / "full"))
  assert threading.active_count() == threads
