"""Imports PyTorch weights: checkpoints of the original synth-reid code, and torchvision's ImageNet ResNet-50.

Original checkpoints -> an inference Orbax checkpoint that eval / translate / extract restore:
  python -m synth_reid_jax.tools.import_torch --log_dir=<dir> --workdir=<dir> [--epoch=N]
reads <log_dir>/{generator,discriminator,id_net[,mlp]}/model.pth.tar-<N> (dicts whose 'state_dict' keys may
carry DataParallel's 'module.' prefix); N defaults to the latest epoch that all of them have. The checkpoint
step is N unless --step is given.

torchvision's ResNet-50 (a local .pth state dict) -> an .npz for config.model.pretrained_reid:
  python -m synth_reid_jax.tools.import_torch --resnet50=<resnet50.pth> --output=<resnet50.npz>
holds the baseline's stem (conv1, bn1, layer1) under "stem/..." and stages 2-4 under "reid/..."; with
config.model.pretrained_reid pointing at it, train_state.create_train_state starts the baselines' stem and R's
stages 2-4 (for the method too) from it (read_pretrained).
Every torchvision ImageNet ResNet-50 file has these key names and converts: resnet50-19c8e357.pth (what
torchreid's model_urls download, so the original's baseline started from it; torch's legacy format, without
BatchNorm's num_batches_tracked), resnet50-0676ba61.pth (torchvision's IMAGENET1K_V1: the same recipe and
top-1, in the zip format) and resnet50-11ad3fa6.pth (IMAGENET1K_V2, torchvision's default since 0.13: a newer
training recipe, not what the original started from).

Reading .pth files needs the optional [torch] extra; the conversion itself works on numpy arrays.
"""

import argparse
import collections
import functools
import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from synth_reid_jax.errors import ConfigError, UserError
from synth_reid_jax.models import BASELINE_BACKBONES, Discriminator, Generator, Projector, ReIDNet, ResNetStem

# The original's checkpoint folders and the name of each network here.
NETWORKS = {"generator": "generator", "discriminator": "discriminator", "id_net": "reid", "mlp": "projector"}
REQUIRED = ("generator", "discriminator", "id_net")
CHECKPOINT_PREFIX = "model.pth.tar-"
DATA_PARALLEL_PREFIX = "module."
FIRST_BLOCK_LAYER = 4  # the original's encoder index of the first residual block
BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
SKIPPED_SUFFIX = "num_batches_tracked"
SHAPE_PROBE = (2, 64, 32)  # (batch, height, width) of the shape-only inits; any size works
SKIP = "skip"


# --- torch layouts -> ours ----------------------------------------------------------------------------------

def _conv(w):
  return np.transpose(w, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)


def _conv_transpose(w):
  return np.transpose(w, (2, 3, 0, 1))  # (in, out, kh, kw) -> (kh, kw, in, out), taps not flipped


def _linear(w):
  return np.transpose(w)  # (out, in) -> (in, out)


def _vector(w):
  return w


def _param(path, layout):
  return "params", path, layout


def _bn(path, field):
  collection, name = BN_FIELDS[field]
  return collection, (*path, name), _vector


def _weight_or_bias(path, field, weight_layout):
  if field == "weight":
    return _param((*path, "kernel"), weight_layout)
  return _param((*path, "bias"), _vector)


# Each rule maps a (prefix-free) torch key to (collection, our path, layout conversion), or None if unknown.

def _generator_rule(key):
  if key == "encoder.1.0.weight":
    return _param(("conv_in", "kernel"), _conv)
  if m := re.fullmatch(r"encoder\.([23])\.0\.weight", key):
    return _param((f"down_{int(m[1]) - 2}", "kernel"), _conv)
  if m := re.fullmatch(r"encoder\.(\d+)\.layers\.1\.0\.weight", key):
    return _param((f"block_{int(m[1]) - FIRST_BLOCK_LAYER}", "conv_0", "kernel"), _conv)
  if m := re.fullmatch(r"encoder\.(\d+)\.layers\.3\.(weight|bias)", key):
    return _weight_or_bias((f"block_{int(m[1]) - FIRST_BLOCK_LAYER}", "conv_1"), m[2], _conv)
  if m := re.fullmatch(r"decoder\.([01])\.0\.weight", key):
    return _param((f"up_{m[1]}", "kernel"), _conv_transpose)
  if m := re.fullmatch(r"decoder\.3\.(weight|bias)", key):
    return _weight_or_bias(("conv_out",), m[1], _conv)
  return None


