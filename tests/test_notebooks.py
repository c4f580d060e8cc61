"""The Colab notebooks as committed (outputs cleared, a parameters cell) and run end to end on the tiny demo.

One tiny training serves both notebooks: evaluate_checkpoint.ipynb finds no checkpoint in a fresh workdir and
trains there, then quickstart.ipynb's launch.py resumes the finished run and plots its samples and results.
"""

import json
import math
import os
import sys

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
QUICKSTART = "quickstart.ipynb"
EVALUATE = "evaluate_checkpoint.ipynb"
TINY_CONFIG = "configs/demo.py:tiny"
DATASET = "reid_toy/real"
KERNEL = "synth-reid-test"  # runs this interpreter; the stock "python3" spec runs `python` from PATH
CELL_TIMEOUT = 900  # seconds; the training cell compiles the train step on a loaded CI machine
PROBE_PREFIX = "PROBE "
PNG = "image/png"


def read(name):
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def cell(nb, cell_id):
  matches = [c for c in nb.cells if c.get("id") == cell_id]
  assert len(matches) == 1, f"expected one cell with id {cell_id!r}, found {len(matches)}"
  return matches[0]


def parameter_names(nb):
  """The names assigned by the cell tagged "parameters" (papermill's convention)."""
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "expected exactly one cell tagged 'parameters'"
  return [line.split("=")[0].strip() for line in cells[0].source.splitlines() if "=" in line]


@pytest.mark.parametrize("name, names", [
    (QUICKSTART, ["CONFIG", "WORKDIR", "DATA_DIR"]),
    (EVALUATE, ["WORKDIR", "CONFIG", "DATASET", "DATA_DIR", "NUM_QUERIES", "TOPK"]),
])
def test_committed_notebooks_are_clean(name, names):
  nb = read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: clear the outputs"
  assert parameter_names(nb) == names
  setup = cell(nb, "setup").source
  assert 'if "google.colab" in sys.modules:' in setup and "pip install" in setup


def execute(name, parameters):
  """Runs a notebook from notebooks/ (as Jupyter would) with `parameters` injected after its parameters cell.

  A last cell prints what the notebook computed (`probe`, a dict expression) as JSON; -> (notebook, probe).
  """
  from nbclient import NotebookClient

  nb = read(name)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, injected)
  probe = {QUICKSTART: "{d: r['mAP'] for d, r in results.items()}",
           EVALUATE: "{'mAP': float(mAP), 'cmc': [float(x) for x in cmc], 'step': int(step), "
                     "'visrank': visrank_paths}"}[name]
  nb.cells.append(nbformat.v4.new_code_cell(f"import json\nprint({PROBE_PREFIX!r} + json.dumps({probe}))"))
  client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, startup_timeout=120,
                          resources={"metadata": {"path": NOTEBOOKS}})
  client.execute()
  text = "".join(out.get("text", "") for out in nb.cells[-1].outputs if out.output_type == "stream")
  line = next(line for line in text.splitlines() if line.startswith(PROBE_PREFIX))
  return nb, json.loads(line[len(PROBE_PREFIX):])


def images(nb, cell_id):
  """PNG outputs (matplotlib figures, IPython images) of one cell."""
  return [out for out in cell(nb, cell_id).outputs if PNG in out.get("data", {})]


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """The environment the notebooks' kernel (and the launch.py it starts) inherits.

  JUPYTER_PATH holds a kernelspec KERNEL that starts this interpreter's ipykernel (sys.executable); a
  persistent compilation cache lets the second notebook reuse what the first compiled (state init, features).
  """
  from ipykernel.kernelspec import write_kernel_spec

  data_dir = tmp_path / "jupyter"
  write_kernel_spec(str(data_dir / "kernels" / KERNEL), overrides={"display_name": KERNEL})
  assert json.loads((data_dir / "kernels" / KERNEL / "kernel.json").read_text())["argv"][0] == sys.executable
  monkeypatch.setenv("JUPYTER_PATH", str(data_dir))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


@pytest.mark.slow
def test_notebooks_train_evaluate_and_plot_the_tiny_demo(tmp_path, kernel_env):
  workdir = str(tmp_path / "workdir")
  parameters = {"CONFIG": TINY_CONFIG, "WORKDIR": workdir, "DATA_DIR": str(tmp_path / "tensorflow_datasets")}

  # evaluate_checkpoint: no checkpoint yet, so it trains the tiny demo, then restores and evaluates it.
  nb, probe = execute(EVALUATE, dict(parameters, DATASET=DATASET, NUM_QUERIES=3, TOPK=4))
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  with open(os.path.join(workdir, "eval", f"{DATASET}.json")) as f:
    trained = json.load(f)  # the trainer's own evaluation after its last step
  with open(os.path.join(workdir, "config.json")) as f:
    num_steps = json.load(f)["train"]["num_steps"]
  assert probe["step"] == trained["step"] == num_steps
  # Features recomputed from the restored checkpoint give the trainer's numbers.
  assert probe["mAP"] == pytest.approx(trained["mAP"], abs=1e-6)
  assert probe["cmc"] == pytest.approx(trained["cmc"][:len(probe["cmc"])], abs=1e-6)
  assert 0.0 < probe["mAP"] <= 1.0 and probe["cmc"] == sorted(probe["cmc"])
  assert "mAP:" in "".join(out.get("text", "") for out in cell(nb, "rank").outputs)
  assert len(images(nb, "cmc-plot")) == 1 and len(images(nb, "visrank")) == 1
  assert len(probe["visrank"]) == 1 and os.path.exists(probe["visrank"][0])

  # quickstart: launch.py finds the run finished; the notebook shows its sample grid, losses and results.
  nb, probe = execute(QUICKSTART, parameters)
  assert list(probe) == [DATASET] and math.isfinite(probe[DATASET])
  assert probe[DATASET] == pytest.approx(trained["mAP"])
  assert [len(images(nb, cell_id)) for cell_id in ("samples", "curves", "results")] == [1, 1, 1]
  printed = "".join(out.get("text", "") for out in cell(nb, "results").outputs)
  assert f"{DATASET}: mAP {trained['mAP']:.1%}, rank-1 {trained['cmc'][0]:.1%}" in printed
