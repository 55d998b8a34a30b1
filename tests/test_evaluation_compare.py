"""``epi-jax compare`` end to end on configs/tiny.py, and its CLI parsing / tables."""

import json
import pathlib

import pytest

from epi_jax.experiments import cli
from epi_jax.experiments import compare as cmp

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_eval_overrides():
  rest, ov = cli.split_eval_args(["--workdir", "x", "--eval.num_examples=3",
                                  "--eval.num_examples.gsm8k", "2", "--eval.tasks=gsm8k,chat"])
  assert rest == ["--workdir", "x"]
  s = cli.apply_eval_overrides(cmp.eval_defaults(), ov)
  assert s["num_examples"]["gsm8k"] == 2 and s["num_examples"]["chat"] == 3
  assert s["tasks"] == ["gsm8k", "chat"]
  with pytest.raises(ValueError, match="Unknown eval setting"):
    cli.apply_eval_overrides(cmp.eval_defaults(), {"num_exampels": 3})


def test_cli_usage_errors(capsys):
  assert cli.evaluate_main([]) == 2
  assert "exactly one of" in capsys.readouterr().err
  assert cli.compare_main(["--workdir", "x"]) == 2
  assert "--config" in capsys.readouterr().err


def test_split_eval_config():
  import ml_collections
  c = ml_collections.ConfigDict({"method": "epi", "eval": {"num_examples": {"gsm8k": 4},
                                                           "snapshots": "final"}})
  train_cfg, s = cmp.split_eval_config(c)
  assert "eval" not in train_cfg and "eval" in c  # the caller's config is untouched
  assert s["num_examples"]["gsm8k"] == 4 and s["num_examples"]["logiqa"] == 300
  assert s["snapshots"] == "final"
  with pytest.raises(ValueError, match="eval"):
    cmp.split_eval_config(ml_collections.ConfigDict({"eval": {"bogus": 1}}))


def test_cached_eval_recomputes_only_for_new_settings(tmp_path):
  path = tmp_path / "eval" / "step_4.json"
  calls = []

  def compute():
    calls.append(1)
    return {"results": {"alpaca": {"loss": 1.5}}, "seconds": 0.1}

  key = cmp.eval_key(cmp.eval_defaults())
  first = cmp.cached_eval(path, key, compute)
  assert first["eval_key"] == key and json.loads(path.read_text()) == first
  assert cmp.cached_eval(path, key, compute) == first and len(calls) == 1
  # Analysis-only settings do not change the key; settings that change results do.
  assert cmp.eval_key({**cmp.eval_defaults(), "snapshots": "final"}) == key
  other = cmp.eval_key({**cmp.eval_defaults(), "seq_len": 128})
  assert other != key
  assert cmp.cached_eval(path, other, compute)["eval_key"] == other and len(calls) == 2
  path.write_text("{not json")  # a broken cache file is recomputed, not an error
  assert cmp.cached_eval(path, other, compute)["eval_key"] == other and len(calls) == 3
  assert sorted(p.name for p in path.parent.iterdir()) == ["step_4.json"]


def test_interrupted_run_stops_the_comparison_with_a_clear_error(tmp_path, monkeypatch):
  """A run stopped by a signal has no final snapshot: the comparison says so
  and stops, instead of failing on the missing snapshot."""
  import types
  cfg = types.SimpleNamespace(total_steps=8)
  monkeypatch.setattr(cmp.training, "train",
                      lambda c, d: types.SimpleNamespace(interrupted=True, step=3))
  with pytest.raises(cmp.RunInterrupted, match=r"\[epi seed0\] training stopped at step 3 of 8"):
    cmp.train_and_evaluate(cfg, tmp_path / "run", "epi seed0", {}, {})


