"""Every notebook in colabs/ runs top to bottom in smoke mode (EPI_COLAB_SMOKE=1) on CPU."""

import os
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "colabs").glob("*.ipynb"))


def test_notebooks_exist_and_are_stripped():
  assert len(NOTEBOOKS) >= 1
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name
    assert "colab-badge" in nb.cells[0].source, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
  monkeypatch.setenv("EPI_COLAB_SMOKE", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("EPI_COLAB_WORKDIR", str(tmp_path))
  # The kernel on one CPU device, as a Colab runtime has one accelerator, not on
  # conftest's 8 fake ones: its steps compile and run several times faster.
  monkeypatch.setenv("XLA_FLAGS", "")
  nb = nbformat.read(path, as_version=4)
  start = time.time()
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  print(f"{path.name}: {time.time() - start:.1f} s in smoke mode")


def test_real_runtime_config_downloads_data_and_model():
  """Outside smoke mode the notebooks' config downloads (no stand-in) and takes the model
  from the Hub; the install cell uses the one repository URL."""
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS[0].parent /
                                                "make_notebooks.py")
  make = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make)
  from epi_jax.training import validate
  for smoke in (False, True):
    scope = {"SMOKE": smoke, "os": os}
    exec(make.CONFIG_CELL, scope)  # pylint: disable=exec-used
    config = validate(scope["make_config"]("epi"))
    assert config.data.allow_standin == smoke
    assert config.model.name == ("tiny" if smoke else "HuggingFaceTB/SmolLM2-135M-Instruct")
  assert f"https://github.com/{make.REPO}" in make.INSTALL
  assert all(make.REPO in nbformat.read(p, as_version=4).cells[0].source for p in NOTEBOOKS)
