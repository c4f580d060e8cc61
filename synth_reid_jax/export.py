"""--mode=export: the test-time feature function of a trained run as files that run without this package.

One trace of "uint8 pixels -> what --mode=extract writes" (normalisation, encoder, re-ID network, BNNeck or
pooled feature, the flip sum with eval.flip), with the checkpoint's variables as constants and a symbolic
batch size, serialized twice:
- embedder.stablehlo: jax.export (StableHLO), for the CPU, CUDA and TPU platforms;
- embedder.onnx: the same jaxpr converted with jax2onnx (opset ONNX_OPSET, dynamic batch axis);
and described by embedder.json (input size, layout, dtype, normalisation, flip, feature size, checkpoint step,
sha256 of each file, versions). Both take RGB uint8 (N, H, W, 3) already at config.data.{height, width}:
extract's PIL bilinear resize happens before them (examples/ shows it). Before anything is written, both run
on probe images and must match extract's feature function (MAX_REL_ERR, MIN_COSINE), and the measured
errors go into embedder.json.
"""

import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from synth_reid_jax import checkpointing, features, inference, sharding, storage, transforms
from synth_reid_jax.errors import ConfigError, InputFilesError
from synth_reid_jax.models import build_models
from synth_reid_jax.models.layers import canonical_dtype

STABLEHLO, ONNX, DESCRIPTION = "embedder.stablehlo", "embedder.onnx", "embedder.json"
ARTEFACTS = (STABLEHLO, ONNX, DESCRIPTION)
# jax.export lowers for each; TPU is left out (and said so in embedder.json) where it does not lower.
PLATFORMS = ("cpu", "cuda", "tpu")
# What TensorRT 8.6, OpenVINO 2023 and onnxruntime 1.13 on read (the converted graph loads and matches at 13
# too; 17 is what the tests check).
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME, BATCH = "images", "features", "N"
# What "equal to --mode=extract" means, checked before writing (and by tests/test_export.py).
MAX_REL_ERR = 1e-4  # max |artefact - extract| / max |extract|
MIN_COSINE = 0.9999  # per image
PROBE_IMAGES = 3  # random images the artefacts are checked on (rounded up to a multiple of the devices)
PROBE_SEED = 0
# pip lines for the ONNX converter (docs/export.md): jax2onnx pins orbax-checkpoint<0.11.37 without importing
# it, so it is installed without its dependencies, next to the [onnx] extra's real ones.
ONNX_INSTALL = ("pip install -c requirements/cpu.lock -e '.[onnx]' && "
                "pip install --no-deps 'jax2onnx==0.17.1'")
ONNX_MODULES = ("jax2onnx", "onnx", "onnx_ir", "onnxruntime")


def check_output(output, workdir, overwrite=False):
  """The absolute output folder, refused before any work when it is a file, lies inside the workdir's
  checkpoints/, or already holds an artefact (unless `overwrite`)."""
  output = os.path.abspath(os.path.expanduser(output))
  checkpoints = checkpointing.checkpoint_dir(workdir)
  if storage.inside(output, checkpoints):
    raise InputFilesError(f"--output {output} lies inside the checkpoint folder {checkpoints}, which Orbax "
                          "owns; export elsewhere (e.g. --output=<workdir>/export).")
  if os.path.exists(output) and not os.path.isdir(output):
    raise InputFilesError(f"--output {output} is a file; give a folder (it is created if missing).")
  existing = [name for name in ARTEFACTS if os.path.lexists(os.path.join(output, name))]
  if existing and not overwrite:
    raise InputFilesError(f"--output {output} already holds {', '.join(existing)}; nothing was written. Pass "
                          "--overwrite to replace them, or use another --output.")
  return output


def check_onnx_converter():
  """Raises, naming the install lines, when the ONNX converter or onnxruntime is not installed."""
  missing = [name for name in ONNX_MODULES if importlib.util.find_spec(name) is None]
  if missing:
    raise ConfigError(f"--mode=export writes ONNX with jax2onnx and checks it with onnxruntime; "
                      f"{', '.join(missing)} not installed. Install them with: {ONNX_INSTALL}")


def pixel_embedder(models, variables, config):
  """uint8 (N, H, W, 3) -> float32 (N, D): extract's normalisation (transforms.normalize, computed in the same
  float32 order) followed by its feature function (features.embed), `variables` as constants."""
  mean = np.asarray(config.data.mean, np.float32)
  std = np.asarray(config.data.std, np.float32)
  flip = bool(config.eval.flip)

  def embedder(images):
    normalized = (images.astype(jnp.float32) / np.float32(transforms.PIXEL_MAX) - mean) / std
    return features.embed(models, variables, normalized, flip)
  return embedder


