"""Loader tests: parity with transformers (Llama, Qwen2) and GGUF Q/K order."""

import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from epi_jax.model import load_gguf, load_hf_checkpoint, load_pretrained  # noqa: E402
from epi_jax.model.tensor_names import permute_qk, unpermute_qk  # noqa: E402

VOCAB = 128


@nnx.jit
def forward(model, tokens):
  return model(tokens)


def _save(tmp_path, name, model_cls, config, **save_kw):
  torch.manual_seed(0)
  model = model_cls(config).eval()
  with torch.no_grad():  # non-trivial norms and biases
    for n, p in model.named_parameters():
      if n.endswith("norm.weight") or n.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  directory = tmp_path / name
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model.save_pretrained(directory, **save_kw)
  return model, directory


def _tokens():
  return np.random.default_rng(0).integers(0, VOCAB, (2, 24)).astype(np.int32)


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      rope_theta=5000.0, tie_word_embeddings=False, max_position_embeddings=256,
      rms_norm_eps=1e-6)
  # Sharded: exercises model.safetensors.index.json.
  return _save(tmp_path_factory.mktemp("hf"), "llama", transformers.LlamaForCausalLM,
               cfg, max_shard_size="100KB")


def test_llama_parity_sharded_checkpoint(llama_ckpt):
  ref, directory = llama_ckpt
  assert (directory / "model.safetensors.index.json").is_file()
  model, tok, config = load_hf_checkpoint(directory)
  assert tok is None and not config.tie_embeddings and config.rope_theta == 5000.0
  tokens = _tokens()
  assert _rel_err(forward(model, tokens), _torch_logits(ref, tokens)) <= 1e-4


def test_qwen2_parity_with_attention_bias(tmp_path):
  cfg = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=256)
  ref, directory = _save(tmp_path, "qwen2", transformers.Qwen2ForCausalLM, cfg)
  model, _, config = load_hf_checkpoint(directory)
  assert config.attention_bias and config.tie_embeddings
  assert model.layers[0].attn.k.bias is not None
  tokens = _tokens()
  assert _rel_err(forward(model, tokens), _torch_logits(ref, tokens)) <= 1e-4


def test_llama3_rope_scaling_parity_and_bf16(tmp_path):
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
      tie_word_embeddings=True, max_position_embeddings=256,
      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                       "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16})
  ref, directory = _save(tmp_path, "llama3", transformers.LlamaForCausalLM, cfg)
  model, _, config = load_hf_checkpoint(directory)
  assert config.rope_scaling["rope_type"] == "llama3"
  tokens = _tokens()
  want = _torch_logits(ref, tokens)
  assert _rel_err(forward(model, tokens), want) <= 1e-4
  bf16, _, _ = load_hf_checkpoint(directory, param_dtype=jnp.bfloat16)
  assert bf16.embed.embedding.get_value().dtype == jnp.bfloat16
  assert _rel_err(forward(bf16, tokens), want) <= 5e-2


