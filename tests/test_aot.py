"""tools/aot.py: the train step compiled for a Cloud TPU topology on this CPU machine (libtpu's compile-only
devices), the backend forms chosen by the devices compiled for rather than the host, and the report's numbers.

Tests that need libtpu (the `[tpu]` extra) skip where it is not installed.
"""

import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gta2duke
from synth_reid_jax import sharding, train_state, train_step
from synth_reid_jax.errors import ConfigError
from synth_reid_jax.models import build_models, forms
from synth_reid_jax.models.layers import ConvTranspose3x3s2
from synth_reid_jax.tools import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='needs libtpu: pip install -e ".[tpu]" (jax[tpu]==0.10.2)')
NUM_CLASSES = 5


def convolutions(lowered_text):
  return len(re.findall(r"stablehlo\.convolution", lowered_text))


def test_a_function_traced_for_a_tpu_takes_the_tpu_forms_on_this_cpu():
  """traced_for decides the "auto" forms by the target given, whatever the host: the transposed convolution
  is one convolution in the plain (TPU) form, four sub-pixel phases in the CPU form."""
  layer = ConvTranspose3x3s2(4)
  x = jnp.zeros((1, 4, 4, 3))
  params = layer.init(jax.random.key(0), x)
  apply = lambda p, x: layer.apply(p, x)
  counts = {platform: convolutions(jax.jit(forms.traced_for(apply, platform)).lower(params, x).as_text())
            for platform in ("tpu", "cpu")}
  assert counts == {"tpu": 1, "cpu": 4}
  assert convolutions(jax.jit(apply).lower(params, x).as_text()) == 4  # untargeted: the default device (CPU)
  with forms.compiling_for("tpu"):
    assert forms.conv_forms() == forms.XLA and forms.nonfinite_guard() == "select"
  assert forms.conv_forms() == forms.CPU and forms.nonfinite_guard() == "cond"


def test_platform_of_reads_meshes_shardings_and_devices():
  mesh = sharding.create_mesh(jax.devices()[:2])
  assert forms.platform_of(mesh) == forms.platform_of(sharding.batch_sharding(mesh)) == "cpu"
  assert forms.platform_of(jax.devices()[0]) == forms.platform_of(jax.devices()) == "cpu"
  assert forms.platform_of("tpu") == "tpu" and forms.platform_of() == "cpu"
  mixed = [jax.devices()[0], types.SimpleNamespace(platform="tpu")]
  with pytest.raises(ValueError, match=r"one platform, got \['cpu', 'tpu'\]"):
    forms.platform_of(mixed)


def test_floor_peaks_and_checks():
  v5e = aot.CHIPS["TPU v5 lite"]
  assert aot.peak_flops(v5e, "bfloat16", "highest") == aot.peak_flops(v5e, "float32", None) == 197e12
  assert aot.peak_flops(v5e, "float32", "highest") == pytest.approx(197e12 / 6)
  # Compute-bound, then bandwidth-bound: the larger of the two times.
  assert aot.step_floor(197e12, 819e9 / 10, v5e, "bfloat16", None) == pytest.approx(1.0)
  assert aot.step_floor(197e11, 819e9 * 2, v5e, "float32", None) == pytest.approx(2.0)
  lowered = ("%0 = stablehlo.custom_call @Sharding(%arg0)\n"
             "%1 = stablehlo.custom_call @lapack_sgesdd_ffi(%0)\n"
             "%2 = stablehlo.custom_call @xla_ffi_python_cpu_callback(%1)")
  compiled = "%p = f64[2,3]{1,0} parameter(0)\n%s = f32[] send(), is_host_transfer=true\n%q = f32[4] add()"
  assert aot.program_checks(lowered, compiled) == {
      "float64": ["f64[2,3]"], "host_callbacks": ["xla_ffi_python_cpu_callback", "host send/recv"],
      "foreign_custom_calls": ["lapack_sgesdd_ffi"]}
  assert aot.program_checks("%0 = stablehlo.custom_call @Sharding(%a)", "f32[8] add()") == {
      "float64": [], "host_callbacks": [], "foreign_custom_calls": []}
  stats = types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=60, alias_size_in_bytes=50,
                                temp_size_in_bytes=30, generated_code_size_in_bytes=7, peak_memory_in_bytes=0)
  assert aot.memory(types.SimpleNamespace(memory_analysis=lambda: stats)) == {
      "arguments": 100, "outputs": 60, "aliased": 50, "temporaries": 30, "generated_code": 7, "peak": 140}


def test_a_topology_name_libtpu_cannot_read_is_one_fatal_line():
  with pytest.raises(SystemExit, match=r"^FATAL --topology='v5litepod-8' is not a libtpu topology name"):
    aot.topology_devices("v5litepod-8")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here")
def test_without_libtpu_the_tool_says_how_to_install_it():
  with pytest.raises(SystemExit, match=r'^FATAL --topology needs libtpu.*pip install "jax\[tpu\]==0\.10\.2"'):
    aot.topology_devices("v5e:2x2")


