"""--mode=export: both artefacts reproduce --mode=extract's features (batches of 1, 3 and 8: relative error,
per-image cosine, top-5 ranking), load in processes that never import synth_reid_jax, describe themselves in
embedder.json, refuse what translate/extract refuse, and meet a wrong input with the runtime's clear error."""

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import processes
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import baseline, gta2duke  # noqa: E402
from synth_reid_jax import export, inference, trainer  # noqa: E402
from synth_reid_jax import train_step as train_step_lib  # noqa: E402
from synth_reid_jax.errors import CheckpointMissingError, ConfigError, InputFilesError  # noqa: E402
from synth_reid_jax.models import build_models  # noqa: E402

HAS_ONNX = all(importlib.util.find_spec(name) for name in export.ONNX_MODULES)
NO_ONNX = f"the ONNX converter is not installed ({export.ONNX_INSTALL})"
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason=NO_ONNX)
BATCH_SIZES = (1, 3, 8)
NUM_IMAGES = 12
NUM_QUERIES = 4
TOP_K = 5
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Run as `python -c BLOCKER <script> <args>`: the script runs with these top-level packages unimportable.
BLOCKER = """
import runpy, sys
blocked = set(sys.argv[1].split(","))
class Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in blocked:
      raise ImportError(f"{name} may not be imported here")
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
assert not blocked & {name.split(".")[0] for name in sys.modules}
"""


def tiny_config(manual_dir, data_dir):
  config = gta2duke.get_config("tiny")
  config.data.manual_dir, config.data.data_dir = manual_dir, data_dir
  config.data.eval_datasets = ()
  config.train.num_steps = 2
  config.train.checkpoint_every_steps = 1
  config.train.sample_every_steps = 1000
  return config


def load(path, height, width):
  """What extract (and the examples) feed the artefacts: RGB uint8, PIL-bilinear resized to config size."""
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="module")
def run(fake_manual_dir, fake_data_dir, launcher, tmp_path_factory):
  """A 2-step tiny run (checkpoints 1 and 2), a folder of images (two not at the config size), extract's
  features of them, and the run exported by launch.py --mode=export (StableHLO only without the converter)."""
  del launcher  # builds the fake datasets the run reads
  root = tmp_path_factory.mktemp("export")
  workdir, images, output = root / "run", root / "images", root / "export"
  config = tiny_config(fake_manual_dir, fake_data_dir)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_step_lib, "make_train_step",
                  functools.partial(train_step_lib.make_train_step, compiler_options=FAST_COMPILE))
    trainer.train_and_evaluate(config, str(workdir))
  rng = np.random.default_rng(0)
  os.makedirs(images / "sub")
  for i in range(NUM_IMAGES):  # smooth colour fields plus noise: images far apart in feature space
    size = (config.data.width, config.data.height) if i % 5 else (24, 40)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 2, 3), np.uint8)).resize(size, Image.BILINEAR)
    pixels = np.clip(np.asarray(coarse, np.int16) + rng.integers(-20, 21, coarse.size[::-1] + (3,)), 0, 255)
    name = images / ("sub" if i > 8 else "") / f"{i:04d}_c1s1_0_01.png"
    Image.fromarray(pixels.astype(np.uint8)).save(name)
  extracted = inference.extract(config, str(workdir), str(images), str(root / "extract.npz"))
  paths = list(np.load(root / "extract.npz")["paths"])
  pixels = np.stack([load(images / p, config.data.height, config.data.width) for p in paths])
  out = ""
  if HAS_ONNX:
    code, out = processes.finish(launch(workdir, f"--output={output}"))
    assert code == 0, out
  else:
    export.export(config, str(workdir), str(output), onnx=False)
  return dict(config=config, workdir=workdir, images=images, output=output, pixels=pixels, paths=paths,
              features=extracted["features"], extract=root / "extract.npz", cli_output=out)


def launch(workdir, *args):
  """launch.py --mode=export on the module's run (gta2duke:tiny on the fake trees, 4 CPU devices; its probe
  compiled without XLA's backend optimisations, which the artefacts do not depend on)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {processes.FAST_COMPILE_FLAG}".strip())
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO, "launch.py"), f"--config={REPO}/configs/gta2duke.py:tiny",
       f"--workdir={workdir}", "--mode=export", "--config.data.eval_datasets=()", *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stablehlo_runner(output):
  exported = jax.export.deserialize(bytearray((output / export.STABLEHLO).read_bytes()))
  return lambda images: np.asarray(exported.call(images))


def onnx_runner(output):
  import onnxruntime

  session = onnxruntime.InferenceSession(str(output / export.ONNX), providers=["CPUExecutionProvider"])
  return lambda images: session.run(None, {export.INPUT_NAME: images})[0]


def top_k(features, k=TOP_K):
  """Each query's k nearest gallery images (squared euclidean), queries first in `features`."""
  queries, gallery = features[:NUM_QUERIES], features[NUM_QUERIES:]
  distances = ((queries[:, None] - gallery[None]) ** 2).sum(-1)
  return np.argsort(distances, axis=1, kind="stable")[:, :k]


