"""Per-task evaluation of a model: batched, jit-compiled, few compiled shapes.

A task is scored by the ``eval_kind`` of its entry in the task registry
(:mod:`epi_jax.data.tasks`): ``generate`` as GSM8K, ``choice`` as LogiQA,
``loss`` as the instruction and chat tasks.

* GSM8K: held-out loss of the reference solution (the primary, low-variance
  score), and exact match of the final number of a greedy generation with the
  KV cache (:func:`epi_jax.model.generate`) from the chat-templated question,
  on the first ``num_generate`` problems (generation is the costly part).
* LogiQA: for each problem, the summed log-likelihood of each of the four
  answers ``"A. <option>"`` .. ``"D. <option>"`` (the form of the training
  reference) as the assistant turn, counted on the answer tokens only (the
  content and the closing ``<|im_end|>``); the best one is the prediction.
  The prompt is run once and its KV cache shared by the four answers. The
  gold answer's loss is reported beside the accuracy.
* code_alpaca, alpaca, chat: held-out loss per assistant token (all assistant
  turns, as in training) and perplexity.

Every task also returns ``per_example`` scores, in example order, so that two
models evaluated on the same examples can be compared pairwise
(:mod:`epi_jax.scoring.bootstrap`): ``nll`` and ``tokens`` (the answer
tokens' summed negative log-likelihood and their count: the set's loss is
``sum(nll) / sum(tokens)``) and, for the accuracy metrics, ``correct`` (0/1).

Rows are padded to a fixed batch size and lengths to power-of-two buckets
(capped at ``seq_len``), and the jitted functions take the model's graphdef as
a static argument, so evaluating another snapshot of the same architecture
reuses the compiled code.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epi_jax.data import datasets
from epi_jax.data import tasks as tasks_lib
from epi_jax.model.generate import generate
from epi_jax.model.llama import init_cache
from epi_jax.scoring import metrics

# Live views of the task registry: the benchmark tasks (evaluated by default),
# every task that can be evaluated, and those scored by their loss only.
TASKS = tasks_lib.TASKS
EVAL_TASKS = tasks_lib.name_list(lambda s: s.eval_kind is not None)
LOSS_TASKS = tasks_lib.name_list(lambda s: s.eval_kind == "loss")
LETTERS = "ABCDEFGH"
# The registry's eval_examples: sized so that paired differences between models
# resolve (standard errors of a few hundredths of a nat, a few points of LogiQA
# accuracy).
DEFAULT_NUM_EXAMPLES = tasks_lib.table(lambda s: s.eval_examples,
                                       lambda s: s.eval_kind is not None)
DEFAULT_NUM_GENERATE = 32  # GSM8K problems generated for exact match


def _bucket(n: int, minimum: int, cap: int | None = None) -> int:
  b = max(minimum, 1 << (max(int(n), 1) - 1).bit_length())
  return min(b, cap) if cap else b


# ----------------------------------------------------------------------------
# Scoring primitives (pure functions of logits; tested with hand-made logits).

def token_logprobs(logits, targets):
  """``log p(targets)`` from ``logits [..., V]`` and int ``targets [...]``.

  Uses ``logit - logsumexp`` so no full log-softmax array is materialized.
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprob(logits, tokens, weights):
  """Summed weighted log-likelihood of ``tokens[:, 1:]`` under ``logits[:, :-1]``.

  Args:
    logits: ``[B, L, V]`` next-token logits (position i predicts token i+1).
    tokens: ``[B, L]`` int token ids.
    weights: ``[B, L]`` 0/1 weight of each token as a *target* (position 0 is
      never a target).

  Returns:
    ``(sum_logprob [B], num_tokens [B])``.
  """
  w = jnp.asarray(weights, jnp.float32)[:, 1:]
  lp = token_logprobs(logits[:, :-1], jnp.asarray(tokens)[:, 1:])
  return jnp.sum(lp * w, axis=1), jnp.sum(w, axis=1)


