"""``epi-jax compare --protocol sequential`` end to end on configs/tiny.py."""

import json
import pathlib

import numpy as np
import pytest

from epi_jax.experiments import cli
from epi_jax.experiments import compare as cmp
from epi_jax.training import config as cfg_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# 128-token rows, not tiny.py's 512 (those are for LogiQA's passages; gsm8k and chat
# fit), on one device, not conftest's 8 fake ones (nothing here is about sharding):
# the three methods' steps compile and run several times faster.
_TINY = """
import runpy
def get_config():
  c = runpy.run_path({tiny!r})["get_config"]()
  c.total_steps = 8
  c.data.seq_len = 128
  c.mesh.data = 1
  c.snapshot_steps = ()
  c.epi.update_interval = 2
  c.epi.track_importance = True
  c.optimizer.warmup_steps = 1
  c.progress_bar = False
  return c
"""


def _loss(res):
  ex = res["per_example"]
  return float(np.sum(ex["nll"]) / np.sum(ex["tokens"]))


def test_sequential_config():
  import ml_collections
  base = ml_collections.ConfigDict({"method": "epi", "seed": 0, "total_steps": 8,
                                    "snapshot_steps": (), "data": {"stages": [], "staged": False},
                                    "epi": {"warmup_steps": None}})
  cfg = cmp.sequential_config(base, "static", "gsm8k", "chat", 4, 3)
  assert cfg.data.staged and cfg.total_steps == 8 and cfg.snapshot_steps == (4,)
  assert [st["mixture"] for st in cfg.data.stages] == [{"gsm8k": 1.0}, {"chat": 1.0}]
  assert cfg.epi.warmup_steps == 4 and cfg.seed == 3  # static: mask chosen at the end of A
  assert cmp.sequential_config(base, "epi", "a", "b", 4, 0).epi.warmup_steps is None
  assert base.data.staged is False  # the caller's config is untouched


def test_sequential_cli_errors(capsys):
  assert cli.compare_main(["--config", str(REPO / "configs" / "tiny.py"), "--workdir", "x",
                           "--protocol", "sequential"]) == 2
  assert "--tasks A,B" in capsys.readouterr().err
  with pytest.raises(ValueError, match="two different tasks"):
    cmp.compare_sequential(cfg_lib.load_config_file(str(REPO / "configs" / "tiny.py")), "x",
                           tasks=["chat", "chat"])


@pytest.mark.slow
def test_sequential_end_to_end_tiny(tmp_path):
  config = tmp_path / "tiny_seq.py"
  config.write_text(_TINY.format(tiny=str(REPO / "configs" / "tiny.py")))
  workdir = tmp_path / "seq"
  argv = ["--config", str(config), "--workdir", str(workdir), "--protocol", "sequential",
          "--tasks", "gsm8k,chat", "--seeds", "1", "--both_orders=false",
          "--eval.num_examples=3", "--eval.num_generate=0", "--eval.batch_size=4",
          "--eval.seq_len=128"]
  assert cli.compare_main(argv) == 0
  results = json.loads((workdir / "results.json").read_text())
  assert results["protocol"] == "sequential" and list(results["orders"]) == ["gsm8k_then_chat"]
  order = results["orders"]["gsm8k_then_chat"]
  assert order["steps_per_task"] == 4
  paired = order["paired"]
  assert list(paired["methods"]) == ["full", "static", "epi"]
  base = json.loads((workdir / "base_eval.json").read_text())["results"]
  for m in ("full", "static", "epi"):
    run = workdir / "gsm8k_then_chat" / m / "seed0"
    after_a = json.loads((run / "eval" / "step_4.json").read_text())["results"]
    final = json.loads((run / "eval" / "step_8.json").read_text())["results"]
    assert set(final) == {"gsm8k", "chat"}  # only A and B are evaluated
    # The drop on A, recomputed from the stored per-example scores.
    drop = 100 * _loss(base["gsm8k"]) / _loss(after_a["gsm8k"]) \
        - 100 * _loss(base["gsm8k"]) / _loss(final["gsm8k"])
    assert paired["methods"][m]["drop"]["value"] == pytest.approx(drop, rel=1e-6, abs=1e-9)
    lo, hi = paired["methods"][m]["drop"]["ci95"]
    assert lo <= drop + 1e-9 and drop - 1e-9 <= hi
    metrics_rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    if m != "full":
      assert all(r["trainable_grad_norm"] <= r["grad_norm"] * (1 + 1e-5) for r in metrics_rows)
  refreshes = [json.loads(l) for l in
               (workdir / "gsm8k_then_chat" / "static" / "seed0" / "refreshes.jsonl")
               .read_text().splitlines()]
  assert [r["step"] for r in refreshes] == [4]  # static: one mask, at the end of A
  texts = results["verdicts"]
  assert len(texts) == 3 and all("drop on the old task (gsm8k after training chat)" in t
                                 for t in texts)
  assert all(any(a in t for a in (": yes (", ": no (", ": not distinguishable at this size ("))
             for t in texts)
  md = (workdir / "results.md").read_text()
  assert md.startswith("Verdicts") and "| epi - static |" in md and "drop on gsm8k" in md
  # Lock-in: EPI's 4 refreshes against full SFT's top-p sets (first seed; both track);
  # static's one refresh; nothing for full SFT.
  locks = order["lock_in"]
  assert set(locks) == {"static", "epi"}
  epi = locks["epi"]["first_run"]
  assert epi["step"] == [2, 4, 6, 8] and len(epi["jaccard_vs_full"]) == 4
  assert all(0.0 <= j <= 1.0 for j in epi["jaccard_vs_full"])
  assert locks["static"]["first_run"]["ongoing_spell_share"] == 1.0  # one mask, never released
  assert "Lock-in of the mask" in md
  # EPI's curves plotted (static's single refresh is not a curve; no heatmap for it).
  plots = {p.name for p in (workdir / "plots").iterdir()}
  assert {"gsm8k_then_chat_lock_in.png", "gsm8k_then_chat_drift.png",
          "gsm8k_then_chat_layer_heatmap_epi.png"} <= plots
  assert "gsm8k_then_chat_layer_heatmap_static.png" not in plots


def test_staged_config_validation():
  from epi_jax.training import config as cfg_lib
  from epi_jax.training import inputs
  c = cfg_lib.default_config()
  c.method = "epi"
  c.data.staged = True
  c.optimizer.warmup_steps = 1
  c.data.stages = [{"mixture": {"gsm8k": 1.0}, "steps": 3}, {"mixture": {"chat": 1.0}, "steps": 3}]
  c.total_steps = 0
  v = cfg_lib.validate(c)
  assert v.total_steps == 6 and cfg_lib.uses_stages(v)
  assert inputs.used_tasks(v) == ["gsm8k", "chat"]
  c.total_steps = 5
  with pytest.raises(ValueError, match="data.staged"):
    cfg_lib.validate(c)
  c.data.stages = []
  with pytest.raises(ValueError, match="needs stages"):
    cfg_lib.validate(c)
