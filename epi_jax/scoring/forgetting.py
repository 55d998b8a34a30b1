"""Forgetting arithmetic over a run's snapshots, and the sequential A->B protocol.

All functions take higher-is-better scores (use
:func:`epi_jax.scoring.metrics.higher_is_better_score`, which turns a loss
into ``-loss``, or normalized scores) so that "forgetting" is always a drop.

* :func:`forgetting`: with a task's scores after each stage/snapshot
  ``s_1..s_K``, ``F = max(s_1..s_{K-1}) - s_K`` (the best earlier score minus
  the final one; negative when the final score is the best). ``None`` with
  fewer than two snapshots.
* :func:`sequential_ab`: train on A, then on B: ``old_task_drop = A(after A) -
  A(after B)`` and ``new_task_gain = B(after B) - B(before B)``.
* :func:`stage_transfer`: the same for a multi-stage schedule: each task's drop
  from the end of the last stage that trained it to the end of the run.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence


def forgetting(scores: Sequence[float]) -> float | None:
  """Best earlier score minus the final score (None with < 2 scores)."""
  scores = [float(s) for s in scores]
  if len(scores) < 2:
    return None
  return max(scores[:-1]) - scores[-1]


def forgetting_table(scores_by_step: Mapping[int, Mapping[str, float]]
                     ) -> dict[str, float | None]:
  """Per-task forgetting from ``{step: {task: score}}`` (steps sorted numerically).

  Tasks missing from some snapshot use the snapshots that have them.
  """
  steps = sorted(scores_by_step, key=int)
  tasks = sorted({t for s in steps for t in scores_by_step[s]})
  return {t: forgetting([scores_by_step[s][t] for s in steps if t in scores_by_step[s]])
          for t in tasks}


def mean_defined(values) -> float | None:
  """Mean of the values that are not None/NaN (None when there are none)."""
  vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
  return sum(vals) / len(vals) if vals else None


def sequential_ab(a_after_a: float, a_after_b: float, b_before: float,
                  b_after_b: float) -> dict[str, float]:
  """The sequential A->B protocol: how much A drops, how much B gains."""
  return {"old_task_drop": float(a_after_a) - float(a_after_b),
          "new_task_gain": float(b_after_b) - float(b_before)}


def stage_transfer(scores_by_step: Mapping[int, Mapping[str, float]],
                   stage_ends: Sequence[int], stage_tasks: Sequence[Sequence[str]],
                   base_scores: Mapping[str, float] | None = None) -> dict:
  """Old-task drop and new-task gain for a multi-stage schedule.

  Args:
    scores_by_step: ``{step: {task: score}}`` with a snapshot at each stage end.
    stage_ends: the step at which each stage ends (cumulative steps).
    stage_tasks: the tasks trained in each stage (weight > 0).
    base_scores: scores before training (for the first stage's gain).

  Returns:
    ``{'old_task_drop': {task: drop}, 'new_task_gain': {task: gain},
    'mean_old_task_drop', 'mean_new_task_gain'}``. A task is "old" when it is
    not trained in the last stage: its drop runs from the end of the last stage
    that trained it to the end of the run. A last-stage task's gain runs from
    the end of the previous stage (or ``base_scores``) to the end of the run.
  """
  if len(stage_ends) != len(stage_tasks):
    raise ValueError(f"stage_ends ({len(stage_ends)}) and stage_tasks "
                     f"({len(stage_tasks)}) differ in length")
  lookup = {int(k): v for k, v in scores_by_step.items()}
  missing = [int(e) for e in stage_ends if int(e) not in lookup]
  if missing:
    raise ValueError(f"no scores at stage end step(s) {missing}; have {sorted(lookup)}")
  final = lookup[int(stage_ends[-1])]
  last_tasks = set(stage_tasks[-1])
  drop, gain = {}, {}
  for i, tasks in enumerate(stage_tasks[:-1]):
    for t in tasks:
      if t in last_tasks or t not in final:
        continue
      later = [j for j in range(i, len(stage_tasks) - 1) if t in stage_tasks[j]]
      end = lookup[int(stage_ends[later[-1]])]
      if t in end:
        drop[t] = end[t] - final[t]
  before = (lookup[int(stage_ends[-2])] if len(stage_ends) > 1 else base_scores) or {}
  for t in last_tasks:
    if t in before and t in final:
      gain[t] = final[t] - before[t]
  return {"old_task_drop": drop, "new_task_gain": gain,
          "mean_old_task_drop": mean_defined(drop.values()),
          "mean_new_task_gain": mean_defined(gain.values())}
