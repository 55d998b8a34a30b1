"""Paired bootstrap confidence intervals over eval examples (and seeds), and verdicts.

Every model of a comparison is evaluated on the same examples, so two models'
scores are *paired*: resampling the examples (with replacement) once and
scoring both models on the same resample keeps the part of the variance that
both share (hard examples are hard for every model) out of their difference.
With several training seeds, the seeds are resampled too (paired by seed
index: seed ``k`` of every method trained on the same data order).

How it works here: :class:`Resampler` draws, per task, ``R`` weight vectors
over the examples (multinomial counts; row 0 is all ones: the point estimate)
and ``R`` seed index vectors. :meth:`Resampler.task_score` turns one task's
per-example scores of one model (one entry per seed) into an ``[R+1, S]``
array of the task's score under every resample; everything derived from
scores (normalized scores, averages, forgetting, drops) is computed
elementwise on those arrays, and :meth:`Resampler.collapse` averages over the
resampled seeds at the end. A 95% interval is the 2.5th and 97.5th
percentiles of a difference's replicates (:func:`interval`).

:func:`verdict` turns a claim ("EPI > static on average") and its interval
into words: "yes" when the interval excludes 0 on the claimed side, "no" when
it excludes 0 on the other side, else "not distinguishable at this size".
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
LEVEL = 0.95


class Resampler:
  """Shared resamples of examples (per task) and seeds; see the module docstring.

  Args:
    sizes: ``{task: number of eval examples}``.
    num_seeds: seeds per method (every method must have this many).
    num_resamples: bootstrap replicates ``R``.
    seed: of the resampling RNG (fixed: reruns give the same intervals).
  """

  def __init__(self, sizes: Mapping[str, int], num_seeds: int, *,
               num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0):
    if num_seeds < 1:
      raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
    rng = np.random.default_rng(seed)
    self.sizes = {t: int(n) for t, n in sizes.items()}
    self.num_seeds = int(num_seeds)
    self.num_resamples = int(num_resamples)
    self.weights = {}
    for task, n in sorted(self.sizes.items()):
      if n < 1:
        raise ValueError(f"task {task!r}: no eval examples to resample")
      w = rng.multinomial(n, np.full(n, 1.0 / n), size=self.num_resamples).astype(np.float64)
      self.weights[task] = np.concatenate([np.ones((1, n)), w])
    idx = rng.integers(0, self.num_seeds, size=(self.num_resamples, self.num_seeds))
    # With one seed there is nothing to resample.
    self.seed_idx = np.concatenate([np.arange(self.num_seeds)[None], idx])

  def task_score(self, task: str, per_seed: Sequence[Mapping[str, Sequence[float]]],
                 metric: str) -> np.ndarray:
    """``[R+1, S]``: the task's ``metric`` of one model under every resample.

    Args:
      task: the task (its examples' weights are shared by all models).
      per_seed: per seed, the ``per_example`` dict of the eval results
        (``nll`` and ``tokens`` for ``'loss'``, ``correct`` for ``'accuracy'``).
      metric: ``'loss'`` (``sum(nll) / sum(tokens)``, token-weighted as the
        reported loss) or ``'accuracy'`` (mean of ``correct``).
    """
    if len(per_seed) != self.num_seeds:
      raise ValueError(f"task {task!r}: {len(per_seed)} seed(s) of scores, expected "
                       f"{self.num_seeds}")
    w = self.weights[task]
    cols = []
    for s, ex in enumerate(per_seed):
      if metric == "loss":
        num, den = np.asarray(ex["nll"], np.float64), np.asarray(ex["tokens"], np.float64)
      elif metric == "accuracy":
        num = np.asarray(ex["correct"], np.float64)
        den = np.ones_like(num)
      else:
        raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
      if num.shape != (w.shape[1],) or den.shape != num.shape:
        raise ValueError(f"task {task!r} seed {s}: {num.shape[0]} per-example scores, expected "
                         f"{w.shape[1]} (models evaluated on different examples?)")
      cols.append((w @ num) / np.maximum(w @ den, 1e-12))
    return np.stack(cols, axis=1)

  def collapse(self, values: np.ndarray) -> np.ndarray:
    """``[R+1]``: the mean over each replicate's resampled seeds (row 0: all seeds)."""
    values = np.asarray(values, np.float64)
    return np.take_along_axis(values, self.seed_idx, axis=1).mean(axis=1)


def interval(replicates: np.ndarray, level: float = LEVEL) -> list[float]:
  """Percentile interval of bootstrap replicates (row 0, the point, excluded)."""
  reps = np.asarray(replicates, np.float64)[1:]
  reps = reps[np.isfinite(reps)]
  if reps.size == 0:
    return [float("nan"), float("nan")]
  alpha = 100.0 * (1.0 - level) / 2.0
  lo, hi = np.percentile(reps, [alpha, 100.0 - alpha])
  return [float(lo), float(hi)]


def summarize(replicates: np.ndarray, level: float = LEVEL) -> dict[str, Any]:
  """``{"diff": point, "ci95": [lo, hi]}`` of a collapsed ``[R+1]`` array."""
  reps = np.asarray(replicates, np.float64)
  return {"diff": float(reps[0]), "ci95": interval(reps, level)}


def paired_difference(a: np.ndarray, b: np.ndarray, resampler: Resampler) -> dict[str, Any]:
  """Point difference ``a - b`` and its paired 95% interval, from ``[R+1, S]`` arrays."""
  return summarize(resampler.collapse(np.asarray(a) - np.asarray(b)))


ANSWERS = ("yes", "no", "not distinguishable at this size")


def verdict(claim: str, diff: float, ci95: Sequence[float], *, lower_is_claimed: bool,
            digits: int = 2) -> dict[str, Any]:
  """The plain-words answer to a claim about ``diff = A - B``.

  Args:
    claim: e.g. ``"EPI > static on average"``.
    diff: the point difference A - B.
    ci95: its interval.
    lower_is_claimed: the claim is "A < B" (a claimed negative difference);
      False for "A > B".

  Returns:
    ``{"claim", "answer", "diff", "ci95", "text"}``; ``answer`` is one of
    :data:`ANSWERS`, ``text`` e.g. ``"EPI > static on average: not
    distinguishable at this size (diff +0.40, CI [-0.90, +1.70])"``.
  """
  lo, hi = float(ci95[0]), float(ci95[1])
  if not (np.isfinite(lo) and np.isfinite(hi)):
    answer = ANSWERS[2]
  elif (hi < 0) if lower_is_claimed else (lo > 0):
    answer = ANSWERS[0]
  elif (lo > 0) if lower_is_claimed else (hi < 0):
    answer = ANSWERS[1]
  else:
    answer = ANSWERS[2]
  text = (f"{claim}: {answer} (diff {diff:+.{digits}f}, CI [{lo:+.{digits}f}, "
          f"{hi:+.{digits}f}])")
  return {"claim": claim, "answer": answer, "diff": float(diff), "ci95": [lo, hi],
          "text": text}
