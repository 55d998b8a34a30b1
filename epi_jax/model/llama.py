"""A Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Mistral) in Flax NNX.

Architecture: token embedding -> ``num_layers`` x [RMSNorm -> grouped-query
attention with rotary embeddings -> residual -> RMSNorm -> SwiGLU MLP ->
residual] -> RMSNorm -> LM head (tied to the embedding or separate).
Rotary embeddings use the Hugging Face "rotate half" layout (the GGUF loader
undoes llama.cpp's interleaved Q/K row order).

Logical axis names (``out_sharding`` metadata on every ``nnx.Param``; read
them with ``nnx.get_partition_spec(nnx.state(model, nnx.Param))`` and map them
to mesh axes with the trainer's rules):

=========================  =========================  ===================
parameter                  shape                      logical axes
=========================  =========================  ===================
``embed.embedding``        [vocab, hidden]            ('vocab', 'embed')
``layers[i].attn.q.kernel``  [hidden, heads*head_dim]  ('embed', 'heads')
``layers[i].attn.k/v.kernel`` [hidden, kv*head_dim]    ('embed', 'kv_heads')
``layers[i].attn.o.kernel``  [heads*head_dim, hidden]  ('heads', 'embed')
``layers[i].attn.q.bias``    [heads*head_dim]          ('heads',)
``layers[i].attn.k/v.bias``  [kv*head_dim]             ('kv_heads',)
``layers[i].mlp.gate/up.kernel`` [hidden, mlp]          ('embed', 'mlp')
``layers[i].mlp.down.kernel``    [mlp, hidden]          ('mlp', 'embed')
``*norm.scale``              [hidden]                  ('norm',)
``lm_head.kernel`` (untied)  [hidden, vocab]           ('embed', 'vocab')
=========================  =========================  ===================

Every kernel is 2-D ``[in, out]``. By default the layers are a list, so each
weight matrix of each layer is exactly one pytree leaf (``layers/3/attn/q/kernel``).
With ``ModelConfig.scan_layers`` the blocks are one stacked Block: every
``layers/...`` param has a leading ``layers`` logical axis of size
``num_layers`` (``layers/attn/q/kernel`` is ``[L, hidden, heads*head_dim]``
with axes ``('layers', 'embed', 'heads')``) and the blocks run in a
``jax.lax.scan`` (remat per block when ``remat``).

Call API: ``model(tokens)`` -> float32 logits ``[B, L, V]``;
``model(tokens, cache=cache)`` -> ``(logits, new_cache)`` (see
:func:`init_cache`). ``segment_ids`` (int32 ``[B, L]``, 0 = padding) restrict
attention to earlier tokens of the same segment, for packed sequences.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta as flax_meta

from epi_jax import sharding
from epi_jax.model.attention import attention, target_mesh
from epi_jax.model.config import ModelConfig, _rope_type

def _batch_sharded(x, last: str | None = None):
  """``x`` with its rows kept over the batch axes of the mesh the step is traced
  for (and its last dimension over ``last``): :func:`epi_jax.sharding.constrain_activation`."""
  return sharding.constrain_activation(x, target_mesh(), last)


def _param(value, axes: tuple[str, ...]) -> nnx.Param:
  """A Param annotated with logical ``axes``.

  Flax shards annotated params eagerly when created under a mesh context
  (``jax.set_mesh`` plus logical axis rules); without a mesh the names are
  pure metadata for the trainer.
  """
  eager = nnx.using_eager_sharding() and flax_meta.get_global_mesh() is not None
  return nnx.Param(value, out_sharding=axes, eager_sharding=eager)


class Dense(nnx.Module):
  """``y = x @ kernel (+ bias)`` with a 2-D ``[in, out]`` kernel."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str, str],
               *, use_bias: bool = False, param_dtype=jnp.float32,
               dtype=None, rngs: nnx.Rngs):
    init = nnx.initializers.normal(stddev=1.0 / math.sqrt(in_features))
    self.kernel = _param(init(rngs.params(), (in_features, out_features),
                              param_dtype), axes)
    self.bias = (_param(jnp.zeros((out_features,), param_dtype), (axes[1],))
                 if use_bias else None)
    self.dtype = dtype or param_dtype

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table ``[vocab, hidden]``; ``attend`` is the tied LM head."""

  def __init__(self, vocab_size: int, features: int, *, param_dtype=jnp.float32,
               dtype=None, rngs: nnx.Rngs):
    init = nnx.initializers.normal(stddev=0.02)
    self.embedding = _param(init(rngs.params(), (vocab_size, features),
                                 param_dtype), ("vocab", "embed"))
    self.dtype = dtype or param_dtype

  def __call__(self, tokens):
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x):
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale``, normalized in float32 (as Hugging Face does)."""

  def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32,
               dtype=None):
    self.scale = _param(jnp.ones((features,), param_dtype), ("norm",))
    self.eps = eps
    self.dtype = dtype or param_dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


