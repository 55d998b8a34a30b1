"""epi-jax export: runs trained by our trainer -> transformers / GGUF, read back equal."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from epi_jax.model import load_gguf, load_hf_checkpoint  # noqa: E402
from epi_jax.model.export import export_hf, hf_config_dict  # noqa: E402
from epi_jax.model.loading import hf_config  # noqa: E402
from epi_jax.training import load_run, train  # noqa: E402
from epi_jax.training.export import export_main, export_run  # noqa: E402
from tiny_hf import save_tiny_hf  # noqa: E402

STEPS = 3


@nnx.jit
def forward(model, tokens):
  return model(tokens)


def _tokens():
  return np.random.default_rng(0).integers(0, 259, (2, 20)).astype(np.int32)


def _rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _hf_logits(directory, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  with torch.no_grad():
    return model.eval()(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _config(model_name=None):
  from configs_loader import load_config
  c = load_config("tiny")
  c.total_steps = STEPS
  c.log_every = 1
  c.checkpoint_every = STEPS
  c.snapshot_steps = ()
  c.progress_bar = False
  c.async_checkpointing = False
  c.data.seq_len = 128
  c.data.mixture = {"gsm8k": 1.0, "code_alpaca": 1.0, "alpaca": 1.0}
  # One device, not conftest's 8 fake ones: a data-parallel run's params are
  # replicated, its checkpoint the same; the step compiles several times faster.
  c.mesh.data = 1
  c.optimizer.warmup_steps = 1
  c.epi.update_interval = 2
  c.epi.isolation_ratio = 0.1
  if model_name is not None:
    c.model.init = "pretrained"
    c.model.name = str(model_name)
  return c


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained(request, tmp_path_factory):
  """(source checkpoint dir, run dir) of a tiny pretrained model trained a few steps."""
  root = tmp_path_factory.mktemp(request.param)
  source = save_tiny_hf(root / "source", request.param)
  train(_config(source), root / "run")
  return source, root / "run"


def test_hf_export_matches_transformers(trained, tmp_path):
  source, run = trained
  model, tok, _ = load_run(run)
  start, _, _ = load_hf_checkpoint(source)
  assert not np.allclose(model.layers[0].attn.q.kernel.get_value(),
                         start.layers[0].attn.q.kernel.get_value())  # it trained
  out = tmp_path / "hf"
  assert export_main(["--workdir", str(run), "--format", "hf", "--out", str(out)]) == 0
  for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"):
    assert (out / f).is_file(), f
  tokens = _tokens()
  assert _rel_err(forward(model, tokens), _hf_logits(out, tokens)) <= 1e-4
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
  assert hf_tok.apply_chat_template(messages, tokenize=False) == tok.render_chat(messages)
  assert hf_tok("héllo 12")["input_ids"] == tok.encode("héllo 12")
  gen = json.loads((out / "generation_config.json").read_text())
  assert tok.eos_id in gen["eos_token_id"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gguf_export_round_trip(trained, tmp_path, dtype):
  _, run = trained
  model, tok, _ = load_run(run)
  path = tmp_path / "model.gguf"
  export_run(run, path, fmt="gguf", dtype=dtype)
  reader = gguf.GGUFReader(str(path))
  kinds = {t.name: t.tensor_type.name for t in reader.tensors}
  assert kinds["blk.0.attn_q.weight"] == ("F32" if dtype == "float32" else "F16")
  assert kinds["blk.0.attn_norm.weight"] == "F32"
  q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
  assert [int(d) for d in q.shape] == [64, 64]
  back, back_tok, config = load_gguf(path)
  assert config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps)  # stored as f32
  assert dataclasses.replace(config, rms_norm_eps=model.config.rms_norm_eps,
                             dtype=model.config.dtype) == model.config
  want = jax.tree.leaves(nnx.state(model, nnx.Param))
  got = jax.tree.leaves(nnx.state(back, nnx.Param))
  assert len(want) == len(got)
  for a, b in zip(want, got):
    if dtype == "float32":
      np.testing.assert_array_equal(a, b)
    else:  # f16 weights: within f16 rounding
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  assert back_tok.encode("héllo <|im_end|>") == tok.encode("héllo <|im_end|>")
  assert back_tok.eos_id == tok.eos_id


def test_random_init_run_exports_with_byte_tokenizer_note(tmp_path, capsys):
  run = tmp_path / "run"
  train(_config(), run)
  out = tmp_path / "hf"
  assert export_main(["--workdir", str(run), "--format", "hf", "--out", str(out)]) == 0
  assert "byte-level stand-in tokenizer" in capsys.readouterr().err
  model, tok, _ = load_run(run)
  tokens = _tokens()
  assert _rel_err(forward(model, tokens), _hf_logits(out, tokens)) <= 1e-4
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok("a<|im_start|>b")["input_ids"] == tok.encode("a<|im_start|>b") == [97, 257, 98]
  # An existing destination is refused, untouched.
  assert export_main(["--workdir", str(run), "--format", "hf", "--out", str(out)]) == 2
  assert "already exists" in capsys.readouterr().err
  assert (out / "model.safetensors").is_file()


def test_sharded_export_and_config_round_trip(trained, tmp_path):
  source, _ = trained
  model, tok, config = load_hf_checkpoint(source)
  assert hf_config(hf_config_dict(config)) == config
  out = tmp_path / "sharded"
  export_hf(model, out, tokenizer=tok, source=source, max_shard_bytes=64 * 1024)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not list(tmp_path.glob(".sharded.partial-*"))  # staging dir renamed into place
  again, _, _ = load_hf_checkpoint(out)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  export_hf(model, tmp_path / "bf16", tokenizer=tok, source=source, dtype="bfloat16")
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  half, _, _ = load_hf_checkpoint(tmp_path / "bf16")
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(half, nnx.Param))):
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)


def test_export_bad_workdir_is_a_clear_error(tmp_path, capsys):
  assert export_main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
  assert "not a training run directory" in capsys.readouterr().err


def _bpe_tokenizer():
  """A small byte-level BPE with merges (as real checkpoints have), trained in place."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from epi_jax.model import ChatTokenizer
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 12 times"] * 20, trainer)
  return ChatTokenizer(tok, default_system_prompt="You are helpful.")


def test_gguf_with_bpe_merges_then_hf_from_that_gguf(tmp_path):
  from epi_jax.model import Llama, get_config
  from epi_jax.model.export import export_gguf
  tok = _bpe_tokenizer()
  assert tok.vocab_size <= 300
  model = Llama(get_config("tiny", vocab_size=304), rngs=nnx.Rngs(1))
  path = tmp_path / "bpe.gguf"
  assert export_gguf(model, path, tokenizer=tok, dtype="float32") == []
  back, back_tok, _ = load_gguf(path)
  text = "the lazy fox, 12 <|im_end|>"
  assert back_tok.encode(text) == tok.encode(text) and len(tok.encode("the quick")) < 9
  assert back_tok.chat_template() == tok.chat_template()
  # GGUF source -> HF: tokenizer.json and the ChatML template written from the GGUF's tokenizer.
  out = tmp_path / "hf"
  export_hf(back, out, tokenizer=back_tok, source=path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok(text)["input_ids"] == tok.encode(text)
  messages = [{"role": "user", "content": "hi"}]
  assert (hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
          == tok.render_chat(messages, add_generation_prompt=True))
  tokens = _tokens()
  assert _rel_err(forward(model, tokens), _hf_logits(out, tokens)) <= 1e-4