def _discriminator_rule(key):
  # The original's nn.Sequential indices of the five convs (index 1 is the first LeakyReLU).
  if m := re.fullmatch(r"dis\.([05])\.(weight|bias)", key):
    return _weight_or_bias((f"conv_{0 if m[1] == '0' else 4}",), m[2], _conv)
  if m := re.fullmatch(r"dis\.([234])\.0\.weight", key):
    return _param((f"conv_{int(m[1]) - 1}", "kernel"), _conv)
  return None


def _mlp_rule(key):
  if m := re.fullmatch(r"mlp_(\d+)\.([02])\.(weight|bias)", key):
    return _weight_or_bias((f"mlp_{m[1]}", f"dense_{int(m[2]) // 2}"), m[3], _linear)
  return None


def _resnet_block_rule(key, prefixes):
  """Keys layerL.j.{convK, bnK, downsample.0/1}.* of the stages L in `prefixes` (stage -> our path prefix)."""
  m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)", key)
  if not m or m[1] not in prefixes:
    return None
  path = (*prefixes[m[1]], f"layer{m[1]}", f"block_{m[2]}")
  module, field = m[3], m[4]
  if module == "downsample.0":
    module = "downsample_conv"
  elif module == "downsample.1":
    module = "downsample_bn"
  if module.startswith(("conv", "downsample_conv")):
    return _param((*path, module, "kernel"), _conv) if field == "weight" else None
  return _bn((*path, module), field) if field in BN_FIELDS else None


def _id_net_rule(key):
  if rule := _resnet_block_rule(key, {"2": (), "3": (), "4": ()}):
    return rule
  if m := re.fullmatch(r"bnneck\.(\w+)", key):
    return _bn(("bnneck",), m[1]) if m[1] in BN_FIELDS else None
  if m := re.fullmatch(r"classifier\.(weight|bias)", key):
    return _weight_or_bias(("classifier",), m[1], _linear)
  return None


def _resnet50_rule(key):
  """torchvision's ResNet-50: conv1, bn1, layer1 -> the stem; layer2-4 -> the re-ID stages; fc is dropped."""
  if key == "conv1.weight":
    return _param(("stem", "conv1", "kernel"), _conv)
  if m := re.fullmatch(r"bn1\.(\w+)", key):
    return _bn(("stem", "bn1"), m[1]) if m[1] in BN_FIELDS else None
  if rule := _resnet_block_rule(key, {"1": ("stem",), "2": ("reid",), "3": ("reid",), "4": ("reid",)}):
    return rule
  if re.fullmatch(r"fc\.(weight|bias)", key):
    return SKIP, None, None
  return None


RULES = {"generator": _generator_rule, "discriminator": _discriminator_rule, "mlp": _mlp_rule,
         "id_net": _id_net_rule}


# --- conversion -------------------------------------------------------------------------------------------

def strip_data_parallel(state_dict: Mapping) -> dict:
  """Drops DataParallel's 'module.' prefix from every key."""
  return {k[len(DATA_PARALLEL_PREFIX):] if k.startswith(DATA_PARALLEL_PREFIX) else k: v
          for k, v in state_dict.items()}


