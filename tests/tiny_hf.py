"""Tiny Hugging Face checkpoints for the tests: written by transformers, with the
byte-level tokenizer, optionally placed in a Hub cache laid out as huggingface_hub
lays it out (``models--org--name/{blobs,refs,snapshots}``)."""

import hashlib
import json
import os
import pathlib
import warnings

VOCAB = 272  # ByteTokenizer's 259 ids fit


def save_tiny_hf(directory, kind: str = "llama"):
  """A tiny random transformers ``kind`` ('llama' or 'qwen2') + the byte-level tokenizer."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from epi_jax.model import ByteTokenizer  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
  if kind == "llama":
    cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rms_norm_eps=1e-6,
                                   rope_theta=5000.0,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0})
    cls = transformers.LlamaForCausalLM
  else:
    cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0)
    cls = transformers.Qwen2ForCausalLM
  torch.manual_seed(0)
  model = cls(cfg).eval()
  with torch.no_grad():  # non-trivial norms and biases
    for n, p in model.named_parameters():
      if n.endswith("norm.weight") or n.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model.save_pretrained(directory)
  tok = ByteTokenizer()
  tok.backend.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
       "pad_token": "<|endoftext|>", "chat_template": tok.chat_template()}))
  return directory


def place_in_hub_cache(source, hub_cache, repo_id: str, revision: str) -> pathlib.Path:
  """Copies checkpoint dir ``source`` into ``hub_cache`` as the Hub client stores a
  download of ``repo_id`` at commit ``revision`` (files are symlinks to blobs named
  by their sha256; ``refs/main`` holds the commit). Returns the snapshot dir."""
  repo = pathlib.Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))
  snapshot = repo / "snapshots" / revision
  (repo / "blobs").mkdir(parents=True, exist_ok=True)
  snapshot.mkdir(parents=True, exist_ok=True)
  for f in sorted(pathlib.Path(source).iterdir()):
    data = f.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / "main").write_text(revision)
  return snapshot