def trace(embedder, height, width):
  """The closed jaxpr of `embedder` for uint8 (N, height, width, 3), N symbolic; -> (jaxpr, input spec)."""
  batch, = jax.export.symbolic_shape(BATCH)
  spec = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
  return jax.make_jaxpr(embedder)(spec), spec


def to_stablehlo(jaxpr, spec):
  """-> (serialized jax.export.Exported, platforms it was lowered for)."""
  function = jax.jit(lambda images: jax_core.jaxpr_as_fun(jaxpr)(images)[0])
  try:
    exported = jax.export.export(function, platforms=PLATFORMS)(spec)
  except Exception as e:  # noqa: BLE001 - a rule missing for TPU: that platform is dropped, the reason shown
    platforms = tuple(p for p in PLATFORMS if p != "tpu")
    print(f"embedder.stablehlo: TPU lowering failed ({str(e).splitlines()[0]}); exporting for "
          f"{', '.join(platforms)}.", flush=True)
    exported = jax.export.export(function, platforms=platforms)(spec)
  return bytes(exported.serialize()), tuple(exported.platforms)


def _max_pool_by_slices(x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation):
  """reduce_window_max as the maximum over the window's strided slices (the same values: max is exact).

  The padding repeats the edge instead of adding -inf: every window that reaches into it also holds the edge
  value it repeats (padding < window), so no maximum changes - and edge copies are slices and concatenations,
  which jax2onnx lowers with a symbolic batch (its lax.pad does not).
  """
  params = dict(window_dimensions=window_dimensions, window_strides=window_strides, padding=padding,
                base_dilation=base_dilation, window_dilation=window_dilation)
  if (any(d != 1 for d in (*base_dilation, *window_dilation))
      or any(max(lo, hi) >= size for (lo, hi), size in zip(padding, window_dimensions))):
    return jax.lax.reduce_window_max_p.bind(x, **params)
  for axis, (lo, hi) in enumerate(padding):
    if lo or hi:
      first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
      last = jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
      x = jax.lax.concatenate([first] * lo + [x] + [last] * hi, axis)
  out = None
  for offset in itertools.product(*(range(k) for k in window_dimensions)):
    window = x
    for axis, (start, size, stride) in enumerate(zip(offset, window_dimensions, window_strides)):
      if size > 1 or stride > 1:  # only spatial axes: the batch axis (symbolic) has size = stride = 1
        count = (x.shape[axis] - size) // stride + 1
        window = jax.lax.slice_in_dim(window, start, start + (count - 1) * stride + 1, stride, axis)
    out = window if out is None else jnp.maximum(out, window)
  return out


def _evaluate_for_onnx(jaxpr, consts, *args):
  """Evaluates a jaxpr with nested jit/remat calls inlined and max pooling as slices.

  jax2onnx lowers reduce_window_max to one MaxPool over every axis (NHWC's batch and channels included), a
  4-D pooling onnxruntime refuses; the slices lower to Pad, Slice and Max, which every runtime runs. Working
  on the jaxpr also keeps jax2onnx's own Flax-function rewrites (which read flax.linen.max_pool's padding as
  a string) out of the conversion: both artefacts come from the same trace.
  """
  env = {}

  def read(var):
    return var.val if isinstance(var, jax_core.Literal) else env[var]

  for var, value in itertools.chain(zip(jaxpr.constvars, consts), zip(jaxpr.invars, args)):
    env[var] = value
  for eqn in jaxpr.eqns:
    values = [read(var) for var in eqn.invars]
    inner = eqn.params.get("jaxpr")
    if eqn.primitive is jax.lax.reduce_window_max_p:
      outs = [_max_pool_by_slices(*values, **eqn.params)]
    elif eqn.primitive.name in ("jit", "pjit", "checkpoint", "remat") and inner is not None:
      closed = inner if isinstance(inner, jax_core.ClosedJaxpr) else jax_core.ClosedJaxpr(inner, ())
      outs = _evaluate_for_onnx(closed.jaxpr, closed.consts, *values)
    else:
      params = eqn.primitive.get_bind_params(eqn.params)  # (subfunctions, params) before jax 0.9
      subfunctions, params = params if isinstance(params, tuple) else ((), params)
      outs = eqn.primitive.bind(*subfunctions, *values, **params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    for var, value in zip(eqn.outvars, outs):
      env[var] = value
  return [read(var) for var in jaxpr.outvars]


def to_onnx(jaxpr, spec):
  """-> serialized ONNX model of the jaxpr (input "images", output "features", batch axis "N")."""
  from jax2onnx import to_onnx as convert

  # jax2onnx logs every plugin it cannot import (Equinox, examples) and every untyped constant it skips.
  loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    model = convert(lambda images: _evaluate_for_onnx(jaxpr.jaxpr, jaxpr.consts, images)[0], [spec],
                    model_name="embedder", opset=ONNX_OPSET, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME])
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)
  _share_initializers(model)
  return model.SerializeToString()


