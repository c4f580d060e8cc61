"""launch.py as users run it: overrides, :tiny, errors reported before compiling, multi-host detection."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import launch  # noqa: E402

DEMO_TINY = f"--config={REPO}/configs/demo.py:tiny"


def run(*args, cwd=REPO):
  """python launch.py <args> in a fresh process (4 CPU devices, as every test); -> CompletedProcess."""
  return subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *args], cwd=cwd, text=True,
                        capture_output=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture
def parsed_flags():
  """launch's flags parsed as for a plain single-process run; unparsed afterwards."""
  launch.FLAGS.unparse_flags()
  launch.parse_flags(["launch.py", DEMO_TINY, "--workdir=/tmp/unused"])
  yield launch.FLAGS
  launch.FLAGS.unparse_flags()


def test_overrides_and_tiny_argument(monkeypatch):
  argv = ["launch.py", DEMO_TINY, "--config.train.batch_size=8", "--config.eval.flip=False"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv, as in app.run
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True)
  values(argv)
  config = values.config
  assert config.train.batch_size == 8 and not config.eval.flip  # the overrides
  assert config.data.height == 32 and config.train.num_steps == 4  # :tiny
  assert launch.FLAGS["config"].default is None  # launch's own flag is this kind of flag


def test_override_typo_exits_with_the_suggestion():
  result = run(DEMO_TINY, "--workdir=/tmp/unused", "--config.train.batch_sise=8")
  assert result.returncode != 0
  assert "Unknown config key in --config.train.batch_sise=8" in result.stderr
  assert 'Did you mean "batch_size"' in result.stderr and "Traceback" not in result.stderr


def test_config_errors_are_reported_before_compiling(tmp_path):
  result = run(DEMO_TINY, f"--workdir={tmp_path}", "--config.train.batch_size=6",
               "--config.data.eval_datasets=('market',)")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert ("config.data.eval_datasets=('market',); allowed: a tuple of values, each a dataset name"
          in result.stderr)
  result = run(DEMO_TINY, f"--workdir={tmp_path}", "--config.train.batch_size=6")
  assert "config.train.batch_size=6 is not divisible by the 4 devices" in result.stderr
  # A workdir that holds checkpoints of another model and batch size.
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"model": {"ngf": 64}, "train": {"batch_size": 8}}, f)
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  result = run(DEMO_TINY, f"--workdir={tmp_path}")
  assert "model.ngf: 64 in config.json, 8 now" in result.stderr, result.stderr
  assert "train.batch_size: 8 in config.json, 4 now" in result.stderr
  assert "--workdir=<new folder>" in result.stderr
  result = run(DEMO_TINY, f"--workdir={tmp_path}", "--mode=eval")  # eval: only the shapes matter
  assert "model.ngf: 64 in config.json, 8 now" in result.stderr and "batch_size" not in result.stderr
  assert os.listdir(tmp_path / "checkpoints") == ["2"]


# --- the command line: each mistake is one line, without the flag list or a traceback ----------------------

CONFIG_FILES = {
    "no_get_config.py": ("x = 1\n", "defines no get_config()"),
    "settings.json": ('{"train": {"batch_size": 8}}\n', "defines no get_config()"),
    "broken.py": ("def get_config(:\n", "is not a Python file (SyntaxError, line 1"),
    "binary.py": ("\x00\x01\x02", "is not a Python file"),
    "returns_int.py": ("def get_config(arg=None):\n  return 3\n", "returned int, not an ml_collections"),
    "raises.py": ("import ml_collections\n\ndef get_config(arg=None):\n  return {}['model']\n",
                  "raises.py, line 4: KeyError: 'model'"),
}


def assert_one_line(result, expected):
  err = result.stderr.strip()
  assert result.returncode != 0 and err.startswith("FATAL ") and expected in err, err
  assert len(err.splitlines()) == 1 and "Traceback" not in err and "flags:" not in err, err


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_a_config_file_that_is_not_an_experiment_is_one_line(tmp_path, name):
  text, expected = CONFIG_FILES[name]
  (tmp_path / name).write_text(text)
  assert_one_line(run(f"--config={tmp_path / name}", f"--workdir={tmp_path / 'run'}"), expected)
  assert not os.path.exists(tmp_path / "run")


def test_a_folder_or_an_unreadable_file_as_config_is_one_line(tmp_path):
  (tmp_path / "configs.py").mkdir()
  assert_one_line(run(f"--config={tmp_path / 'configs.py'}", "--workdir=/tmp/unused"), "is a folder")
  assert_one_line(run(f"--config={tmp_path / 'nope.py'}:tiny", "--workdir=/tmp/unused"),
                  "nope.py does not exist")
  unreadable = tmp_path / "secret.py"
  unreadable.write_text("def get_config(arg=None):\n  return None\n")
  unreadable.chmod(0)
  if os.access(unreadable, os.R_OK):
    pytest.skip("running as root: every file is readable")
  assert_one_line(run(f"--config={unreadable}", "--workdir=/tmp/unused"), "cannot read")


@pytest.mark.parametrize("args, expected", [
    (("stray",), "Unexpected argument(s) stray: launch.py takes only flags"),
    (("eval",), "(did you mean --mode=eval?)"),
    (("--mode=translate",), "--mode=translate needs --input_dir and --output_dir"),
    (("--mode=extract", "--input_dir=/tmp"), "--mode=extract needs --output"),
])
def test_stray_arguments_and_missing_mode_flags_are_one_line(args, expected):
  assert_one_line(run(DEMO_TINY, "--workdir=/tmp/unused", *args), expected)


def test_eval_without_checkpoint_prints_devices_then_says_what_to_do(tmp_path):
  result = run(DEMO_TINY, f"--workdir={tmp_path}", "--mode=eval")
  assert result.returncode != 0
  assert "1 process(es), 4 CPU device(s) (4 local); global batch 4 (1 per device)" in result.stdout
  assert "No checkpoint in" in result.stderr and "Train first" in result.stderr


@pytest.mark.parametrize("flags, env, expected", [
    ({}, {}, False),
    ({"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 0}, {}, True),
    ({}, {"SLURM_NTASKS": "4"}, True),
    ({}, {"SLURM_NTASKS": "1"}, False),
    ({}, {"TPU_WORKER_HOSTNAMES": "t1,t2"}, True),
    ({}, {"TPU_WORKER_HOSTNAMES": "localhost"}, False),
])
def test_distributed_initialisation_only_when_needed(parsed_flags, monkeypatch, flags, env, expected):
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  for name, value in flags.items():
    monkeypatch.setattr(parsed_flags[name], "value", value)
  assert launch.needs_distributed_init() == expected