def check_equal_to_extract(runner, run):
  measured = []
  for batch in BATCH_SIZES:
    out = np.concatenate([runner(run["pixels"][i:i + batch]) for i in range(0, NUM_IMAGES, batch)])
    assert out.dtype == np.float32 and out.shape == run["features"].shape
    errors = export.compare(out, run["features"])
    assert errors["max_rel_err"] <= 1e-4 and errors["min_cosine"] >= 0.9999, (batch, errors)
    np.testing.assert_array_equal(top_k(out), top_k(run["features"]))
    measured.append(errors)
  print({key: max(abs(e[key] - (key == "min_cosine")) for e in measured) for key in measured[0]})


@pytest.mark.slow
def test_the_ranking_the_comparison_rests_on_is_not_a_tie(run):
  """The top-5 check means something: the features differ and no two distances in a top-5 are near-equal."""
  queries, gallery = run["features"][:NUM_QUERIES], run["features"][NUM_QUERIES:]
  distances = np.sort(((queries[:, None] - gallery[None]) ** 2).sum(-1), axis=1)[:, :TOP_K + 1]
  assert np.diff(distances, axis=1).min() > 1e-3 * distances.max()


@pytest.mark.slow
def test_stablehlo_equals_extract_at_batch_1_3_and_8(run):
  check_equal_to_extract(stablehlo_runner(run["output"]), run)


@needs_onnx
@pytest.mark.slow
def test_onnx_equals_extract_at_batch_1_3_and_8(run):
  check_equal_to_extract(onnx_runner(run["output"]), run)


@pytest.mark.slow
def test_embedder_json_describes_the_artefacts(run):
  description = json.loads((run["output"] / export.DESCRIPTION).read_text())
  config = run["config"]
  assert (description["height"], description["width"]) == (config.data.height, config.data.width)
  assert (description["layout"], description["channel_order"], description["input_dtype"]) == (
      "NHWC", "RGB", "uint8")
  assert description["feature_dim"] == run["features"].shape[1]
  assert description["mean"] == list(config.data.mean) and description["std"] == list(config.data.std)
  assert description["flip"] is True and description["checkpoint_step"] == 2
  assert description["jax_version"] == jax.__version__
  assert set(description["stablehlo_platforms"]) >= {"cpu", "cuda"}
  for name, entry in description["files"].items():
    assert hashlib.sha256((run["output"] / name).read_bytes()).hexdigest() == entry["sha256"]
  assert description["verified"]["embedder.stablehlo"]["max_rel_err"] <= export.MAX_REL_ERR
  if HAS_ONNX:
    assert description["config"].endswith("configs/gta2duke.py:tiny")
    assert set(description["files"]) == {export.STABLEHLO, export.ONNX}
    # The flip's second pass shares the weights instead of storing them twice.
    assert description["files"][export.ONNX]["bytes"] < 1.5 * description["files"][export.STABLEHLO]["bytes"]
    assert description["onnx_opset"] == export.ONNX_OPSET
    assert description["verified"]["embedder.onnx"]["min_cosine"] >= export.MIN_COSINE
    assert "Checked against extract's features" in run["cli_output"]


