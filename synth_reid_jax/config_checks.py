"""Config checks before anything is read, written or compiled, and the workdir's config.json.

`RULES` holds what each key of configs/default.py may hold (type and range), `CROSS_RULES` the constraints
between keys; `validate_config` lists every problem at once, each naming the key, its value and what is
allowed. Keys with a fixed set of values are checked against the list the code that uses them keeps, so the
check and the code cannot disagree. What can only be judged against the data (validation identities, the PK
sampler's identities per batch) is checked by the input pipeline as it reads the dataset's labels, before
the trainer writes config.json or compiles anything.
"""

import dataclasses
import difflib
import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

from synth_reid_jax import evaluation, input_pipeline, losses, storage, train_step, transforms
from synth_reid_jax.errors import ConfigError
from synth_reid_jax.models import BACKBONES, BASELINE_BACKBONES, CONV_IMPLS
from synth_reid_jax.models.discriminator import NUM_LAYERS as DISCRIMINATOR_LAYERS
from synth_reid_jax.models.forms import NONFINITE_GUARDS
from synth_reid_jax.models.generator import FIRST_BLOCK_LAYER
from synth_reid_jax.models.layers import COMPUTE_DTYPES

CONFIG_FILE = "config.json"
# Keys whose values fix parameter shapes or the classifier width: a workdir trained with other values cannot
# be evaluated with this config (nor resumed: see RESUMABLE_KEYS).
SHAPE_KEYS = ("model.backbone", "model.ngf", "model.n_blocks", "model.ndf", "model.projector_dim",
              "model.reid_stages", "model.reid_width", "loss.nce_layers", "data.source", "data.combineall",
              "data.combineall_query", "data.val", "data.val_ids")
# With a target, validation holds out target identities: the source's classes, so the classifier's width,
# stay whatever data.val says, and a run trained with validation is evaluated without it.
_SOURCE_VAL_KEYS = ("data.val", "data.val_ids")
# The only keys a resumed run may change: how long it trains, how it is observed, evaluated and saved, where
# the datasets are read from and how fast. Every other key fixes what the checkpoints mean (batches, data,
# augmentation, model, losses, schedule, optimisers, seed) and must keep the value it had.
RESUMABLE_KEYS = (
    "train.num_epochs", "train.num_steps", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.sample_every_steps", "train.num_samples", "train.eval_every_epochs",
    "train.on_nonfinite", "train.nonfinite_guard", "train.divergence_factor",
    "eval.batch_size", "eval.flip", "eval.metric", "eval.normalize", "eval.rerank", "eval.cuhk03_metric",
    "eval.ranks", "eval.visrank_topk",
    "data.eval_datasets", "data.manual_dir", "data.data_dir", "data.num_workers", "data.prefetch",
    "model.conv_impl", "model.remat",
)
# Keys with a fixed set of values, and the code's own list of them.
CHOICES = {
    "model.backbone": BACKBONES,
    "model.dtype": COMPUTE_DTYPES,
    "model.conv_impl": CONV_IMPLS,
    "loss.sim_type": losses.FEATURE_MATCHING_KINDS,
    "train.on_nonfinite": train_step.NONFINITE_ACTIONS,
    "train.nonfinite_guard": NONFINITE_GUARDS,
    "eval.metric": evaluation.DISTANCE_METRICS,
    "data.sampler": input_pipeline.SAMPLERS,
}
OPTIMIZERS = ("generator", "discriminator", "projector", "reid")  # the config.optim.<name> blocks


# --- What one value may be ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """`test(value)` holds for the values `allowed` describes (words that complete "allowed: ...")."""
  allowed: str | Callable[[], str]
  test: Callable[[Any], bool]

  def describe(self):
    return self.allowed() if callable(self.allowed) else self.allowed


def _is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(low, high=None, multiple_of=1):
  words = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
  if multiple_of > 1:
    words += f", a multiple of {multiple_of}"
  in_range = lambda v: v >= low and (high is None or v <= high)  # noqa: E731
  return Rule(words, lambda v: _is_int(v) and in_range(v) and v % multiple_of == 0)