def _to_numpy(value):
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def _convert(name, state_dict, rule):
  """Applies `rule` to every key -> (nested {collection: tree}, {flat path: (torch key, torch shape)})."""
  flat, sources, unknown = {}, {}, []
  for key, value in strip_data_parallel(state_dict).items():
    if key.endswith(SKIPPED_SUFFIX):
      continue
    mapped = rule(key)
    if mapped is None:
      unknown.append(key)
      continue
    collection, path, layout = mapped
    if collection == SKIP:
      continue
    value = _to_numpy(value)
    flat[(collection, *path)] = layout(value)
    sources[(collection, *path)] = (key, value.shape)
  if unknown:
    raise ValueError(f"{name}: {len(unknown)} state_dict keys have no counterpart here, e.g. {unknown[:5]}; "
                     "is this a checkpoint of the original synth-reid code (without Self_Attn layers)?")
  return traverse_util.unflatten_dict(flat), sources


def _check_shapes(name, converted, sources, expected):
  """Raises naming the torch key and both shapes on a mismatch, or the missing / unexpected entries."""
  have = traverse_util.flatten_dict(converted)
  want = traverse_util.flatten_dict(expected)
  missing = sorted("/".join(p) for p in want.keys() - have.keys())
  extra = sorted(sources[p][0] for p in have.keys() - want.keys())
  if missing or extra:
    raise ValueError(f"{name}: the checkpoint does not match the network: missing {missing[:5]}, "
                     f"unexpected keys {extra[:5]}")
  for path, value in have.items():
    if tuple(value.shape) != tuple(want[path].shape):
      key, torch_shape = sources[path]
      raise ValueError(f"{name}: '{key}' has shape {tuple(torch_shape)} ({tuple(value.shape)} in our layout) "
                       f"but {'/'.join(path)} needs {tuple(want[path].shape)}")


def _require(name, state_dict, key):
  if key not in state_dict:
    raise ValueError(f"{name}: missing key '{key}'; is this a {name} checkpoint of the original code?")
  return state_dict[key]


def _count(state_dict, pattern):
  """Distinct values of the first group of `pattern` among the keys."""
  return len({m[1] for k in state_dict if (m := re.fullmatch(pattern, k))})


def _count_blocks(state_dict, stages):
  """Bottlenecks per ResNet stage (layer1 .. layer4) in a state dict."""
  return [_count(state_dict, rf"layer{s}\.(\d+)\..*") for s in stages]


def infer_sizes(state_dicts: Mapping[str, Mapping]) -> dict:
  """The model sizes (config.model keys) and the number of classes of the original checkpoints given."""
  sd = {name: strip_data_parallel(state_dict) for name, state_dict in state_dicts.items()}
  sizes = {}
  if "generator" in sd:
    sizes["ngf"] = int(_require("generator", sd["generator"], "encoder.1.0.weight").shape[0])
    sizes["n_blocks"] = _count(sd["generator"], r"encoder\.(\d+)\.layers\..*")
  if "discriminator" in sd:
    sizes["ndf"] = int(_require("discriminator", sd["discriminator"], "dis.0.weight").shape[0])
  if "mlp" in sd:
    first_layers = [_require("mlp", sd["mlp"], f"mlp_{i}.0.weight")
                    for i in range(_count(sd["mlp"], r"mlp_(\d+)\..*"))]
    sizes["projector_dim"] = int(first_layers[0].shape[0]) if first_layers else 0
    sizes["projector_channels"] = [int(w.shape[1]) for w in first_layers]
  if "id_net" in sd:
    first = _require("id_net", sd["id_net"], "layer2.0.conv1.weight")
    sizes["reid_width"] = int(first.shape[0]) // 2  # stage 2 has 2 * width planes
    sizes["reid_in_channels"] = int(first.shape[1])
    sizes["reid_stages"] = _count_blocks(sd["id_net"], (2, 3, 4))
    sizes["num_classes"] = int(_require("id_net", sd["id_net"], "classifier.weight").shape[0])
  return sizes


def _init_shapes(model, *args, **kwargs):
  return jax.eval_shape(lambda key, *a: model.init(key, *a, **kwargs), jax.random.PRNGKey(0), *args)


