"""EPI's refresh machinery: importance scores, the cuts a refresh finds, masks.

What ``transforms`` composes into a step: the importance EMA (``ema``), the
values a refresh ranks (``ranked_values``), its per-leaf cuts (``find_cuts``:
normalization factors and top-k thresholds), the masks built from them
(``top_masks``), hysteresis and the refresh's statistics. Functions of lists of
leaves and ``EPIOptions``; the optimizer state lives in ``transforms``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from epi_jax.method import compact, selection
from epi_jax.method.layout import Leaf, can_isolate, eligible_mask
from epi_jax.method.options import EPIOptions


class RefreshStats(NamedTuple):
  """The scalar statistics a refresh writes into ``EPIState``."""
  num_refreshes: chex.Array
  isolated_fraction: chex.Array
  num_flipped: chex.Array
  jaccard_prev: chex.Array
  jaccard_first: chex.Array
  threshold: chex.Array


# ---------------------------------------------------------------------------
# Importance.
# ---------------------------------------------------------------------------

def _score(importance: str, g, p):
  """s(g) in float32; complex entries score by their modulus (|g|^2, |g|)."""
  work = jnp.complex64 if jnp.iscomplexobj(g) else jnp.float32
  g = g.astype(work)
  if importance == "grad_sq":
    return (jnp.real(g * jnp.conj(g)) if work == jnp.complex64 else g * g).astype(jnp.float32)
  if importance == "grad_abs":
    return jnp.abs(g).astype(jnp.float32)
  if p is None:
    raise ValueError(f"importance={importance!r} needs params: pass params to update().")
  return jnp.abs(g * p.astype(jnp.promote_types(work, p.dtype))).astype(jnp.float32)


def all_finite(tree) -> jax.Array:
  """Whether every float leaf of ``tree`` is finite (a device bool; True for none).

  The one finite check of the package: EPI's scores (``scores_finite``), the
  train step's params and a restored checkpoint's. One fused reduction per leaf.
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def scores_finite(importance: str, g_leaves, p_leaves) -> jax.Array:
  """Whether every score s(g) is finite: a non-finite gradient, or a finite
  one whose square overflows (|g| > 1.8e19 in float32), fails.

  Read off the scores' sum: with ``grad_sq`` that is the squared gradient
  norm, ``optax.tree.norm``'s own sum, which a step that also clips or logs
  the norm has already (XLA computes it once for both). A finite sum means
  finite scores (they are >= 0); only a sum that is not has the scores
  themselves checked, recomputed in a ``lax.cond`` by :func:`all_finite` (one
  fused reduction per leaf: no score array is materialized).
  """
  def scores(g_leaves, p_leaves):
    return [_score(importance, g, p) for g, p in zip(g_leaves, p_leaves)]

  def entries_finite(g_leaves, p_leaves):
    return all_finite(scores(g_leaves, p_leaves))

  if importance == "grad_sq":
    total = optax.tree.norm(g_leaves, squared=True)
  else:
    total = sum(jnp.sum(s, dtype=jnp.float32) for s in scores(g_leaves, p_leaves))
  return jax.lax.cond(jnp.isfinite(total), lambda *_: jnp.bool_(True), entries_finite,
                      g_leaves, p_leaves)


def _real_f32(x) -> jax.Array:
  # inject_hyperparams casts hyperparameters to the params' dtype: maybe complex.
  return jnp.real(jnp.asarray(x)).astype(jnp.float32)


def ema(options: EPIOptions, layout: list[Leaf], state, grads, params):
  """The new importance: ``beta I + (1 - beta) s(g)``; unchanged when some
  score is not finite (so I stays finite). With ``displacement`` the kept
  theta_0 (no EMA)."""
  imp_leaves, treedef = jax.tree.flatten(state.importance)
  if options.importance == "displacement":
    return state.importance
  g_leaves = treedef.flatten_up_to(grads)
  p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(imp_leaves)
  decay = _real_f32(options.ema_decay)
  # Int and bool leaves keep their (int or bool) importance: never isolated.
  scored = [i for i, imp in enumerate(imp_leaves) if can_isolate(imp.dtype)]
  finite = scores_finite(options.importance, [g_leaves[i] for i in scored],
                          [p_leaves[i] for i in scored])
  out = list(imp_leaves)
  for i in scored:
    leaf, imp, g, p = layout[i], imp_leaves[i], g_leaves[i], p_leaves[i]
    # Written as optax.scale_by_adam writes nu, so that XLA contracts it the same
    # way: with beta = b2 the two are equal bit for bit (importance="inner_nu").
    new = (1.0 - decay) * _score(options.importance, g, p) + decay * imp.astype(jnp.float32)
    if imp.dtype == jnp.bfloat16:
      new = compact.stochastic_round_bf16(new, state.count, skip_axis=leaf.axis, leaf_id=i)
    out[i] = jnp.where(finite, new.astype(imp.dtype), imp)
  return jax.tree.unflatten(treedef, out)