def rope_frequencies(config: ModelConfig) -> jax.Array:
  """Inverse frequencies ``[head_dim // 2]`` including rope scaling."""
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  scaling = config.rope_scaling
  if not scaling:
    return inv
  kind = _rope_type(scaling)
  if kind == "linear":
    return inv / scaling["factor"]
  if kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    out = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(medium, smoothed, out)
  return inv


def apply_rope(x, positions, inv_freq):
  """Rotates ``x [B, L, H, D]`` by ``positions [B, L]`` (rotate-half layout)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values of all layers for ``size`` slots, filled up to ``end``.

  Attributes:
    k, v: per-layer lists of ``[B, size, num_kv_heads, head_dim]``, or with
      ``scan_layers`` one stacked ``[num_layers, B, size, num_kv_heads, head_dim]``.
    segment_ids: ``[B, size]`` segment of each filled slot (0 = empty/padding).
    end: int32 scalar, number of slots written so far (same for all rows).
  """
  k: list[jax.Array] | jax.Array
  v: list[jax.Array] | jax.Array
  segment_ids: jax.Array
  end: jax.Array

  @property
  def size(self) -> int:
    return self.segment_ids.shape[1]

  def repeat_rows(self, n: int) -> "KVCache":
    """Each row ``n`` times in a row (``n`` continuations of one prefix); the
    rows are axis 1 of the stacked ``scan_layers`` layout, axis 0 per layer."""
    if isinstance(self.k, jax.Array):
      kv = [jnp.repeat(x, n, axis=1) for x in (self.k, self.v)]
    else:
      kv = [[jnp.repeat(x, n, axis=0) for x in layers] for layers in (self.k, self.v)]
    return KVCache(k=kv[0], v=kv[1], segment_ids=jnp.repeat(self.segment_ids, n, axis=0),
                   end=self.end)


def init_cache(config: ModelConfig, batch_size: int, size: int,
               dtype=None) -> KVCache:
  """An empty :class:`KVCache` of ``size`` slots (compute dtype by default)."""
  dtype = dtype or config.compute_dtype
  shape = (batch_size, size, config.num_kv_heads, config.head_dim)
  if config.scan_layers:
    stacked = jnp.zeros((config.num_layers, *shape), dtype)
    return KVCache(k=stacked, v=stacked, segment_ids=jnp.zeros((batch_size, size), jnp.int32),
                   end=jnp.zeros((), jnp.int32))
  zeros = lambda: jnp.zeros(shape, dtype)
  return KVCache(k=[zeros() for _ in range(config.num_layers)],
                 v=[zeros() for _ in range(config.num_layers)],
                 segment_ids=jnp.zeros((batch_size, size), jnp.int32),
                 end=jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    kw = dict(param_dtype=c.param_dtype, dtype=c.compute_dtype, rngs=rngs)
    self.q = Dense(c.hidden_size, c.num_heads * c.head_dim, ("embed", "heads"),
                   use_bias=c.attention_bias, **kw)
    self.k = Dense(c.hidden_size, c.num_kv_heads * c.head_dim,
                   ("embed", "kv_heads"), use_bias=c.attention_bias, **kw)
    self.v = Dense(c.hidden_size, c.num_kv_heads * c.head_dim,
                   ("embed", "kv_heads"), use_bias=c.attention_bias, **kw)
    self.o = Dense(c.num_heads * c.head_dim, c.hidden_size, ("heads", "embed"), **kw)
    self.num_heads, self.num_kv_heads = c.num_heads, c.num_kv_heads
    self.head_dim = c.head_dim
    self.implementation = c.attention

  def __call__(self, x, positions, segment_ids, inv_freq, layer_cache=None,
               packed=True):
    b, l, _ = x.shape
    q = self.q(x).reshape(b, l, self.num_heads, self.head_dim)
    k = self.k(x).reshape(b, l, self.num_kv_heads, self.head_dim)
    v = self.v(x).reshape(b, l, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    new_kv = None
    if layer_cache is None:
      out = attention(q, k, v, q_segment_ids=segment_ids,
                      implementation=self.implementation, packed=packed)
    else:
      ck, cv, k_seg, end = layer_cache
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, end, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, end, 0, 0))
      new_kv = (k, v)
      out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=k_seg,
                      q_offset=end, implementation=self.implementation)
    out = self.o(out.reshape(b, l, self.num_heads * self.head_dim))
    return out, new_kv


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    kw = dict(param_dtype=c.param_dtype, dtype=c.compute_dtype, rngs=rngs)
    self.gate = Dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
    self.up = Dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
    self.down = Dense(c.intermediate_size, c.hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, x):
    hidden = jax.nn.silu(self.gate(x)) * self.up(x)
    return self.down(_batch_sharded(hidden, "tensor"))


