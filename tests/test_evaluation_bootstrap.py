"""Paired bootstrap intervals and verdicts on constructed per-example scores."""

import numpy as np
import pytest

from epi_jax.experiments import claims
from epi_jax.scoring import bootstrap


def _loss_scores(rng, n, shift=0.0, noise=0.0, hardness=None):
  """Per-example nll/tokens whose token-weighted loss is ``mean + shift``."""
  tokens = rng.integers(5, 40, size=n).astype(float)
  hardness = rng.gamma(2.0, 1.0, size=n) if hardness is None else hardness
  per_token = hardness + shift + noise * rng.standard_normal(n)
  return {"nll": (per_token * tokens).tolist(), "tokens": tokens.tolist()}, hardness


def test_paired_interval_covers_a_known_loss_difference():
  rng = np.random.default_rng(0)
  n = 300
  b, hard = _loss_scores(rng, n)
  tokens = np.asarray(b["tokens"])
  # Model A: every example 0.05 nats/token better, plus a little per-example noise;
  # the examples' hardness (shared by both models) varies by ~1.4 nats/token.
  a = {"nll": ((hard - 0.05 + 0.02 * rng.standard_normal(n)) * tokens).tolist(),
       "tokens": b["tokens"]}
  rs = bootstrap.Resampler({"t": n}, 1, num_resamples=1000, seed=1)
  la, lb = rs.task_score("t", [a], "loss"), rs.task_score("t", [b], "loss")
  assert la.shape == (1001, 1)
  d = bootstrap.paired_difference(la, lb, rs)
  true = float(np.sum(a["nll"]) / tokens.sum() - np.sum(b["nll"]) / tokens.sum())
  assert d["diff"] == pytest.approx(true)
  lo, hi = d["ci95"]
  assert lo <= -0.05 <= hi and hi < 0  # covers the shift, excludes 0
  assert hi - lo < 0.02  # pairing removes the shared hardness (unpaired: ~0.3 wide)
  unpaired = rs.collapse(la)[1:] - rs.collapse(lb)[1:][::-1]
  assert np.percentile(unpaired, 97.5) - np.percentile(unpaired, 2.5) > 10 * (hi - lo)


def test_interval_includes_zero_for_noise_and_excludes_it_for_a_real_gap():
  rng = np.random.default_rng(2)
  n = 300
  rs = bootstrap.Resampler({"q": n}, 1, num_resamples=2000, seed=0)
  # Two models with the same 40% accuracy, independent errors: pure noise.
  a = {"correct": (rng.random(n) < 0.4).astype(int).tolist()}
  b = {"correct": (rng.random(n) < 0.4).astype(int).tolist()}
  noise = bootstrap.paired_difference(rs.task_score("q", [a], "accuracy"),
                                      rs.task_score("q", [b], "accuracy"), rs)
  assert noise["ci95"][0] < 0 < noise["ci95"][1]
  # A = B with 45 wrong answers made right: +15 points exactly.
  fixed = np.asarray(b["correct"]).copy()
  fixed[np.flatnonzero(fixed == 0)[:45]] = 1
  gap = bootstrap.paired_difference(rs.task_score("q", [{"correct": fixed.tolist()}],
                                                  "accuracy"),
                                    rs.task_score("q", [b], "accuracy"), rs)
  assert gap["diff"] == pytest.approx(0.15)
  assert 0 < gap["ci95"][0] <= 0.15 <= gap["ci95"][1]


def test_seeds_are_resampled_too():
  n = 200
  rs = bootstrap.Resampler({"q": n}, 2, num_resamples=2000, seed=3)
  base = np.zeros(n, int)
  base[:80] = 1
  # Seed 0 is 10 points better than the baseline, seed 1 is 30 points better.
  a = []
  for extra in (20, 60):
    c = base.copy()
    c[80:80 + extra] = 1
    a.append({"correct": c.tolist()})
  b = [{"correct": base.tolist()}] * 2
  d = bootstrap.paired_difference(rs.task_score("q", a, "accuracy"),
                                  rs.task_score("q", b, "accuracy"), rs)
  assert d["diff"] == pytest.approx(0.2)
  lo, hi = d["ci95"]
  # The seed spread shows: replicates drawing seed 0 twice sit at ~0.1, seed 1 twice ~0.3.
  assert lo < 0.13 and hi > 0.27
  with pytest.raises(ValueError, match="seed"):
    rs.task_score("q", a[:1], "accuracy")
  with pytest.raises(ValueError, match="different examples"):
    rs.task_score("q", [{"correct": [1, 0]}] * 2, "accuracy")


