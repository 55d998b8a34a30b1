"""benchmarks/memory_plan.py for configs/tiny.py: its per-device numbers add up."""

import importlib.util
import json
import pathlib

import pytest

from epi_jax.model import get_config, param_count

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _module():
  spec = importlib.util.spec_from_file_location("memory_plan", REPO / "benchmarks" / "memory_plan.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_memory_plan_tiny_adds_up(tmp_path, capsys):
  out = tmp_path / "plan.json"
  # data=8: every device holds all params (replicated), so params == 4 bytes x count.
  _module().main(["--config", str(REPO / "configs" / "tiny.py"), "--data.seq_len=128",
                  "--mesh.data=8", "--unit", "MiB", "--json", str(out)])
  table = capsys.readouterr().out
  assert "| epi compact |" in table and "fits 95 / 80 GiB" in table
  rows = {r["variant"]: r for r in json.loads(out.read_text())}
  assert set(rows) == {"full", "epi", "epi compact"}
  n = param_count(get_config("tiny"))
  for name, r in rows.items():
    b = r["bytes"]
    assert r["num_params"] == n
    assert b["params"] == 4 * n, name
    assert b["batch"] == 6 * 4 * 8 * 128 // 8  # six int32/float32 [8, 128] arrays over 8 devices
    # The compiled step's arguments are exactly the state and the batch.
    assert b["compiled_arguments"] == (b["params"] + b["optimizer"] + b["epi"]
                                       + b["step"] + b["batch"]), name
    assert b["total"] == b["compiled_arguments"] + b["temp"] and b["temp"] > 0
  assert rows["full"]["bytes"]["epi"] == 0
  assert rows["full"]["bytes"]["optimizer"] >= 2 * 4 * n  # AdamW mu and nu
  # EPI default: fp32 importance + two bool masks; compact: bf16 + two packed bit masks.
  assert rows["epi"]["bytes"]["epi"] >= (4 + 1 + 1) * n
  assert rows["epi compact"]["bytes"]["epi"] < 0.5 * rows["epi"]["bytes"]["epi"]


def test_memory_plan_sharded_params_split(tmp_path):
  out = tmp_path / "plan.json"
  _module().main(["--config", str(REPO / "configs" / "tiny.py"), "--data.seq_len=128",
                  "--mesh.data=1", "--mesh.fsdp=4", "--mesh.tensor=2",
                  "--variants", "full,epi compact", "--json", str(out)])
  full, compact = json.loads(out.read_text())
  n = param_count(get_config("tiny"))
  # Every matrix of tiny divides the fsdp x tensor mesh; only the norm scales are whole.
  norms = 64 * (2 * 2 + 1)
  assert full["bytes"]["params"] == 4 * ((n - norms) // 8 + norms)
  # Compact EPI state (bf16 importance + two bit-packed masks, ~2.25 B/param) is sharded
  # like the params (4 B/param): the packed masks too, not replicated.
  assert compact["bytes"]["epi"] <= 0.6 * compact["bytes"]["params"]
