"""Restoring a trained model for inference, and the translate / extract modes over a folder of images."""

import dataclasses
import os
import re

import grain
import jax
import numpy as np
import tqdm
from PIL import Image

from synth_reid_jax import (
  checkpointing,
  config_checks,
  features,
  input_pipeline,
  sharding,
  storage,
  train_state,
  transforms,
)
from synth_reid_jax.datasets import parsing
from synth_reid_jax.datasets.images import to_rgb
from synth_reid_jax.errors import (
  CheckpointDamagedError,
  ConfigError,
  InputFilesError,
  MissingInputError,
)
from synth_reid_jax.models import build_models, forms
from synth_reid_jax.transforms import to_uint8

# Encoded images translate/extract read from --input_dir (case-insensitive suffixes).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
JPEG_QUALITY = 95  # translate: JPEG and WebP outputs
LOSSY_FORMATS = ("JPEG", "WEBP")
# extract's pids / camids: the file-name patterns of the released datasets (GTA first: a Market-style pattern
# never matches its names, but this order states which rule wins).
FILENAME_LAYOUTS = (parsing.GTA_SYNTHREID, parsing.MARKET1501)
UNPARSED = -1


def prepare(config, workdir):
  """Every mode's checks: the config, the devices and the workdir's earlier config; -> (workdir, mesh)."""
  config_checks.validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = sharding.create_mesh()
  config_checks.validate_for_devices(config, mesh.devices.size)
  config_checks.check_workdir_config(config, workdir)
  return workdir, mesh


def restore_for_inference(config, workdir, step=None, mesh=None):
  """The networks and their variables (replicated on `mesh`) from a train or inference checkpoint.

  Only what test-time features and translation need is read: the generator (or stem) and the re-ID network.
  -> (models, variables {"params", "batch_stats"}, step).
  """
  mesh = sharding.create_mesh() if mesh is None else mesh
  directory = checkpointing.checkpoint_dir(workdir)
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise checkpointing.no_checkpoint_error(directory)  # before the Checkpointer, which would create it
  checkpointer = checkpointing.Checkpointer(workdir, iterator_names=())
  try:
    step = checkpointer.resolve_step(step)
    metadata = checkpointer.metadata(step)
    num_classes = int(metadata["num_classes"])
    abstract = jax.eval_shape(
        lambda key: train_state.create_train_state(config, key, num_classes, pretrained=False)[0],
                              jax.random.key(0))
    replicated = sharding.replicated_sharding(mesh)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            {"params": abstract.params, "batch_stats": abstract.batch_stats})
    networks = ("generator" if config.model.backbone == "generator" else "stem", "reid")
    try:
      variables, _ = checkpointer.restore_variables(template, step=step, networks=networks)
    except CheckpointDamagedError as e:
      good = checkpointer.newest_intact_before(template, step, networks)
      hint = ("No older checkpoint is intact." if good is None
              else f"The newest intact checkpoint before it is step {good}: pass --step={good}.")
      raise CheckpointDamagedError(f"{e} {hint}", e.step) from e
  finally:
    checkpointer.close()
  return build_models(config, num_classes), variables, step


@dataclasses.dataclass(frozen=True)
class _FileRecord:
  """An image file as an eval-pipeline record; the bytes are read only when the pipeline asks for them (a file
  that cannot be read gives no bytes, so it is reported as unreadable with the undecodable ones)."""
  path: str
  pid: int
  camid: int
  filename: str

  def __getitem__(self, key):
    if key == "image":
      try:
        with open(self.path, "rb") as f:
          return f.read()
      except OSError:
        return b""
    return getattr(self, key)

  def get(self, key, default=None):
    return self[key] if key in ("image", "pid", "camid", "filename") else default


class _SkipUnreadable(grain.transforms.Map):
  """The eval transform, but an image that does not decode becomes padding (mask False, unreadable True)."""

  def __init__(self, config):
    self.inner = transforms.eval_transform(config)
    self.blank = np.zeros((config.data.height, config.data.width, 3), np.uint8)

  def map(self, element):
    try:
      return {**self.inner.map(element), "unreadable": False}
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
      return {**element, "image": self.blank, "mask": False, "unreadable": True}


def why_unreadable(path):
  """The reason an image file does not decode (for the report at the end)."""
  try:
    with Image.open(path) as image:
      to_rgb(image).load()
  except Exception as e:  # noqa: BLE001 - whatever PIL or the OS says is the reason
    return str(e).splitlines()[0] if str(e) else type(e).__name__
  return "decodes now (it changed while running)"


