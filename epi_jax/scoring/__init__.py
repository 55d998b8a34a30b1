"""Scoring: per-task metrics, forgetting, drift analysis and the paired bootstrap.

Everything here scores a model or a run's records and imports nothing of the
trainer (``epi_jax.training``) or the experiment driver (``epi_jax.experiments``).

* :func:`evaluate` scores a model on the five tasks (held-out answer-token
  loss for all five, GSM8K on its reference solution; LogiQA option
  log-likelihood accuracy; GSM8K exact match), with per-example scores.
* :mod:`~epi_jax.scoring.metrics`: answer extraction and the normalized
  average score; :mod:`~epi_jax.scoring.forgetting`: forgetting arithmetic;
  :mod:`~epi_jax.scoring.drift`: mask- and importance-drift metrics;
  :mod:`~epi_jax.scoring.bootstrap`: paired bootstrap intervals and verdicts.
"""

from epi_jax.scoring.evaluate import (DEFAULT_NUM_EXAMPLES, DEFAULT_NUM_GENERATE, LOSS_TASKS,
                                      TASKS,
                                      eval_gsm8k, eval_logiqa, eval_loss, evaluate,
                                      option_logprobs, pick_option, select_examples,
                                      sequence_logprob, sequence_nll, token_logprobs)
from epi_jax.scoring.forgetting import forgetting_table, sequential_ab, stage_transfer
from epi_jax.scoring.metrics import (PRIMARY_METRIC, exact_match,
                                     extract_gsm8k_answer, gsm8k_match,
                                     normalize_number, normalized_scores)

__all__ = [
    "DEFAULT_NUM_EXAMPLES", "DEFAULT_NUM_GENERATE", "LOSS_TASKS", "PRIMARY_METRIC", "TASKS", "eval_gsm8k",
    "eval_logiqa", "eval_loss", "evaluate", "exact_match", "extract_gsm8k_answer",
    "forgetting_table", "gsm8k_match", "normalize_number",
    "normalized_scores", "option_logprobs", "pick_option", "select_examples",
    "sequence_logprob", "sequence_nll", "sequential_ab", "stage_transfer",
    "token_logprobs",
]