def number(low=None, high=None, *, low_open=False, high_open=False):
  """A finite real number in the interval (open or closed at each end; None: unbounded)."""
  if high is None:
    words = f"a finite number {'>' if low_open else '>='} {low}" if low is not None else "a finite number"
  else:
    words = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

  def test(v):
    if not _is_number(v):
      return False
    above = low is None or (v > low if low_open else v >= low)
    below = high is None or (v < high if high_open else v <= high)
    return above and below
  return Rule(words, test)


def boolean():
  return Rule("True or False", lambda v: isinstance(v, bool))


def text(empty=True):
  return Rule("a string" if empty else "a non-empty string",
              lambda v: isinstance(v, str) and (empty or bool(v.strip())))


def one_of(choices):
  return Rule(f"one of {tuple(choices)}", lambda v: isinstance(v, str) and v in choices)


def optional(rule):
  return Rule(lambda: f"None or {rule.describe()}", lambda v: v is None or rule.test(v))


def sequence(item, length=None, min_length=0, ordered=False):
  """A tuple (or list) of values that each pass `item`; `ordered`: non-decreasing."""
  def words():
    size = f"{length} " if length is not None else ("1 or more " if min_length == 1 else "")
    order = ", in increasing order" if ordered else ""
    return f"a tuple of {size}values, each {item.describe()}{order}"

  def test(v):
    if isinstance(v, str) or not isinstance(v, Sequence):
      return False
    if (length is not None and len(v) != length) or len(v) < min_length:
      return False
    return all(item.test(x) for x in v) and (not ordered or list(v) == sorted(v))
  return Rule(words, test)


def _dataset_names():
  from synth_reid_jax.datasets import DATASET_NAMES  # imports TFDS: only when a dataset name is checked
  return DATASET_NAMES


def dataset():
  return Rule(lambda: f"a dataset name, one of {_dataset_names()}",
              lambda v: isinstance(v, str) and v in _dataset_names())


def _erase_area(v):
  return sequence(number(0, 1, low_open=True), length=2).test(v) and v[0] <= v[1]


