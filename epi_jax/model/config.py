"""Architectures of the Llama-family decoders the project can build.

A :class:`ModelConfig` describes the shape of a decoder-only transformer
(Llama, SmolLM2, Qwen2, Mistral): RMSNorm, rotary embeddings, grouped-query
attention and a SwiGLU MLP. :func:`get_config` returns the named ones; the
large ones are for accelerator users and are checked here only by their
abstract parameter counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from epi_jax.model.attention import IMPLEMENTATIONS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder.

  Attributes:
    vocab_size: rows of the embedding table (and columns of the LM head).
    hidden_size: model width (``embed`` axis).
    num_layers: number of transformer blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when smaller than
      ``num_heads``; must divide it).
    head_dim: width of one head.
    intermediate_size: width of the SwiGLU MLP (``mlp`` axis).
    rope_theta: base of the rotary frequencies.
    rope_scaling: ``None`` or a dict with ``rope_type`` (or ``type``) in
      ``{'default', 'linear', 'llama3'}`` and its parameters (Hugging Face
      ``config.json`` conventions: ``factor``, ``low_freq_factor``,
      ``high_freq_factor``, ``original_max_position_embeddings``).
    rms_norm_eps: epsilon of the RMSNorms.
    tie_embeddings: the LM head reuses the embedding table.
    attention_bias: q/k/v projections have biases (Qwen2).
    max_position_embeddings: longest context the checkpoint was trained for
      (informational; rotary embeddings are computed on the fly).
    param_dtype: dtype of the parameters (e.g. float32 master weights).
    dtype: compute dtype of activations and matmuls; ``None`` means
      ``param_dtype``. Logits are always returned in float32.
    remat: rematerialize each block in the backward pass (saves memory).
    scan_layers: stack the blocks' params on a leading ``layers`` axis and run
      them with one ``jax.lax.scan`` (compile time independent of depth).
    attention: attention kernel, one of
      ``epi_jax.model.attention.IMPLEMENTATIONS`` (``'auto'`` picks by backend).
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 10000.0
  rope_scaling: dict[str, Any] | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 2048
  param_dtype: Any = jnp.float32
  dtype: Any = None
  remat: bool = False
  scan_layers: bool = False
  attention: str = "auto"

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "intermediate_size"):
      if int(getattr(self, field)) <= 0:
        raise ValueError(f"ModelConfig.{field} must be positive, got "
                         f"{getattr(self, field)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide "
          f"num_heads={self.num_heads}")
    if self.attention not in IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention={self.attention!r}: expected one of "
                       f"{IMPLEMENTATIONS}")
    if self.rope_scaling is not None:
      kind = _rope_type(self.rope_scaling)
      if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"ModelConfig.rope_scaling: unsupported rope_type "
                         f"{kind!r} (known: default, linear, llama3)")

  @property
  def compute_dtype(self):
    return self.dtype if self.dtype is not None else self.param_dtype

  def __hash__(self):  # rope_scaling is a dict; hash a frozen view of it.
    items = tuple(
        (f.name, _freeze(getattr(self, f.name))) for f in dataclasses.fields(self))
    return hash(items)


def _freeze(value):
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  try:
    hash(value)
    return value
  except TypeError:
    return repr(value)


def _rope_type(rope_scaling: dict[str, Any]) -> str:
  return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

_CONFIGS: dict[str, dict[str, Any]] = {
    # Small enough for unit tests on a CPU; vocab fits ByteTokenizer.
    "tiny": dict(vocab_size=272, hidden_size=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, intermediate_size=128,
                 rope_theta=10000.0, tie_embeddings=True,
                 max_position_embeddings=512),
    # HuggingFaceTB/SmolLM2-*: published sizes 135M, 360M, 1.7B.
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64,
                         intermediate_size=1536, rope_theta=100000.0,
                         tie_embeddings=True, max_position_embeddings=8192),
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, num_layers=32,
                         num_heads=15, num_kv_heads=5, head_dim=64,
                         intermediate_size=2560, rope_theta=100000.0,
                         tie_embeddings=True, max_position_embeddings=8192),
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, num_layers=24,
                         num_heads=32, num_kv_heads=32, head_dim=64,
                         intermediate_size=8192, rope_theta=130000.0,
                         tie_embeddings=True, max_position_embeddings=8192),
    # meta-llama/Llama-3.2-1B: 1.236B.
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16,
                         num_heads=32, num_kv_heads=8, head_dim=64,
                         intermediate_size=8192, rope_theta=500000.0,
                         rope_scaling=_LLAMA3_SCALING, tie_embeddings=True,
                         max_position_embeddings=131072),
    # meta-llama/Meta-Llama-3-8B: 8.03B.
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128,
                       intermediate_size=14336, rope_theta=500000.0,
                       max_position_embeddings=8192),
    # Qwen/Qwen2-7B: 7.62B, q/k/v biases.
    "qwen2-7b": dict(vocab_size=152064, hidden_size=3584, num_layers=28,
                     num_heads=28, num_kv_heads=4, head_dim=128,
                     intermediate_size=18944, rope_theta=1000000.0,
                     rms_norm_eps=1e-6, attention_bias=True,
                     max_position_embeddings=32768),
    # mistralai/Mistral-7B-v0.3 (7.25B; v0.1 differs only in vocab 32000,
    # rope base 1e4 and a 4096-token sliding window, which is not modeled).
    "mistral-7b": dict(vocab_size=32768, hidden_size=4096, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128,
                       intermediate_size=14336, rope_theta=1000000.0,
                       max_position_embeddings=32768),
}


def config_names() -> list[str]:
  return list(_CONFIGS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
  """Returns the named :class:`ModelConfig`, with fields replaced by ``overrides``.

  Raises:
    ValueError: for an unknown name (the message lists the known ones) or an
      unknown override field.
  """
  key = name.lower()
  if key not in _CONFIGS:
    raise ValueError(f"Unknown model config {name!r}; known: "
                     f"{', '.join(_CONFIGS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"Unknown ModelConfig field(s) {bad}; known: {sorted(fields)}")
  return ModelConfig(**{**_CONFIGS[key], **overrides})


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward = 3x forward).

  ``2 x`` the matmul params (attention projections, MLP, LM head) plus the
  attention scores and values at ``seq_len`` (the causal half not skipped),
  times 3: the usual MFU accounting. Norms, softmax and RoPE are left out.
  """
  d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  per_layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * config.intermediate_size
  matmul = config.num_layers * per_layer + config.vocab_size * d
  attention = config.num_layers * 2 * h * hd * seq_len
  return 3.0 * 2.0 * (matmul + attention)
