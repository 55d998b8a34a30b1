"""configs/study.py (`make study`) and benchmarks/forgetting_screen.py (`make study-screen`)."""

import json
import pathlib
import re
import runpy

import pytest

from epi_jax.experiments import compare as cmp
from epi_jax.training import config as cfg_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
STUDY = runpy.run_path(str(REPO / "configs" / "study.py"))
SCREEN = runpy.run_path(str(REPO / "benchmarks" / "forgetting_screen.py"))


def _make_var(name):
  return re.search(rf"^{name} :?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)


def test_study_config_validates_at_the_sizes_of_its_constants():
  train_cfg, settings = cmp.split_eval_config(STUDY["get_config"]())
  train_cfg = cfg_lib.validate(train_cfg)
  s = STUDY
  assert s["STEPS_PER_TASK"] >= 60 and s["SEEDS"] == 3 and s["EVAL_EXAMPLES"] >= 64
  assert train_cfg.total_steps == 2 * s["STEPS_PER_TASK"]  # sequential: half on A
  assert (train_cfg.data.batch_size, train_cfg.data.seq_len) == (s["BATCH_SIZE"], s["SEQ_LEN"])
  assert train_cfg.epi.update_interval == s["UPDATE_INTERVAL"]
  assert train_cfg.epi.ema_decay == s["EMA_DECAY"]
  assert train_cfg.checkpoint_every == s["CHECKPOINT_EVERY"] > 0  # resumable
  assert train_cfg.epi.track_importance  # full SFT's top-p sets for the lock-in Jaccard
  assert settings["tasks"] == list(s["PAIR"])
  assert all(settings["num_examples"][t] == s["EVAL_EXAMPLES"] for t in s["PAIR"])
  assert settings["num_generate"] == 0  # the cost per example assumes loss-only evals
  assert set(s["METHODS"]) == set(cmp.SEQUENTIAL_METHODS)


def test_study_cost_matches_the_docstring_arithmetic():
  s = STUDY
  runs = s["SEEDS"] * len(s["METHODS"])
  train = s["SEEDS"] * 2 * s["STEPS_PER_TASK"] * sum(s["STEP_SECONDS"].values())
  evals = (1 + 2 * runs) * len(s["PAIR"]) * s["EVAL_EXAMPLES"] * s["EVAL_SECONDS_PER_EXAMPLE"]
  total = train + evals + runs * s["RUN_OVERHEAD_SECONDS"]
  est = s["estimated_seconds"]()
  assert est["total"] == pytest.approx(total)
  assert 0.85 * s["BUDGET_SECONDS"] <= total <= 1.15 * s["BUDGET_SECONDS"]  # about 2 h
  doc = s["__doc__"]
  for value in (est["train"], est["eval"], est["overhead"], est["total"]):
    assert f"{value:.0f} s" in doc, value
  assert f"about {est['total'] / 60:.0f} min" in doc


def test_makefile_runs_the_study_pair():
  assert _make_var("STUDY_TASKS") == ",".join(STUDY["PAIR"])
  assert int(_make_var("STUDY_SEEDS")) == STUDY["SEEDS"]


def test_screen_rows_sorted_by_drop():
  def order(a, b, drop):
    return {"first": a, "second": b,
            "paired": {"methods": {"full": {"drop": {"value": drop, "ci95": [drop - 1, drop + 1]
                                                     if drop is not None else None}}}}}
  results = {"gsm8k_chat": {"orders": {"x": order("gsm8k", "chat", 1.5),
                                       "y": order("chat", "gsm8k", None)}},
             "alpaca_chat": {"orders": {"z": order("alpaca", "chat", 4.0)}}}
  rows = SCREEN["drop_rows"](results)
  assert [(r["first"], r["drop"]) for r in rows] == [("alpaca", 4.0), ("gsm8k", 1.5),
                                                      ("chat", None)]
  md = SCREEN["screen_markdown"](rows, 8, 32)
  assert "| alpaca | chat | +4.00 | [+3.00, +5.00] |" in md and "| chat | gsm8k | – | – |" in md
  assert SCREEN["unordered_pairs"](["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]


def test_screen_rejects_bad_tasks(capsys):
  with pytest.raises(SystemExit):
    SCREEN["main"](["--config", "x.py", "--workdir", "w", "--tasks", "gsm8k"])
  assert "expected two or more different tasks" in capsys.readouterr().err


# 128-token rows, not tiny.py's 512 (those are for LogiQA's passages, left out; gsm8k
# and chat fit), on one device, not conftest's 8 fake ones (nothing here is about sharding).
_TINY = """
import runpy
def get_config():
  c = runpy.run_path({tiny!r})["get_config"]()
  c.data.seq_len = 128
  c.data.mixture.logiqa = 0.0
  c.mesh.data = 1
  c.snapshot_steps = ()
  c.optimizer.warmup_steps = 1
  c.progress_bar = False
  return c
"""


@pytest.mark.slow
def test_screen_end_to_end_tiny(tmp_path, capsys):
  """Two tasks: both orders of full SFT, 2 + 2 steps, the drop table written."""
  config = tmp_path / "tiny_screen.py"
  config.write_text(_TINY.format(tiny=str(REPO / "configs" / "tiny.py")))
  workdir = tmp_path / "screen"
  assert SCREEN["main"](["--config", str(config), "--workdir", str(workdir),
                         "--tasks", "gsm8k,chat", "--steps_per_task", "2",
                         "--num_examples", "3", "--eval.num_generate=0",
                         "--eval.batch_size=4", "--eval.seq_len=128"]) == 0
  screen = json.loads((workdir / "screen.json").read_text())
  assert {(r["first"], r["second"]) for r in screen["rows"]} == {("gsm8k", "chat"),
                                                                 ("chat", "gsm8k")}
  assert all(r["drop"] is not None for r in screen["rows"])
  assert screen["rows"][0]["drop"] >= screen["rows"][1]["drop"]
  seq = json.loads((workdir / "gsm8k_chat" / "results.json").read_text())
  assert seq["orders"]["gsm8k_then_chat"]["steps_per_task"] == 2
  assert list(seq["orders"]["chat_then_gsm8k"]["paired"]["methods"]) == ["full"]
  assert "| first (A) | then (B) | drop on A |" in (workdir / "screen.md").read_text()
  assert "forgets most:" in capsys.readouterr().out


NOISE = runpy.run_path(str(REPO / "benchmarks" / "importance_noise.py"))


@pytest.mark.slow
def test_importance_noise_end_to_end_tiny(tmp_path):
  """Split-half and consecutive Jaccards of the top-p set, per beta, per task half."""
  out = tmp_path / "noise.json"
  config = tmp_path / "tiny_noise.py"
  config.write_text(_TINY.format(tiny=str(REPO / "configs" / "tiny.py")))
  assert NOISE["main"](["--config", str(config), "--tasks", "gsm8k,chat",
                        "--steps", "4", "--every", "2", "--betas", "0,0.9",
                        "--out", str(out)]) == 0
  res = json.loads(out.read_text())
  assert [(r["step"], r["task"]) for r in res["records"]] == [(2, "gsm8k"), (4, "chat")]
  first, second = res["records"]
  assert set(first["split_half"]) == {"0.0", "0.9"} and first["consecutive"] == {}
  values = [v for r in res["records"] for d in (r["split_half"], r["consecutive"])
            for v in d.values()]
  assert len(values) == 6 and all(0.0 <= v <= 1.0 for v in values)
  # Two halves of different rows select different sets: the top-p set is not
  # one fixed set at this size (were A and B fed the same gradients, all 1.0).
  assert min(first["split_half"].values()) < 1.0
  assert res["mean_by_task"]["chat"]["consecutive"]["0.0"] == second["consecutive"]["0.0"]


def test_importance_noise_rejects_bad_betas(capsys):
  with pytest.raises(SystemExit):
    NOISE["parse_args"](["--betas", "0.5,1.0"])
  assert "--betas: each must be in [0, 1)" in capsys.readouterr().err
