"""Scoring: GSM8K answer extraction and exact match, the normalized average score.

Per-task metrics (what :func:`epi_jax.scoring.evaluate` reports; each
task's primary metric is its ``metric`` in :mod:`epi_jax.data.tasks`):

* ``gsm8k``: ``loss`` of the reference solution (primary: exact match of a
  135M model is near 0 for every method, so it cannot tell them apart), and
  ``accuracy``, exact match of the final number of the greedy completion
  against the reference ``final_answer`` (``18.0 == 18``, ``1,000 == 1000``).
* ``logiqa``: ``accuracy``, the option with the highest log-likelihood wins
  (and ``loss``, the gold answer's).
* ``code_alpaca``, ``alpaca``, ``chat``: ``loss`` (mean negative
  log-likelihood per assistant token, nats) and ``perplexity`` (``exp(loss)``).

The normalized average score (:func:`normalized_scores`) puts all tasks on one
scale relative to the base model, 100 meaning "as good as the base model":

* accuracy tasks: ``100 * acc_s(model) / acc_s(base)`` with the add-one
  (rule of succession) accuracy ``acc_s = (correct + 1) / (n + 2)``, so a
  base model that scores 0 does not divide by zero and a handful of lucky
  answers on a small eval set does not explode the ratio;
* loss tasks: ``100 * loss(base) / loss(model)`` (lower loss than the base
  model gives more than 100).

``average`` is the plain mean of the per-task normalized scores. The papers
score open-ended tasks with an LLM judge on a 0-10 scale; we have no judge,
so this is not the papers' number, only its analogue: the ordering of
methods is what compares.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Mapping

from epi_jax.data import tasks as tasks_lib

# Task -> (primary metric, higher_is_better), and task -> a metric also
# reported: live views of the task registry (its evaluated tasks).
PRIMARY_METRIC = tasks_lib.table(lambda s: (s.metric, s.higher_is_better),
                                 lambda s: s.eval_kind is not None)
SECONDARY_METRIC = tasks_lib.table(
    lambda s: s.secondary_metric, lambda s: s.eval_kind is not None and s.secondary_metric)

# A number: optional sign or currency, digits with optional thousands commas,
# optional decimals; or a bare decimal like ".5".
_NUMBER = re.compile(r"-?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_MARKERS = (
    re.compile(r"####\s*(.*)", re.S),
    re.compile(r"answer\s*(?:is|:)\s*(.*)", re.S | re.I),
)


def normalize_number(text: str | None) -> str | None:
  """A canonical string of the number in ``text``, or None.

  Removes ``$``, thousands commas, spaces and a trailing ``.``; ``18.0``,
  ``18.00`` and ``18`` all give ``'18'``; ``-3.50`` gives ``'-3.5'``.
  """
  if text is None:
    return None
  s = str(text).strip().replace(",", "").replace("$", "").replace(" ", "")
  s = s.rstrip(".")
  if s.startswith("+"):
    s = s[1:]
  try:
    value = Decimal(s)
  except InvalidOperation:
    return None
  if not value.is_finite():
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def _last_number(text: str) -> str | None:
  matches = _NUMBER.findall(text)
  return normalize_number(matches[-1]) if matches else None


def _first_number(text: str) -> str | None:
  match = _NUMBER.search(text)
  return normalize_number(match.group(0)) if match else None


def extract_gsm8k_answer(completion: str) -> str | None:
  """The final numeric answer of a GSM8K-style completion, normalized.

  Looks, in order, for the number right after the last ``####`` marker, then
  after the last "the answer is" / "answer:", and otherwise takes the last
  number in the text. Handles thousands commas, signs, ``$`` and units
  ("18 dollars"), decimals and trailing text. Returns None when the text has
  no number.
  """
  if not completion:
    return None
  for marker in _MARKERS:
    hits = list(marker.finditer(completion))
    if hits:
      found = _first_number(hits[-1].group(1))
      if found is not None:
        return found
  return _last_number(completion)


def gsm8k_match(completion: str, reference: str) -> bool:
  """Exact match of the extracted final number against the reference answer."""
  ref = normalize_number(reference)
  if ref is None:  # references like "1,000" or "#### 5" still parse via extraction
    ref = extract_gsm8k_answer(str(reference))
  pred = extract_gsm8k_answer(completion)
  return pred is not None and ref is not None and pred == ref


def exact_match(predictions, references) -> float:
  """Mean of :func:`gsm8k_match` over pairs (0.0 for empty input)."""
  predictions, references = list(predictions), list(references)
  if len(predictions) != len(references):
    raise ValueError(f"predictions ({len(predictions)}) and references "
                     f"({len(references)}) differ in length")
  if not predictions:
    return 0.0
  return sum(gsm8k_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


def primary_score(task: str, result: Mapping) -> float:
  """A task's primary metric value from its result dict (see PRIMARY_METRIC)."""
  metric, _ = PRIMARY_METRIC.get(task, ("loss", False))
  if metric not in result:
    raise ValueError(f"result for task {task!r} has no {metric!r}: {dict(result)}")
  return float(result[metric])


def higher_is_better_score(task: str, result: Mapping) -> float:
  """The primary metric with a sign such that higher is better (``-loss``)."""
  metric, higher = PRIMARY_METRIC.get(task, ("loss", False))
  value = primary_score(task, result)
  return value if higher else -value


def smoothed_accuracy(accuracy, n: int):
  """The add-one accuracy ``(correct + 1) / (n + 2)`` (floats or arrays)."""
  return (accuracy * n + 1.0) / (n + 2.0)


def normalized_value(task: str, value, base_value, n: int = 0, base_n: int | None = None):
  """``100 * score / base score`` from metric values (floats or numpy arrays,
  elementwise: the bootstrap applies it to resampled scores).

  ``n`` / ``base_n``: eval examples of an accuracy task (for the add-one
  accuracy; ``base_n`` defaults to ``n``).
  """
  _, higher = PRIMARY_METRIC.get(task, ("loss", False))
  if higher:
    base_n = n if base_n is None else base_n
    return 100.0 * smoothed_accuracy(value, n) / smoothed_accuracy(base_value, base_n)
  return 100.0 * base_value / value


def normalized_task_score(task: str, result: Mapping, base: Mapping) -> float:
  """``100 * score / base score`` for one task (see the module docstring)."""
  metric, higher = PRIMARY_METRIC.get(task, ("loss", False))
  for name, r in (("result", result), ("base", base)):
    if metric not in r:
      raise ValueError(f"{name} for task {task!r} has no {metric!r}")
  value, base_value = float(result[metric]), float(base[metric])
  if not higher and (not value > 0 or not math.isfinite(value)):
    raise ValueError(f"task {task!r}: loss must be positive and finite, got {value}")
  return float(normalized_value(task, value, base_value, int(result.get("n", 0)),
                                int(base.get("n", 0))))


def normalized_scores(results: Mapping[str, Mapping], base: Mapping[str, Mapping]
                      ) -> dict[str, float]:
  """Per-task normalized scores and their mean as ``'average'``.

  Args:
    results: ``{task: metrics}`` of the model, as returned by ``evaluate``.
    base: the same for the base model. Only tasks in both count.
  """
  tasks = [t for t in results if t in base and t in PRIMARY_METRIC]
  out = {t: normalized_task_score(t, results[t], base[t]) for t in tasks}
  out["average"] = sum(out.values()) / len(tasks) if tasks else float("nan")
  return out
