"""Restoring a trained model for inference, and the translate / extract modes over a folder of images."""

import dataclasses
import os
import re

import jax
import numpy as np
import tqdm
from PIL import Image

from synth_reid_jax import checkpointing, config_checks, features, input_pipeline, sharding, train_state
from synth_reid_jax.datasets import parsing
from synth_reid_jax.models import build_models
from synth_reid_jax.transforms import to_uint8

# Encoded images translate/extract read from --input_dir (case-insensitive suffixes).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_QUALITY = 95  # translate: non-PNG outputs
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
  checkpointer = checkpointing.Checkpointer(workdir, iterator_names=())
  try:
    step = checkpointer.resolve_step(step)
    metadata = checkpointer.metadata(step)
    num_classes = int(metadata["num_classes"])
    abstract = jax.eval_shape(lambda key: train_state.create_train_state(config, key, num_classes)[0],
                              jax.random.key(0))
    replicated = sharding.replicated_sharding(mesh)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            {"params": abstract.params, "batch_stats": abstract.batch_stats})
    encoder = "stem" if config.model.backbone == "resnet50" else "generator"
    variables, _ = checkpointer.restore_variables(template, step=step, networks=(encoder, "reid"))
  finally:
    checkpointer.close()
  return build_models(config, num_classes), variables, step


@dataclasses.dataclass(frozen=True)
class _FileRecord:
  """An image file as an eval-pipeline record; the bytes are read only when the pipeline asks for them."""
  path: str
  pid: int
  camid: int
  filename: str

  def __getitem__(self, key):
    if key == "image":
      with open(self.path, "rb") as f:
        return f.read()
    return getattr(self, key)

  def get(self, key, default=None):
    return self[key] if key in ("image", "pid", "camid", "filename") else default


def list_image_files(input_dir):
  """Relative paths of every image under input_dir (recursively, sorted)."""
  input_dir = os.path.expanduser(input_dir)
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"--input_dir {input_dir} is not a directory.")
  paths = sorted(os.path.relpath(os.path.join(root, name), input_dir)
                 for root, _, names in os.walk(input_dir) for name in names
                 if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))
  if not paths:
    raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under --input_dir {input_dir}.")
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
  return input_pipeline.create_eval_pipeline(config, "input_dir", "images", records=records)


def translate(config, workdir, input_dir, output_dir, step=None):
  """Writes G(x) for every image under input_dir to output_dir (same relative names, at the config's size)."""
  workdir, mesh = prepare(config, workdir)
  if config.model.backbone != "generator":
    raise ValueError(f"--mode=translate needs a generator; config.model.backbone={config.model.backbone!r}.")
  models, variables, step = restore_for_inference(config, workdir, step, mesh)
  input_dir = os.path.expanduser(input_dir)
  paths = list_image_files(input_dir)
  stream = _folder_stream(config, input_dir, paths)
  generate = jax.jit(lambda params, x: models.generator.apply({"params": params["generator"]}, x),
                     in_shardings=(sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)),
                     out_shardings=sharding.batch_sharding(mesh))
  is_main = jax.process_index() == 0
  for batch in tqdm.tqdm(stream, total=len(stream), unit="batch", disable=not is_main, desc="translate"):
    images = sharding.make_global_batch(np.asarray(batch["image"], np.float32), mesh)
    out = to_uint8(features.to_host(generate(variables["params"], images)), config.data.mean, config.data.std)
    mask, index = (features.to_host(np.asarray(batch[k])) for k in ("mask", "index"))
    if not is_main:
      continue
    for image, keep, i in zip(out, mask, index):
      if keep:
        path = os.path.join(os.path.expanduser(output_dir), paths[i])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        options = {} if path.lower().endswith(".png") else {"quality": JPEG_QUALITY}
        Image.fromarray(image).save(path, **options)
  if is_main:
    print(f"Translated {len(paths)} images with the step-{step} generator into {output_dir}.", flush=True)


def extract(config, workdir, input_dir, output, step=None):
  """Writes the re-ID features of every image under input_dir to an .npz (features, paths, pids, camids)."""
  workdir, mesh = prepare(config, workdir)
  models, variables, step = restore_for_inference(config, workdir, step, mesh)
  input_dir = os.path.expanduser(input_dir)
  paths = list_image_files(input_dir)
  stream = _folder_stream(config, input_dir, paths)
  feature_fn = features.make_feature_fn(models, config, mesh)
  out = features.compute_features(feature_fn, variables, stream, mesh)
  if jax.process_index() == 0:
    output = os.path.expanduser(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    np.savez(output, features=out["features"].astype(np.float32), paths=np.asarray(paths),
             pids=out["pid"].astype(np.int64), camids=out["camid"].astype(np.int64))
    num, dim = out["features"].shape
    print(f"Wrote {num} x {dim} features (step {step}) to {output}.", flush=True)
  return out