def pick_option(scores, num_tokens=None, normalize: str = "sum") -> np.ndarray:
  """Index of the best option per problem.

  Args:
    scores: ``[N, K]`` summed log-likelihoods.
    num_tokens: ``[N, K]`` token counts (needed for ``normalize='mean'``).
    normalize: ``'sum'`` (total log-likelihood) or ``'mean'`` (per token).
  """
  scores = np.asarray(scores, np.float64)
  if normalize == "mean":
    if num_tokens is None:
      raise ValueError("normalize='mean' needs num_tokens")
    scores = scores / np.maximum(np.asarray(num_tokens, np.float64), 1)
  elif normalize != "sum":
    raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
  return np.argmax(scores, axis=-1)


# ----------------------------------------------------------------------------
# Jitted kernels.

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll_jit(graphdef, state, tokens, segment_ids, weights):
  model = nnx.merge(graphdef, state)
  logits = model(tokens, segment_ids=segment_ids)
  return sequence_logprob(logits, tokens, weights)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _option_logprob_jit(graphdef, state, prompt, prompt_seg, options, option_w):
  """Prefix-shared scoring: prompt ``[B, P]`` (left-padded) once, then its
  ``K`` continuations ``options [B*K, O]`` (right-padded) on a copied cache."""
  model = nnx.merge(graphdef, state)
  b, p = prompt.shape
  bk, o = options.shape
  k = bk // b
  cache = init_cache(model.config, b, p + o)
  positions = jnp.maximum(jnp.cumsum(prompt_seg, axis=1) - 1, 0)
  logits, cache = model(prompt, positions=positions, segment_ids=prompt_seg,
                        cache=cache)
  rep = lambda x: jnp.repeat(x, k, axis=0)
  last = rep(logits[:, -1])  # predicts each option's first token
  cache = cache.repeat_rows(k)
  pos = rep(positions[:, -1:] + 1) + jnp.arange(o, dtype=jnp.int32)[None]
  # Padding tokens at the end of an option are causal-masked from the real
  # ones and carry weight 0, so they can share segment 1.
  logits_o, _ = model(options, positions=pos,
                      segment_ids=jnp.ones((bk, o), jnp.int32), cache=cache)
  logits_all = jnp.concatenate([last[:, None], logits_o[:, :-1]], axis=1)
  lp = token_logprobs(logits_all, options)
  w = option_w.astype(jnp.float32)
  return jnp.sum(lp * w, axis=1), jnp.sum(w, axis=1)


def _split(model):
  graphdef, state = nnx.split(model)
  return graphdef, state


# ----------------------------------------------------------------------------
# Batched drivers.

