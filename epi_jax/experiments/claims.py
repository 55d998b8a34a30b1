"""The paper's claims, tested with paired bootstrap intervals (see ``bootstrap``).

Inputs are eval results with ``per_example`` scores (``evaluate``): the base
model's ``{task: results}`` and, per method, one ``{step: {task: results}}``
per seed. Per method, :func:`mixture_quantities` and
:func:`sequential_quantities` build the resampled quantities (``[R+1, S]``
arrays, higher-is-better normalized points, base = 100):

* mixture: ``task:<t>`` (normalized score), ``raw:<t>`` (the metric itself:
  loss in nats or accuracy), ``average``, ``forgetting:<t>`` (best earlier
  snapshot minus final) and ``forgetting`` (their mean over tasks);
* sequential A then B: ``drop`` (A's normalized score at the end of A minus
  at the end), ``gain`` (B's at the end minus at the end of A), and the
  per-task scores at both points.

:func:`analyze` pairs every two methods (``"epi - static"``: the difference
and its ``ci95`` for every quantity), gives each method's own value with an
interval, and answers the claims with :func:`epi_jax.scoring.bootstrap.verdict`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from epi_jax.scoring import bootstrap
from epi_jax.scoring import metrics

NAMES = {"full": "full SFT", "multi_stage": "multi-stage", "static": "static", "epi": "EPI"}

# (A, op, B, quantity): "A op B on quantity". The EPI paper's claims (docs/METHOD.md
# names the paper): EPI's average above static isolation's, static's above
# multi-stage's and full SFT's; EPI's forgetting below static's and full's.
MIXTURE_CLAIMS = (
    ("epi", ">", "static", "average"),
    ("static", ">", "multi_stage", "average"),
    ("static", ">", "full", "average"),
    ("epi", "<", "static", "forgetting"),
    ("epi", "<", "full", "forgetting"),
)
# CPI-FT's Table 2 (drop on the old task: full -24.5, multi-stage -16.2,
# CPI-FT -5.7) and EPI's lower forgetting.
SEQUENTIAL_CLAIMS = (
    ("static", "<", "full", "drop"),
    ("epi", "<", "static", "drop"),
    ("epi", "<", "full", "drop"),
)
LABELS = {"average": "average normalized score", "forgetting": "forgetting",
          "drop": "drop on the old task", "gain": "gain on the new task"}


def _sizes(base: Mapping[str, Mapping], tasks: Sequence[str]) -> dict[str, int]:
  out = {}
  for t in tasks:
    ex = base[t].get("per_example")
    if not ex:
      raise ValueError(f"base results for {t!r} have no per_example scores: evaluated "
                       "before they were stored? Delete the cached eval files and rerun.")
    key = "nll" if metrics.PRIMARY_METRIC[t][0] == "loss" else "correct"
    out[t] = len(ex[key])
  return out


def make_resampler(base, tasks, num_seeds, num_resamples=bootstrap.DEFAULT_RESAMPLES,
                   seed=0) -> bootstrap.Resampler:
  return bootstrap.Resampler(_sizes(base, tasks), num_seeds, num_resamples=num_resamples,
                             seed=seed)


def _per_example(results: Mapping, task: str, where: str) -> Mapping:
  if task not in results or "per_example" not in results[task]:
    raise ValueError(f"{where}: no per_example scores for {task!r}")
  return results[task]["per_example"]


def _normalized(rs: bootstrap.Resampler, task: str, per_seed: Sequence[Mapping],
                base: Mapping, where: str) -> tuple[np.ndarray, np.ndarray]:
  """``(normalized [R+1, S], raw metric [R+1, S])`` of one task at one snapshot."""
  metric = metrics.PRIMARY_METRIC[task][0]
  raw = rs.task_score(task, [_per_example(r, task, where) for r in per_seed], metric)
  base_raw = rs.task_score(task, [_per_example(base, task, "base")] * rs.num_seeds, metric)
  return metrics.normalized_value(task, raw, base_raw, rs.sizes[task]), raw


def _at(runs: Sequence[Mapping[int, Mapping]], step: int | None) -> list[Mapping]:
  """Per seed, the results at ``step`` (None: the final snapshot)."""
  out = []
  for k, evals in enumerate(runs):
    steps = sorted(int(s) for s in evals)
    s = steps[-1] if step is None else int(step)
    if s not in steps:
      raise ValueError(f"seed {k}: no eval at step {s}; have {steps}")
    out.append({int(a): b for a, b in evals.items()}[s])
  return out


def mixture_quantities(rs: bootstrap.Resampler, base: Mapping, runs, tasks,
                       method: str) -> dict[str, np.ndarray]:
  """A method's resampled scores, average and forgetting (see the module docstring)."""
  q = {}
  steps = sorted({int(s) for evals in runs for s in evals})
  for t in tasks:
    per_step = [_normalized(rs, t, _at(runs, s), base, f"{method} step {s}")
                for s in steps]
    q[f"task:{t}"], q[f"raw:{t}"] = per_step[-1]
    if len(steps) > 1:
      earlier = np.max(np.stack([n for n, _ in per_step[:-1]]), axis=0)
      q[f"forgetting:{t}"] = earlier - per_step[-1][0]
  q["average"] = np.mean([q[f"task:{t}"] for t in tasks], axis=0)
  if len(steps) > 1:
    q["forgetting"] = np.mean([q[f"forgetting:{t}"] for t in tasks], axis=0)
  return q