@pytest.mark.slow
@pytest.mark.parametrize("script, artefact, blocked", [
    ("embed_jax.py", export.STABLEHLO, "synth_reid_jax,configs,flax"),
    ("embed_onnx.py", export.ONNX, "synth_reid_jax,configs,flax,jax"),
])
def test_examples_embed_a_folder_without_the_package(run, tmp_path, script, artefact, blocked):
  if artefact == export.ONNX and not HAS_ONNX:
    pytest.skip(NO_ONNX)
  out = tmp_path / "features.npz"
  result = subprocess.run(
      [sys.executable, "-c", BLOCKER, blocked, os.path.join(REPO, "examples", script),
       f"--export={run['output']}", f"--images={run['images']}", f"--output={out}", "--batch_size=5"],
      cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  written, extracted = np.load(out), np.load(run["extract"])
  assert list(written["paths"]) == list(extracted["paths"])  # the same files, in the same order
  errors = export.compare(written["features"], extracted["features"])
  assert errors["max_rel_err"] <= 1e-4 and errors["min_cosine"] >= 0.9999, errors


@pytest.mark.slow
def test_wrong_input_gets_the_runtimes_clear_error(run):
  good = run["pixels"][:2]
  wrong = {"dtype": good.astype(np.float32), "size": np.zeros((2, 64, 32, 3), np.uint8),
           "layout": good.transpose(0, 3, 1, 2).copy()}
  stablehlo = stablehlo_runner(run["output"])
  with pytest.raises(ValueError, match=r"Dtype mismatch for args\[0\]: expected uint8 and called with float"):
    stablehlo(wrong["dtype"])
  for name in ("size", "layout"):
    with pytest.raises(ValueError, match=r"Shape mismatch for args\[0\]\.shape\[1\].*\(N, 32, 16, 3\)"):
      stablehlo(wrong[name])
  if HAS_ONNX:
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    onnx = onnx_runner(run["output"])
    with pytest.raises(InvalidArgument, match=r"Unexpected input data type. Actual: \(tensor\(float\)\) , "
                                              r"expected: \(tensor\(uint8\)\)"):
      onnx(wrong["dtype"])
    for name in ("size", "layout"):
      with pytest.raises(InvalidArgument, match="Got invalid dimensions for input: images"):
        onnx(wrong[name])


@pytest.mark.slow
def test_refusals_before_any_work(run, tmp_path):
  config, workdir, output = run["config"], str(run["workdir"]), str(run["output"])
  with pytest.raises(InputFilesError, match="already holds embedder.stablehlo.*--overwrite"):
    export.export(config, workdir, output, onnx=False)
  with pytest.raises(InputFilesError, match="lies inside the checkpoint folder"):
    export.export(config, workdir, os.path.join(workdir, "checkpoints", "export"), onnx=False)
  with pytest.raises(InputFilesError, match="is a file"):
    export.export(config, workdir, str(run["extract"]), onnx=False)
  bfloat16 = config.copy_and_resolve_references()
  bfloat16.model.dtype = "bfloat16"
  with pytest.raises(ConfigError, match="needs float32 compute.*--config.model.dtype=float32"):
    export.export(bfloat16, workdir, str(tmp_path / "out"), onnx=False)
  with pytest.raises(CheckpointMissingError, match="No checkpoint in"):
    export.export(config, str(tmp_path / "empty"), str(tmp_path / "out"), onnx=False)
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_cli_refusal_is_one_fatal_line(run):
  code, out = processes.finish(launch(run["workdir"], f"--output={run['output']}"))
  assert code != 0
  fatal = [line for line in out.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and "already holds" in fatal[0] and "Traceback" not in out, out


def test_export_needs_output():
  command = [sys.executable, os.path.join(REPO, "launch.py"), f"--config={REPO}/configs/demo.py",
             "--workdir=/tmp/unused", "--mode=export"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0 and "--mode=export needs --output" in result.stderr


def test_missing_converter_is_named_with_the_install_line(monkeypatch):
  monkeypatch.setattr(export, "ONNX_MODULES", (*export.ONNX_MODULES, "no_such_converter_module"))
  with pytest.raises(ConfigError, match="no_such_converter_module.*pip install --no-deps 'jax2onnx==0.17.1'"):
    export.check_onnx_converter()


@pytest.mark.slow
def test_overwrite_and_step(run, tmp_path):
  """--step picks the checkpoint, --overwrite replaces the files; a different step embeds differently."""
  output = tmp_path / "step1"
  os.makedirs(output)
  (output / export.STABLEHLO).write_bytes(b"old")
  description = export.export(run["config"], str(run["workdir"]), str(output), step=1, overwrite=True,
                              onnx=False)
  assert description["checkpoint_step"] == 1 and set(description["files"]) == {export.STABLEHLO}
  step1 = stablehlo_runner(output)(run["pixels"])
  assert export.compare(step1, run["features"])["max_rel_err"] > 1e-3


@pytest.mark.parametrize("padding", [((0, 0), (1, 1), (1, 1), (0, 0)), ((0, 0), (0, 0), (0, 0), (0, 0)),
                                     ((0, 0), (0, 1), (2, 0), (0, 0))])
def test_max_pool_as_slices_is_exact(padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3))
  params = dict(window_dimensions=(1, 3, 3, 1), window_strides=(1, 2, 2, 1), padding=padding,
                base_dilation=(1,) * 4, window_dilation=(1,) * 4)
  expected = jax.lax.reduce_window_max_p.bind(x, **params)
  np.testing.assert_array_equal(export._max_pool_by_slices(x, **params), expected)


@needs_onnx
@pytest.mark.slow
def test_the_baseline_with_its_max_pool_and_imagenet_statistics_converts():
  """resnet50_plain (a max-pooling stem, per-channel mean/std, the pooled feature) through both converters."""
  config = baseline.get_config("tiny")
  models = build_models(config, 5)
  pixels = jnp.zeros((1, config.data.height, config.data.width, 3))
  stem = models.stem.init(jax.random.key(0), pixels, train=False)  # only what the feature needs
  encoded = jax.eval_shape(lambda x: models.stem.apply(stem, x, train=False), pixels)
  reid = models.reid.init(jax.random.key(1), jnp.zeros(encoded.shape), train=False)
  variables = jax.tree.map(np.asarray, {key: {"stem": stem[key], "reid": reid[key]}
                                        for key in ("params", "batch_stats")})
  embedder = export.pixel_embedder(models, variables, config)
  jaxpr, spec = export.trace(embedder, config.data.height, config.data.width)
  assert "reduce_window_max" in str(jaxpr)
  import onnxruntime

  session = onnxruntime.InferenceSession(export.to_onnx(jaxpr, spec), providers=["CPUExecutionProvider"])
  images = np.random.default_rng(0).integers(0, 256, (3, config.data.height, config.data.width, 3), np.uint8)
  reference = np.asarray(jax.jit(embedder)(images))
  assert np.abs(reference).max() > 0
  errors = export.compare(session.run(None, {export.INPUT_NAME: images})[0], reference)
  assert errors["max_rel_err"] <= 1e-5 and errors["min_cosine"] >= 0.9999, errors
