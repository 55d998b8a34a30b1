"""Models by Hugging Face Hub id, offline against a cache in huggingface_hub's layout."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from epi_jax.model import load_pretrained  # noqa: E402
from epi_jax.model.loading import is_hub_id  # noqa: E402
from tiny_hf import place_in_hub_cache, save_tiny_hf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPO, REV = "tiny-org/tiny-llama", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  """(HF_HOME, the plain checkpoint dir) with the model cached under HF_HOME/hub."""
  root = tmp_path_factory.mktemp("hub")
  source = save_tiny_hf(root / "plain", "llama")
  place_in_hub_cache(source, root / "hf_home" / "hub", REPO, REV)
  return root / "hf_home", source


def _env(hf_home):
  return dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", XLA_FLAGS="",
              PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_hub_id_pattern():
  assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
  assert is_hub_id("org/name@v1.0") and is_hub_id(f"org/name@{REV}")
  assert not is_hub_id("/abs/dir") and not is_hub_id("model.gguf")
  assert not is_hub_id("smollm2-135m-instruct")


def _offline_here(monkeypatch, hf_home):
  # huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import: set its constants here
  # (the train subprocess below sets the environment itself).
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("spec", [REPO, f"{REPO}@{REV}", f"{REPO}@main"])
def test_offline_hub_id_loads_equal_to_the_directory(hub, monkeypatch, spec):
  hf_home, source = hub
  _offline_here(monkeypatch, hf_home)
  model, tok, config = load_pretrained(spec)
  want, want_tok, want_config = load_pretrained(str(source))
  assert config == want_config
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(want, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  assert tok.encode("hi <|im_end|>") == want_tok.encode("hi <|im_end|>")


def test_cli_generate_and_train_by_hub_id_offline(hub, tmp_path, monkeypatch, capsys):
  """Training in a fresh process, whose environment (HF_HOME, HF_HUB_OFFLINE) alone
  finds the cached model; generate and export run the same CLI in this process
  (one Python and JAX start each less)."""
  from epi_jax import cli
  hf_home, _ = hub
  env = _env(hf_home)
  _offline_here(monkeypatch, hf_home)
  assert cli.main(["generate", "--model", f"{REPO}@{REV}", "--prompt", "hi",
                   "--max_new_tokens", "2"]) == 0, capsys.readouterr().err[-3000:]
  run = tmp_path / "run"
  train = subprocess.run(
      [sys.executable, "-m", "epi_jax.cli", "train", "--config", str(ROOT / "configs/tiny.py"),
       "--workdir", str(run), "--model", REPO, "--config.total_steps=2",
       "--config.optimizer.warmup_steps=1",
       "--config.data.seq_len=128", "--config.data.mixture.logiqa=0.0",
       "--config.progress_bar=False", "--config.mesh.data=1",
       "--config.async_checkpointing=False", "--config.method=full"],
      env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  assert '"name": "tiny-org/tiny-llama"' in (run / "config.json").read_text()
  out = tmp_path / "exported"
  capsys.readouterr()
  assert cli.main(["export", "--workdir", str(run), "--format", "hf", "--out", str(out)]) == 0, \
      capsys.readouterr().err[-3000:]
  # The tokenizer files come from the Hub snapshot the run started from.
  assert (out / "tokenizer_config.json").read_bytes() == (
      hub[1] / "tokenizer_config.json").read_bytes()
  capsys.readouterr()
  # A clear one-line error, exit 2 (an exception would fail the test here).
  assert cli.main(["generate", "--model", "tiny-org/not-cached", "--prompt", "hi"]) == 2
  err = capsys.readouterr().err
  assert "tiny-org/not-cached" in err and "HF_HUB_OFFLINE" in err
  assert "Traceback" not in err