LEARNING_RATE = number(0, low_open=True)
WEIGHT = number(0)  # a loss weight; 0 turns the term off
RULES = {
    "seed": integer(0, 2**32 - 1),
    # data
    "data.source": dataset(),
    "data.target": text(),  # a dataset when a loss reads real images (CROSS_RULES)
    "data.eval_datasets": sequence(dataset()),
    "data.manual_dir": text(empty=False),
    "data.data_dir": text(empty=False),
    "data.height": integer(4, multiple_of=4),  # the generator downsamples twice
    "data.width": integer(4, multiple_of=4),
    "data.n_samples": integer(0),
    "data.combineall": boolean(),
    "data.combineall_query": boolean(),
    "data.transforms": sequence(one_of(transforms.TRAIN_TRANSFORMS)),
    "data.crop_scale": number(1),  # the crop window must fit in the enlarged image
    "data.crop_prob": number(0, 1),
    "data.pad_size": integer(0),
    "data.jitter_brightness": number(0),
    "data.jitter_contrast": number(0),
    "data.jitter_saturation": number(0),
    "data.jitter_hue": number(0, 0.5),  # at most half the hue circle
    "data.erase_prob": number(0, 1),
    "data.erase_area": Rule("two numbers 0 < low <= high <= 1 (fractions of the image)", _erase_area),
    "data.erase_aspect": number(0, 1, low_open=True),
    "data.mean": sequence(number(), length=3),
    "data.std": sequence(number(0, low_open=True), length=3),
    "data.num_workers": integer(0),
    "data.prefetch": integer(1),
    "data.sampler": one_of(CHOICES["data.sampler"]),
    "data.num_instances": integer(1),
    "data.val": boolean(),
    "data.val_ids": integer(1),
    "data.msmt17_list_val": boolean(),
    "data.target_restarts": boolean(),
    # model
    "model.backbone": one_of(CHOICES["model.backbone"]),
    "model.ngf": integer(1),
    "model.n_blocks": integer(1),
    "model.ndf": integer(1),
    "model.projector_dim": integer(1),
    "model.reid_stages": sequence(integer(1), length=3),
    "model.reid_width": integer(1),
    "model.dtype": one_of(CHOICES["model.dtype"]),
    "model.remat": boolean(),
    "model.conv_impl": one_of(CHOICES["model.conv_impl"]),
    "model.pretrained_reid": text(),
    # losses
    "loss.gan": WEIGHT,
    "loss.dis": WEIGHT,
    "loss.nce": WEIGHT,
    "loss.nce_idt": WEIGHT,
    "loss.sim": WEIGHT,
    "loss.sim_type": one_of(CHOICES["loss.sim_type"]),
    "loss.reid_ce": WEIGHT,
    "loss.reid_triplet": WEIGHT,
    "loss.triplet_margin": number(0),
    "loss.label_smoothing": number(0, 1, high_open=True),
    "loss.nce_temperature": number(0, low_open=True),
    "loss.num_patches": integer(1),
    "loss.nce_layers": sequence(integer(0)),  # the range depends on model.n_blocks (CROSS_RULES)
    "loss.dis_layers": sequence(integer(0, DISCRIMINATOR_LAYERS - 1)),
    "loss.guide_gen": boolean(),
    "loss.reid_start_epoch": integer(1),
    # optimisers
    **{f"optim.{name}.{key}": rule for name in OPTIMIZERS for key, rule in (
        ("lr", LEARNING_RATE),
        ("b1", number(0, 1, high_open=True)),
        ("b2", number(0, 1, high_open=True)),
        ("eps", number(0, low_open=True)),
        ("weight_decay", number(0)),
        ("milestones", sequence(integer(0), ordered=True)),
        ("gamma", number(0, low_open=True)),
    )},
    # training
    "train.batch_size": integer(1),
    "train.num_epochs": integer(1),
    "train.num_steps": optional(integer(1)),  # None: num_epochs
    "train.log_every_steps": integer(1),
    "train.eval_every_epochs": integer(1),
    "train.checkpoint_every_steps": integer(1),
    "train.keep_checkpoints": integer(1),
    "train.sample_every_steps": integer(1),
    "train.num_samples": integer(1),
    "train.on_nonfinite": one_of(CHOICES["train.on_nonfinite"]),
    "train.nonfinite_guard": one_of(CHOICES["train.nonfinite_guard"]),
    "train.divergence_factor": number(1, low_open=True),
    # evaluation
    "eval.batch_size": integer(1),
    "eval.flip": boolean(),
    "eval.metric": one_of(CHOICES["eval.metric"]),
    "eval.normalize": boolean(),
    "eval.rerank": boolean(),
    "eval.cuhk03_metric": boolean(),
    "eval.ranks": sequence(integer(1), min_length=1),
    "eval.visrank_topk": integer(0),
    "eval.adabn": boolean(),
}


# --- Constraints between keys ---------------------------------------------------------------------------


def needs_target(config):
  """Whether a loss reads real images: D's real term, feature matching, identity PatchNCE."""
  return _reads_target(flatten(config))


def _reads_target(v):
  """needs_target on flattened values (flatten(config))."""
  return v["model.backbone"] == "generator" and (
      v["loss.dis"] > 0 or v["loss.sim"] > 0 or (v["loss.nce"] > 0 and v["loss.nce_idt"] > 0))


def _target_is_a_dataset(v):
  if _reads_target(v) and v["data.target"] not in _dataset_names():
    return (f"config.data.target={v['data.target']!r} is not a dataset; use one of {_dataset_names()} "
            "(a loss reads real images: loss.dis, loss.sim or loss.nce_idt > 0)")


def _val_target_is_a_dataset(v):
  if v["data.val"] and v["data.target"] and v["data.target"] not in _dataset_names():
    return (f"config.data.target={v['data.target']!r} is not a dataset; use one of {_dataset_names()} "
            "(config.data.val holds out target identities; '' validates on the source)")


