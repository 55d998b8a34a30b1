"""benchmarks/sensitivity.py end to end: a 2 x 1 (p, T) grid on configs/tiny.py, a few steps."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "sensitivity.py"
TASKS = ("gsm8k", "code_alpaca", "logiqa", "alpaca", "chat")


def _args(workdir, *extra):
  return ["--workdir", str(workdir), "--ratios", "0.01,0.1",
          "--intervals", "2", "--steps", "4", "--seeds", "1",
          "--config.data.seq_len=128", "--config.data.mixture.logiqa=0.0",
          "--config.progress_bar=False", "--config.optimizer.warmup_steps=1",
          "--eval.num_examples=2", "--eval.max_new_tokens=4", "--eval.seq_len=128",
          "--eval.batch_size=2", "--baselines", "full", *extra]


def _run(workdir, *extra):
  # A fresh process on one CPU device (not conftest's 8 fake ones): as a user runs it.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, str(SCRIPT), *_args(workdir, *extra)], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def _main(argv, capsys) -> tuple[int, str, str]:
  """The script's ``main`` in this process: (exit code, stdout, stderr). For what needs no
  fresh process (a rerun that only reads, a usage error), one Python and JAX start less."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("sensitivity_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  capsys.readouterr()
  code = module.main([str(a) for a in argv])
  out = capsys.readouterr()
  return code, out.out, out.err


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_sensitivity_sweep_end_to_end(tmp_path, capsys):
  workdir = tmp_path / "sens"
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((workdir / "sensitivity.json").read_text())
  assert res["ratios"] == [0.01, 0.1] and res["intervals"] == [2]
  names = ["epi_p0.01_T2", "epi_p0.1_T2"]
  assert [c["name"] for c in res["cells"]] == names
  assert set(res["methods"]) == {"full", *names} and res["baselines"] == ["full"]
  for name, e in res["methods"].items():
    assert _finite(e["average"]["mean"]), name
    assert set(e["tasks"]) == set(TASKS), name
    assert all(_finite(e["normalized"][t]["mean"]) for t in TASKS), name
  for name in names:
    d = res["methods"][name]["drift"]
    # 4 steps at T = 2: refreshes after steps 2 and 4 (or the initial mask and more).
    assert d["num_refreshes"]["mean"] >= 2, (name, d)
    assert 0.0 <= d["final_jaccard_first"]["mean"] <= 1.0, (name, d)
  assert "drift" not in res["methods"]["full"]
  md = (workdir / "sensitivity.md").read_text()
  assert "| p \\ T | 2 |" in md and "| 0.01 |" in md and "| 0.1 |" in md
  assert "Final Jaccard vs first mask" in md and "| epi_p0.1_T2 | 0.1 | 2 |" in md
  assert (workdir / "sensitivity.png").stat().st_size > 1000
  # Resumable: a rerun trains and evaluates nothing again and gives the same numbers
  # (in this process: it only reads what the first run wrote).
  done = {n: (workdir / n / "seed0" / "DONE").stat().st_mtime for n in names}
  code, out, err = _main(_args(workdir), capsys)
  assert code == 0, err[-3000:]
  assert "finished run found" in out
  assert "training into" not in out and "evaluating" not in out
  assert {n: (workdir / n / "seed0" / "DONE").stat().st_mtime for n in names} == done
  again = json.loads((workdir / "sensitivity.json").read_text())
  assert again["methods"]["epi_p0.1_T2"]["average"] == res["methods"]["epi_p0.1_T2"]["average"]


def test_sensitivity_bad_input(tmp_path, capsys):
  code, _, err = _main(_args(tmp_path / "bad", "--ratios", "1.5"), capsys)
  assert code == 2 and "--ratios" in err
