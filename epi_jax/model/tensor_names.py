"""Tensor names and layouts of Hugging Face and GGUF checkpoints, both ways.

One place for each naming and layout rule, used by the loaders
(:mod:`epi_jax.model.loading`) and the exporters (:mod:`epi_jax.model.export`).
A *slot* is the canonical name of one tensor of the module: ``'embed'``,
``'norm'``, ``'lm_head'`` or ``'layers.<i>.<part>'`` with ``part`` one of
:data:`LAYER_PARTS`. The module keeps kernels ``[in, out]``; checkpoints keep
them ``[out, in]`` (torch ``Linear`` and numpy-order GGUF alike).
"""

from __future__ import annotations

import re

import numpy as np

LAYER_PARTS = ("attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down",
               "q_bias", "k_bias", "v_bias")

_HF_TOP = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm",
           "lm_head.weight": "lm_head"}
_HF_LAYER = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "mlp_norm",
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v", "self_attn.o_proj.weight": "o",
    "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
}
_GGUF_TOP = {"token_embd.weight": "embed", "output_norm.weight": "norm",
             "output.weight": "lm_head"}
_GGUF_LAYER = {
    "attn_norm.weight": "attn_norm", "ffn_norm.weight": "mlp_norm",
    "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v",
    "attn_output.weight": "o", "ffn_gate.weight": "gate", "ffn_up.weight": "up",
    "ffn_down.weight": "down", "attn_q.bias": "q_bias", "attn_k.bias": "k_bias",
    "attn_v.bias": "v_bias",
}
_FORMATS = {"hf": (_HF_TOP, r"model\.layers\.(\d+)\.(.+)", "model.layers.{}.{}", _HF_LAYER),
            "gguf": (_GGUF_TOP, r"blk\.(\d+)\.(.+)", "blk.{}.{}", _GGUF_LAYER)}


def slot_of(name: str, fmt: str) -> str | None:
  """The slot of checkpoint tensor ``name`` in format ``'hf'``/``'gguf'``; None if unknown."""
  top, pattern, _, layer = _FORMATS[fmt]
  if name in top:
    return top[name]
  m = re.fullmatch(pattern, name)
  if m and m.group(2) in layer:
    return f"layers.{m.group(1)}.{layer[m.group(2)]}"
  return None


def name_of(slot: str, fmt: str) -> str:
  """The checkpoint tensor name of ``slot`` in format ``'hf'``/``'gguf'``."""
  top, _, template, layer = _FORMATS[fmt]
  for name, s in top.items():
    if s == slot:
      return name
  m = re.fullmatch(r"layers\.(\d+)\.(.+)", slot)
  for name, part in layer.items():
    if m and part == m.group(2):
      return template.format(m.group(1), name)
  raise ValueError(f"No {fmt} tensor name for slot {slot!r}")


def part_of(slot: str) -> str:
  """``'layers.3.q_bias'`` -> ``'q_bias'``; top-level slots are their own part."""
  return slot.rsplit(".", 1)[-1]


def swap_layout(w: np.ndarray, slot: str) -> np.ndarray:
  """Module ``[in, out]`` <-> checkpoint ``[out, in]`` (its own inverse).

  The embedding table is ``[vocab, hidden]`` in both; vectors are unchanged.
  """
  return w.T if w.ndim == 2 and slot != "embed" else w


def _heads_for(part: str, num_heads: int, num_kv_heads: int) -> int | None:
  if part in ("q", "q_bias"):
    return num_heads
  if part in ("k", "k_bias"):
    return num_kv_heads
  return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (interleaved -> rotate-half).

  ``convert_hf_to_gguf.py`` stores ``w.reshape(n_head, 2, d/2, in)
  .swapaxes(1, 2)``; this is its inverse. Works for weights ``[out, in]`` and
  biases ``[out]``.
  """
  rest = w.shape[1:]
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2)
          .reshape(w.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (rotate-half -> interleaved); inverse of
  :func:`unpermute_qk`."""
  rest = w.shape[1:]
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest).swapaxes(1, 2)
          .reshape(w.shape))


def gguf_qk_order(w: np.ndarray, slot: str, *, num_heads: int, num_kv_heads: int,
                  to_gguf: bool) -> np.ndarray:
  """Applies (``to_gguf``) or undoes llama.cpp's Q/K permutation on a
  checkpoint-layout ``[out, in]`` tensor; other slots pass through."""
  heads = _heads_for(part_of(slot), num_heads, num_kv_heads)
  if heads is None:
    return w
  return permute_qk(w, heads) if to_gguf else unpermute_qk(w, heads)
