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


def test_baseline_is_the_originals_im_resnet_softmax_02():
  config = load("baseline")
  assert config.model.backbone == "resnet50_plain"
  assert (config.loss.gan, config.loss.dis, config.loss.nce, config.loss.nce_idt, config.loss.sim) == (0,) * 5
  assert config.loss.reid_ce > 0 and not config_checks.needs_target(config)
  # The yaml and the original's default_config, point by point.
  assert (config.data.source, config.data.combineall, config.data.n_samples) == ("gta_synthreid", False, 50)
  assert config.data.eval_datasets == ("market1501", "cuhk03/detected")
  assert (config.data.height, config.data.width, config.data.val) == (256, 128, False)
  assert (config.data.mean, config.data.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert config.data.transforms == ("random_flip", "pad", "random_crop") and config.data.pad_size == 10
  assert (config.loss.reid_ce, config.loss.reid_triplet, config.loss.label_smoothing) == (1.0, 0.0, 0.0)
  r = config.optim.reid
  assert (r.lr, r.b1, r.b2, r.weight_decay, r.milestones, r.gamma) == (
      2e-4, 0.9, 0.999, 5e-4, (20, 30, 40), 0.1)
  assert (config.train.num_epochs, config.train.batch_size, config.seed) == (60, 32, 10)
  assert (config.eval.flip, config.eval.metric, config.eval.normalize, config.eval.rerank) == (
      True, "euclidean", False, False)
  assert config.model.pretrained_reid == ""  # ImageNet weights are the user's file (see the docstring)


def test_demo_baseline_is_the_baseline_recipe_at_the_demos_size():
  demo_baseline, baseline, demo = load("demo_baseline"), flat(load("baseline")), flat(load("demo"))
  recipe = ("model.backbone", "data.combineall", "data.n_samples", "data.mean", "data.std", "data.transforms",
            "loss.reid_ce", "loss.label_smoothing", "loss.gan", "loss.nce", "loss.sim", "optim.reid.b1",
            "eval.flip", "eval.metric")
  assert {k: flat(demo_baseline)[k] for k in recipe} == {k: baseline[k] for k in recipe}
  budget = ("data.height", "data.width", "model.reid_width", "model.reid_stages", "train.num_epochs",
            "train.batch_size", "optim.reid.lr", "optim.reid.milestones")
  assert {k: flat(demo_baseline)[k] for k in budget} == {k: demo[k] for k in budget}
  assert demo_baseline.data.pad_size == 2  # 10 px at 256 high, at 64


def test_demo_pair_is_the_toy_domains():
  for name in ("demo", "demo_baseline"):
    config = load(name)
    assert (config.data.source, config.data.eval_datasets) == ("reid_toy/synthetic", ("reid_toy/real",))
    assert config.data.height * config.data.width <= 64 * 32
  assert config_checks.needs_target(load("demo")) and not config_checks.needs_target(load("demo_baseline"))
  assert load("demo_baseline").model.backbone == "resnet50_plain"  # the thesis' direct transfer, as baseline


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


# --- the ablation grid (configs/ablations.py) ---------------------------------------------------------------

ABLATIONS = importlib.import_module("configs.ablations")
# variant: the original yaml's (weight_nce, weight_idt, weight_sim, eval_flip); every one also sets
# weight_gen 1, weight_dis 0.5, weight_x 0.5, weight_t 0, feat_match, guide_gen True.
ORIGINAL_SWITCHES = {
    "nce": (0.5, 0.0, 0.0, True),  # adv_nce_resnet_joint_test_10_bottle.yaml
    "nce_fm": (0.5, 0.0, 0.5, True),  # _11_bottle
    "nce_idt": (0.5, 0.5, 0.0, True),  # _12_bottle
    "nce_idt_fm": (0.5, 0.5, 0.5, True),  # _13_bottle
    "no_nce_no_sim": (0.0, 0.0, 0.0, False),  # _11_bottle_noNCE_noSIM
    "mapping_only": (0.0, 0.0, 0.0, True),  # _mapping_only
}


def test_every_ablation_of_the_original_is_there():
  assert set(ABLATIONS.VARIANTS) == set(ORIGINAL_SWITCHES)


@pytest.mark.parametrize("variant", ORIGINAL_SWITCHES)
@pytest.mark.parametrize("form", ["{}", "{},tiny", "{}:tiny"])
def test_ablations_set_the_originals_switches_and_are_valid(variant, form):
  config = ABLATIONS.get_config(form.format(variant))
  config_checks.validate_config(config, reference=default())
  assert set(flat(config)) == set(flat(default()))
  w = config.loss
  assert (w.nce, w.nce_idt, w.sim, config.eval.flip) == ORIGINAL_SWITCHES[variant]
  assert (w.gan, w.dis, w.reid_ce, w.reid_triplet, w.sim_type, w.guide_gen) == (
      1.0, 0.5, 0.5, 0.0, "feat_match", True)
  assert (config.data.source, config.data.target, config.data.eval_datasets) == (
      "gta_synthreid", "market1501", ("market1501",))
  assert config.seed == 10
  shrunk = "tiny" in form
  assert (config.data.height == 32) == shrunk and (config.train.num_steps is not None) == shrunk


def test_final_ablation_is_the_thesis_config():
  assert flat(ABLATIONS.get_config("nce_fm")) == flat(load("gta2market"))


def test_unknown_ablation_lists_the_variants():
  for arg in (None, "", "nce_fn", "nce_fm,huge", "nce_fm,tiny,tiny"):
    with pytest.raises(ValueError, match=r"Unknown ablation.*'nce', 'nce_fm', 'nce_idt'.*'mapping_only'"):
      ABLATIONS.get_config(arg)
