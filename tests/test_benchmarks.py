"""benchmarks/run.py end to end at a tiny size: the JSON it writes and the table it prints."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from epi_jax.model.config import get_config, train_flops_per_token

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_opt_refresh_bytes_tiny(tmp_path):
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "run.py"), "--parts", "opt,refresh,bytes",
       "--sizes", "1e4,3e4", "--reps", "3", "--out", str(out)],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())
  variants = {o["variant"] for o in res["opt"]}
  assert {"adamw", "isolate(adamw)", "isolate(adamw) compact", "chain(epi, adamw)"} <= variants
  for o in res["opt"]:
    assert o["step_s"] > 0 and o["refresh_step_s"] > 0 and o["ratio_vs_adamw"] > 0
  assert [o["ratio_vs_adamw"] for o in res["opt"] if o["variant"] == "adamw"] == [1.0, 1.0]
  assert {o["method"] for o in res["refresh"] if "n" in o} >= {"lax.top_k", "sort"}
  assert any("growth_exponent" in o for o in res["refresh"])
  compact = [o for o in res["bytes"] if o["importance_dtype"] == "bfloat16"
             and o["packed_mask"] and not o["track_first_mask"]]
  assert compact and compact[0]["bytes_per_param"] <= 2.2
  assert "| n params | variant |" in proc.stdout


def _smoke(script: str, tmp_path, timeout: int, *flags: str):
  """Runs ``benchmarks/<script> --smoke`` on one CPU device: (its stdout, its --out JSON)."""
  out = tmp_path / "out.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke",
                         "--out", str(out), *flags], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_peer_torch_smoke(tmp_path):
  """benchmarks/peer_torch.py runs the peer and our two steps, each in its own process."""
  stdout, res = _smoke("peer_torch.py", tmp_path, timeout=900)
  assert set(res["rows"]) == {"torch", "full", "epi"}
  for row in res["rows"].values():
    assert row["step_s"] > 0 and row["gflops"] > 0
    # Random init, same token ids: both frameworks start near ln(vocab).
    assert abs(row["first_loss"] - np.log(272)) < 0.5, row
  assert "peer/ours" in stdout


@pytest.mark.slow
def test_peer_torch_interleaved_smoke(tmp_path):
  """``--interleaved``: our full and EPI steps alternated in one process."""
  stdout, res = _smoke("peer_torch.py", tmp_path, 600, "--interleaved")
  assert set(res["rows"]) == {"full", "epi"}
  for row in res["rows"].values():
    assert len(row["steps_s"]) == 3 and row["step_s"] > 0
  assert res["epi_over_full"] == pytest.approx(res["rows"]["epi"]["step_s"]
                                                / res["rows"]["full"]["step_s"])
  assert "epi/full step" in stdout


def test_train_flops_per_token_of_smollm2():
  # 6 x 134.5M matmul params + attention at 256 tokens: ~0.86 GFLOP per training token.
  cfg = get_config("smollm2-135m")
  assert abs(train_flops_per_token(cfg, 256) / 1e9 - 0.86) < 0.01
  assert train_flops_per_token(cfg, 512) > train_flops_per_token(cfg, 256)


def test_profile_step_smoke(tmp_path):
  """benchmarks/profile_step.py traces the trainer's step and attributes its ops' time."""
  stdout, res = _smoke("profile_step.py", tmp_path, timeout=600)
  assert "phase/kind" in stdout
  r = res["results"]["full"]
  assert r["num_ops"] > 50 and r["ops_s"] > 0 and r["wall_step_s"] > 0
  kinds = r["by_phase_kind"]
  # The model's matmuls run forward and backward; AdamW runs outside the gradient.
  assert kinds["forward/matmul"] > 0 and kinds["backward/matmul"] > 0
  assert any(k.startswith("update/") and v > 0 for k, v in kinds.items())
  assert abs(sum(kinds.values()) - r["ops_s"]) < 1e-6 * max(r["ops_s"], 1.0)
  assert r["top"] and r["top_grouped"][0]["s"] >= r["top_grouped"][-1]["s"]
