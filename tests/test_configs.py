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


def test_demo_is_the_thesis_triplet_variant_and_its_baseline_softmax_only():
  demo, tiny_demo, base = load("demo"), load("demo", "tiny"), load("demo_baseline")
  assert (demo.loss.reid_ce, demo.loss.reid_triplet, demo.data.sampler, demo.data.num_instances) == (
      0.5, 1.0, "pk", 2)
  assert tiny_demo.train.batch_size // tiny_demo.data.num_instances >= 2  # the triplet loss has negatives
  assert (base.loss.reid_triplet, base.data.sampler) == (0.0, "random")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_is_the_same_experiment_shrunk(name):
  full, tiny = flat(load(name)), flat(load(name, "tiny"))
  for key in ("data.source", "data.target", "data.eval_datasets", "model.backbone", "loss.gan", "loss.nce",
              "loss.sim", "loss.reid_ce", "loss.reid_triplet", "data.sampler"):
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
  assert "config.data.height=30; allowed: an integer >= 4, a multiple of 4" in message
  assert "config.data.source='gta5'; allowed: a dataset name, one of" in message and "market1501" in message
  assert "[9] out of range" in message and "are 0..5" in message
  assert "config.loss.dis_layers=(1, 7); allowed: a tuple of values, each an integer in [0, 5]" in message


# --- every key has a rule (configs/default.py and config_checks.RULES cannot drift apart) -------------------


def test_every_documented_key_has_a_rule_and_a_resume_policy():
  keys = set(flat(default()))
  assert keys == set(config_checks.RULES), "a key of configs/default.py without a rule, or a stale rule"
  assert set(config_checks.RESUMABLE_KEYS) <= keys and set(config_checks.SHAPE_KEYS) <= keys
  assert not set(config_checks.SHAPE_KEYS) & set(config_checks.RESUMABLE_KEYS)
  for key in ("train.batch_size", "data.source", "data.target", "data.height", "seed", "optim.reid.lr",
              "optim.generator.milestones", "loss.nce"):
    assert key not in config_checks.RESUMABLE_KEYS, key


@pytest.mark.parametrize("key", sorted(config_checks.RULES))
def test_every_rule_checks_the_type(key):
  rule = config_checks.RULES[key]
  assert rule.test(flat(default())[key]), key  # the documented default is allowed
  assert not rule.test(object()) and rule.describe(), key


# One wrong value per class of the issue; each must come back as one problem naming the key, the value and
# what is allowed.
BAD_VALUES = [
    ("optim.generator.lr", -1.0, "a finite number > 0"),
    ("optim.reid.lr", float("inf"), "a finite number > 0"),
    ("optim.projector.b2", 1.0, "a number in [0, 1)"),
    ("optim.reid.milestones", (40, 30), "in increasing order"),
    ("loss.reid_ce", -0.5, "a finite number >= 0"),
    ("loss.nce_temperature", 0.0, "a finite number > 0"),
    ("loss.num_patches", 0, "an integer >= 1"),
    ("loss.label_smoothing", 1.0, "a number in [0, 1)"),
    ("model.ngf", 0, "an integer >= 1"),
    ("model.ndf", -3, "an integer >= 1"),
    ("model.reid_stages", (1, 1), "a tuple of 3 values"),
    ("data.mean", (0.5, 0.5), "a tuple of 3 values, each a finite number"),
    ("data.std", (0.5, 0.0, 0.5), "each a finite number > 0"),
    ("data.pad_size", -2, "an integer >= 0"),
    ("data.n_samples", -1, "an integer >= 0"),
    ("data.num_workers", -1, "an integer >= 0"),
    ("data.jitter_hue", 0.7, "a number in [0, 0.5]"),
    ("data.jitter_brightness", -0.1, "a finite number >= 0"),
    ("data.crop_prob", 1.5, "a number in [0, 1]"),
    ("data.erase_area", (0.4, 0.02), "0 < low <= high <= 1"),
    ("data.val_ids", 0, "an integer >= 1"),
    ("eval.batch_size", 0, "an integer >= 1"),
    ("eval.ranks", (), "1 or more values"),
    ("train.num_steps", 0, "None or an integer >= 1"),
    ("train.divergence_factor", 0.5, "a finite number > 1"),
    ("seed", -1, "an integer in [0, 4294967295]"),
]


@pytest.mark.parametrize("key, value, allowed", BAD_VALUES)
def test_a_bad_value_is_named_with_what_is_allowed(key, value, allowed):
  config = load("gta2duke", "tiny")
  section, *rest = key.split(".")
  node = config
  for part in [section, *rest][:-1]:
    node = node[part]
  with node.ignore_type() if hasattr(node, "ignore_type") else config.ignore_type():
    node[key.split(".")[-1]] = value
  problems = config_checks.config_problems(config, reference=default())
  assert len(problems) == 1, problems
  shown = repr(tuple(value) if isinstance(value, (tuple, list)) else value)
  assert problems[0] == f"config.{key}={shown}; allowed: " + problems[0].split("; allowed: ", 1)[1]
  assert allowed in problems[0], problems[0]