def sequential_quantities(rs: bootstrap.Resampler, base: Mapping, runs, task_a: str,
                          task_b: str, end_a: int, method: str) -> dict[str, np.ndarray]:
  """Drop on A and gain on B of an A-then-B run (snapshots at ``end_a`` and the end)."""
  mid, final = _at(runs, end_a), _at(runs, None)
  q = {}
  for t in (task_a, task_b):
    q[f"after_a:{t}"], _ = _normalized(rs, t, mid, base, f"{method} step {end_a}")
    q[f"task:{t}"], q[f"raw:{t}"] = _normalized(rs, t, final, base, f"{method} final")
  q["drop"] = q[f"after_a:{task_a}"] - q[f"task:{task_a}"]
  q["gain"] = q[f"task:{task_b}"] - q[f"after_a:{task_b}"]
  return q


def claim_text(a: str, op: str, b: str, quantity: str) -> str:
  return f"{NAMES.get(a, a)} {op} {NAMES.get(b, b)} on {LABELS.get(quantity, quantity)}"


def analyze(rs: bootstrap.Resampler, quantities: Mapping[str, Mapping[str, np.ndarray]],
            claims: Sequence[tuple[str, str, str, str]], *, suffix: str = ""
            ) -> dict[str, Any]:
  """Per-method values, every pair's differences with ``ci95``, and the verdicts.

  Args:
    rs: the resampler every quantity was built with.
    quantities: ``{method: {quantity: [R+1, S]}}`` in display order.
    claims: ``(A, op, B, quantity)`` tuples; those whose methods or quantity
      are missing are skipped.
    suffix: appended to each claim's text (e.g. the task order).

  Returns:
    ``{"resamples", "level", "methods": {m: {q: {"value", "ci95"}}},
    "pairs": {"A - B": {q: {"diff", "ci95"}}}, "verdicts": [...]}``.
  """
  order = list(quantities)
  per_method = {}
  for m in order:
    per_method[m] = {}
    for k, v in quantities[m].items():
      s = bootstrap.summarize(rs.collapse(v))
      per_method[m][k] = {"value": s["diff"], "ci95": s["ci95"]}
  pairs = {}
  for i, a in enumerate(order):
    for b in order[:i]:
      shared = [k for k in quantities[a] if k in quantities[b]]
      pairs[f"{a} - {b}"] = {k: bootstrap.paired_difference(quantities[a][k],
                                                            quantities[b][k], rs)
                             for k in shared}
  verdicts = []
  for a, op, b, quantity in claims:
    if a not in quantities or b not in quantities or quantity not in quantities[a] \
        or quantity not in quantities[b]:
      continue
    d = bootstrap.paired_difference(quantities[a][quantity], quantities[b][quantity], rs)
    v = bootstrap.verdict(claim_text(a, op, b, quantity) + suffix, d["diff"], d["ci95"],
                          lower_is_claimed=op == "<")
    verdicts.append({**v, "pair": f"{a} - {b}", "quantity": quantity})
  return {"resamples": rs.num_resamples, "level": bootstrap.LEVEL,
          "num_seeds": rs.num_seeds, "methods": per_method, "pairs": pairs,
          "verdicts": verdicts}


def ci_cell(entry: Mapping | None, digits: int = 1, key: str = "diff") -> str:
  """``+1.2 [-0.3, +2.6]`` of a difference (``key="diff"``), ``105.0 [103.5, 107.2]``
  of a value (``key="value"``); "–" if none."""
  if not entry:
    return "–"
  value = entry.get(key, entry.get("value"))
  lo, hi = entry["ci95"]
  sign = "+" if key == "diff" else ""
  return f"{value:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"