def test_verdict_wording():
  yes = bootstrap.verdict("EPI > static on average", 1.0, [0.2, 1.8], lower_is_claimed=False)
  assert yes["answer"] == "yes"
  assert yes["text"] == "EPI > static on average: yes (diff +1.00, CI [+0.20, +1.80])"
  no = bootstrap.verdict("EPI > static on average", -1.0, [-1.5, -0.2], lower_is_claimed=False)
  assert no["answer"] == "no"
  same = bootstrap.verdict("EPI < static on forgetting", -0.12, [-0.5, 0.3],
                           lower_is_claimed=True)
  assert same["text"] == ("EPI < static on forgetting: not distinguishable at this size "
                          "(diff -0.12, CI [-0.50, +0.30])")
  assert bootstrap.verdict("x < y", -2.0, [-3.0, -1.0], lower_is_claimed=True)["answer"] == "yes"
  assert bootstrap.verdict("x < y", 2.0, [1.0, 3.0], lower_is_claimed=True)["answer"] == "no"


def _results(loss_shift, acc_correct, rng_seed):
  rng = np.random.default_rng(rng_seed)
  n = 150
  hard = np.random.default_rng(99).gamma(2.0, 1.0, size=n)
  tokens = np.full(n, 10.0)
  nll = (hard + loss_shift + 0.01 * rng.standard_normal(n)) * tokens
  return {"alpaca": {"loss": float(nll.sum() / tokens.sum()), "n": n,
                     "per_example": {"nll": nll.tolist(), "tokens": tokens.tolist()}},
          "logiqa": {"accuracy": float(np.mean(acc_correct)), "n": len(acc_correct),
                     "per_example": {"correct": list(acc_correct)}}}


def test_claims_on_constructed_runs():
  """EPI clearly better on the average and forgetting, static = full up to noise."""
  correct = np.zeros(100, int)
  correct[:30] = 1
  better = correct.copy()
  better[30:50] = 1
  base = _results(0.0, correct, 0)
  runs = {
      # Two snapshots: (step 5, step 10).
      "full": [{5: _results(-0.20, better, 1), 10: _results(-0.10, correct, 2)}],
      "static": [{5: _results(-0.20, better, 3), 10: _results(-0.10, correct, 4)}],
      "epi": [{5: _results(-0.20, better, 5), 10: _results(-0.30, better, 6)}],
  }
  tasks = ["alpaca", "logiqa"]
  rs = claims.make_resampler(base, tasks, 1, 1000)
  q = {m: claims.mixture_quantities(rs, base, r, tasks, m) for m, r in runs.items()}
  out = claims.analyze(rs, q, claims.MIXTURE_CLAIMS)
  answers = {v["claim"]: v["answer"] for v in out["verdicts"]}
  assert answers["EPI > static on average normalized score"] == "yes"
  assert answers["static > full SFT on average normalized score"] == \
      "not distinguishable at this size"
  assert answers["EPI < static on forgetting"] == "yes"
  assert answers["EPI < full SFT on forgetting"] == "yes"
  assert not any("multi-stage" in c for c in answers)  # no multi_stage run: claim skipped
  pair = out["pairs"]["epi - static"]
  assert set(pair) >= {"average", "forgetting", "task:alpaca", "raw:logiqa"}
  # logiqa +20 points of accuracy, exactly (same examples, 20 answers fixed).
  assert pair["raw:logiqa"]["diff"] == pytest.approx(0.2)
  assert pair["raw:logiqa"]["ci95"][0] > 0
  assert out["methods"]["epi"]["average"]["value"] > 100.0


def test_sequential_drop_from_per_example_scores():
  correct = np.zeros(100, int)
  correct[:40] = 1
  worse = correct.copy()
  worse[:20] = 0
  base = _results(0.0, correct, 0)
  # A = logiqa learned then forgotten (-20 accuracy points), B = alpaca improving.
  runs = {"full": [{4: _results(-0.1, correct, 1), 8: _results(-0.3, worse, 2)}],
          "epi": [{4: _results(-0.1, correct, 3), 8: _results(-0.3, correct, 4)}]}
  rs = claims.make_resampler(base, ["logiqa", "alpaca"], 1, 1000)
  q = {m: claims.sequential_quantities(rs, base, r, "logiqa", "alpaca", 4, m)
       for m, r in runs.items()}
  # Normalized: (40+1)/102 -> (20+1)/102 relative to the base's (40+1)/102: 100 -> 51.2.
  assert rs.collapse(q["full"]["drop"])[0] == pytest.approx(100 - 100 * 21 / 41)
  assert rs.collapse(q["epi"]["drop"])[0] == pytest.approx(0.0)
  assert rs.collapse(q["full"]["gain"])[0] > 0
  out = claims.analyze(rs, q, claims.SEQUENTIAL_CLAIMS, suffix=" (logiqa)")
  assert [v["text"].split(":")[0] for v in out["verdicts"]] == [
      "EPI < full SFT on drop on the old task (logiqa)"]
  assert out["verdicts"][0]["answer"] == "yes"