def _transforms_combine(v):
  try:
    transforms.check_transforms(v["data.transforms"])
  except ValueError as e:
    return str(e)


def _nce_layers_in_range(v):
  num_layers = FIRST_BLOCK_LAYER + v["model.n_blocks"]
  bad = [layer for layer in v["loss.nce_layers"] if layer >= num_layers]
  if v["loss.nce"] > 0 and (bad or not v["loss.nce_layers"]):
    return (f"config.loss.nce_layers={tuple(v['loss.nce_layers'])}: {bad} out of range; allowed: 1 or more "
            f"encoder layers, which with model.n_blocks={v['model.n_blocks']} are 0..{num_layers - 1}")


def _dis_layers_given(v):
  if v["loss.sim"] > 0 and not v["loss.dis_layers"]:
    return (f"config.loss.dis_layers=(): loss.sim={v['loss.sim']} matches discriminator features, so "
            f"allowed: 1 or more layers in 0..{DISCRIMINATOR_LAYERS - 1}")


def _baseline_has_no_generator(v):
  translation = ("gan", "dis", "nce", "nce_idt", "sim")
  if v["model.backbone"] in BASELINE_BACKBONES and any(v[f"loss.{k}"] > 0 for k in translation):
    return (f"config.model.backbone={v['model.backbone']!r} (direct transfer) has no generator: set "
            "config.loss.{gan, dis, nce, nce_idt, sim} to 0 (see configs/baseline.py)")


def _reid_trains(v):
  if v["loss.reid_ce"] <= 0 and v["loss.reid_triplet"] <= 0:
    return "config.loss.reid_ce and reid_triplet are both 0: the re-ID network would never train"


def _pk_batches(v):
  batch, k = v["train.batch_size"], v["data.num_instances"]
  if v["data.sampler"] == "pk" and batch % k:
    return (f"config.train.batch_size={batch} with config.data.sampler='pk' and "
            f"config.data.num_instances={k}: the batch must be a multiple of num_instances (P identities x "
            f"K images), e.g. {max(1, batch // k) * k}")


def _query_needs_combineall(v):
  if v["data.combineall_query"] and not v["data.combineall"]:
    return ("config.data.combineall_query=True merges the query split into combineall's source set: it needs "
            "config.data.combineall=True")


def _adabn_needs_target(v):
  if v["eval.adabn"] and not _reads_target(v):
    return ("config.eval.adabn=True re-estimates R's BatchNorm statistics on the target's training images, "
            "but this config reads no target (direct transfer, or no loss that reads real images); set "
            "config.eval.adabn=False")


# (keys read, check -> message or None); a check runs only when each of its keys passed its own rule.
CROSS_RULES = (
    (("model.backbone", "loss.dis", "loss.sim", "loss.nce", "loss.nce_idt", "data.target"),
     _target_is_a_dataset),
    (("data.val", "data.target"), _val_target_is_a_dataset),
    (("data.transforms",), _transforms_combine),
    (("model.n_blocks", "loss.nce", "loss.nce_layers"), _nce_layers_in_range),
    (("loss.sim", "loss.dis_layers"), _dis_layers_given),
    (("model.backbone", "loss.gan", "loss.dis", "loss.nce", "loss.nce_idt", "loss.sim"),
     _baseline_has_no_generator),
    (("loss.reid_ce", "loss.reid_triplet"), _reid_trains),
    (("train.batch_size", "data.sampler", "data.num_instances"), _pk_batches),
    (("data.combineall", "data.combineall_query"), _query_needs_combineall),
    (("eval.adabn", "model.backbone", "loss.dis", "loss.sim", "loss.nce", "loss.nce_idt"),
     _adabn_needs_target),
)


# --- The check -----------------------------------------------------------------------------------------