def list_image_files(input_dir):
  """Relative paths of every image under input_dir (recursively, sorted)."""
  input_dir = os.path.expanduser(input_dir)
  if not os.path.isdir(input_dir):
    raise MissingInputError(f"--input_dir {input_dir} is not a directory.")
  paths = sorted(os.path.relpath(os.path.join(root, name), input_dir)
                 for root, _, names in os.walk(input_dir) for name in names
                 if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))
  if not paths:
    raise MissingInputError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under --input_dir {input_dir}.")
  return paths


def parse_identity(filename):
  """(pid, 0-based camid) from a re-ID file name, or (-1, -1) when it follows no known pattern."""
  name = os.path.basename(filename)
  for layout in FILENAME_LAYOUTS:
    match = re.match(layout.pattern, name)
    if match:
      return int(match.group("pid")), int(match.group("cam")) - 1
  return UNPARSED, UNPARSED


def _folder_stream(config, input_dir, paths):
  records = [_FileRecord(os.path.join(input_dir, p), *parse_identity(p), p) for p in paths]
  return input_pipeline.create_eval_pipeline(config, "input_dir", "images", records=records,
                                             transform=_SkipUnreadable(config))


def check_translate_output(input_dir, output_dir, paths, overwrite=False):
  """Refuses, before any work, an output folder that is or lies inside the input folder, that cannot be
  written (a file in its way, a read-only or full disk), or that already holds output files (unless
  `overwrite`)."""
  if storage.inside(output_dir, input_dir):
    where = "is" if os.path.realpath(output_dir) == os.path.realpath(input_dir) else "lies inside"
    raise InputFilesError(f"--output_dir {output_dir} {where} --input_dir {input_dir}: translate would write "
                          "over or next to its own input. Use an --output_dir outside the input folder.")
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise InputFilesError(f"--output_dir {output_dir} is a file; give a folder (it is created if missing).")
  storage.check_folder(output_dir, "--output_dir")
  existing = [p for p in paths if os.path.lexists(os.path.join(output_dir, p))]
  if existing and not overwrite:
    raise InputFilesError(
        f"--output_dir {output_dir} already holds {len(existing)} of the {len(paths)} output files (e.g. "
        f"{existing[0]}); nothing was written. Pass --overwrite to replace them, or use another "
        "--output_dir.")


def extract_output_path(output, input_dir, overwrite=False):
  """The .npz extract writes (".npz" added as numpy does), checked before any work: not inside the input
  folder, not an existing file (unless `overwrite`), in a folder that exists or can be made and can be
  written (not read-only, not full)."""
  output = os.path.abspath(os.path.expanduser(output))
  if not output.endswith(".npz"):
    output += ".npz"
  if storage.inside(output, input_dir):
    raise InputFilesError(f"--output {output} lies inside --input_dir {input_dir}; write it elsewhere.")
  if os.path.isdir(output):
    raise InputFilesError(f"--output {output} is a folder; give a file name ending in .npz.")
  if os.path.exists(output) and not overwrite:
    raise InputFilesError(f"--output {output} exists; pass --overwrite to replace it, or another --output.")
  parent = os.path.dirname(output)
  ancestor = parent
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise InputFilesError(f"--output {output}: {ancestor} is a file, so the folder {parent} cannot be made.")
  storage.check_folder(parent, f"--output {output}: the folder")
  return output


def _report_skipped(input_dir, paths, skipped, what):
  """Raises (exit non-zero) listing the unreadable files that were skipped, after the rest was written."""
  if not skipped:
    return
  lines = [f"  {paths[i]}: {why_unreadable(os.path.join(input_dir, paths[i]))}" for i in skipped]
  raise InputFilesError(f"{len(skipped)} of {len(paths)} images could not be read and were skipped "
                        f"({what}):\n" + "\n".join(lines)
                        + "\nReplace or remove them and rerun (with --overwrite).")


def _check_strict(strict, input_dir, paths, unreadable):
  if strict and unreadable:
    i = unreadable[0]
    raise InputFilesError(f"Cannot read {os.path.join(input_dir, paths[i])}: "
                          f"{why_unreadable(os.path.join(input_dir, paths[i]))} (--strict stops at the first "
                          "unreadable image; without it such images are skipped and listed at the end).")


def _write_image(image, path):
  """Saves a uint8 image (format from the suffix; a .png losslessly) through a temporary file renamed into
  place, so a failed write (a full disk) leaves neither a partial image nor a lost older one."""
  image_format = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
  options = {"quality": JPEG_QUALITY} if image_format in LOSSY_FORMATS else {}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with storage.replaced(path) as temporary:
    Image.fromarray(image).save(temporary, format=image_format, **options)


