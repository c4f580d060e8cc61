"""Converts pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth) into our FID .npz.

  python -m synth_reid_jax.tools.convert_inception pt_inception-2015-12-05-6726825d.pth \
      --output=inception_fid.npz

Reading the .pth needs the optional [torch] extra; the conversion itself is plain numpy.
"""

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from synth_reid_jax.models import inception

# Our leaf (collection, name) -> the torch parameter / buffer name at the end of the same module path.
TORCH_LEAF_NAMES = {
    ("params", "kernel"): "weight",  # Conv2d
    ("params", "scale"): "weight",  # BatchNorm2d
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Parts of the torch checkpoint the pool3 features never read: the classifier heads and BatchNorm's counter.
IGNORED_PREFIXES = ("fc.", "AuxLogits.")
IGNORED_SUFFIXES = (".num_batches_tracked",)
CONV_KERNEL_TO_HWIO = (2, 3, 1, 0)  # torch (out, in, kh, kw) -> flax (kh, kw, in, out)


def torch_name(flat_name: str) -> str:
  """"params/Mixed_5b/branch1x1/conv/kernel" -> "Mixed_5b.branch1x1.conv.weight"."""
  collection, *module_path, leaf = flat_name.split(inception.WEIGHTS_SEP)
  return ".".join([*module_path, TORCH_LEAF_NAMES[(collection, leaf)]])


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid's torch state dict -> our flat {"params/.../kernel": float32 array} (checked, complete)."""
  state_dict = {name.removeprefix("module."): np.asarray(value) for name, value in state_dict.items()}
  flat, used = {}, set()
  missing = []
  for name, shape in inception.variable_shapes().items():
    source = torch_name(name)
    if source not in state_dict:
      missing.append(source)
      continue
    value = state_dict[source].astype(np.float32)
    if name.endswith(f"{inception.WEIGHTS_SEP}kernel"):
      value = value.transpose(CONV_KERNEL_TO_HWIO)
    if value.shape != shape:
      raise ValueError(f"{source} has shape {state_dict[source].shape}, which does not give {name} {shape}; "
                       "is this pytorch-fid's pt_inception-2015-12-05 file?")
    flat[name] = value
    used.add(source)
  unexpected = sorted(name for name in state_dict if name not in used
                      and not name.startswith(IGNORED_PREFIXES) and not name.endswith(IGNORED_SUFFIXES))
  if missing or unexpected:
    raise ValueError(
        f"the checkpoint is not pytorch-fid's FID Inception: {len(missing)} missing keys {missing[:5]}, "
        f"{len(unexpected)} unexpected keys {unexpected[:5]}.\n{inception.WEIGHTS_HELP}")
  return flat


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch .pth state dict (or a dict holding one under "state_dict") as numpy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such checkpoint: {path!r}.\n{inception.WEIGHTS_HELP}")
  try:
    import torch
  except ImportError as error:
    raise ImportError("reading a .pth file needs torch: pip install 'synth-reid-jax[torch]'") from error
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
    checkpoint = checkpoint["state_dict"]
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a state dict")
  return {name: value.detach().cpu().numpy() for name, value in checkpoint.items() if torch.is_tensor(value)}


def default_output(checkpoint: str) -> str:
  """pt_inception-2015-12-05-6726825d.pth -> pt_inception-2015-12-05-6726825d.npz beside it."""
  return os.path.splitext(checkpoint)[0] + ".npz"


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(prog="python -m synth_reid_jax.tools.convert_inception",
                                   description=__doc__.splitlines()[0], epilog=inception.WEIGHTS_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("checkpoint", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("--output", help="where to write the .npz (default: the checkpoint's name with .npz)")
  args = parser.parse_args(argv)
  output = args.output or default_output(args.checkpoint)
  flat = convert_state_dict(load_torch_state_dict(args.checkpoint))
  inception.save_variables(output, flat)
  num_values = sum(value.size for value in flat.values())
  print(f"wrote {len(flat)} arrays ({num_values} values) to {output}", file=sys.stderr)
  print(output)
  return output


if __name__ == "__main__":
  main()