def _expected_variables(network, sizes):
  """Shapes of our variables for a network of the given sizes (no compute)."""
  image = jnp.zeros((*SHAPE_PROBE, 3))
  if network == "generator":
    return _init_shapes(Generator(ngf=sizes["ngf"], n_blocks=sizes["n_blocks"]), image)
  if network == "discriminator":
    return _init_shapes(Discriminator(ndf=sizes["ndf"]), image)
  if network == "mlp":
    feats = [jnp.zeros((1, 1, 1, c)) for c in sizes["projector_channels"]]
    return _init_shapes(Projector(dim=sizes["projector_dim"]), feats)
  model = ReIDNet(sizes["num_classes"], stages=tuple(sizes["reid_stages"]), width=sizes["reid_width"])
  return _init_shapes(model, jnp.zeros((2, 16, 8, sizes["reid_in_channels"])), train=False)


def convert_state_dicts(state_dicts: Mapping[str, Mapping]) -> dict:
  """Original state dicts {"generator", "discriminator", "id_net", "mlp"} (any subset) -> our variables.

  Returns {"params": {"generator", "discriminator", "reid", "projector"}, "batch_stats": {"reid"}} for the
  networks given, as float32 numpy arrays; the state dicts' values may be torch tensors or numpy arrays.
  """
  unknown = set(state_dicts) - set(NETWORKS)
  if unknown:
    raise ValueError(f"unknown networks {sorted(unknown)}; expected some of {sorted(NETWORKS)}")
  sizes = infer_sizes(state_dicts)
  variables = {"params": {}, "batch_stats": {}}
  for network, state_dict in state_dicts.items():
    converted, sources = _convert(network, state_dict, RULES[network])
    _check_shapes(network, converted, sources, _expected_variables(network, sizes))
    for collection, tree in converted.items():
      variables[collection][NETWORKS[network]] = tree
  return variables


def convert_resnet50(state_dict: Mapping) -> dict:
  """torchvision ResNet-50 state dict -> {"stem"|"reid": {"params", "batch_stats"}}.

  "reid" holds layer2-4 only: the BNNeck and the classifier are not ImageNet's.
  """
  converted, sources = _convert("resnet50", state_dict, _resnet50_rule)
  # (collection, network, ...) -> (network, collection, ...)
  regroup = lambda path: (path[1], path[0], *path[2:])
  flat = traverse_util.flatten_dict(converted)
  tree = traverse_util.unflatten_dict({regroup(p): v for p, v in flat.items()})
  sources = {regroup(p): s for p, s in sources.items()}
  if "conv1" not in tree.get("stem", {}).get("params", {}):
    raise ValueError("resnet50: no 'conv1.weight'; is this a torchvision ResNet-50 state dict?")
  width = int(tree["stem"]["params"]["conv1"]["kernel"].shape[-1])
  stages = _count_blocks(strip_data_parallel(state_dict), (1, 2, 3, 4))
  stem = ResNetStem(num_blocks=stages[0], width=width)
  image = jnp.zeros((*SHAPE_PROBE, 3))
  expected = {"stem": _init_shapes(stem, image, train=False)}
  features = jax.eval_shape(lambda v, x: stem.apply(v, x, train=False), expected["stem"], image)
  reid_net = ReIDNet(1, stages=tuple(stages[1:]), width=width)
  reid = _init_shapes(reid_net, jnp.zeros(features.shape), train=False)
  expected["reid"] = {collection: {k: v for k, v in variables.items() if k not in ("bnneck", "classifier")}
                      for collection, variables in reid.items()}
  _check_shapes("resnet50", tree, sources, expected)
  return tree