class Block(nnx.Module):
  """One pre-norm transformer block."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    nkw = dict(param_dtype=c.param_dtype, dtype=c.compute_dtype)
    self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **nkw)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **nkw)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, segment_ids, inv_freq, layer_cache=None,
               packed=True):
    h, new_kv = self.attn(self.attn_norm(x), positions, segment_ids, inv_freq,
                          layer_cache, packed)
    x = _batch_sharded(x + h)
    x = _batch_sharded(x + self.mlp(self.mlp_norm(x)))
    return x, new_kv


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
  """``num_layers`` Blocks as one Block whose params have a leading ``layers`` axis."""
  @nnx.split_rngs(splits=config.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return Block(config, rngs=rngs)
  return make(rngs)


class Llama(nnx.Module):
  """Decoder-only Llama-family language model (see the module docstring)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embed = Embed(c.vocab_size, c.hidden_size, param_dtype=c.param_dtype,
                       dtype=c.compute_dtype, rngs=rngs)
    if c.scan_layers:
      self.layers = _stacked_blocks(c, rngs)
    else:
      self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=c.param_dtype,
                        dtype=c.compute_dtype)
    self.lm_head = (None if c.tie_embeddings else
                    Dense(c.hidden_size, c.vocab_size, ("embed", "vocab"),
                          param_dtype=c.param_dtype, dtype=c.compute_dtype,
                          rngs=rngs))

  def __call__(self, tokens, *, positions=None, segment_ids=None,
               cache: KVCache | None = None, packed: bool = True):
    """Runs the decoder.

    Args:
      tokens: int32 ``[B, L]``.
      positions: int32 ``[B, L]`` rotary positions; default ``arange(L)``
        (offset by ``cache.end`` when a cache is given). Packed sequences
        should restart positions at 0 for each segment.
      segment_ids: int32 ``[B, L]``; 0 marks padding. Tokens attend only to
        earlier tokens with the same segment id. Default: all ones.
      cache: optional :class:`KVCache`; the new keys/values are written at
        slots ``[cache.end, cache.end + L)``.
      packed: rows may hold several segments (``False`` lets
        ``attention='cudnn'`` use its fused kernel; see ``epi_jax.model.attention``).

    Returns:
      float32 logits ``[B, L, vocab]``, or ``(logits, new_cache)`` when
      ``cache`` is given.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    b, l = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, l), jnp.int32)
    if positions is None:
      start = 0 if cache is None else cache.end
      positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32) + start, (b, l))
    inv_freq = rope_frequencies(self.config)
    x = _batch_sharded(self.embed(tokens))
    if cache is None:
      x = self._run_blocks(x, positions, segment_ids, inv_freq, packed)
      new_cache = None
    else:
      seg = jax.lax.dynamic_update_slice(cache.segment_ids,
                                         segment_ids.astype(jnp.int32),
                                         (0, cache.end))
      x, ks, vs = self._run_blocks_cached(x, positions, segment_ids, inv_freq,
                                          cache, seg)
      new_cache = KVCache(k=ks, v=vs, segment_ids=seg, end=cache.end + l)
    x = self.norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    logits = _batch_sharded(logits.astype(jnp.float32), "tensor")
    return logits if cache is None else (logits, new_cache)

  def _run_blocks(self, x, positions, segment_ids, inv_freq, packed):
    if not self.config.scan_layers:
      def forward(block, x, positions, segment_ids, inv_freq):
        return block(x, positions, segment_ids, inv_freq, None, packed)[0]
      if self.config.remat:
        forward = nnx.remat(forward)
      for block in self.layers:
        x = forward(block, x, positions, segment_ids, inv_freq)
      return x
    graphdef, stacked = nnx.split(self.layers)

    def body(x, layer_state):
      block = nnx.merge(graphdef, layer_state)
      return block(x, positions, segment_ids, inv_freq, None, packed)[0], None

    if self.config.remat:  # per block, as MaxText: only the carry is saved
      body = jax.checkpoint(body, prevent_cse=False)
    return jax.lax.scan(body, x, stacked)[0]

  def _run_blocks_cached(self, x, positions, segment_ids, inv_freq, cache, seg):
    if not self.config.scan_layers:
      ks, vs = [], []
      for i, block in enumerate(self.layers):
        x, (k, v) = block(x, positions, segment_ids, inv_freq,
                          (cache.k[i], cache.v[i], seg, cache.end))
        ks.append(k)
        vs.append(v)
      return x, ks, vs
    graphdef, stacked = nnx.split(self.layers)

    def body(x, xs):
      layer_state, ck, cv = xs
      block = nnx.merge(graphdef, layer_state)
      x, kv = block(x, positions, segment_ids, inv_freq, (ck, cv, seg, cache.end))
      return x, kv

    x, (ks, vs) = jax.lax.scan(body, x, (stacked, cache.k, cache.v))
    return x, ks, vs


def param_count(config: ModelConfig) -> int:
  """Number of parameters, computed from the abstract shapes (no allocation)."""
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  return int(sum(math.prod(leaf.shape) for leaf in leaves))