def _share_initializers(model):
  """Keeps one initializer per distinct constant: jax2onnx gives each use of a weight its own copy, so the
  flip's second pass through the networks would double the file."""
  import onnx

  first, rename, kept = {}, {}, []
  for tensor in model.graph.initializer:
    anonymous = onnx.TensorProto()
    anonymous.CopyFrom(tensor)
    anonymous.name = ""
    key = hashlib.sha256(anonymous.SerializeToString()).digest()
    if key in first:
      rename[tensor.name] = first[key]
    else:
      first[key] = tensor.name
      kept.append(tensor)
  if not rename:
    return
  for node in model.graph.node:
    for i, name in enumerate(node.input):
      if name in rename:
        node.input[i] = rename[name]
  kept = [onnx.TensorProto.FromString(t.SerializeToString()) for t in kept]
  del model.graph.initializer[:]
  model.graph.initializer.extend(kept)


def compare(features_out, reference):
  """-> {"max_rel_err": max |a - b| / max |b|, "min_cosine": per-row minimum} of two (N, D) arrays."""
  a, b = np.asarray(features_out, np.float64), np.asarray(reference, np.float64)
  if a.shape != b.shape:
    raise AssertionError(f"artefact output shape {a.shape} differs from extract's {b.shape}")
  scale = np.abs(b).max()
  rel = float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max())
  norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  cosine = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
  return {"max_rel_err": rel, "min_cosine": float(cosine.min())}