@pytest.mark.parametrize("changes, message", [
    ({"data.sampler": "pk", "data.num_instances": 3},
     "config.train.batch_size=4 with config.data.sampler='pk' and config.data.num_instances=3"),
    ({"data.combineall": False, "data.combineall_query": True}, "combineall_query=True"),
    ({"loss.reid_ce": 0.0}, "reid_ce and reid_triplet are both 0"),
    ({"data.transforms": ("pad",)}, "pad without random_crop"),
    ({"data.target": "nowhere"}, "config.data.target='nowhere' is not a dataset"),
    ({"model.backbone": "resnet50"}, "has no generator"),
])
def test_constraints_between_keys(changes, message):
  config = load("gta2duke", "tiny")
  for key, value in changes.items():
    section, name = key.split(".")
    config[section][name] = value
  problems = config_checks.config_problems(config)
  assert len(problems) == 1 and message in problems[0], problems


def test_adabn_needs_a_target():
  config = load("demo_baseline", "tiny")
  config.eval.adabn = True
  problems = config_checks.config_problems(config)
  assert len(problems) == 1 and "config.eval.adabn=True" in problems[0] and "reads no target" in problems[0]
  method = load("demo", "tiny")
  method.eval.adabn = True
  assert config_checks.config_problems(method) == []


def test_every_problem_is_listed_at_once():
  config = load("gta2duke", "tiny")
  config.optim.generator.lr = -1.0
  config.model.ngf = 0
  config.eval.batch_size = 0
  config.data.std = (0.5, 0.0, 0.5)
  with pytest.raises(ValueError) as error:
    config_checks.validate_config(config, reference=default())
  lines = str(error.value).splitlines()
  assert lines[0] == "Invalid config:" and len(lines) == 5
  for key in ("optim.generator.lr=-1.0", "model.ngf=0", "eval.batch_size=0", "data.std=(0.5, 0.0, 0.5)"):
    assert any(f"config.{key}; allowed" in line for line in lines), key


# --- resuming: what may change ------------------------------------------------------------------------------


def trained_workdir(tmp_path, config):
  """A workdir as a run leaves it: config.json and a checkpoint folder (its contents are not read)."""
  config_checks.write_config(config, str(tmp_path))
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  return str(tmp_path)


def test_resume_refuses_a_change_of_what_the_checkpoints_mean(tmp_path):
  workdir = trained_workdir(tmp_path, load("gta2duke", "tiny"))
  changed = load("gta2duke", "tiny")
  changed.train.batch_size = 8
  changed.data.target = "market1501"
  changed.optim.reid.lr = 1e-3
  with pytest.raises(ValueError) as error:
    config_checks.check_workdir_config(changed, workdir, resume=True)
  message = str(error.value)
  assert f"Cannot resume the run in {workdir}" in message and "--workdir=<new folder>" in message
  for line in ("train.batch_size: 4 in config.json, 8 now", "data.target: 'dukemtmc_reid' in config.json, "
               "'market1501' now", "optim.reid.lr: 0.0002 in config.json, 0.001 now"):
    assert line in message, message
  config_checks.check_workdir_config(changed, workdir)  # eval reads the same shapes: not refused


def test_eval_ignores_target_validation_but_not_source_validation(tmp_path):
  """With a target, data.val holds out target identities (the classifier keeps every source identity), so a
  run trained with validation is evaluated without it; a baseline's validation changes its classes."""
  trained = load("gta2duke", "tiny")
  trained.data.val = True
  (tmp_path / "method").mkdir()
  workdir = trained_workdir(tmp_path / "method", trained)
  config_checks.check_workdir_config(load("gta2duke", "tiny"), workdir)
  trained = load("baseline", "tiny")
  trained.data.val = True
  (tmp_path / "baseline").mkdir()
  workdir = trained_workdir(tmp_path / "baseline", trained)
  with pytest.raises(ValueError, match="data.val: True in config.json, False now"):
    config_checks.check_workdir_config(load("baseline", "tiny"), workdir)


def test_resume_accepts_the_resumable_keys(tmp_path):
  workdir = trained_workdir(tmp_path, load("gta2duke", "tiny"))
  changed = load("gta2duke", "tiny")
  changed.train.num_steps = 100
  changed.train.checkpoint_every_steps = 7
  changed.eval.batch_size = 8
  changed.eval.metric = "cosine"
  changed.data.eval_datasets = ("market1501", "dukemtmc_reid")
  changed.data.num_workers = 3
  config_checks.check_workdir_config(changed, workdir, resume=True)


def test_a_workdir_without_checkpoints_takes_any_config(tmp_path):
  """A start that failed before its first checkpoint must not bind the corrected command to its values."""
  config_checks.write_config(load("gta2duke", "tiny"), str(tmp_path))
  changed = load("gta2duke", "tiny")
  changed.model.ngf = 16
  changed.train.batch_size = 8
  config_checks.check_workdir_config(changed, str(tmp_path), resume=True)
  (tmp_path / "checkpoints").mkdir()  # an empty folder (a first save that never finished) is no checkpoint
  config_checks.check_workdir_config(changed, str(tmp_path), resume=True)


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