def tiny_config(**changes):
  config = gta2duke.get_config("tiny")
  for key, value in changes.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def lowered_step(config, mesh):
  """The tiny train step's StableHLO for `mesh`, as training would build it (nothing compiled)."""
  optimizers = {}

  def init(key):
    state, built = train_state.create_train_state(config, key, NUM_CLASSES, pretrained=False)
    optimizers.update(built)
    return state

  state = jax.eval_shape(init, jax.random.key(0))
  shape = (config.train.batch_size, config.data.height, config.data.width, 3)
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  batch = {"source": images, "target": images, "pid": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}
  step = train_step.make_train_step(config, build_models(config, NUM_CLASSES), optimizers, 10, mesh)
  return step.lower(state, batch, jax.eval_shape(jax.random.key, 0)).as_text()


def guard_conds(text):
  return text.count("stablehlo.case")


@needs_libtpu
def test_the_step_for_a_tpu_topology_takes_the_tpu_program_under_auto_and_the_cpu_one_is_unchanged():
  """Under "auto" the tiny step lowered for v5e chips is the plain-forms, select-guard program (the same
  convolutions as conv_impl=xla, no cond); for this CPU's devices it is today's (CPU forms, cond guard)."""
  tpu = sharding.create_mesh(aot.topology_devices("v5e:2x2"))
  cpu = sharding.create_mesh(jax.devices())
  auto_tpu = lowered_step(tiny_config(), tpu)
  plain_select = lowered_step(tiny_config(model__conv_impl="xla", train__nonfinite_guard="select"), tpu)
  cpu_forms = lowered_step(tiny_config(model__conv_impl="cpu", train__nonfinite_guard="select"), tpu)
  assert convolutions(auto_tpu) == convolutions(plain_select) < convolutions(cpu_forms)
  assert guard_conds(auto_tpu) == guard_conds(plain_select) == 0
  auto_cpu = lowered_step(tiny_config(), cpu)
  cpu_cond = lowered_step(tiny_config(model__conv_impl="cpu", train__nonfinite_guard="cond"), cpu)
  assert convolutions(auto_cpu) == convolutions(cpu_cond) == convolutions(cpu_forms)
  assert guard_conds(auto_cpu) == guard_conds(cpu_cond) > 0


@needs_libtpu
def test_megacore_topologies_count_one_device_per_chip_and_unknown_ones_are_one_line():
  assert len(aot.topology_devices("v4:2x2x1")) == len(aot.topology_devices("v5p:2x2x1")) == 4
  assert len(aot.topology_devices("v5e:1x1")) == 1
  with pytest.raises(SystemExit, match=r"^FATAL --topology='v9z:2x2' is not a topology libtpu knows"):
    aot.topology_devices("v9z:2x2")
  with pytest.raises(ConfigError, match=r"config.train.batch_size=6 is not divisible by the 4 devices"):
    aot.compile_for_topology(tiny_config(train__batch_size=6), "v5e:2x2", NUM_CLASSES)


@needs_libtpu
@pytest.mark.slow
def test_the_tiny_experiment_compiles_for_v5e(tmp_path):
  """The command a TPU user runs (about 40 s of compiling on 2 idle cores): JSON with the TPU forms, per-chip
  memory within the chip's HBM, FLOPs, the floor and no float64, host callback or foreign custom call."""
  serialized = tmp_path / "step.bin"
  result = subprocess.run(
      [sys.executable, "-m", "synth_reid_jax.tools.aot", "--config=configs/gta2duke.py:tiny",
       "--topology=v5e:2x2", "--json", f"--serialize={serialized}"],
      cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["device_kind"] == "TPU v5 lite" and report["num_devices"] == 4 and report["global_batch"] == 4
  assert (report["conv_impl"], report["nonfinite_guard"]) == ("xla", "select")
  memory = report["memory_per_device"]
  assert set(memory) >= {"arguments", "outputs", "temporaries", "peak"}
  assert 0 < memory["arguments"] <= memory["peak"] < report["hbm_per_device"] == 16 * 2 ** 30
  assert report["fits"] is True and report["compile_seconds"] > 0
  assert report["flops_per_device"] > 0
  assert report["flops_per_step"] == pytest.approx(4 * report["flops_per_device"])
  chip = aot.CHIPS["TPU v5 lite"]
  assert report["step_seconds_floor"] == pytest.approx(max(report["flops_per_device"] / chip["bf16_flops"],
                                                           report["bytes_accessed_per_device"] / 819e9))
  assert report["checks"] == {"float64": [], "host_callbacks": [], "foreign_custom_calls": []}
  extractor = report["feature_extractor"]
  assert extractor["fits"] and extractor["memory_per_device"]["peak"] > 0 and extractor["batch"] == 16
  with open(serialized, "rb") as f:
    saved = pickle.load(f)
  assert report["serialized"]["bytes"] == os.path.getsize(serialized) and len(saved["executable"]) > 0
  assert np.isfinite(report["step_seconds_floor"])