def ranked_values(options: EPIOptions, importance, params):
  """What the selection ranks: the importance, or with ``displacement`` how far
  each weight moved from theta_0 (CPI-FT's score), read from the params that the
  refresh step sees."""
  if options.importance != "displacement":
    return importance
  if params is None:
    raise ValueError("importance='displacement' needs params: pass params to update().")
  return jax.tree.map(lambda t0, p: jnp.abs(p.astype(t0.dtype) - t0).astype(jnp.float32)
                      if can_isolate(t0.dtype) else t0, importance, params)


def _score_of(leaf: Leaf, ranked) -> jax.Array:
  """float32 scores of a leaf's ranked values, elementwise (fused where used)."""
  if ranked.dtype == jnp.bfloat16:
    # Ties inside one bf16 value broken by a fixed hash of the in-layer index.
    return compact.dequantize_with_tiebreak(ranked, skip_axis=leaf.axis)
  return ranked.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Selection: per-slice normalization, then top-k by counting.
# ---------------------------------------------------------------------------

def layer_scale(normalization: str, leaf: Leaf, score) -> jax.Array:
  """The factor that normalizes a leaf's (or each slice's) scores.

  Scores are multiplied by ``1 / (mean + tiny)`` rather than divided by the
  mean: XLA:CPU's vectorized division is not correctly rounded, so two
  fusions dividing the same values could disagree in the last bit; a product
  is exact everywhere.
  """
  tiny = jnp.finfo(jnp.float32).tiny
  if normalization == "none" or not leaf.any_eligible:
    return leaf.broadcast(jnp.ones((leaf.shape[leaf.axis],) if leaf.axis is not None else (),
                                   jnp.float32))
  reduce = jnp.mean if normalization == "layer_mean" else jnp.max
  return 1.0 / (reduce(score, axis=leaf.reduce_axes, keepdims=leaf.axis is not None) + tiny)


def _bits(leaf: Leaf, ranked, scale) -> jax.Array:
  """Normalized score bits; -1 (never selected) at ineligible slices."""
  bits = selection.score_bits(_score_of(leaf, ranked) * scale)
  elig = eligible_mask(leaf)
  return bits if elig is True else jnp.where(elig, bits, -1)


class Cuts(NamedTuple):
  """What a refresh decides, per leaf (None for a leaf with no eligible
  slice): its normalization factor and its bit threshold, per slice for a
  stacked leaf, shaped to broadcast against the leaf.

  The masks are built from them elementwise, leaf by leaf (``top_masks``).
  """
  scales: list[Optional[jax.Array]]  # float32 [] or [slices] broadcast
  thrs: list[Optional[jax.Array]]    # int32: a scalar (global selection), else like the scales


def no_cuts(options: EPIOptions, layout: list[Leaf]) -> Cuts:
  """The cuts of no refresh: scale 1, threshold NEVER, for every slice (one
  scalar threshold under global selection, as the refresh's)."""
  ones = [layer_scale("none", leaf, None) if leaf.any_eligible else None for leaf in layout]
  never = lambda shape: jnp.full(shape, selection.NEVER, jnp.int32)  # pylint: disable=unnecessary-lambda-assignment
  return Cuts(ones, [None if d is None else never(() if options.selection == "global" else d.shape)
                     for d in ones])


def find_cuts(options: EPIOptions, layout: list[Leaf], ranked: list[jax.Array]):
  """A refresh's cuts and the global threshold (0 under ``selection="layer"``).

  Each leaf (or slice) is normalized by its own reduction. The search then
  counts, in each of its passes, the normalized score bits of every eligible
  leaf, computed in that pass from the importance and the leaf's small scale
  vector (``selection._in_loop``): one fused read of the importance per pass,
  per leaf, and nothing parameter-sized materialized, copied or resharded
  (each leaf is counted where it lives; only counts are reduced across
  devices). The search counts exactly.
  """
  elig = [i for i, leaf in enumerate(layout) if leaf.any_eligible]
  scales = [None] * len(layout)
  for i in elig:
    scales[i] = layer_scale(options.normalization, layout[i], _score_of(layout[i], ranked[i]))
  operands = ([ranked[i] for i in elig], [scales[i] for i in elig])

  def bits_fn(ops):
    return [_bits(layout[i], r, d) for i, r, d in zip(elig, *ops)]

  axes = [layout[i].axis for i in elig]
  never = jnp.int32(selection.NEVER)  # above every score's bits
  thrs = [None] * len(layout)
  if options.selection == "global":
    n = sum(leaf.num_eligible for leaf in layout)
    k = selection.topk_count(options.isolation_ratio, n)
    thr = selection.kth_largest_bits(operands, k, 1, bits_fn=bits_fn, axes=axes)
    # One scalar for every leaf: a per-slice copy of it, broadcast against a
    # sharded leaf, is laid out by the partitioner on its own (TPU: a
    # parameter-sized broadcast and an all-to-all per leaf).
    for i in elig:
      thrs[i] = thr
    threshold = jax.lax.bitcast_convert_type(jnp.maximum(thr, 0), jnp.float32)
  else:  # per-layer top-p: one search per slice, all in one loop
    ks = []
    for i in elig:
      leaf = layout[i]
      k = selection.topk_count(options.isolation_ratio, leaf.slice_size)
      shape = (leaf.shape[leaf.axis],) if leaf.axis is not None else ()
      ks.append(selection.Count(jnp.broadcast_to(k.hi, shape), jnp.broadcast_to(k.lo, shape)))
    found = selection.kth_largest_bits_per_slice(operands, axes, ks, bits_fn=bits_fn)
    for i, t in zip(elig, found):
      leaf = layout[i]
      if not all(leaf.eligible):
        t = jnp.where(jnp.asarray(leaf.eligible), t, never)
      thrs[i] = leaf.broadcast(t)
    threshold = jnp.float32(0.0)
  return Cuts(scales, thrs), threshold


