"""Llama-family models: configs, the Flax NNX decoder, loading, export, tokenizers, generation."""

from epi_jax.model.config import ModelConfig, config_names, get_config
from epi_jax.model.generate import generate, generate_text
from epi_jax.model.llama import KVCache, Llama, init_cache, param_count
from epi_jax.model.loading import (load_gguf, load_hf_checkpoint, load_pretrained,
                                   resolve_model_path)
from epi_jax.model.tokenizer import ByteTokenizer, ChatTokenizer
from epi_jax.model.export import export_gguf, export_hf

__all__ = [
    "ByteTokenizer", "ChatTokenizer", "KVCache", "Llama", "ModelConfig",
    "config_names", "export_gguf", "export_hf", "generate", "generate_text", "get_config",
    "init_cache", "load_gguf", "load_hf_checkpoint", "load_pretrained", "param_count",
    "resolve_model_path",
]