def _window(ids, mask, seq_len: int) -> tuple[list[int], list[bool]]:
  """The first ``seq_len`` tokens; if they hold no target token (a long first
  user turn), a window that starts half a window before the first target."""
  ids, mask = list(ids), list(mask)
  if len(ids) <= seq_len or any(mask[1:seq_len]):
    return ids[:seq_len], mask[:seq_len]
  first = next((i for i, m in enumerate(mask) if m), 0)
  start = max(0, first - seq_len // 2)
  return ids[start:start + seq_len], mask[start:start + seq_len]


def sequence_nll(model, sequences: Sequence[tuple[Sequence[int], Sequence[bool]]], *,
                 batch_size: int = 8, seq_len: int = 512, pad_id: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Summed NLL and token count of each ``(ids, target_mask)``.

  Sequences longer than ``seq_len`` are cut to their first ``seq_len`` tokens,
  or, when those hold no target token, to a window around the first target.
  """
  graphdef, state = _split(model)
  nll, count = np.zeros(len(sequences)), np.zeros(len(sequences))
  # Longest first, so that each batch pads to a similar length.
  order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
  for start in range(0, len(sequences), batch_size):
    rows = order[start:start + batch_size]
    chunk = [_window(sequences[i][0], sequences[i][1], seq_len) for i in rows]
    length = _bucket(max(len(i) for i, _ in chunk), 32, seq_len)
    tokens = np.full((batch_size, length), pad_id, np.int32)
    segs = np.zeros((batch_size, length), np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    for r, (ids, mask) in enumerate(chunk):
      tokens[r, :len(ids)] = ids
      segs[r, :len(ids)] = 1
      weights[r, :len(ids)] = mask
    lp, n = _nll_jit(graphdef, state, jnp.asarray(tokens), jnp.asarray(segs),
                     jnp.asarray(weights))
    nll[rows] = -np.asarray(lp)[:len(chunk)]
    count[rows] = np.asarray(n)[:len(chunk)]
  return nll, count


def option_logprobs(model, prompts: Sequence[Sequence[int]],
                    options: Sequence[Sequence[tuple[Sequence[int], Sequence[bool]]]], *,
                    batch_size: int = 8, seq_len: int = 1024, pad_id: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Log-likelihood of each continuation given its prompt.

  Args:
    model: a Llama.
    prompts: ``N`` prompt token lists.
    options: for each prompt, ``K`` continuations ``(ids, weights)``; only
      tokens with a true weight count.
    batch_size: prompts per batch (``batch_size * K`` continuation rows).
    seq_len: prompt + continuation are cut to this many tokens (the prompt
      from the left, keeping its end; continuations from the right).

  Returns:
    ``(logprob [N, K], num_tokens [N, K])``.
  """
  n = len(prompts)
  if n == 0:
    return np.zeros((0, 0)), np.zeros((0, 0))
  k = len(options[0])
  if any(len(o) != k for o in options):
    raise ValueError("every prompt needs the same number of options")
  graphdef, state = _split(model)
  out_lp, out_n = np.zeros((n, k)), np.zeros((n, k))
  order = sorted(range(n), key=lambda i: -len(prompts[i]))
  for start in range(0, n, batch_size):
    rows = order[start:start + batch_size]
    ps = [prompts[i] for i in rows]
    os_ = [options[i] for i in rows]
    o_len = _bucket(max(len(ids) for opts in os_ for ids, _ in opts), 16, seq_len // 2)
    p_len = _bucket(max(len(p) for p in ps), 32, seq_len - o_len)
    prompt = np.full((batch_size, p_len), pad_id, np.int32)
    pseg = np.zeros((batch_size, p_len), np.int32)
    opt = np.full((batch_size * k, o_len), pad_id, np.int32)
    w = np.zeros((batch_size * k, o_len), np.float32)
    for r, (p, opts) in enumerate(zip(ps, os_)):
      p = list(p)[-p_len:]
      prompt[r, p_len - len(p):] = p
      pseg[r, p_len - len(p):] = 1
      for j, (ids, mask) in enumerate(opts):
        ids, mask = list(ids)[:o_len], list(mask)[:o_len]
        opt[r * k + j, :len(ids)] = ids
        w[r * k + j, :len(ids)] = mask
    lp, cnt = _option_logprob_jit(graphdef, state, jnp.asarray(prompt),
                                  jnp.asarray(pseg), jnp.asarray(opt), jnp.asarray(w))
    out_lp[rows] = np.asarray(lp).reshape(batch_size, k)[:len(rows)]
    out_n[rows] = np.asarray(cnt).reshape(batch_size, k)[:len(rows)]
  return out_lp, out_n


# ----------------------------------------------------------------------------
# Tasks.

def _prompt_ids(tokenizer, example) -> list[int]:
  ids, _ = tokenizer.apply_chat_template(example["messages"][:-1],
                                         add_generation_prompt=True)
  return ids


def _rounded(values, digits: int = 5) -> list[float]:
  return [round(float(v), digits) for v in values]


def eval_gsm8k(model, tokenizer, examples, *, max_new_tokens: int = 160,
               batch_size: int = 8, keep_samples: int = 3,
               num_generate: int | None = DEFAULT_NUM_GENERATE, loss_batch_size: int = 8,
               seq_len: int = 512) -> dict[str, Any]:
  """GSM8K: loss of the reference solutions, and greedy exact match.

  The loss (all ``examples``) is the primary score; exact match runs on the
  first ``num_generate`` of them (None: all; 0: none). ``samples`` holds a
  few completions to inspect.
  """
  res = eval_loss(model, tokenizer, examples, batch_size=loss_batch_size, seq_len=seq_len)
  gen = list(examples) if num_generate is None else list(examples)[:max(int(num_generate), 0)]
  completions = []
  for start in range(0, len(gen), batch_size):
    chunk = gen[start:start + batch_size]
    outs = generate(model, [_prompt_ids(tokenizer, e) for e in chunk],
                    max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids,
                    pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    completions += [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
  refs = [e["final_answer"] for e in gen]
  correct = [bool(metrics.gsm8k_match(c, r)) for c, r in zip(completions, refs)]
  res["per_example"]["correct"] = [int(c) for c in correct]
  res.update(accuracy=float(np.mean(correct)) if correct else None,
             n_generated=len(gen), correct=int(sum(correct)),
             samples=[{"reference": r, "extracted": metrics.extract_gsm8k_answer(c),
                       "completion": c} for c, r in list(zip(completions, refs))[:keep_samples]])
  return res


def logiqa_candidates(tokenizer, example) -> tuple[list[int], list[tuple[list[int], list[bool]]]]:
  """The prompt ids and, per option, the answer tokens and their weights."""
  prompt_msgs = example["messages"][:-1]
  prompt, _ = tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True)
  cands = []
  for i, option in enumerate(example["options"]):
    answer = {"role": "assistant", "content": f"{LETTERS[i]}. {option}"}
    ids, mask = tokenizer.apply_chat_template(prompt_msgs + [answer])
    if ids[:len(prompt)] != prompt:
      raise ValueError("chat template: the answer does not extend the generation prompt")
    cands.append((ids[len(prompt):], mask[len(prompt):]))
  return prompt, cands


def eval_logiqa(model, tokenizer, examples, *, batch_size: int = 8,
                seq_len: int = 1024, normalize: str = "sum") -> dict[str, Any]:
  """LogiQA accuracy by option log-likelihood (``normalize``: see pick_option)."""
  prompts, cands = zip(*[logiqa_candidates(tokenizer, e) for e in examples])
  lp, cnt = option_logprobs(model, list(prompts), list(cands), batch_size=batch_size,
                            seq_len=seq_len, pad_id=tokenizer.pad_id)
  pred = pick_option(lp, cnt, normalize)
  gold = np.asarray([int(e["answer"]) for e in examples])
  rows = np.arange(len(examples))
  gold_nll, gold_tokens = -lp[rows, gold], cnt[rows, gold]
  return {"accuracy": float(np.mean(pred == gold)), "n": len(examples),
          "correct": int(np.sum(pred == gold)),
          "loss": float(gold_nll.sum() / max(float(gold_tokens.sum()), 1.0)),
          "prediction_counts": np.bincount(pred, minlength=lp.shape[1]).tolist(),
          "per_example": {"correct": (pred == gold).astype(int).tolist(),
                          "nll": _rounded(gold_nll), "tokens": _rounded(gold_tokens, 1)}}


def eval_loss(model, tokenizer, examples, *, batch_size: int = 8,
              seq_len: int = 512) -> dict[str, Any]:
  """Held-out loss per assistant token (token-weighted over the set) and perplexity."""
  seqs = [tokenizer.apply_chat_template(e["messages"]) for e in examples]
  nll, count = sequence_nll(model, seqs, batch_size=batch_size, seq_len=seq_len,
                            pad_id=tokenizer.pad_id)
  tokens = float(count.sum())
  if tokens == 0:
    raise ValueError("no assistant tokens to score (examples empty or all truncated)")
  loss = float(nll.sum() / tokens)
  return {"loss": loss, "perplexity": float(np.exp(loss)), "n": len(examples),
          "tokens": int(tokens),
          "per_example": {"nll": _rounded(nll), "tokens": _rounded(count, 1)}}


# ----------------------------------------------------------------------------
# Entry point.

def select_examples(source, n: int | None, sample_seed: int | None = None) -> list[dict]:
  """The first ``n`` examples, or ``n`` drawn without replacement with ``sample_seed``."""
  total = len(source)
  n = total if n is None else min(int(n), total)
  if sample_seed is None:
    idx = range(n)
  else:
    idx = sorted(np.random.default_rng(sample_seed).permutation(total)[:n].tolist())
  return [source[i] for i in idx]


def _num_for(num_examples, task) -> int | None:
  if isinstance(num_examples, Mapping):
    return num_examples.get(task, DEFAULT_NUM_EXAMPLES.get(task))
  return num_examples


def evaluate(model, tokenizer, *, tasks: Sequence[str] = TASKS, data_dir=None,
             num_examples: int | Mapping[str, int] | None = None,
             max_new_tokens: int = 160, batch_size: int = 8, seq_len: int = 512,
             generate_batch_size: int | None = 16, split: str = "test", sample_seed: int | None = None,
             logiqa_normalize: str = "sum", examples: Mapping[str, Sequence] | None = None,
             num_generate: int | None = DEFAULT_NUM_GENERATE, verbose: bool = False
             ) -> dict[str, dict[str, Any]]:
  """Evaluates ``model`` on each task.

  Args:
    model: a :class:`epi_jax.model.Llama`.
    tokenizer: its ChatTokenizer/ByteTokenizer.
    tasks: which tasks (any registered task with an ``eval_kind``; default
      ``TASKS``, the benchmark tasks).
    data_dir: the prepared TFDS data (default ``epi_jax.data.default_data_dir()``).
    num_examples: examples per task: an int for all, a dict per task (missing
      tasks use ``DEFAULT_NUM_EXAMPLES``), or None for the defaults.
    max_new_tokens: GSM8K generation budget.
    num_generate: GSM8K problems (the first ones) generated for exact match
      (None: all; 0: none, loss only).
    batch_size: rows per batch (LogiQA: problems per batch, four rows each).
    generate_batch_size: GSM8K rows per generation batch (decoding is
      memory-bound, so larger batches are almost free); None: ``batch_size``.
    seq_len: longest sequence scored (loss tasks; LogiQA uses ``2 * seq_len``
      for prompt plus answer since its prompts are long).
    split: the split to evaluate on.
    sample_seed: None: the first N examples; an int: a fixed random subset.
    logiqa_normalize: ``'sum'`` or ``'mean'`` option log-likelihood.
    examples: ``{task: [example dicts]}`` to use instead of loading (tests).
    verbose: print one line per task.

  Returns:
    ``{task: metrics}``: every task ``loss, n, per_example`` (see the module
    docstring); gsm8k also ``perplexity, tokens, accuracy, correct,
    n_generated, samples``; logiqa ``accuracy, correct, prediction_counts``;
    loss tasks ``perplexity, tokens``; each with ``seconds`` and ``cpu_seconds``.
  """
  if num_examples is None:
    num_examples = DEFAULT_NUM_EXAMPLES
  unknown = [t for t in tasks if t not in EVAL_TASKS]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; known: {list(EVAL_TASKS)}")
  results = {}
  for task in tasks:
    start, cpu_start = time.perf_counter(), time.process_time()
    if examples is not None and task in examples:
      exs = list(examples[task])[:_num_for(num_examples, task) or None]
    else:
      exs = select_examples(datasets.load_examples(task, split, data_dir),
                            _num_for(num_examples, task), sample_seed)
    if not exs:
      raise ValueError(f"task {task!r}: no examples to evaluate")
    kind = tasks_lib.get(task).eval_kind
    if kind == "generate":
      res = eval_gsm8k(model, tokenizer, exs, max_new_tokens=max_new_tokens,
                       batch_size=generate_batch_size or batch_size, num_generate=num_generate,
                       loss_batch_size=batch_size, seq_len=seq_len)
    elif kind == "choice":
      res = eval_logiqa(model, tokenizer, exs, batch_size=batch_size,
                        seq_len=2 * seq_len, normalize=logiqa_normalize)
    else:
      res = eval_loss(model, tokenizer, exs, batch_size=batch_size, seq_len=seq_len)
    res["seconds"] = round(time.perf_counter() - start, 2)
    # CPU time of this process (all threads): on a busy shared machine,
    # cpu_seconds / cores estimates the wall time on an idle one.
    res["cpu_seconds"] = round(time.process_time() - cpu_start, 2)
    results[task] = res
    if verbose:
      shown = {k: v for k, v in res.items()
               if k not in ("samples", "prediction_counts", "per_example")}
      print(f"[eval] {task}: {shown}", flush=True)
  return results