def flatten(config, prefix=""):
  """{"data.height": 256, ...} of a ConfigDict or nested dicts."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _unknown_keys(values, reference):
  known = flatten(reference)
  problems = []
  for key in sorted(set(values) - set(known)):
    close = difflib.get_close_matches(key, known, n=1)
    problems.append(f"unknown key config.{key}" + (f" (did you mean config.{close[0]}?)" if close else "")
                    + "; every key is documented in configs/default.py")
  return problems


def _shown(value):
  return repr(tuple(value) if isinstance(value, list) else value)


def config_problems(config, reference=None):
  """Every problem of `config`, one line each: unknown keys (when `reference`, configs/default.py's config,
  lists the known ones), values outside their key's rule, and broken constraints between keys."""
  values = flatten(config)
  problems = _unknown_keys(values, reference) if reference is not None else []
  passed = set()
  for key, rule in RULES.items():
    if key not in values:
      continue
    if rule.test(values[key]):
      passed.add(key)
    else:
      problems.append(f"config.{key}={_shown(values[key])}; allowed: {rule.describe()}")
  for keys, check in CROSS_RULES:
    if all(key in passed for key in keys):
      message = check(values)
      if message:
        problems.append(message)
  return problems


def validate_config(config, reference=None):
  """Raises with every mistake a config can hold, before anything is read, written or compiled."""
  problems = config_problems(config, reference)
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


def validate_for_devices(config, num_devices):
  """Batches must split evenly over the devices."""
  for key in ("train.batch_size", "eval.batch_size"):
    section, name = key.split(".")
    value = config[section][name]
    if value % num_devices:
      suggestion = max(1, value // num_devices) * num_devices
      raise ConfigError(f"config.{key}={value} is not divisible by the {num_devices} devices; set it to a "
                       f"multiple of {num_devices}, e.g. --config.{key}={suggestion}.")


# --- The workdir's config.json ---------------------------------------------------------------------------


def config_json(config):
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def has_checkpoints(workdir):
  """Whether `workdir` holds a finished checkpoint (checkpoints/<step>); cheap, reads no checkpoint."""
  directory = os.path.join(os.path.expanduser(workdir), "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_workdir_config(config, workdir, resume=False):
  """Raises if `workdir` holds checkpoints that `config` cannot use.

  Any mode: the keys that fix parameter shapes (SHAPE_KEYS) must match config.json. `resume` (training):
  every key but RESUMABLE_KEYS must. A workdir without checkpoints takes any config: nothing in it depends
  on the old one (a start that failed before its first checkpoint leaves no trace that matters).
  """
  path = os.path.join(os.path.expanduser(workdir), CONFIG_FILE)
  if not os.path.exists(path) or not has_checkpoints(workdir):
    return
  try:
    with open(path) as f:
      old = flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError(f"Cannot read {path} ({e}). Restore it from a backup, or move it away if this workdir "
                     "is to start over with the current config.") from e
  new = flatten(config_json(config))
  if resume:
    keys = [key for key in old if key not in RESUMABLE_KEYS]
  else:
    with_target = old.get("data.target") and new.get("data.target")
    keys = [key for key in SHAPE_KEYS if not (key in _SOURCE_VAL_KEYS and with_target)]
  differ = [f"{key}: {_shown(old[key])} in config.json, {_shown(new.get(key))} now"
            for key in keys if key in old and key in new and old[key] != new[key]]
  if not differ:
    return
  if resume:
    raise ConfigError(
        f"Cannot resume the run in {workdir}: these keys fix what its checkpoints mean and differ from "
        f"{path}:\n  " + "\n  ".join(differ) + "\nResume with the values in config.json, or train from "
        "scratch in a new workdir (--workdir=<new folder>). Only how long a run trains, how it is logged, "
        "evaluated and checkpointed, and where and how fast it reads data may change on resume (README).")
  raise ConfigError(f"The workdir {workdir} holds a run with a different model or identity set:\n  "
                   + "\n  ".join(differ) + f"\nUse a fresh --workdir, or the config in {path}.")


def write_config(config, workdir):
  """<workdir>/config.json: the config of the latest run in this workdir.

  Written to a temporary file and renamed, so that a reader (another process of a multi-host run checking
  the workdir, or a crash halfway) sees the old file or the new one, never a partial one.
  """
  storage.write_file(os.path.join(workdir, CONFIG_FILE),
                     config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