def save_npz(path, tree):
  """Writes a nested dict of arrays as an .npz with '/'-joined keys."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **traverse_util.flatten_dict(tree, sep="/"))


class WeightsFileMissingError(UserError, FileNotFoundError):
  """A weights file (config.model.pretrained_reid) that does not exist."""


class WeightsFileError(UserError, ValueError):
  """A weights file that cannot be read as an .npz."""


# The ResNet-50 that ImageNet files fit (config.model sizes); other widths (the demo, :tiny) cannot use them.
IMAGENET_RESNET50 = {"reid_width": 64, "reid_stages": (4, 6, 3)}
CONVERT_COMMAND = "python -m synth_reid_jax.tools.import_torch --resnet50=<pth> --output=<npz>"


def missing_imagenet_notice(config) -> str | None:
  """The line a run prints when it trains a baseline ResNet-50 from random weights where the original's
  baseline started from ImageNet (config.model.pretrained_reid empty); None otherwise."""
  model = config.model
  fits = (model.reid_width, tuple(model.reid_stages)) == tuple(IMAGENET_RESNET50.values())
  if model.backbone not in BASELINE_BACKBONES or model.get("pretrained_reid", "") or not fits:
    return None
  return ("NOTE: config.model.pretrained_reid is empty, so the ResNet-50 starts from random weights; the "
          "original's baseline starts from ImageNet. Convert resnet50-19c8e357.pth (torchreid's file) once "
          f"with `{CONVERT_COMMAND}` and pass --config.model.pretrained_reid=<npz>.")


def load_npz(path) -> dict:
  """The nested dict written by save_npz (e.g. the ResNet-50 weights of config.model.pretrained_reid)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise WeightsFileMissingError(
        f"No weights file {path}; create it with `python -m synth_reid_jax.tools.import_torch "
        "--resnet50=<torchvision resnet50 .pth> --output=<.npz>`, or set config.model.pretrained_reid='' "
        "to start from random weights")
  try:
    with np.load(path) as data:
      return traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise WeightsFileError(f"Cannot read {path} as an .npz of weights ({e}); write it with `python -m "
                           "synth_reid_jax.tools.import_torch --resnet50=<pth> --output=<npz>`") from e


def merge_pretrained(variables, pretrained, where="pretrained weights"):
  """`variables` with every leaf that `pretrained` (a sub-tree of the same structure) holds replaced."""
  flat = traverse_util.flatten_dict(variables)
  for path, value in traverse_util.flatten_dict(pretrained).items():
    name = "/".join(path)
    if path not in flat:
      raise ValueError(f"{where}: '{name}' has no counterpart in the model; check config.model's sizes")
    if tuple(flat[path].shape) != tuple(value.shape):
      raise ValueError(f"{where}: '{name}' has shape {value.shape}, the model needs "
                       f"{tuple(flat[path].shape)}; check config.model's sizes")
    flat[path] = jnp.asarray(value, flat[path].dtype)
  return traverse_util.unflatten_dict(flat)


def _from_imagenet(network, path) -> bool:
  """Whether an --resnet50 .npz gives this variable ((collection, module, ...) of `network`): all of the
  baseline's stem, and R's stages 2-4; R's BNNeck and classifier are not ImageNet's and keep their init."""
  return network == "stem" or (network == "reid" and bool(re.fullmatch(r"layer\d", path[1])))


def _resnet_sizes(tree):
  """(width, blocks of stages 2-4) of {"reid": {"params": ...}} (a file or a model), None without stages."""
  stages = tree.get("reid", {}).get("params", {})
  first = stages.get("layer2", {}).get("block_0", {}).get("conv1", {}).get("kernel")
  if first is None:
    return None
  return int(first.shape[-1]) // 2, tuple(len(stages.get(f"layer{i}", {})) for i in (2, 3, 4))


def _joined(network, path):
  return "/".join((network, *path))


def _params_first(paths):
  return sorted(paths, key=lambda p: (p[0] != "params", p))


