"""Experiment configs: they load (full and :tiny), use only documented keys and pass the trainer's checks."""

import importlib
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from synth_reid_jax import config_checks  # noqa: E402

EXPERIMENTS = ("gta2market", "gta2duke", "gta2cuhk03", "gta2msmt17", "baseline", "demo", "demo_baseline")
THESIS = {"gta2market": "market1501", "gta2duke": "dukemtmc_reid", "gta2cuhk03": "cuhk03/detected",
          "gta2msmt17": "msmt17"}  # MSMT17 is not in the thesis, but its config has the same form


def load(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def default():
  return importlib.import_module("configs.default").get_config()


def flat(config):
  return config_checks.flatten(config)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_every_experiment_is_valid_and_uses_documented_keys(name, arg):
  config = load(name, arg)
  config_checks.validate_config(config, reference=default())
  assert set(flat(config)) == set(flat(default()))


@pytest.mark.parametrize("name", THESIS)
def test_thesis_configs_change_only_the_domains(name):
  config, base = flat(load(name)), flat(default())
  changed = {k for k in base if config[k] != base[k]}
  assert changed <= {"data.target", "data.eval_datasets"}
  assert config["data.source"] == "gta_synthreid" and config["data.target"] == THESIS[name]
  # Market (the thesis' test set) comes first: it ranks the best checkpoint.
  assert config["data.eval_datasets"][0] == "market1501"


def test_baseline_is_direct_transfer_with_reid_losses_only():
  config = load("baseline")
  assert config.model.backbone == "resnet50"
  assert (config.loss.gan, config.loss.dis, config.loss.nce, config.loss.nce_idt, config.loss.sim) == (0,) * 5
  assert config.loss.reid_ce > 0 and not config_checks.needs_target(config)


def test_demo_pair_is_the_toy_domains():
  for name in ("demo", "demo_baseline"):
    config = load(name)
    assert (config.data.source, config.data.eval_datasets) == ("reid_toy/synthetic", ("reid_toy/real",))
    assert config.data.height * config.data.width <= 64 * 32
  assert config_checks.needs_target(load("demo")) and not config_checks.needs_target(load("demo_baseline"))
  assert load("demo_baseline").model.backbone == "resnet50"  # the thesis' direct transfer, as baseline.py


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_is_the_same_experiment_shrunk(name):
  full, tiny = flat(load(name)), flat(load(name, "tiny"))
  for key in ("data.source", "data.target", "data.eval_datasets", "model.backbone", "loss.gan", "loss.nce",
              "loss.sim", "loss.reid_ce"):
    assert tiny[key] == full[key], key
  assert tiny["data.height"] * tiny["data.width"] <= 32 * 16
  assert tiny["train.num_steps"] <= 8 and tiny["model.ngf"] <= 8 and tiny["model.reid_stages"] == (1, 1, 1)


def test_unknown_config_argument_is_rejected():
  with pytest.raises(ValueError, match="Unknown config argument 'huge'.*:tiny"):
    load("gta2duke", "huge")


def test_validation_names_every_problem_and_the_fix():
  config = load("gta2duke", "tiny")
  config.data.height = 30
  config.data.source = "gta5"
  config.loss.nce_layers = (0, 9)
  config.loss.dis_layers = (1, 7)
  with pytest.raises(ValueError) as error:
    config_checks.validate_config(config)
  message = str(error.value)
  assert "config.data.height=30 must be a positive multiple of 4" in message
  assert "config.data.source='gta5' is not a dataset" in message and "market1501" in message
  assert "[9] out of range" in message and "layers 0..5" in message
  assert "[7] out of range" in message


def test_unknown_key_suggests_the_documented_one():
  config = load("demo", "tiny")
  config.train.unlock()
  config.train.batch_sise = 8
  with pytest.raises(ValueError, match=r"key config.train.batch_sise \(did you mean config.train.batch_size"):
    config_checks.validate_config(config, reference=default())


def test_batch_must_split_over_devices():
  config = load("demo", "tiny")
  config.train.batch_size = 6
  with pytest.raises(ValueError, match=r"config.train.batch_size=6 is not divisible by the 4 devices.*=4"):
    config_checks.validate_for_devices(config, 4)