def test_load_onto_sharding(llama_ckpt):
  _, directory = llama_ckpt
  mesh = jax.make_mesh((1,), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  model, _, _ = load_hf_checkpoint(directory, shardings=replicated)
  assert model.layers[1].mlp.down.kernel.get_value().sharding == replicated
  # A pytree of shardings like nnx.state(model, nnx.Param).
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  tree = jax.tree.map(lambda _: replicated, specs)
  again, _, _ = load_hf_checkpoint(directory, shardings=tree)
  np.testing.assert_array_equal(again.embed.embedding.get_value(),
                                model.embed.embedding.get_value())


def _edit(directory, tmp_path, fn):
  """Copies a single-file checkpoint, applying ``fn`` to its tensor dict."""
  from safetensors.numpy import load_file, save_file
  out = tmp_path / "edited"
  out.mkdir(parents=True)
  (out / "config.json").write_text((directory / "config.json").read_text())
  tensors = {}
  for f in sorted(directory.glob("*.safetensors")):
    tensors.update(load_file(str(f)))
  save_file(fn(tensors), str(out / "model.safetensors"))
  return out


def test_bad_checkpoints_name_the_tensor(llama_ckpt, tmp_path):
  _, directory = llama_ckpt
  name = "model.layers.1.mlp.up_proj.weight"

  def drop(t):
    t.pop(name)
    return t
  with pytest.raises(ValueError, match=r"layers\.1\.up"):
    load_hf_checkpoint(_edit(directory, tmp_path / "a", drop))

  def extra(t):
    t["model.layers.0.self_attn.weird.weight"] = np.zeros((2, 2), np.float32)
    return t
  with pytest.raises(ValueError, match="self_attn.weird"):
    load_hf_checkpoint(_edit(directory, tmp_path / "b", extra))

  def reshape(t):
    t[name] = t[name][:, :10].copy()
    return t
  with pytest.raises(ValueError, match=f"Shape mismatch.*{name}"):
    load_hf_checkpoint(_edit(directory, tmp_path / "c", reshape))

  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf_checkpoint(tmp_path)
  cfg = json.loads((directory / "config.json").read_text())
  bad = tmp_path / "bad_type"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type"):
    load_hf_checkpoint(bad)
  with pytest.raises(FileNotFoundError, match="neither a known name"):
    load_pretrained(str(tmp_path / "nope.gguf"))


def _permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_llama_cpp_permute():
  w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
  np.testing.assert_array_equal(unpermute_qk(_permute(w, 3), 3), w)
  np.testing.assert_array_equal(permute_qk(w, 3), _permute(w, 3))  # the exporter's
  assert not np.array_equal(_permute(w, 3), w)


def _write_gguf(ref, path):
  """Writes the tiny Llama ``ref`` as a llama.cpp-style GGUF (permuted Q/K, F32)."""
  gguf = pytest.importorskip("gguf")
  c = ref.config
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(5000.0)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  byte_chars = [chr(i) for i in range(33, 127)]
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_chars
  tokens += ["ab"] + [f"<extra{i}>" for i in range(VOCAB - len(tokens) - 1)]
  w.add_token_list(tokens)
  w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
  w.add_token_merges(["a b"])
  w.add_eos_token_id(2)
  names = {"embed_tokens": "token_embd", "norm": "output_norm"}
  layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  for n, p in ref.state_dict().items():
    a = p.numpy().astype(np.float32)
    base = n.removesuffix(".weight")
    if base == "lm_head":
      gname = "output"
    elif base.startswith("model.layers."):
      _, _, i, rest = base.split(".", 3)
      gname = f"blk.{i}.{layer[rest]}"
      if rest == "self_attn.q_proj":
        a = _permute(a, c.num_attention_heads)
      elif rest == "self_attn.k_proj":
        a = _permute(a, c.num_key_value_heads)
    else:
      gname = names[base.removeprefix("model.")]
    w.add_tensor(gname + ".weight", np.ascontiguousarray(a))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_gguf_loader_matches_transformers(llama_ckpt, tmp_path):
  ref, _ = llama_ckpt
  path = _write_gguf(ref, tmp_path / "tiny.gguf")
  model, tok, config = load_gguf(path)
  assert not config.tie_embeddings and config.num_kv_heads == 2
  assert tok.eos_id == 2 and tok.encode("<|im_start|>!") == [1, 3]
  tokens_ = _tokens()
  assert _rel_err(forward(model, tokens_), _torch_logits(ref, tokens_)) <= 1e-4


def test_loading_into_scanned_layout_equals_loading_then_stacking(llama_ckpt, tmp_path):
  from epi_jax.model.setup import flat_params, stack_layers
  ref, directory = llama_ckpt
  gguf_path = _write_gguf(ref, tmp_path / "tiny.gguf")
  mesh = jax.make_mesh((1,), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for load, src in ((load_hf_checkpoint, directory), (load_gguf, gguf_path)):
    plain, _, _ = load(src)
    scanned, _, config = load(src, scan_layers=True, shardings=replicated)
    assert config.scan_layers and not plain.config.scan_layers
    want, got = stack_layers(flat_params(plain)), flat_params(scanned)
    assert set(got) == set(want) and got["layers/mlp/up/kernel"].shape[0] == 2
    for k, v in want.items():
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)
    assert got["layers/attn/q/kernel"].sharding == replicated
    tokens = _tokens()
    assert _rel_err(forward(scanned, tokens), _torch_logits(ref, tokens)) <= 1e-4


def test_config_and_tokenizer_without_weights_and_the_kept_reader(llama_ckpt, tmp_path):
  """``pretrained_config`` gives load_pretrained's config and tokenizer without
  the weights; the parsed GGUF is kept, and read again once the file changes."""
  import os

  from epi_jax.model.gguf_cache import gguf_reader
  from epi_jax.model.loading import pretrained_config
  ref, directory = llama_ckpt
  gguf_path = _write_gguf(ref, tmp_path / "tiny.gguf")
  _, tok, config = load_pretrained(str(gguf_path), scan_layers=True)
  got_config, got_tok = pretrained_config(str(gguf_path), scan_layers=True)
  assert got_config == config
  assert got_tok.encode("<|im_start|>ab!") == tok.encode("<|im_start|>ab!")
  with pytest.raises(FileNotFoundError, match="No tokenizer.json"):  # as load_pretrained
    pretrained_config(str(directory))
  assert gguf_reader(gguf_path) is gguf_reader(str(gguf_path))
  first = gguf_reader(gguf_path)
  st = os.stat(gguf_path)
  os.utime(gguf_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
  assert gguf_reader(gguf_path) is not first
