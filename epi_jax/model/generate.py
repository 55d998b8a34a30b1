"""Batched autoregressive generation with a KV cache, compiled once per bucket.

Prompts are left-padded to a power-of-two length (min 16) and the batch to a
power-of-two size, and ``max_new_tokens`` is rounded up to a power of two, so
that few shapes ever get compiled. Prefill and the decode loop
(``jax.lax.while_loop``, stopping early once every row has emitted a stop
token) run inside one ``jax.jit``.

Only ids the tokenizer knows are ever produced: an embedding table may have
more rows than the tokenizer has tokens (padded vocabularies, e.g. Qwen2's,
or the tiny test model's 272 rows for ByteTokenizer's 259 ids), and the logits
of those extra rows are masked before sampling. Generation stops at the
model's context (``max_position_embeddings``): ``max_new_tokens`` is capped
there with a warning, and a prompt that does not fit is refused.
"""

from __future__ import annotations

import functools
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epi_jax.model.llama import Llama, init_cache


def _bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (max(int(n), 1) - 1).bit_length())


def _sample(logits, key, temperature, top_p, greedy: bool, vocab_size):
  """Greedy argmax, or temperature + nucleus (top-p) sampling, over ids < vocab_size."""
  ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  logits = jnp.where(ids < vocab_size, logits, -jnp.inf)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / jnp.maximum(temperature, 1e-6)
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
  keep = before < top_p  # the top token is always kept
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "new_bucket", "greedy"))
def _generate_jit(graphdef, state, tokens, segment_ids, limit, stop_ids,
                  temperature, top_p, rng, pad_id, vocab_size, *, new_bucket: int,
                  greedy: bool):
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  cache = init_cache(model.config, b, p + new_bucket)
  positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
  logits, cache = model(tokens, positions=positions, segment_ids=segment_ids,
                        cache=cache)
  out = jnp.full((b, new_bucket), pad_id, jnp.int32)
  done = jnp.all(segment_ids == 0, axis=1)  # batch-padding rows

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < limit) & ~jnp.all(done)

  def body(carry):
    i, cache, last, pos, done, out = carry
    tok = _sample(last, jax.random.fold_in(rng, i), temperature, top_p, greedy, vocab_size)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, i].set(tok)
    done = done | jnp.isin(tok, stop_ids)
    logits, cache = model(tok[:, None], positions=pos[:, None],
                          segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache)
    return i + 1, cache, logits[:, -1], pos + 1, done, out

  carry = (jnp.zeros((), jnp.int32), cache, logits[:, -1], positions[:, -1] + 1,
           done, out)
  return jax.lax.while_loop(cond, body, carry)[-1]


def generate(model: Llama, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, stop_ids: Sequence[int] = (),
             temperature: float = 0.0, top_p: float = 1.0, rng=None,
             pad_id: int = 0, vocab_size: int | None = None) -> list[list[int]]:
  """Continues each prompt; returns the new tokens of each row.

  Args:
    model: a :class:`Llama`.
    prompts: token-id lists (different lengths allowed; left-padded inside).
    max_new_tokens: most tokens generated per row.
    stop_ids: a row stops at the first of these; the stop token itself is not
      included in the returned tokens.
    temperature: 0 means greedy; otherwise softmax temperature.
    top_p: nucleus sampling mass (1.0: sample from the full distribution).
    rng: ``jax.random`` key for sampling (default key 0).
    pad_id: id used for padding (never attended to).
    vocab_size: the tokenizer's vocabulary size: ids at or past it are never
      generated (default: the model's ``vocab_size``, every embedding row).

  Returns:
    One list of generated token ids per prompt.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("prompts must be a non-empty list of non-empty token lists")
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got "
                     f"temperature={temperature}, top_p={top_p}")
  vocab = model.config.vocab_size
  if vocab_size is None:
    vocab_size = vocab
  if not 0 < vocab_size <= vocab:
    raise ValueError(f"vocab_size={vocab_size} must be in [1, {vocab}] (the model's "
                     "embedding rows)")
  for p in prompts:
    if min(p) < 0 or max(p) >= vocab:
      raise ValueError(f"prompt token ids must be in [0, {vocab}), got "
                       f"{min(p)}..{max(p)}")
  context = model.config.max_position_embeddings
  longest = max(len(p) for p in prompts)
  if longest >= context:
    raise ValueError(f"a prompt of {longest} tokens does not fit the model's context of "
                     f"{context} tokens")
  if longest + max_new_tokens > context:
    warnings.warn(f"max_new_tokens={max_new_tokens} capped to {context - longest}: the "
                  f"model's context is {context} tokens and the longest prompt takes "
                  f"{longest}", stacklevel=2)
    max_new_tokens = context - longest
  n, length = len(prompts), _bucket(max(len(p) for p in prompts))
  batch = _bucket(n, minimum=1)
  tokens = np.full((batch, length), pad_id, np.int32)
  segs = np.zeros((batch, length), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    segs[i, length - len(p):] = 1
  stops = sorted(set(int(s) for s in stop_ids))
  stops = np.asarray(stops + [-1] * (-len(stops) % 8 or (8 if not stops else 0)),
                     np.int32)  # fixed length: no recompiles per stop count
  graphdef, state = nnx.split(model)
  out = _generate_jit(
      graphdef, state, jnp.asarray(tokens), jnp.asarray(segs),
      jnp.int32(max_new_tokens), jnp.asarray(stops), jnp.float32(temperature),
      jnp.float32(top_p), rng if rng is not None else jax.random.key(0),
      jnp.int32(pad_id), jnp.int32(vocab_size), new_bucket=_bucket(max_new_tokens),
      greedy=temperature == 0)
  out = np.asarray(out)[:n, :max_new_tokens]
  results = []
  stop_set = set(int(s) for s in stop_ids)
  for row in out.tolist():
    cut = next((j for j, t in enumerate(row) if t in stop_set), len(row))
    results.append(row[:cut])
  return results


def generate_text(model: Llama, tokenizer, messages_or_prompt, *,
                  max_new_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 1.0, rng=None):
  """Chat-style generation from text.

  ``messages_or_prompt`` is a string (one user message), a message list
  (``[{'role', 'content'}, ...]``), or a list of those for a batch. The
  conversation is rendered with the tokenizer's chat template plus a
  generation prompt. Returns the assistant's reply (a str), or a list of
  replies for a batch.
  """
  def is_conversation(x):
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and x
                                  and isinstance(x[0], dict))
  single = is_conversation(messages_or_prompt)
  items = [messages_or_prompt] if single else list(messages_or_prompt)
  prompts = []
  for item in items:
    messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
    ids, _ = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompts.append(ids)
  outs = generate(model, prompts, max_new_tokens=max_new_tokens,
                  stop_ids=tokenizer.stop_ids, temperature=temperature,
                  top_p=top_p, rng=rng, pad_id=tokenizer.pad_id,
                  vocab_size=tokenizer.vocab_size)
  texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
  return texts[0] if single else texts