def translate(config, workdir, input_dir, output_dir, step=None, overwrite=False, strict=False):
  """Writes G(x) for every image under input_dir to output_dir (same relative names, at the config's size).

  Unreadable images are skipped (or, with `strict`, stop the run) and listed at the end (InputFilesError).
  """
  workdir, mesh = prepare(config, workdir)
  if config.model.backbone != "generator":
    raise ConfigError(f"--mode=translate needs a generator; config.model.backbone={config.model.backbone!r}.")
  input_dir, output_dir = (os.path.abspath(os.path.expanduser(d)) for d in (input_dir, output_dir))
  paths = list_image_files(input_dir)
  check_translate_output(input_dir, output_dir, paths, overwrite)
  models, variables, step = restore_for_inference(config, workdir, step, mesh)
  stream = _folder_stream(config, input_dir, paths)
  translate_fn = lambda params, x: models.generator.apply({"params": params["generator"]}, x)
  generate = jax.jit(forms.traced_for(translate_fn, mesh),
                     in_shardings=(sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)),
                     out_shardings=sharding.batch_sharding(mesh))
  is_main = jax.process_index() == 0
  skipped, written = [], 0
  for batch in tqdm.tqdm(stream, total=len(stream), unit="batch", disable=not is_main, desc="translate"):
    images = sharding.make_global_batch(np.asarray(batch["image"], np.float32), mesh)
    out = to_uint8(features.to_host(generate(variables["params"], images)), config.data.mean, config.data.std)
    mask, index, unreadable = (features.to_host(np.asarray(batch[key]))
                               for key in ("mask", "index", "unreadable"))
    bad = [int(i) for i, u in zip(index, unreadable) if u]
    skipped += bad
    if is_main:
      for image, keep, i in zip(out, mask, index):
        if keep:
          try:
            _write_image(image, os.path.join(output_dir, paths[i]))
          except OSError as e:
            if not storage.is_storage_error(e, output_dir):
              raise
            then = (f"{written} of {len(paths)} images were written before it and are kept; free space and "
                    "rerun with --overwrite.")
            raise storage.storage_error(e, output_dir, then) from e
          written += 1
    _check_strict(strict, input_dir, paths, bad)
  if is_main:
    print(f"Translated {written} images with the step-{step} generator into {output_dir}.", flush=True)
  _report_skipped(input_dir, paths, sorted(skipped), "translate")


def _write_npz(path, arrays):
  """np.savez through a temporary file renamed into place (as _write_image)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with storage.replaced(path) as temporary, open(temporary, "wb") as f:
    np.savez(f, **arrays)


def extract(config, workdir, input_dir, output, step=None, overwrite=False, strict=False):
  """Writes the re-ID features of every image under input_dir to an .npz (features, paths, pids, camids).

  Unreadable images are skipped (or, with `strict`, stop the run) and listed at the end (InputFilesError)."""
  workdir, mesh = prepare(config, workdir)
  input_dir = os.path.abspath(os.path.expanduser(input_dir))
  paths = list_image_files(input_dir)
  output = extract_output_path(output, input_dir, overwrite)
  models, variables, step = restore_for_inference(config, workdir, step, mesh)
  stream = _folder_stream(config, input_dir, paths)
  if strict:  # find the first unreadable image before computing anything
    for batch in stream:
      index, unreadable = (features.to_host(np.asarray(batch[key])) for key in ("index", "unreadable"))
      _check_strict(strict, input_dir, paths, [int(i) for i in index[unreadable]])
  feature_fn = features.make_feature_fn(models, config, mesh)
  out = features.compute_features(feature_fn, variables, stream, mesh)
  kept = [int(i) for i in out["index"]]
  if jax.process_index() == 0:
    arrays = {"features": out["features"].astype(np.float32), "paths": np.asarray([paths[i] for i in kept]),
              "pids": out["pid"].astype(np.int64), "camids": out["camid"].astype(np.int64)}
    with storage.storage_errors(os.path.dirname(output), "No features were written (an older --output is "
                                "unchanged); free space and rerun."):
      _write_npz(output, arrays)
    num, dim = out["features"].shape
    print(f"Wrote {num} x {dim} features (step {step}) to {output}.", flush=True)
  _report_skipped(input_dir, paths, sorted(set(range(len(paths))) - set(kept)), f"not in {output}")
  return out
