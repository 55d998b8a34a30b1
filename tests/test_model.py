"""Tiny-model tests of the Llama decoder, configs, generation and ByteTokenizer."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from epi_jax.model import (ByteTokenizer, Llama, config_names, generate,
                           generate_text, get_config, init_cache, param_count)

generate_module = importlib.import_module("epi_jax.model.generate")


@nnx.jit
def forward(model, tokens, positions=None, segment_ids=None):
  return model(tokens, positions=positions, segment_ids=segment_ids)


@nnx.jit
def cached_forward(model, tokens, cache):
  return model(tokens, cache=cache)


@pytest.fixture(scope="module")
def tiny():
  return Llama(get_config("tiny"), rngs=nnx.Rngs(0))


# Published parameter counts.
PUBLISHED = {
    "smollm2-135m": 134.5e6, "smollm2-360m": 361.8e6, "smollm2-1.7b": 1.71e9,
    "llama-3.2-1b": 1.236e9, "llama-3-8b": 8.03e9, "qwen2-7b": 7.62e9,
    "mistral-7b": 7.24e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
  count = param_count(get_config(name))
  assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.01, count


def test_unknown_config_lists_known_names():
  with pytest.raises(ValueError, match="smollm2-135m"):
    get_config("gpt-5")
  with pytest.raises(ValueError, match="hidden_sise"):
    get_config("tiny", hidden_sise=3)
  with pytest.raises(ValueError, match="num_kv_heads"):
    get_config("tiny", num_kv_heads=3)
  assert "mistral-7b" in config_names()


def test_logical_axis_names(tiny):
  specs = nnx.get_partition_spec(nnx.state(tiny, nnx.Param))
  flat = {tuple(p): tuple(v.get_value()) for p, v in nnx.to_flat_state(specs)}
  assert flat[("embed", "embedding")] == ("vocab", "embed")
  assert flat[("layers", 0, "attn", "q", "kernel")] == ("embed", "heads")
  assert flat[("layers", 1, "attn", "k", "kernel")] == ("embed", "kv_heads")
  assert flat[("layers", 1, "attn", "o", "kernel")] == ("heads", "embed")
  assert flat[("layers", 0, "mlp", "gate", "kernel")] == ("embed", "mlp")
  assert flat[("layers", 0, "mlp", "down", "kernel")] == ("mlp", "embed")
  assert flat[("norm", "scale")] == ("norm",)
  # Every parameter is annotated and every kernel is one 2-D leaf per layer.
  assert all(len(v) >= 1 for v in flat.values())
  kernels = [p for p in flat if p[-1] == "kernel"]
  assert len(kernels) == 7 * 2
  untied = Llama(get_config("tiny", tie_embeddings=False, attention_bias=True),
                 rngs=nnx.Rngs(0))
  flat = {tuple(p): tuple(v.get_value()) for p, v in
          nnx.to_flat_state(nnx.get_partition_spec(nnx.state(untied, nnx.Param)))}
  assert flat[("lm_head", "kernel")] == ("embed", "vocab")
  assert flat[("layers", 0, "attn", "q", "bias")] == ("heads",)
  assert flat[("layers", 0, "attn", "v", "bias")] == ("kv_heads",)


def test_kv_cache_prefill_and_decode_match_full_forward(tiny):
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 259)
  full = forward(tiny, tokens)
  cache = init_cache(tiny.config, 2, 16)
  a, cache = cached_forward(tiny, tokens[:, :5], cache)
  parts = [a]
  for i in range(5, 9):
    b, cache = cached_forward(tiny, tokens[:, i:i + 1], cache)
    parts.append(b)
  np.testing.assert_allclose(jnp.concatenate(parts, 1), full, atol=1e-5, rtol=1e-5)
  assert int(cache.end) == 9


def test_segment_ids_packing_equals_separate_sequences(tiny):
  a = jax.random.randint(jax.random.key(2), (1, 5), 0, 259)
  b = jax.random.randint(jax.random.key(3), (1, 7), 0, 259)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], 1)
  seg = jnp.array([[1] * 5 + [2] * 7 + [0] * 4])
  pos = jnp.array([list(range(5)) + list(range(7)) + [0] * 4])
  out = forward(tiny, packed, pos, seg)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out[:, :5], forward(tiny, a), atol=1e-5, rtol=1e-5)
  alone = forward(tiny, b)
  np.testing.assert_allclose(out[:, 5:12], alone, atol=1e-5, rtol=1e-5)
  # Without segment ids the second sequence would see the first: differs.
  assert not np.allclose(forward(tiny, packed, pos)[:, 5:12], alone, atol=1e-3)


def test_bf16_compute_and_remat_grads_match():
  config = get_config("tiny")
  tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, 259)
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(
      m(tokens)[:, :-1], tokens[:, 1:]).mean()
  plain = Llama(config, rngs=nnx.Rngs(0))
  remat = Llama(get_config("tiny", remat=True), rngs=nnx.Rngs(0))
  grad = nnx.jit(nnx.grad(loss))
  g1 = grad(plain)
  g2 = grad(remat)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  mixed = Llama(get_config("tiny", dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  assert mixed.layers[0].attn.q.kernel.get_value().dtype == jnp.float32
  out = forward(mixed, tokens)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, forward(plain, tokens), atol=0.1)
  bf16 = Llama(get_config("tiny", param_dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  assert bf16.embed.embedding.get_value().dtype == jnp.bfloat16


def test_train_step_reduces_loss():
  model = Llama(get_config("tiny"), rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, 259)

  @nnx.jit
  def step(model, opt):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(
          m(tokens)[:, :-1], tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  first = float(step(model, opt))
  for _ in range(10):
    last = float(step(model, opt))
  assert last < first - 0.5


def _greedy_without_cache(model, prompt, n):
  # Full forward over a fixed-size right-padded buffer (causal: padding after
  # the last real token cannot change its logits), one compile.
  buf = np.zeros((1, 32), np.int32)
  buf[0, :len(prompt)] = prompt
  length = len(prompt)
  for _ in range(n):
    logits = forward(model, jnp.asarray(buf))
    buf[0, length] = int(jnp.argmax(logits[0, length - 1]))
    length += 1
  return buf[0, len(prompt):length].tolist()


def test_cached_generation_equals_uncached(tiny):
  prompts = [[5, 6, 7, 8, 9], [100, 3], [42] * 11]
  outs = generate(tiny, prompts, max_new_tokens=6, stop_ids=())
  for prompt, out in zip(prompts, outs):
    assert out == _greedy_without_cache(tiny, prompt, 6)


def test_generation_stops_and_compiles_once_per_bucket(tiny):
  prompt = [1, 2, 3]
  first = generate(tiny, [prompt], max_new_tokens=8)[0]
  stop = first[2]
  cut = generate(tiny, [prompt], max_new_tokens=8, stop_ids=[stop])[0]
  assert cut == first[:first.index(stop)]
  before = generate_module._generate_jit._cache_size()
  generate(tiny, [[4, 5, 6, 7]], max_new_tokens=7, stop_ids=[stop])
  generate(tiny, [[9] * 10], max_new_tokens=5, stop_ids=[stop])
  assert generate_module._generate_jit._cache_size() == before


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny):
  p = [[10, 20, 30]]
  greedy = generate(tiny, p, max_new_tokens=6)
  kw = dict(max_new_tokens=6, temperature=1.0)
  s1 = generate(tiny, p, top_p=1.0, rng=jax.random.key(7), **kw)
  assert s1 == generate(tiny, p, top_p=1.0, rng=jax.random.key(7), **kw)
  assert generate(tiny, p, top_p=1e-6, rng=jax.random.key(7), **kw) == greedy
  draws = {tuple(generate(tiny, p, top_p=1.0, rng=jax.random.key(s), **kw)[0])
           for s in range(4)}
  assert len(draws) > 1


def test_generate_rejects_bad_input(tiny):
  with pytest.raises(ValueError, match="prompts"):
    generate(tiny, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(tiny, [[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match="token ids"):
    generate(tiny, [[1, 10_000]], max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    generate(tiny, [[1]], max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="tokens must be"):
    tiny(jnp.zeros((3,), jnp.int32))


def test_byte_tokenizer_chat_template_and_mask():
  tok = ByteTokenizer()
  msgs = [{"role": "user", "content": "hi é"}, {"role": "assistant", "content": "yo"},
          {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
  ids, mask = tok.apply_chat_template(msgs)
  assert tok.decode(ids) == tok.render_chat(msgs)
  assert ids == tok.encode(tok.render_chat(msgs))
  masked = [i for i, m in zip(ids, mask) if m]
  assert masked == tok.encode("yo<|im_end|>4<|im_end|>")
  gen_ids, gen_mask = tok.apply_chat_template(msgs[:1], add_generation_prompt=True)
  assert tok.decode(gen_ids).endswith("<|im_start|>assistant\n") and not any(gen_mask)
  with pytest.raises(ValueError, match=r"messages\[0\]\['role'\]"):
    tok.apply_chat_template([{"role": "bot", "content": "x"}])
  with pytest.raises(ValueError, match="content"):
    tok.apply_chat_template([{"role": "user"}])


def test_generate_text_with_byte_tokenizer(tiny):
  tok = ByteTokenizer()
  single = generate_text(tiny, tok, "hello", max_new_tokens=4)
  batch = generate_text(tiny, tok, ["hello", [{"role": "user", "content": "x"}]],
                        max_new_tokens=4)
  assert isinstance(single, str) and batch[0] == single and len(batch) == 2