# Training rows of 128 tokens, not tiny.py's 512 (LogiQA's passages need those, so it is
# left out of the training stages; every task is still evaluated, at eval.seq_len=128).
# One device, not conftest's 8 fake ones: the comparison is not about sharding
# (test_training checks sharded == single device), and each method's step compiles
# and runs several times faster unpartitioned.
_SMALL_TINY = """
import runpy
def get_config():
  c = runpy.run_path({tiny!r})["get_config"]()
  c.total_steps = 12
  c.data.seq_len = 128
  c.mesh.data = 1
  c.data.mixture.logiqa = 0.0
  c.data.stages = [{{"mixture": {{"gsm8k": 1.0, "alpaca": 1.0}}, "steps": 6}},
                   {{"mixture": {{"code_alpaca": 1.0, "chat": 1.0}}, "steps": 6}}]
  c.snapshot_steps = (6,)
  c.epi.update_interval = 3
  c.epi.track_importance = True
  c.progress_bar = False
  return c
"""


@pytest.mark.slow
def test_compare_end_to_end_tiny(tmp_path):
  """configs/tiny.py, shortened to 12 steps in two stages, all four methods."""
  config = tmp_path / "tiny_small.py"
  config.write_text(_SMALL_TINY.format(tiny=str(REPO / "configs" / "tiny.py")))
  workdir = tmp_path / "cmp"
  argv = ["--config", str(config), "--workdir", str(workdir),
          "--methods", "full,multi_stage,static,epi,epi_clip_trainable", "--seeds", "1",
          "--config.optimizer.warmup_steps=2",
          "--eval.num_examples=3", "--eval.max_new_tokens=8", "--eval.batch_size=4",
          "--eval.seq_len=128"]
  assert cli.compare_main(argv) == 0
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["methods"]) == {"full", "multi_stage", "static", "epi",
                                     "epi_clip_trainable"}
  for m, e in results["methods"].items():
    assert set(e["tasks"]) == set(cmp.TASKS), m
    assert e["average"]["mean"] is not None
    # Snapshots at 6 and 12: forgetting is defined for every task.
    assert all(e["forgetting"][t]["mean"] is not None for t in cmp.TASKS), m
  assert "stage_transfer" in results["methods"]["multi_stage"]
  assert results["methods"]["epi"]["drift"]["num_refreshes"]["mean"] >= 2
  assert (workdir / "results.md").read_text().count("| epi |") >= 3
  assert (workdir / "plots" / "tasks_normalized.png").is_file()
  assert (workdir / "plots" / "drift.png").is_file()
  assert (workdir / "plots" / "layer_heatmap_epi.png").is_file()
  # Paired intervals beside every difference, and the five claims answered.
  pair = results["paired"]["pairs"]["epi - static"]
  assert {"average", "forgetting", "task:chat", "raw:gsm8k"} <= set(pair)
  lo, hi = pair["average"]["ci95"]
  assert lo <= pair["average"]["diff"] <= hi
  assert "epi_clip_trainable - epi" in results["paired"]["pairs"]
  assert len(results["verdicts"]) == 5
  md = (workdir / "results.md").read_text()
  assert md.startswith("Verdicts") and results["verdicts"][0] in md
  assert "| epi - static |" in md
  # Clipping: the trainable norm is logged beside the global one.
  norms = results["methods"]["epi"]["grad_norms"]
  assert norms["trainable_grad_norm"]["mean"] <= norms["grad_norm"]["mean"] * (1 + 1e-6)
  # Drift the paper's way: top-p importance sets of full SFT (mode "none") and
  # EPI (its masks), from the first seed (cmp.DRIFT_METHODS).
  imp = results["importance_drift"]
  assert set(imp) == set(cmp.DRIFT_METHODS) == {"full", "epi"}
  assert imp["full"]["step"] == [3, 6, 9, 12] and imp["full"]["jaccard_first"][0] == 1.0
  assert imp["epi"]["final_jaccard_first"] is not None
  assert (workdir / "plots" / "importance_drift.png").is_file()
  assert (workdir / "plots" / "importance_layers_full.png").is_file()
  assert "Drift of the top-p importance set" in md
  # Lock-in (epi_jax.method.lock_in) for every run with EPI refreshes; the first
  # seed's EPI mask against full SFT's saved top-p set at each refresh step.
  epi_lock = results["methods"]["epi"]["lock_in"]
  run = epi_lock["first_run"]
  assert run["step"] == [3, 6, 9, 12] and run["release_fraction"][0] is None
  assert all(0.0 <= f <= 1.0 for f in run["release_fraction"][1:])
  assert 1.0 <= run["mean_spell_refreshes"] <= 4.0
  assert all(0.0 <= j <= 1.0 for j in run["jaccard_vs_full"])
  assert epi_lock["mean_jaccard_vs_full"]["mean"] == run["mean_jaccard_vs_full"]
  assert epi_lock["mean_importance_ratio"]["mean"] > 0
  assert "lock_in" in results["methods"]["epi_clip_trainable"]  # no sets saved: no Jaccard
  assert results["methods"]["epi_clip_trainable"]["lock_in"]["mean_jaccard_vs_full"]["n"] == 0
  assert "lock_in" not in results["methods"]["full"]
  assert sorted(p.name for p in (workdir / "full" / "seed0" / "top_sets").iterdir()) == [
      "step_12.npy", "step_3.npy", "step_6.npy", "step_9.npy"]
  assert "Lock-in of the mask" in md and "| epi |" in md.split("Lock-in of the mask")[1]
  cached = sorted(p.name for p in (workdir / "epi" / "seed0" / "eval").iterdir())
  assert cached == ["step_12.json", "step_6.json"]
  # A rerun trains nothing and re-evaluates nothing: same numbers.
  mtime = (workdir / "epi" / "seed0" / "eval" / "step_12.json").stat().st_mtime
  assert cli.compare_main(argv) == 0
  again = json.loads((workdir / "results.json").read_text())
  assert again["methods"]["epi"]["average"] == results["methods"]["epi"]["average"]
  assert (workdir / "epi" / "seed0" / "eval" / "step_12.json").stat().st_mtime == mtime
  # epi-jax evaluate on one snapshot.
  out = tmp_path / "eval.json"
  assert cli.evaluate_main(["--workdir", str(workdir / "epi" / "seed0"), "--snapshot", "6",
                            "--eval.tasks=alpaca", "--eval.num_examples=2",
                            "--eval.seq_len=128", "--output", str(out)]) == 0
  single = json.loads(out.read_text())
  assert single["step"] == 6 and set(single["results"]) == {"alpaca"}