def top_masks(layout: list[Leaf], ranked, scales, thrs) -> list[jax.Array]:
  """Bool top-k masks, elementwise from a refresh's per-leaf ``Cuts``."""
  return [_bits(leaf, r, d) >= t if leaf.any_eligible else jnp.zeros(leaf.shape, jnp.bool_)
          for leaf, r, d, t in zip(layout, ranked, scales, thrs)]


# ---------------------------------------------------------------------------
# Masks: storage, hysteresis, statistics.
# ---------------------------------------------------------------------------

def as_bool(mask, shape, like=None):
  """A stored (bool or packed) mask leaf as bools of ``shape`` (sharded like
  the array ``like`` under Explicit mesh axes, when given)."""
  if mask.dtype != jnp.uint8:
    return mask
  return compact.unpack(mask, shape, None if like is None else jax.typeof(like).sharding.spec)


def store_mask(options: EPIOptions, mask: jax.Array) -> jax.Array:
  return compact.pack(mask) if options.packed_mask else mask


def with_hysteresis(release_after: int, top: list, old_mask: list, old_streak):
  """Bool masks of a refresh from its top-k masks, and the new out-streaks.

  With ``release_after = R > 1`` an isolated entry stays isolated until it has
  been out of the top-k at R consecutive refreshes. ``old_mask`` may be stored
  (packed) masks.
  """
  if release_after == 1:
    return list(top), old_streak
  masks, streaks = [], []
  for t, old, streak in zip(top, old_mask, old_streak):
    old = as_bool(old, t.shape)
    streak = jnp.where(t | ~old, jnp.uint8(0), jnp.minimum(streak, jnp.uint8(254)) + jnp.uint8(1))
    masks.append(t | (old & (streak < release_after)))
    streaks.append(streak)
  return masks, streaks


def _mask_count(layout: list[Leaf], masks) -> selection.Count:
  """Set entries of per-leaf bool masks (fused reductions, a stacked leaf
  counted per slice)."""
  total = selection.count_from_int(0)
  for leaf, m in zip(layout, masks):
    total = selection.add_counts(total, selection.leaf_count(m, leaf.axis))
  return total


def _jaccard(layout, a: list, b: list) -> jax.Array:
  inter = selection.count_to_float(_mask_count(layout, map(jnp.logical_and, a, b)))
  union = selection.count_to_float(_mask_count(layout, map(jnp.logical_or, a, b)))
  return selection.jaccard(inter, union)


def refresh_stats(options: EPIOptions, layout, mask, old_mask, first_mask, old: RefreshStats,
                   threshold) -> RefreshStats:
  """The statistics of a refresh, from per-leaf bool masks (the new, the
  previous and, when tracked, the first one), each count one fused read."""
  n_elig = selection.count_to_float(selection.count_from_int(
      sum(leaf.num_eligible for leaf in layout)))
  first = old.num_refreshes == 0
  return RefreshStats(
      num_refreshes=old.num_refreshes + 1,
      isolated_fraction=(selection.count_to_float(_mask_count(layout, mask))
                         / jnp.maximum(n_elig, 1.0)).astype(jnp.float32),
      num_flipped=selection.count_to_float(
          _mask_count(layout, map(jnp.logical_xor, mask, old_mask))).astype(jnp.float32),
      jaccard_prev=jnp.where(first, 1.0, _jaccard(layout, mask, old_mask)).astype(jnp.float32),
      jaccard_first=(_jaccard(layout, mask, first_mask) if options.track_first_mask
                     else old.jaccard_first).astype(jnp.float32),
      threshold=threshold.astype(jnp.float32))