def read_pretrained(variables, path) -> dict:
  """What an --resnet50 .npz at `path` gives `variables` ({network: {"params", "batch_stats"}}, arrays or
  shapes): {network: {collection: tree}} of float32 numpy arrays, every ImageNet part present and shaped as
  the model's (_from_imagenet). The file's stem is unused by the method, which has none.

  Raises ConfigError naming the file, the first mismatching keys and the config that would fit it.
  """
  weights = load_npz(path)
  missing, unexpected, shapes, values = [], [], [], {}
  # Problems are listed stem first, parameters before statistics: the first one named is the telling one.
  for network in sorted(variables, key=lambda n: n != "stem"):
    want = {p: leaf for p, leaf in traverse_util.flatten_dict(variables[network]).items()
            if _from_imagenet(network, p)}
    if not want:
      continue
    have = traverse_util.flatten_dict(weights.get(network, {}))
    name = functools.partial(_joined, network)
    missing += [name(p) for p in _params_first(want.keys() - have.keys())]
    unexpected += [name(p) for p in _params_first(have.keys() - want.keys())]
    differ = [p for p in _params_first(want.keys() & have.keys()) if have[p].shape != tuple(want[p].shape)]
    shapes += [f"{name(p)}: {have[p].shape} in the file, {tuple(want[p].shape)} in the model" for p in differ]
    values[network] = traverse_util.unflatten_dict(
        {p: np.asarray(have[p], np.float32) for p in want if p in have})
  if missing or unexpected or shapes:
    found = [f"missing in the file: {missing[:5]} ({len(missing)} in all)"] if missing else []
    found += [f"not in the model: {unexpected[:5]} ({len(unexpected)} in all)"] if unexpected else []
    found += [f"shapes differ: {shapes[:3]} ({len(shapes)} in all)"] if shapes else []
    model, fits = _resnet_sizes(variables), _resnet_sizes(weights)
    message = f"config.model.pretrained_reid={path} does not fit the configured model"
    if model:
      message += f" (width {model[0]}, stages 2-4 of {model[1]} blocks)"
    message += ": " + "; ".join(found) + "."
    if fits:
      message += (f" The file holds a ResNet of width {fits[0]} with stages 2-4 of {fits[1]} blocks "
                  f"(torchvision's ResNet-50: 64, (4, 6, 3)): set config.model.reid_width={fits[0]} and "
                  f"config.model.reid_stages={fits[1]} (for the method also config.model.ngf={fits[0]}: R's "
                  "stages read the encoder's 4 x ngf channels).")
    raise ConfigError(message + " Make the file from torchvision's resnet50 .pth with `python -m "
                      "synth_reid_jax.tools.import_torch --resnet50=<pth> --output=<npz>`, or set "
                      "config.model.pretrained_reid='' to start from random weights.")
  return values


def apply_pretrained(variables, path):
  """{network: variables} with what an .npz from --resnet50 gives them loaded (read_pretrained): the
  baseline's stem and R's stages 2-4 start from ImageNet, the BNNeck and the classifier keep their values.
  """
  pretrained = read_pretrained(variables, path)
  return {name: merge_pretrained(v, pretrained[name], where=f"{path} ({name})") if name in pretrained else v
          for name, v in variables.items()}


# --- files --------------------------------------------------------------------------------------------------

def _torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError("Reading PyTorch checkpoints needs torch: pip install 'synth-reid-jax[torch]'") from e
  return torch


