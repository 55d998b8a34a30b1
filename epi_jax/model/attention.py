"""Causal grouped-query attention with segment ids, one function, several kernels.

:func:`attention` computes ``softmax(q k^T / sqrt(d)) v`` where a query at
slot ``i`` sees the keys at slots ``j <= i + q_offset`` with the same non-zero
segment id (0 = padding), for ``q [B, Lq, H, D]`` and ``k, v [B, Lk, K, D]``
(``K`` divides ``H``: grouped-query attention). Implementations
(``ModelConfig.attention``):

* ``"einsum"``: two einsums and a masked float32 softmax (the reference).
* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``.
* ``"cudnn"``: cuDNN flash attention on GPU (``implementation="cudnn"``):
  causal, padding by sequence lengths (rows right-padded, as the data
  pipeline makes them). It cannot express several segments per row, so
  packed rows (``packed=True``) fall back to ``"xla"`` with a one-line notice.
* ``"splash"``: the Pallas TPU splash attention kernel with segment ids
  (``jax.experimental.pallas.ops.tpu.splash_attention``): the Mosaic kernel
  (a ``tpu_custom_call`` in the compiled program) when the target devices
  are TPUs, Pallas interpret mode otherwise (slow: tests only). XLA cannot
  partition a Pallas call, so on a multi-device mesh the kernel runs under a
  ``shard_map`` over the batch axes (``data``, ``fsdp``) and the heads
  (``tensor``, where the query and kv heads divide it), one kernel per shard.
* ``"auto"``: by platform: ``splash`` on TPU, ``cudnn`` on GPU,
  :data:`CPU_DEFAULT` on CPU.

The platform is that of the *target* devices: the mesh that the train step
is compiled for (:func:`on_mesh`, set by ``training.step`` while it traces),
not ``jax.default_backend()``: a step compiled on a CPU host for a TPU
topology (``epi-jax plan``) must hold the TPU kernels. Without a mesh in
context the default backend decides.

Rows that are all padding: ``einsum``/``xla`` give a uniform average of the
values, ``splash`` attends padding to earlier padding; either way the loss
masks them out. Decoding with a KV cache (``q_offset > 0`` or ``Lq != Lk``)
always takes the ``xla`` path (the fused kernels are for full sequences).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "einsum", "cudnn", "splash")
# benchmarks/attention.py (forward + backward, SmolLM2-135M heads, medians of
# interleaved runs on a shared 2-core CPU): "xla" took 0.92x the time of
# "einsum" at seq 512 and 0.91x at seq 192: a small but consistent edge.
CPU_DEFAULT = "xla"

# Large finite negative: rows whose every key is masked (padding queries) get a
# uniform softmax instead of NaNs.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


_TARGET = threading.local()


@contextlib.contextmanager
def on_mesh(mesh):
  """Within: attention is traced for ``mesh`` (its devices' platform, its axes)."""
  previous = getattr(_TARGET, "mesh", None)
  _TARGET.mesh = mesh
  try:
    yield mesh
  finally:
    _TARGET.mesh = previous


def target_mesh():
  """The mesh set by :func:`on_mesh`, or None."""
  return getattr(_TARGET, "mesh", None)


def platform(mesh=None) -> str:
  """``'tpu'``, ``'gpu'`` or ``'cpu'``: of ``mesh``'s (or :func:`on_mesh`'s) devices,
  else ``jax.default_backend()``."""
  mesh = mesh if mesh is not None else target_mesh()
  devices = getattr(mesh, "devices", None)
  if devices is not None and devices.size:
    return devices.flat[0].platform
  return jax.default_backend()


def resolve(implementation: str, backend: str | None = None) -> str:
  """The concrete implementation of ``implementation`` on ``backend`` (default:
  :func:`platform`)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of "
                     f"{IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  backend = backend or platform()
  return {"tpu": "splash", "gpu": "cudnn"}.get(backend, CPU_DEFAULT)


@functools.lru_cache(maxsize=None)
def _notice(message: str) -> None:
  print(f"[epi_jax] {message}", file=sys.stderr)


def _mask(q_segment_ids, kv_segment_ids, q_offset):
  """``[B, Lq, Lk]``: causal by slot, same non-zero segment."""
  q_idx = jnp.arange(q_segment_ids.shape[1]) + q_offset
  k_idx = jnp.arange(kv_segment_ids.shape[1])
  mask = k_idx[None, None, :] <= q_idx[None, :, None]
  mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask & (kv_segment_ids[:, None, :] != 0)


def _einsum(q, k, v, mask):
  b, l, h, d = q.shape
  kh = k.shape[2]
  q = q.reshape(b, l, kh, h // kh, d)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k.astype(q.dtype),
                      preferred_element_type=jnp.float32) / math.sqrt(d)
  scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(b, l, h, d)


def _xla(q, k, v, mask):
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


def _cudnn(q, k, v, segment_ids, *, mesh=None):
  lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  sharded = _qkv_sharding(mesh, q, k)
  if sharded is not None:  # cuDNN's partitioner needs q, k and v sharded alike
    on, qkv = sharded
    q, k, v = (jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(on, qkv))
               for x in (q, k, v))
  return jax.nn.dot_product_attention(
      q, k, v, is_causal=True, query_seq_lengths=lengths,
      key_value_seq_lengths=lengths, implementation="cudnn")


def _splash_local(q, k, v, segment_ids, *, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk, splash_attention_mask as sm)
  b, l, h, d = q.shape
  block = min(512, l)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block,
                        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.CausalMask((l, l)) for _ in range(h)])
  kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # [B, L, H, D] -> [B, H, L, D]
  qh = to_heads(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype))
  kh, vh = to_heads(k.astype(q.dtype)), to_heads(v.astype(q.dtype))
  seg = sk.SegmentIds(q=segment_ids, kv=segment_ids)
  out = jax.vmap(kernel)(qh, kh, vh, seg)
  return to_heads(out)


def _qkv_sharding(mesh, q, k):
  """``(mesh, spec)`` of ``[B, L, H, D]`` q, k and v on a multi-device ``mesh``:
  the batch over its batch axes and, where the heads divide it, the heads over
  ``tensor``; None on one device or when neither divides."""
  if mesh is None or mesh.size == 1:
    return None
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from epi_jax import sharding  # pylint: disable=g-import-not-at-top
  context = jax.sharding.get_abstract_mesh()  # inside auto_axes: its Auto view
  on = mesh if context.empty else context
  names = sharding.axis_sizes(mesh)
  batch = sharding.batch_axes_dividing(q.shape[0], names)
  t = names.get("tensor", 1)
  heads = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
  return None if batch is None and heads is None else (on, P(batch, None, heads, None))


def _splash(q, k, v, segment_ids, *, interpret: bool, mesh=None):
  """Splash attention; on a multi-device ``mesh`` one kernel per shard (shard_map)
  over the batch axes and, where the heads divide it, the ``tensor`` axis."""
  local = functools.partial(_splash_local, interpret=interpret)
  sharded = _qkv_sharding(mesh, q, k)
  if sharded is None:
    return local(q, k, v, segment_ids)
  on, qkv = sharded
  return jax.shard_map(local, mesh=on, in_specs=(qkv, qkv, qkv, jax.sharding.PartitionSpec(
      qkv[0], None)), out_specs=qkv, check_vma=False)(q, k, v, segment_ids)


def attention(q, k, v, *, q_segment_ids, kv_segment_ids=None, q_offset=0,
              implementation: str = "auto", packed: bool = True):
  """Causal attention with segment ids (see the module docstring).

  Args:
    q: ``[B, Lq, H, D]``.
    k, v: ``[B, Lk, K, D]``.
    q_segment_ids: int ``[B, Lq]``, 0 = padding.
    kv_segment_ids: int ``[B, Lk]``; default ``q_segment_ids``.
    q_offset: slot of the first query (a KV cache's fill level).
    implementation: one of :data:`IMPLEMENTATIONS`.
    packed: rows may hold several segments (only ``cudnn`` cares).

  Returns:
    ``[B, Lq, H, D]`` in ``q``'s dtype.
  """
  impl = resolve(implementation)
  decoding = kv_segment_ids is not None or not isinstance(q_offset, int) or q_offset
  if kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  if decoding and impl in ("cudnn", "splash"):
    impl = "xla"
  if impl == "cudnn" and packed:
    _notice("attention='cudnn' cannot mask packed segments; using 'xla' for packed rows")
    impl = "xla"
  target = platform()
  if impl == "cudnn":
    if target != "gpu":
      raise ValueError("attention='cudnn' needs a GPU backend; use 'auto' or 'xla'")
    return _cudnn(q, k, v, q_segment_ids, mesh=target_mesh())
  if impl == "splash":
    return _splash(q, k, v, q_segment_ids, interpret=target != "tpu", mesh=target_mesh())
  mask = _mask(q_segment_ids, kv_segment_ids, q_offset)
  return (_xla if impl == "xla" else _einsum)(q, k, v, mask)
