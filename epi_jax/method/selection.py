"""Global top-k selection over a pytree of scores, by counting instead of sorting.

Sorting or ``top_k`` over every score of a model needs all scores in one
array; on a sharded model that is an all-gather of every score onto every
device. Here the k-th largest score is found by a k-ary search on the float
bit patterns: each pass compares every score against ``2**bits_per_pass - 1``
candidate thresholds and only reduces *counts* across leaves (and across
devices: an all-reduce of a few integers). Scores are non-negative floats, and
for those the int32 bit pattern orders like the value, so the search is over
integers and the result is exact.

Cost: ``ceil(31 / bits_per_pass)`` passes over the scores (31 at the 1 bit per
pass that ``isolation`` uses, measured fastest on CPU), each reading every
score once.

Counts can exceed int32 on billion-parameter models. They are carried as two
int32 digits of base 2**16 (``Count``), exact up to ~2**46 entries.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_BASE_BITS = 16
_BASE = 1 << _BASE_BITS
# Largest finite non-negative float32 bit pattern + 1 (+inf maps here; NaN above).
_INF_BITS = 0x7F800000
NEVER = _INF_BITS + 1  # a threshold above every score's bits: selects nothing
# Last-axis sizes counted as 32-bit words (see count_true): 4 x 8 shards.
WORD_AXIS_MULTIPLE = 32


class Count(NamedTuple):
  """A non-negative integer as ``hi * 2**16 + lo`` (both int32, broadcastable)."""
  hi: jax.Array
  lo: jax.Array


def split_count(n: jax.Array) -> Count:
  n = n.astype(jnp.int32)
  return Count(n >> _BASE_BITS, n & (_BASE - 1))


def add_counts(a: Count, b: Count) -> Count:
  lo = a.lo + b.lo
  return Count(a.hi + b.hi + (lo >> _BASE_BITS), lo & (_BASE - 1))


def count_leq(a: Count, b: Count) -> jax.Array:
  return (a.hi < b.hi) | ((a.hi == b.hi) & (a.lo <= b.lo))


def count_from_int(n: int) -> Count:
  """A static Python integer as a ``Count`` (exact for any size)."""
  return Count(jnp.int32(n >> _BASE_BITS), jnp.int32(n & (_BASE - 1)))


def count_to_float(c: Count) -> jax.Array:
  return c.hi.astype(jnp.float32) * _BASE + c.lo.astype(jnp.float32)


def jaccard(intersection, union):
  """The Jaccard overlap ``|A & B| / |A | B|`` of two sets from the sizes of their
  intersection and union; 1.0 when both sets are empty (``union == 0``).

  The one Jaccard of the package: EPI's refresh statistics (``jaccard_prev``,
  ``jaccard_first``), the trainer's importance drift and the scoring of masks
  count their sets their own way and call this. JAX arrays (a refresh's float32
  counts, traced) give an array, computed without a branch; Python or NumPy
  counts give a Python float.

  Raises:
    ValueError: when given arrays that are not scalars (the sets, not their sizes).
  """
  if np.ndim(intersection) or np.ndim(union):
    raise ValueError("jaccard takes the sizes of the intersection and the union "
                     f"(scalars), got shapes {np.shape(intersection)} and {np.shape(union)}")
  if isinstance(intersection, jax.Array) or isinstance(union, jax.Array):
    return jnp.where(union > 0, intersection / jnp.maximum(union, 1.0), 1.0)
  return 1.0 if union == 0 else intersection / union


def num_selected(ratio, n: int) -> int:
  """k for a concrete ratio: ``floor(p * N)`` the way ``topk_count`` computes it."""
  r = np.float32(np.real(ratio))
  if r >= 1:
    return n
  return int(min(max(np.floor(r * np.float32(n)), 0), n))


def topk_count(ratio: Any, n: int) -> Count:
  """``k = floor(p * N)`` as a ``Count``, one formula for every way p arrives.

  p is rounded to float32 and multiplied by ``float32(N)`` in float32 (round
  to nearest), then floored; ``p >= 1`` gives N exactly. A Python float, a
  NumPy scalar and a traced value (``optax.inject_hyperparams``) thus give the
  same k, so injecting p never changes the masks. The float32 product also
  gives the k a decimal p means: ``0.29 * 100`` is 28.999999999999996 in
  float64 but rounds to 29 in float32. Above 2**24 entries ``float32(N)`` is
  itself rounded: k is then within a relative 2**-23 of ``p * N``.
  """
  if isinstance(ratio, (int, float, np.number)) and not isinstance(ratio, bool):
    return count_from_int(num_selected(ratio, n))
  # real: inject_hyperparams casts hyperparameters to the params' dtype (complex too).
  r = jnp.real(jnp.asarray(ratio)).astype(jnp.float32)
  k = jnp.clip(jnp.floor(r * jnp.float32(n)), 0.0, float(n))
  hi = jnp.floor(k / _BASE)
  every = count_from_int(n)
  return Count(jnp.where(r >= 1, every.hi, hi.astype(jnp.int32)),
                jnp.where(r >= 1, every.lo, (k - hi * _BASE).astype(jnp.int32)))


def score_bits(scores: jax.Array) -> jax.Array:
  """int32 bit patterns of non-negative float scores; NaN/negative sort lowest."""
  s = scores.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(s, jnp.int32)
  return jnp.where((s >= 0) & ~jnp.isnan(s), bits, -1)


def count_true(mask: jax.Array, keep_axis: int | None = None) -> jax.Array:
  """Number of True entries of a bool array (int32; < 2**31 per array).

  With ``keep_axis`` the count is per index along that axis (shape
  ``[mask.shape[keep_axis]]``): the per-slice counts of a stacked leaf, reduced
  shard-locally when that axis is sharded (no gather).

  On CPU, where the last axis is a multiple of 32 (and is not ``keep_axis``),
  the bools are read as 32-bit words (4 bools each, 0 or 1 per byte) and
  popcounted: XLA:CPU reduces those ~3x faster than it sums bools as int32
  (measured, BENCHMARKS.md). Splitting the last axis into words stays
  shard-local while each shard of it holds a multiple of 4 entries: always with
  up to 8 shards on that axis. Elsewhere the bools are summed as they are: the
  TPU compiler has no byte view of a bool array and widens every byte of the
  words to 32 bits first, a parameter-sized temporary per counted leaf
  (BENCHMARKS.md, issue 31). The platform is the one the program is lowered
  for (``lax.platform_dependent``), not the host's.
  """
  axes = None if keep_axis is None else tuple(a for a in range(mask.ndim) if a != keep_axis)

  def plain(mask):
    return jnp.sum(mask, axis=axes, dtype=jnp.int32)

  last = mask.ndim - 1
  if not (mask.ndim and keep_axis != last and mask.shape[-1]
          and mask.shape[-1] % WORD_AXIS_MULTIPLE == 0):
    return plain(mask)

  def words(mask):
    bytes_ = mask.view(jnp.uint8).reshape(mask.shape[:-1] + (mask.shape[-1] // 4, 4))
    values = jax.lax.population_count(jax.lax.bitcast_convert_type(bytes_, jnp.uint32))
    return jnp.sum(values, axis=axes, dtype=jnp.int32)

  return jax.lax.platform_dependent(mask, cpu=words, default=plain)


def leaf_count(mask: jax.Array, axis: int | None = None) -> Count:
  """Set entries of one bool leaf as a ``Count``: a stacked leaf (``axis``)
  counted per slice first, so a leaf may hold 2**31 entries or more."""
  if axis is None:
    return split_count(count_true(mask))
  per_slice = split_count(count_true(mask, keep_axis=axis))
  return Count(jnp.sum(per_slice.hi), jnp.sum(per_slice.lo))


def _in_loop(operands, carry):
  """``operands`` as seen inside a search pass: tied to the loop's carry by an
  optimization barrier, so the elementwise scores computed from them are not
  loop invariants. XLA would otherwise hoist them out of the loop and
  materialize every score (a parameter-sized temporary per leaf); tied, each
  pass is one fused read of its operands."""
  return jax.lax.optimization_barrier((operands, carry))[0]


def count_at_least(bits_leaves: list[jax.Array], thresholds: jax.Array,
                   axes: list[int | None] | None = None) -> Count:
  """For each threshold t (shape [m]), the number of bits >= t over all leaves.

  Counted per leaf (no flattening: that would re-shard, i.e. all-gather, a
  sharded leaf), a stacked leaf (``axes``) per slice."""
  axes = axes or [None] * len(bits_leaves)
  his, los = [], []
  for j in range(thresholds.shape[0]):
    total = count_from_int(0)
    for bits, axis in zip(bits_leaves, axes):
      total = add_counts(total, leaf_count(bits >= thresholds[j], axis))
    his.append(total.hi)
    los.append(total.lo)
  return Count(jnp.stack(his), jnp.stack(los))


def kth_largest_bits(operands, k: Count, bits_per_pass: int = 4, bits_fn=None,
                     axes: list[int | None] | None = None) -> jax.Array:
  """The smallest bit threshold b with ``#{bits >= b} <= k`` (an int32 scalar).

  ``operands``: the leaves' score bits (int32 arrays), or with ``bits_fn`` what
  ``bits_fn(operands)`` computes them from in each pass (fused there, never
  materialized: see ``_in_loop``). ``axes``: each leaf's layer axis (counted
  per slice), or None.

  Selecting ``bits >= b`` then takes exactly k entries when the scores are
  distinct. With ties at the boundary it takes fewer: a group of equal scores
  is selected whole or not at all (never more than k are selected).
  """
  m = (1 << bits_per_pass) - 1
  lo0 = jnp.int32(0)
  hi0 = jnp.int32(_INF_BITS + 1)  # count(bits >= hi0) == 0 <= k.

  def cond(carry):
    lo, hi = carry
    return lo < hi

  def body(carry):
    lo, hi = carry
    ops = _in_loop(operands, carry)
    bits_leaves = bits_fn(ops) if bits_fn is not None else ops
    # Unknown points are lo..hi-1 (count(hi) <= k is known). Split them into
    # m+1 groups and test the last point of each of the first m groups.
    step = (hi - lo + m) // (m + 1)
    j = jnp.arange(1, m + 1, dtype=jnp.int32)
    cand = jnp.minimum(lo + j * step - 1, hi)
    ok = count_leq(count_at_least(bits_leaves, cand, axes), k)
    # First candidate with count <= k; counts only fall as the threshold rises.
    first = jnp.argmax(ok)
    any_ok = jnp.any(ok)
    new_hi = jnp.where(any_ok, cand[first], hi)
    prev = jnp.where(first > 0, cand[jnp.maximum(first - 1, 0)] + 1, lo)
    new_lo = jnp.where(any_ok, prev, cand[-1] + 1)
    return new_lo, new_hi

  lo, _ = jax.lax.while_loop(cond, body, (lo0, hi0))
  return lo


def kth_largest_bits_per_slice(operands, axes: list[int | None], ks: list[Count],
                               bits_fn=None) -> list[jax.Array]:
  """``kth_largest_bits`` for many independent groups at once, by bisection.

  Leaf ``i`` with ``axes[i] = None`` is one group (its threshold is a scalar);
  with an axis, every slice along it is its own group (a threshold per slice,
  shape ``[L]``). ``ks[i]`` is the ``k`` of each group (shaped alike).
  ``operands`` and ``bits_fn`` as in ``kth_largest_bits``. One ``while_loop``
  runs all the searches (a group that has converged stays put), so the result
  is exactly that of one ``kth_largest_bits`` call per group, with one loop in
  the graph instead of one per leaf. Per-slice counts are reduced along the
  other axes only: a sharded layer axis stays sharded.
  """

  def counts(bits, axis, thr):
    if axis is None:
      return split_count(count_true(bits >= thr))
    thr = jnp.expand_dims(thr, [a for a in range(bits.ndim) if a != axis])
    return split_count(count_true(bits >= thr, keep_axis=axis))

  def cond(carry):
    return jnp.any(jnp.stack([jnp.any(lo < hi) for lo, hi in carry]))

  def body(carry):
    ops = _in_loop(operands, carry)
    bits_leaves = bits_fn(ops) if bits_fn is not None else ops
    out = []
    for bits, axis, k, (lo, hi) in zip(bits_leaves, axes, ks, carry):
      cand = jnp.minimum(lo + (hi - lo + 1) // 2 - 1, hi)
      ok = count_leq(counts(bits, axis, cand), k)
      active = lo < hi
      out.append((jnp.where(active & ~ok, cand + 1, lo), jnp.where(active & ok, cand, hi)))
    return out

  init = [(jnp.zeros(k.lo.shape, jnp.int32), jnp.full(k.lo.shape, _INF_BITS + 1, jnp.int32))
          for k in ks]
  return [lo for lo, _ in jax.lax.while_loop(cond, body, init)]