def test_standin_eval_examples():
  src = {t: [{"task": t, "id": "s0", "messages": [
      {"role": "user", "content": f"[{t}] What is 3 + 4?"},
      {"role": "assistant", "content": "3 + 4 = 7."}]}] for t in ("gsm8k", "logiqa", "chat")}
  out = cmp.standin_eval_examples(src)
  assert out["gsm8k"][0]["final_answer"] == "7"
  assert out["logiqa"][0]["options"][out["logiqa"][0]["answer"]] == "7"
  assert len(out["logiqa"][0]["options"]) == 4
  assert "final_answer" not in out["chat"][0] and "final_answer" not in src["gsm8k"][0]


@pytest.mark.parametrize("name", ["demo.py", "demo_gpu.py"])
def test_demo_configs_validate(name):
  from epi_jax.training import config as cfg_lib
  config = cfg_lib.load_config_file(str(REPO / "configs" / name))
  train_cfg, settings = cmp.split_eval_config(config)
  train_cfg = cfg_lib.validate(train_cfg)
  assert train_cfg.epi.track_importance and train_cfg.total_steps % 2 == 0
  assert all(settings["num_examples"][t] >= 24 for t in settings["tasks"])
  if name == "demo_gpu.py":  # the sizes that resolve small differences
    assert settings["num_examples"]["logiqa"] >= 300 and "logiqa" in settings["tasks"]
    assert all(settings["num_examples"][t] >= 128 for t in settings["tasks"])


def test_verdicts_cli(tmp_path, capsys):
  (tmp_path / "results.json").write_text(json.dumps({
      "protocol": "mixture", "seeds": [0, 1], "paired": {"resamples": 2000},
      "verdicts": ["EPI > static on average normalized score: yes (diff +1.00, CI [+0.20, "
                   "+1.80])"]}))
  assert cli.verdicts_main([str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "over eval examples and seeds, 2000 resamples" in out
  assert "- EPI > static on average normalized score: yes" in out
  assert cli.verdicts_main([str(tmp_path / "missing")]) == 2
