"""The comparison's report: aggregate over seeds, tables, and writing results.json/.md."""

import json

import pytest

from epi_jax.experiments import compare as cmp
from epi_jax.experiments import report


BASE = {"logiqa": {"accuracy": 0.0, "n": 4}, "alpaca": {"loss": 2.0, "perplexity": 7.4, "n": 4}}


def _runs():
  """Two seeds of one method's run summaries (the shape of report.run_summary)."""
  return {"full": [{"final": {"logiqa": {"accuracy": 0.25, "n": 4},
                              "alpaca": {"loss": 1.0, "perplexity": 2.7, "n": 4}},
                    "normalized": {"logiqa": 200.0, "alpaca": 200.0, "average": 200.0},
                    "forgetting": {"logiqa": 5.0, "alpaca": -1.0}, "forgetting_mean": 2.0,
                    "eval_seconds": 1.0, "run_dir": "x/full/seed0"},
                   {"final": {"logiqa": {"accuracy": 0.5, "n": 4},
                              "alpaca": {"loss": 1.0, "perplexity": 2.7, "n": 4}},
                    "normalized": {"logiqa": 300.0, "alpaca": 200.0, "average": 250.0},
                    "forgetting": {"logiqa": 1.0, "alpaca": -1.0}, "forgetting_mean": 0.0,
                    "eval_seconds": 1.0, "run_dir": "x/full/seed1"}]}


def test_results_markdown_and_aggregate():
  methods = report.aggregate(_runs())
  assert methods["full"]["average"]["mean"] == 225.0
  assert methods["full"]["average"]["std"] == 25.0
  assert methods["full"]["tasks"]["logiqa"]["values"] == [0.25, 0.5]
  assert methods["full"]["forgetting"]["mean"]["mean"] == 1.0
  md = report.results_markdown({"methods": methods, "base": BASE, "seeds": [0, 1],
                                "eval": {**cmp.eval_defaults(), "tasks": ["logiqa", "alpaca"]}})
  assert "| full | 37.5 ± 12.5 | 1.000 ± 0.000 | 225.0 ± 25.0 | 1.0 ± 1.0 |" in md
  assert "| base | 0.0 | 2.000 | 100.0 | – |" in md


def test_mean_std_leaves_out_missing_and_non_finite_values():
  assert report.mean_std([1.0, None, float("nan"), 3.0]) == {"mean": 2.0, "std": 1.0, "n": 2}
  assert report.mean_std([None, float("inf")]) == {"mean": None, "std": None, "n": 0}
  assert report.plus_minus(report.mean_std([1.0, 3.0])) == "2.0 ± 1.0"
  assert report.plus_minus(report.mean_std([0.5]), 100.0) == "50.0"
  assert report.plus_minus(None) == "–"


def test_grad_norm_stats_from_metrics_jsonl(tmp_path):
  assert report.grad_norm_stats(tmp_path, 1.0) is None  # no metrics.jsonl
  rows = [{"step": 1, "grad_norm": 2.0, "trainable_grad_norm": 0.5},
          {"step": 2, "grad_norm": 0.5, "trainable_grad_norm": 1.5},
          {"step": 3, "loss": 1.0}]  # a row without grad norms is left out
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  out = report.grad_norm_stats(tmp_path, 1.0)
  assert out == {"grad_norm": 1.25, "trainable_grad_norm": 1.0, "clipped_all": 0.5,
                 "clipped_trainable": 0.5}
  assert set(report.grad_norm_stats(tmp_path, 0.0)) == {"grad_norm", "trainable_grad_norm"}


def test_write_results_writes_json_markdown_and_plots(tmp_path):
  runs = _runs()
  results = {"protocol": "mixture", "seeds": [0, 1], "base": BASE,
             "eval": {**cmp.eval_defaults(), "tasks": ["logiqa", "alpaca"]},
             "methods": report.aggregate(runs), "paired": {"resamples": 10},
             "verdicts": ["EPI > static on average normalized score: yes"]}
  logged = []
  report.write_results(tmp_path, results, runs, log=logged.append)
  assert json.loads((tmp_path / "results.json").read_text())["methods"]["full"]["average"] == \
      results["methods"]["full"]["average"]
  md = (tmp_path / "results.md").read_text()
  assert md.startswith("Verdicts") and "- EPI > static on average normalized score: yes" in md
  assert (tmp_path / "plots" / "tasks_normalized.png").stat().st_size > 1000
  assert not (tmp_path / "plots" / "drift.png").exists()  # no run has refreshes
  assert not list(tmp_path.rglob("*.tmp"))  # the writes are atomic: no leftovers
  assert logged[0].strip() == md.strip()


def test_lock_in_aggregate_and_table():
  """Means over seeds of the lock-in scalars, a run without a Jaccard left out of its mean."""
  runs = [{"mean_release_fraction": 0.2, "mean_spell_refreshes": 3.0, "ongoing_spell_share": 0.5,
           "mean_importance_ratio": 2.0, "mean_jaccard_vs_full": 0.4, "step": [2, 4]},
          {"mean_release_fraction": 0.4, "mean_spell_refreshes": 2.0, "ongoing_spell_share": 0.7,
           "mean_importance_ratio": 4.0, "step": [2, 4]}, None]
  agg = report.aggregate_lock_in(runs)
  assert agg["mean_release_fraction"]["mean"] == pytest.approx(0.3)
  assert agg["mean_jaccard_vs_full"] == {"mean": 0.4, "std": 0.0, "n": 1}
  assert agg["first_run"] is runs[0]
  assert report.aggregate_lock_in([None]) is None
  md = report.lock_in_markdown({"epi": agg, "static": None})
  assert "| epi | 0.300" in md and "| static |" not in md
  assert report.lock_in_markdown({"full": None}) == ""
