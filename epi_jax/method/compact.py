"""Compact EPI state: bit-packed masks and a bf16 importance EMA.

Packed masks hold 8 mask entries per ``uint8`` along the *second-to-last*
axis (8 rows per byte): a ``(..., m, n)`` leaf is stored as
``(..., ceil(m / 8), n)``, bit ``j`` of byte ``[i, c]`` being entry
``[8 i + j, c]``; padding bits are 0. The last (minor) axis keeps its width,
so the packed mask has the parameter's layout on a TPU (its 128-wide lane
axis: unpacking is a broadcast along rows, not a transpose), and the
parameter's sharding on every axis but the packed one, which still splits
where its bytes do (``fit_spec``). A vector ``(n,)`` packs its only axis
into ``(ceil(n / 8),)``; scalars are stored as ``(1,)``.

Checkpoints written before this layout packed the last axis
(``(..., ceil(n / 8))``); :func:`unpack_last_axis` reads those.

The bf16 EMA is updated in float32 and rounded back to bf16 *stochastically*:
a round-to-nearest bf16 EMA (8 significant bits) would drop every increment
below 2**-9 of the current value, e.g. most of the ``(1 - beta) s`` term at
``beta = 0.99`` once the EMA has grown. Stochastic rounding keeps the stored
value unbiased. Its random bits are a hash of (element index, step count,
leaf number), so they are deterministic, need no RNG state, and are computed
elementwise from ``iota`` (no communication on sharded leaves).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from epi_jax.method import selection

BITS = 8  # mask entries per stored byte


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the packed mask of a leaf of ``shape``."""
  if not shape:
    return (1,)
  if len(shape) == 1:
    return (-(-shape[-1] // BITS),)
  return tuple(shape[:-2]) + (-(-shape[-2] // BITS), shape[-1])


def explicit_mesh():
  """The context's abstract mesh when it has Explicit axes, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or not mesh.explicit_axes else mesh


def fit_spec(spec, shape, mesh) -> P:
  """``spec`` on the dimensions of ``shape`` that its mesh axes still divide
  (a packed mask keeps its parameter's spec where the bytes still split)."""
  dims = list(spec) + [None] * (len(shape) - len(spec))
  size = lambda a: math.prod(mesh.shape[x] for x in ((a,) if isinstance(a, str) else a))
  return P(*[a if a is not None and d % size(a) == 0 else None for a, d in zip(dims, shape)])


def _on_auto_axes(fn, x, out_shape, out_spec=None):
  """``fn(x)``; under Explicit mesh axes, run with them Auto and the result
  sharded as ``out_spec`` (default: ``x``'s spec where it divides
  ``out_shape``). Packing reshapes the packed axis, which Explicit sharding
  types reject for a sharded axis; the bytes of a shard are its own either way.
  """
  mesh = explicit_mesh()
  if mesh is None:
    return fn(x)
  if out_spec is None:
    out_spec = fit_spec(jax.typeof(x).sharding.spec, out_shape, mesh)
  return jax.sharding.auto_axes(fn, out_sharding=out_spec)(x)


def pack(mask: jax.Array) -> jax.Array:
  """Bool mask ``(..., m, n)`` -> uint8 ``(..., ceil(m/8), n)``, little-endian bits."""
  return _on_auto_axes(_pack, mask, packed_shape(mask.shape))


def _pack(mask: jax.Array) -> jax.Array:
  if mask.ndim == 0:
    mask = mask[None]
  axis = -1 if mask.ndim == 1 else -2
  n = mask.shape[axis]
  pad = (-n) % BITS
  if pad:
    widths = [(0, 0)] * mask.ndim
    widths[axis] = (0, pad)
    mask = jnp.pad(mask, widths)
  if axis == -1:
    m = mask.reshape((-1, BITS)).astype(jnp.uint8)
    weights = jnp.left_shift(jnp.uint8(1), jnp.arange(BITS, dtype=jnp.uint8))
    return jnp.sum(m * weights, axis=-1, dtype=jnp.uint8)
  m = mask.reshape(mask.shape[:-2] + (-1, BITS, mask.shape[-1])).astype(jnp.uint8)
  weights = jnp.left_shift(jnp.uint8(1), jnp.arange(BITS, dtype=jnp.uint8))[:, None]
  # Distinct bits: the sum is an OR, and stays below 256.
  return jnp.sum(m * weights, axis=-2, dtype=jnp.uint8)


def unpack(packed: jax.Array, shape: tuple[int, ...], out_spec=None) -> jax.Array:
  """uint8 ``(..., ceil(m/8), n)`` -> bool mask of ``shape`` (inverse of ``pack``).

  ``out_spec``: under Explicit mesh axes, the result's PartitionSpec (default:
  the packed mask's, where it divides ``shape``)."""
  return _on_auto_axes(lambda p: _unpack(p, shape), packed, shape, out_spec)


def _unpack(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if len(shape) <= 1:  # a vector packs its only (last) axis
    return unpack_last_axis(packed, shape)
  shifts = jnp.arange(BITS, dtype=jnp.uint8)
  bits = jnp.right_shift(packed[..., None, :], shifts[:, None]) & jnp.uint8(1)
  rows = bits.reshape(packed.shape[:-2] + (packed.shape[-2] * BITS, packed.shape[-1]))
  if rows.shape[-2] != shape[-2]:
    rows = rows[..., :shape[-2], :]
  return rows.astype(jnp.bool_)


def unpack_last_axis(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Bool mask of ``shape`` from the earlier layout, 8 entries per byte along
  the last axis (``(..., ceil(n / 8))``, bit ``j`` of byte ``i`` = entry
  ``8 i + j``): the packed masks of older checkpoints."""
  shifts = jnp.arange(BITS, dtype=jnp.uint8)
  bits = jnp.right_shift(packed[..., None], shifts) & jnp.uint8(1)
  flat = bits.reshape(packed.shape[:-1] + (packed.shape[-1] * BITS,))
  n = shape[-1] if shape else 1
  return flat[..., :n].reshape(shape).astype(jnp.bool_)


def legacy_packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of a leaf's packed mask in the earlier, last-axis layout."""
  return (1,) if not shape else tuple(shape[:-1]) + (-(-shape[-1] // BITS),)


def popcount(packed: jax.Array) -> jax.Array:
  """Number of set bits of a packed mask (int32 scalar; < 2**31 per leaf)."""
  # As 32-bit words: 4x fewer elements to reduce (see selection.count_true).
  if packed.shape[-1] % selection.WORD_AXIS_MULTIPLE == 0:
    packed = jax.lax.bitcast_convert_type(
        packed.reshape(packed.shape[:-1] + (packed.shape[-1] // 4, 4)), jnp.uint32)
  return jnp.sum(jax.lax.population_count(packed), dtype=jnp.int32)


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finalizer: a cheap, well-mixed integer hash."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _flat_index(shape: tuple[int, ...], skip_axis: int | None = None,
                zero: jax.Array | None = None) -> jax.Array:
  """Row-major element index (uint32, wrapping) built from per-axis iotas.

  With ``skip_axis`` the index is that within each slice along that axis (the
  axis is left out), so every layer of a stacked leaf gets the same indices as
  the same layer stored as a leaf of its own.

  ``zero``: a uint32 scalar 0 that the compiler cannot prove is 0
  (:func:`opaque_zero`), added so that leaves of one shape compute their
  indices apart.
  """
  idx = jnp.zeros(shape, jnp.uint32)
  if zero is not None:
    idx = idx + zero
  stride = 1
  for axis in reversed(range(len(shape))):
    if axis == skip_axis:
      continue
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return idx


def opaque_zero(count: jax.Array, leaf_id: int) -> jax.Array:
  """uint32 0 for a non-negative ``count``, computed so that XLA cannot prove it
  (nor merge it across ``leaf_id`` s).

  Why: leaves of one shape but different shardings (a q kernel ``(embed,
  heads)`` and an o kernel ``(heads, embed)``) would otherwise share one hash of
  their element indices, which XLA computes once and moves between the two
  shardings (a collective of a u32 per parameter at every step, found
  compiling for TPU). Added to each leaf's index, it keeps the values (and so
  the layout invariance) and makes XLA compute them per leaf, where they are
  used. (An ``optimization_barrier`` of a constant is folded away.)
  """
  bound = jnp.int32(-1 - leaf_id)
  return (jnp.minimum(count.astype(jnp.int32), bound) - bound).astype(jnp.uint32)


def stochastic_round_bf16(x: jax.Array, count: jax.Array, salt: int = 0,
                          skip_axis: int | None = None, leaf_id: int | None = None) -> jax.Array:
  """float32 -> bfloat16, rounding up with probability = the dropped fraction.

  For finite non-negative ``x`` (importance scores). ``count`` (int32 scalar),
  ``salt`` (a Python int) and the element's index (within its slice along
  ``skip_axis``, see ``_flat_index``) select the random bits. ``leaf_id``
  (the leaf's number) changes no bit: it makes XLA compute them per leaf
  (:func:`opaque_zero`).
  """
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  seed = _fmix32(count.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)
                 + jnp.uint32((salt * 0x632BE5AB) % 2**32))
  zero = None if leaf_id is None else opaque_zero(count, leaf_id)
  noise = _fmix32(_flat_index(x.shape, skip_axis, zero) ^ seed) >> 16
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
  rounded = jnp.where(jnp.isfinite(x), rounded, bits)  # inf/NaN: plain cast
  # Finite values have 16 low zero bits here: the cast to bf16 is exact.
  return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def num_bytes(tree) -> int:
  """Total bytes of the arrays in a pytree."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def dequantize_with_tiebreak(imp: jax.Array, salt: int = 0,
                             skip_axis: int | None = None) -> jax.Array:
  """bf16 importance -> float32 with the 16 dropped bits filled by a fixed hash.

  Keeps the order of distinct bf16 values and breaks ties inside one bf16
  value pseudo-randomly, so the top-k selection takes exactly k entries
  instead of dropping a whole group of equal values at the threshold.
  """
  bits = jax.lax.bitcast_convert_type(imp.astype(jnp.float32), jnp.uint32)
  low = _fmix32(_flat_index(imp.shape, skip_axis)
                ^ jnp.uint32((salt * 0x27D4EB2F + 1) % 2**32)) >> 16
  filled = jax.lax.bitcast_convert_type(bits | low, jnp.float32)
  return jnp.where(jnp.isfinite(filled) & (imp > 0), filled, imp.astype(jnp.float32))
