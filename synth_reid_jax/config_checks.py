"""Config checks before anything is read or compiled, and the workdir's config.json.

Every key with a fixed set of values is checked against the list the code that uses it keeps (one list per
key), so the check and the code cannot disagree.
"""

import difflib
import json
import os

from synth_reid_jax import evaluation, input_pipeline, losses, train_step, transforms
from synth_reid_jax.errors import ConfigError
from synth_reid_jax.models import BACKBONES, BASELINE_BACKBONES, CONV_IMPLS
from synth_reid_jax.models.discriminator import NUM_LAYERS as DISCRIMINATOR_LAYERS
from synth_reid_jax.models.forms import NONFINITE_GUARDS
from synth_reid_jax.models.generator import FIRST_BLOCK_LAYER
from synth_reid_jax.models.layers import COMPUTE_DTYPES

CONFIG_FILE = "config.json"
# Keys whose values fix parameter shapes or the classifier width: a workdir trained with other values cannot
# be resumed or evaluated with this config.
SHAPE_KEYS = ("model.backbone", "model.ngf", "model.n_blocks", "model.ndf", "model.projector_dim",
              "model.reid_stages", "model.reid_width", "loss.nce_layers", "data.source", "data.combineall",
              "data.combineall_query", "data.val", "data.val_ids")
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
POSITIVE_TRAIN_KEYS = ("log_every_steps", "checkpoint_every_steps", "sample_every_steps", "eval_every_epochs",
                       "keep_checkpoints", "divergence_factor")


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


def needs_target(config):
  """Whether a loss reads real images: D's real term, feature matching, identity PatchNCE."""
  w = config.loss
  return config.model.backbone == "generator" and (w.dis > 0 or w.sim > 0 or (w.nce > 0 and w.nce_idt > 0))


def _unknown_keys(config, reference):
  known = flatten(reference)
  problems = []
  for key in sorted(set(flatten(config)) - set(known)):
    close = difflib.get_close_matches(key, known, n=1)
    problems.append(f"unknown key config.{key}" + (f" (did you mean config.{close[0]}?)" if close else "")
                    + "; every key is documented in configs/default.py")
  return problems


def validate_config(config, reference=None):
  """Raises with the fix for every mistake a config can hold, before any data is read or code compiled.

  `reference` (configs/default.py's config) lists the known keys: others are typos.
  """
  problems = _unknown_keys(config, reference) if reference is not None else []
  data, model, loss, train, ev = config.data, config.model, config.loss, config.train, config.eval
  values = flatten(config)
  for key, choices in CHOICES.items():
    if key in values and values[key] not in choices:
      problems.append(f"config.{key}={values[key]!r}; use one of {choices}")

  from synth_reid_jax.datasets import DATASET_NAMES  # imports TFDS: only once the cheap checks passed

  def check_dataset(name, key):
    if name not in DATASET_NAMES:
      problems.append(f"config.{key}={name!r} is not a dataset; use one of {DATASET_NAMES}")

  check_dataset(data.source, "data.source")
  if needs_target(config):
    check_dataset(data.target, "data.target")
  for name in data.eval_datasets:
    check_dataset(name, "data.eval_datasets")
  try:
    transforms.check_transforms(data.transforms)
  except ValueError as e:
    problems.append(str(e))
  for key in ("height", "width"):
    if data[key] <= 0 or data[key] % 4:
      problems.append(f"config.data.{key}={data[key]} must be a positive multiple of 4 (the generator "
                      f"downsamples twice), e.g. {max(4, data[key] // 4 * 4)}")
  num_layers = FIRST_BLOCK_LAYER + model.n_blocks
  bad = [layer for layer in loss.nce_layers if not 0 <= layer < num_layers]
  if loss.nce > 0 and bad:
    problems.append(f"config.loss.nce_layers {tuple(loss.nce_layers)}: {bad} out of range; the encoder with "
                    f"model.n_blocks={model.n_blocks} has layers 0..{num_layers - 1}")
  bad = [layer for layer in loss.dis_layers if not 0 <= layer < DISCRIMINATOR_LAYERS]
  if loss.sim > 0 and bad:
    problems.append(f"config.loss.dis_layers {tuple(loss.dis_layers)}: {bad} out of range; the "
                    f"discriminator has layers 0..{DISCRIMINATOR_LAYERS - 1}")
  translation = ("gan", "dis", "nce", "nce_idt", "sim")
  if model.backbone in BASELINE_BACKBONES and any(loss[k] > 0 for k in translation):
    problems.append(f"config.model.backbone={model.backbone!r} (direct transfer) has no generator: set "
                    "config.loss.{gan, dis, nce, nce_idt, sim} to 0 (see configs/baseline.py)")
  if loss.reid_ce <= 0 and loss.reid_triplet <= 0:
    problems.append("config.loss.reid_ce and reid_triplet are both 0: the re-ID network would never train")
  if train.batch_size <= 0:
    problems.append(f"config.train.batch_size={train.batch_size} must be positive")
  if train.num_steps is not None and train.num_steps <= 0:
    problems.append(f"config.train.num_steps={train.num_steps} must be positive (or None to use num_epochs)")
  if train.num_steps is None and train.num_epochs <= 0:
    problems.append(f"config.train.num_epochs={train.num_epochs} must be positive")
  for key in POSITIVE_TRAIN_KEYS:
    if train[key] <= 0:
      problems.append(f"config.train.{key}={train[key]} must be positive")
  if not ev.ranks or any(r < 1 for r in ev.ranks):
    problems.append(f"config.eval.ranks={tuple(ev.ranks)} must be ranks >= 1, e.g. (1, 5, 10, 20)")
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


def config_json(config):
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def check_workdir_config(config, workdir):
  """Raises if `workdir` holds a run whose config.json builds other shapes than `config` does."""
  path = os.path.join(os.path.expanduser(workdir), CONFIG_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError(f"Cannot read {path} ({e}). Restore it from a backup, or move it away if this workdir "
                     "is to start over with the current config.") from e
  new = flatten(config_json(config))
  differ = [f"{key}: {old[key]!r} in {path}, {new.get(key)!r} now"
            for key in SHAPE_KEYS if key in old and old[key] != new.get(key)]
  if differ:
    raise ConfigError(f"The workdir {workdir} holds a run with a different model or identity set:\n  "
                     + "\n  ".join(differ) + "\nUse a fresh --workdir, or the config in that config.json.")


def write_config(config, workdir):
  """<workdir>/config.json: the config of the latest run in this workdir.

  Written to a temporary file and renamed, so that a reader (another process of a multi-host run checking
  the workdir, or a crash halfway) sees the old file or the new one, never a partial one.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  temporary = f"{path}.tmp{os.getpid()}"
  try:
    with open(temporary, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
