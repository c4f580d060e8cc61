"""Test setup shared by every test: four forced CPU devices so sharding is exercised everywhere."""

import os

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  _flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()

# --- Fake datasets shared by every test that reads data (tests/fakes.py writes them) ---
import fakes  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fake_manual_dir(tmp_path_factory):
  """A manual_dir holding every real dataset as a tiny fake release, in its real layout."""
  return fakes.make_all(str(tmp_path_factory.mktemp("manual")))


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory):
  """A session-wide data_dir: `get_builder(name, fake_data_dir, fake_manual_dir)` prepares into it once."""
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))


@pytest.fixture(scope="session")
def tiny_toy_config():
  """A reid_toy small enough to generate and build in well under a second."""
  from synth_reid_jax.datasets import ToyConfig

  return ToyConfig(num_train_ids=6, num_test_ids=4, images_per_id=4, num_cameras=3, queries_per_id=1)


@pytest.fixture(scope="session")
def launcher(fake_manual_dir, fake_data_dir, tmp_path_factory):
  """-> start(workdir, *args): launch.py as a process on the fake trees (see processes.py)."""
  import processes

  from synth_reid_jax.datasets import get_builder
  for name in ("gta_synthreid", "dukemtmc_reid"):
    get_builder(name, fake_data_dir, fake_manual_dir)
  return processes.make_launcher(fake_manual_dir, fake_data_dir, tmp_path_factory.mktemp("jax_cache"))