def _probe(config, mesh, models, variables, exported, onnx_model):
  """Runs the artefacts on random images at batch 1 and PROBE_IMAGES and compares them with extract's
  feature function (features.make_feature_fn on the workdir's mesh); -> the measured errors."""
  count = -(-PROBE_IMAGES // mesh.devices.size) * mesh.devices.size
  shape = (count, config.data.height, config.data.width, 3)
  images = np.random.default_rng(PROBE_SEED).integers(0, 256, shape, dtype=np.uint8)
  feature_fn = features.make_feature_fn(models, config, mesh)
  normalized = transforms.normalize(images, config.data.mean, config.data.std)
  reference = features.to_host(feature_fn(variables, sharding.make_global_batch(normalized, mesh)))
  runs = {STABLEHLO: lambda x: np.asarray(jax.export.deserialize(bytearray(exported)).call(x))}
  if onnx_model is not None:
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    runs[ONNX] = lambda x: session.run(None, {INPUT_NAME: x})[0]
  measured = {}
  for name, run in runs.items():
    out = np.concatenate([run(images[:1]), run(images)])
    errors = compare(out, np.concatenate([reference[:1], reference]))
    if not (errors["max_rel_err"] <= MAX_REL_ERR and errors["min_cosine"] >= MIN_COSINE):
      raise AssertionError(f"{name} does not reproduce extract's features on {count} probe images: "
                           f"{errors} (bounds: max_rel_err {MAX_REL_ERR}, min_cosine {MIN_COSINE}); nothing "
                           "was written.")
    measured[name] = errors
  return {"images": count, "batch_sizes": [1, count], "platform": jax.devices()[0].platform, **measured}


def _version(package):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _write(path, data):
  """Writes bytes through a temporary file and a rename (a reader never sees half a file)."""
  storage.write_file(path, data)


def describe(config, *, feature_dim, step, config_name, files, platforms, onnx, verified):
  """embedder.json's content: what a caller needs to feed the artefacts, and how they were made."""
  backbone = config.model.get("backbone", "generator")
  return {
      "height": int(config.data.height), "width": int(config.data.width), "layout": "NHWC",
      "channel_order": "RGB", "input_dtype": "uint8", "input_name": INPUT_NAME, "input_shape":
      [BATCH, int(config.data.height), int(config.data.width), 3], "output_name": OUTPUT_NAME,
      "output_dtype": "float32", "feature_dim": int(feature_dim),
      "mean": [float(v) for v in config.data.mean], "std": [float(v) for v in config.data.std],
      "normalization": "inside: (pixel / 255 - mean) / std per channel",
      "resize": "none inside: give images already at height x width (--mode=extract first resizes every "
                "image with PIL's bilinear filter)",
      "flip": bool(config.eval.flip),
      "flip_combination": "sum: feature(x) + feature(x flipped left-right)" if config.eval.flip else None,
      "feature": "pooled (no BNNeck)" if backbone == "resnet50_plain" else "BNNeck output",
      "backbone": backbone, "model_dtype": str(config.model.dtype), "config": config_name,
      "checkpoint_step": int(step), "files": files, "stablehlo_platforms": list(platforms),
      "onnx_opset": ONNX_OPSET if onnx else None, "jax_version": jax.__version__,
      "jaxlib_version": _version("jaxlib"), "jax2onnx_version": _version("jax2onnx") if onnx else None,
      "onnx_version": _version("onnx") if onnx else None,
      "onnxruntime_version": _version("onnxruntime") if onnx else None,
      "verified": verified,
  }


def export(config, workdir, output, step=None, overwrite=False, config_name=None, onnx=True):
  """Writes embedder.stablehlo, embedder.onnx (unless not `onnx`) and embedder.json into `output`.

  Refuses (before restoring anything) an output inside the workdir's checkpoints/ or one that holds the files
  already (unless `overwrite`); a workdir without the checkpoint is CheckpointMissingError. -> embedder.json's
  content.
  """
  workdir, mesh = inference.prepare(config, workdir)
  if canonical_dtype(config.model.dtype) != jnp.float32:
    # onnxruntime has no bfloat16 convolutions, and reduced-precision features differ from run to run by more
    # than the 1e-4 the artefacts are held to. The checkpoint's variables are float32 whatever model.dtype.
    raise ConfigError(f"--mode=export needs float32 compute; config.model.dtype={config.model.dtype!r}. Pass "
                      "--config.model.dtype=float32 (the checkpoint's variables are float32; --mode=extract "
                      "with the same override gives the features the artefacts reproduce).")
  output = check_output(output, workdir, overwrite)
  if onnx:
    check_onnx_converter()
  models, variables, step = inference.restore_for_inference(config, workdir, step, mesh)
  # The plain convolution forms for every platform (models/forms.py): a CPU rewrite must not be baked into
  # the CUDA and TPU lowerings, and ONNX runtimes have their own convolution kernels.
  portable = config.copy_and_resolve_references()
  with portable.unlocked():
    portable.model.conv_impl = "xla"
  constants = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), variables)
  num_classes = models.reid.num_classes
  embedder = pixel_embedder(build_models(portable, num_classes), constants, config)
  jaxpr, spec = trace(embedder, config.data.height, config.data.width)
  stablehlo, platforms = to_stablehlo(jaxpr, spec)
  onnx_model = to_onnx(jaxpr, spec) if onnx else None
  verified = _probe(config, mesh, models, variables, stablehlo, onnx_model)
  files = {STABLEHLO: stablehlo} | ({ONNX: onnx_model} if onnx else {})
  sums = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
          for name, data in files.items()}
  description = describe(config, feature_dim=jaxpr.out_avals[0].shape[-1], step=step, config_name=config_name,
                         files=sums, platforms=platforms, onnx=onnx, verified=verified)
  if jax.process_index() == 0:
    os.makedirs(output, exist_ok=True)
    for name, data in files.items():
      _write(os.path.join(output, name), data)
    if not onnx and os.path.lexists(os.path.join(output, ONNX)):
      os.remove(os.path.join(output, ONNX))  # an older export's, which embedder.json would not describe
    _write(os.path.join(output, DESCRIPTION), (json.dumps(description, indent=2) + "\n").encode())
    errors = ", ".join(f"{name} max rel err {verified[name]['max_rel_err']:.1e}, min cosine "
                       f"{verified[name]['min_cosine']:.6f}" for name in files)
    print(f"Exported the step-{step} embedder ({config.data.height}x{config.data.width} uint8 RGB -> "
          f"{description['feature_dim']}-d float32) to {output}: {', '.join([*files, DESCRIPTION])}. Checked "
          f"against extract's features on {verified['images']} images: {errors}.", flush=True)
  return description