def load_torch_file(path, allow_pickle=False):
  """torch.load on CPU: tensors and plain containers only, unless allow_pickle (only for trusted files)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file {path}")
  torch = _torch()
  if allow_pickle:
    return torch.load(path, map_location="cpu", weights_only=False)
  try:
    # torchreid also saves the MultiStepLR state, whose milestones are a Counter.
    with torch.serialization.safe_globals([collections.Counter]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(f"{path} holds objects beyond tensors and containers ({e}). If you trust the file, "
                     "rerun with --allow_pickle.") from e


def _state_dict(checkpoint, path):
  state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path} is not a checkpoint dict with a 'state_dict' (got {type(checkpoint).__name__})")
  return state_dict


def available_epochs(folder) -> set[int]:
  """The N of every model.pth.tar-N in folder."""
  if not os.path.isdir(folder):
    return set()
  pattern = re.escape(CHECKPOINT_PREFIX) + r"(\d+)"
  return {int(m[1]) for name in os.listdir(folder) if (m := re.fullmatch(pattern, name))}


def find_checkpoints(log_dir, epoch=None) -> tuple[int, dict[str, str]]:
  """(epoch, {network: path}) of an original run; the latest epoch of every required network by default."""
  log_dir = os.path.expanduser(str(log_dir))
  if not os.path.isdir(log_dir):
    raise FileNotFoundError(f"--log_dir {log_dir} does not exist; point it at the original run's log folder")
  epochs = {}
  for network in NETWORKS:
    folder = os.path.join(log_dir, network)
    if network in REQUIRED and not os.path.isdir(folder):
      raise FileNotFoundError(f"No folder {folder}; the original saves each network in <log_dir>/{network}/")
    if os.path.isdir(folder):
      epochs[network] = available_epochs(folder)
  if epoch is None:
    common = set.intersection(*(epochs[n] for n in REQUIRED))
    if not common:
      raise FileNotFoundError(f"No epoch N has {CHECKPOINT_PREFIX}N in every one of "
                              f"{[os.path.join(log_dir, n) for n in REQUIRED]}; found {epochs}")
    epoch = max(common)
  paths = {}
  for network, found in epochs.items():
    path = os.path.join(log_dir, network, f"{CHECKPOINT_PREFIX}{epoch}")
    if network in REQUIRED and not os.path.isfile(path):
      raise FileNotFoundError(f"No checkpoint file {path} (epochs there: {sorted(found)})")
    if os.path.isfile(path):
      paths[network] = path
  return epoch, paths


def import_log_dir(log_dir, workdir, epoch=None, step=None, allow_pickle=False):
  """Converts one epoch of an original run into an inference checkpoint in workdir -> (step, paths, sizes)."""
  from synth_reid_jax import checkpointing  # Orbax: only needed here

  epoch, paths = find_checkpoints(log_dir, epoch)
  state_dicts = {n: _state_dict(load_torch_file(p, allow_pickle), p) for n, p in paths.items()}
  variables = convert_state_dicts(state_dicts)
  sizes = infer_sizes(state_dicts)
  model_keys = ("ngf", "n_blocks", "ndf", "projector_dim", "reid_width", "reid_stages")
  step = epoch if step is None else step
  checkpointing.save_inference_checkpoint(
      workdir, variables["params"], variables["batch_stats"], step,
      metadata={"num_classes": sizes["num_classes"], "epoch": epoch, "source": os.path.abspath(log_dir),
                "config": {"model": {k: sizes[k] for k in model_keys if k in sizes}}})
  return step, paths, sizes


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--log_dir", help="the original run's folder holding generator/, discriminator/, ...")
  parser.add_argument("--workdir", help="where the Orbax checkpoint goes (<workdir>/checkpoints/<step>)")
  parser.add_argument("--epoch", type=int, default=None, help="N of model.pth.tar-N (default: the latest)")
  parser.add_argument("--step", type=int, default=None, help="step of the checkpoint written (default: N)")
  parser.add_argument("--resnet50", help="a torchvision ResNet-50 .pth state dict to convert")
  parser.add_argument("--output", help="the .npz written for --resnet50")
  parser.add_argument("--allow_pickle", action="store_true",
                      help="load files holding arbitrary Python objects (only for files you trust)")
  args = parser.parse_args(argv)
  if args.resnet50:
    if not args.output:
      parser.error("--resnet50 needs --output=<file>.npz")
    checkpoint = load_torch_file(args.resnet50, args.allow_pickle)
    save_npz(args.output, convert_resnet50(_state_dict(checkpoint, args.resnet50)))
    print(f"Wrote {args.output}")
    return
  if not (args.log_dir and args.workdir):
    parser.error("give --log_dir and --workdir (or --resnet50 and --output)")
  step, paths, sizes = import_log_dir(args.log_dir, args.workdir, args.epoch, args.step, args.allow_pickle)
  for network, path in paths.items():
    print(f"  {network}: {path}")
  if "mlp" not in paths:
    print("  no mlp checkpoint: the projector is left out (eval, translate and extract do not need it)")
  print(f"Wrote {os.path.join(os.path.abspath(args.workdir), 'checkpoints', str(step))} "
        f"({sizes['num_classes']} classes, sizes {sizes})")


if __name__ == "__main__":
  main()
