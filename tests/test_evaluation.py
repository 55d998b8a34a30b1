"""evaluate() on the tiny random model with the ByteTokenizer, and the scoring kernels."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from epi_jax.model import ByteTokenizer, Llama, get_config

ev = importlib.import_module("epi_jax.scoring.evaluate")


@pytest.fixture(scope="module")
def tiny():
  return Llama(get_config("tiny"), rngs=nnx.Rngs(0)), ByteTokenizer()


def _examples():
  gsm = [{"task": "gsm8k", "final_answer": str(a),
          "messages": [{"role": "user", "content": f"What is {a} + 0?"},
                       {"role": "assistant", "content": f"{a} + 0 = {a}\n#### {a}"}]}
         for a in (3, 14, 150)]
  logiqa = [{"task": "logiqa", "answer": i % 4, "options": ["red", "green", "blue", "gray"],
             "messages": [{"role": "user", "content": "Which color? A. red B. green C. blue D. gray"},
                          {"role": "assistant", "content": f"{'ABCD'[i % 4]}. x"}]}
            for i in range(5)]
  chat = [{"task": t, "messages": [{"role": "user", "content": "hi " * (i + 1)},
                                   {"role": "assistant", "content": "hello there" * (i + 1)},
                                   {"role": "user", "content": "more"},
                                   {"role": "assistant", "content": "ok"}]}
          for t in ("chat",) for i in range(3)]
  alp = [{"task": "alpaca", "messages": [{"role": "user", "content": "Say yes."},
                                         {"role": "assistant", "content": "Yes."}]}] * 2
  return {"gsm8k": gsm, "logiqa": logiqa, "chat": chat, "alpaca": alp,
          "code_alpaca": [dict(e, task="code_alpaca") for e in alp]}


def test_sequence_logprob_hand_made_logits():
  # Vocabulary of 3; position i predicts token i+1.
  logits = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
  tokens = jnp.array([[0, 0, 2]])
  lp, n = ev.sequence_logprob(logits, tokens, jnp.array([[0, 1, 1]]))
  assert float(n[0]) == 2
  assert float(lp[0]) == pytest.approx(np.log(0.7) + np.log(0.8), rel=1e-5)
  lp, n = ev.sequence_logprob(logits, tokens, jnp.array([[0, 0, 1]]))
  assert float(lp[0]) == pytest.approx(np.log(0.8), rel=1e-5)


def test_pick_option():
  scores = np.array([[-5.0, -2.0, -9.0, -3.0], [-1.0, -4.0, -4.0, -4.0]])
  assert ev.pick_option(scores).tolist() == [1, 0]
  counts = np.array([[10, 1, 1, 1], [1, 8, 8, 8]])
  # Per token, option 0 of row 0 (-0.5) beats option 1 (-2.0).
  assert ev.pick_option(scores, counts, "mean").tolist() == [0, 1]
  with pytest.raises(ValueError, match="normalize"):
    ev.pick_option(scores, counts, "max")


def test_option_logprobs_match_full_forward(tiny):
  """The prefix-shared cache scoring equals scoring each full sequence."""
  model, tok = tiny
  prompts = [[5, 6, 7, 8, 9], [10, 11]]
  options = [[([1, 2, 3], [1, 1, 1]), ([4], [1]), ([1, 2, 3, 4, 5], [1, 1, 0, 1, 1])],
             [([9, 9], [1, 1]), ([7, 7, 7], [0, 1, 1]), ([3], [1])]]
  lp, cnt = ev.option_logprobs(model, prompts, options, batch_size=2, seq_len=128)
  # Reference: each full sequence through the plain (cache-free) scorer.
  seqs = [(p + ids, [0] * len(p) + w) for i, p in enumerate(prompts)
          for ids, w in options[i]]
  nll, n = ev.sequence_nll(model, seqs, batch_size=8, seq_len=128)
  np.testing.assert_allclose(cnt.ravel(), n)
  np.testing.assert_allclose(lp.ravel(), -nll, atol=1e-3)
  assert np.all(lp < 0)


def test_rigged_logiqa_picks_right_option(tiny, monkeypatch):
  """With a scorer that likes one option, accuracy reflects the picks."""
  model, tok = tiny
  exs = _examples()["logiqa"]

  def fake(model, prompts, cands, **kw):
    lp = np.full((len(prompts), 4), -10.0)
    lp[:, 2] = -1.0  # always "C"
    return lp, np.ones_like(lp)

  monkeypatch.setattr(ev, "option_logprobs", fake)
  res = ev.eval_logiqa(model, tok, exs)
  gold = [e["answer"] for e in exs]
  assert res["accuracy"] == pytest.approx(np.mean([g == 2 for g in gold]))
  assert res["prediction_counts"] == [0, 0, 5, 0]


def test_logiqa_candidates_are_answer_tokens(tiny):
  _, tok = tiny
  ex = _examples()["logiqa"][0]
  prompt, cands = ev.logiqa_candidates(tok, ex)
  assert len(cands) == 4
  ids, mask = cands[1]
  assert tok.decode(ids) == "B. green<|im_end|>\n"
  assert mask[-1] is False and all(mask[:-1])  # content + <|im_end|>, not the newline


def test_evaluate_tiny_all_tasks(tiny):
  model, tok = tiny
  res = ev.evaluate(model, tok, examples=_examples(), num_examples=4,
                    max_new_tokens=8, batch_size=2, seq_len=64)
  assert set(res) == set(ev.TASKS)
  assert res["gsm8k"]["n"] == 3 and 0.0 <= res["gsm8k"]["accuracy"] <= 1.0
  assert len(res["gsm8k"]["samples"]) == 3
  # Per-example scores of every task, in example order, for paired comparisons.
  g = res["gsm8k"]
  assert len(g["per_example"]["nll"]) == 3 and len(g["per_example"]["correct"]) == 3
  assert g["loss"] == pytest.approx(sum(g["per_example"]["nll"])
                                    / sum(g["per_example"]["tokens"]), rel=1e-4)
  assert 3.0 < g["loss"] < 8.0  # the reference solution's loss, a random byte model
  q = res["logiqa"]["per_example"]
  assert sum(q["correct"]) == res["logiqa"]["correct"] and len(q["nll"]) == 4
  assert res["logiqa"]["loss"] > 0
  assert res["logiqa"]["n"] == 4 and sum(res["logiqa"]["prediction_counts"]) == 4
  for t in ev.LOSS_TASKS:
    # A random byte-level model: loss near log(259) per token.
    assert 3.0 < res[t]["loss"] < 8.0, res[t]
    assert res[t]["perplexity"] == pytest.approx(np.exp(res[t]["loss"]), rel=1e-6)
    assert res[t]["tokens"] > 0 and res[t]["seconds"] >= 0
    assert sum(res[t]["per_example"]["tokens"]) == res[t]["tokens"]
    assert res[t]["loss"] == pytest.approx(sum(res[t]["per_example"]["nll"])
                                           / res[t]["tokens"], rel=1e-4)
  # Exact match on the first problem only; the loss still on all three.
  few = ev.evaluate(model, tok, tasks=("gsm8k",), examples=_examples(), num_examples=4,
                    max_new_tokens=4, batch_size=2, seq_len=64, num_generate=1)
  assert few["gsm8k"]["n_generated"] == 1 and len(few["gsm8k"]["per_example"]["nll"]) == 3
  assert few["gsm8k"]["loss"] == pytest.approx(g["loss"], rel=1e-5)
  # Deterministic: same numbers again (and no recompilation errors).
  again = ev.evaluate(model, tok, tasks=("chat",), examples=_examples(), num_examples=4,
                      batch_size=2, seq_len=64)
  assert again["chat"]["loss"] == pytest.approx(res["chat"]["loss"], rel=1e-6)


def test_evaluate_rejects_unknown_task(tiny):
  model, tok = tiny
  with pytest.raises(ValueError, match="unknown task"):
    ev.evaluate(model, tok, tasks=("mmlu",), examples={})


def test_select_examples():
  src = list(range(10))
  assert ev.select_examples(src, 3) == [0, 1, 2]
  a = ev.select_examples(src, 4, sample_seed=1)
  assert a == ev.select_examples(src, 4, sample_seed=1) and len(set(a)) == 4
  assert ev.select_examples(src, 99) == src


def test_window_keeps_targets():
  ids, mask = list(range(10)), [False] * 7 + [True] * 3
  assert ev._window(ids, mask, 20) == (ids, mask)
  w_ids, w_mask = ev._window(ids, mask, 4)
  assert len(w_ids) == 4 and any(w_mask[1:]) and w_ids == [5, 6, 7, 8]
  assert ev._window(ids, [True] * 10, 4) == (ids[:4], [True] * 4)
