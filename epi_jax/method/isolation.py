"""Evolving Parameter Isolation (EPI) as optax gradient transformations.

Two forms share one state and one update (``_update_epi``):

* ``epi_transform``: chain-first. ``optax.chain(epi_transform(...), adamw)``
  zeroes the *gradients* of isolated entries. Cheap and composable, but a
  stateful optimizer after it still moves isolated weights (Adam momentum,
  decoupled weight decay).
* ``isolate(inner, ...)``: a wrapper. Importance comes from the raw
  gradients, ``inner`` runs as usual, and its *final* updates are zeroed at
  isolated entries, so isolated weights are bit-for-bit frozen.

Every option is validated once, by ``EPIOptions``. The semantics (defaults,
the refresh schedule, what each option does) are in ``docs/METHOD.md``.

Stacked layers: with ``layer_axes`` a leaf that holds every layer of a weight
type (``nnx.scan`` / MaxText / Levanter layouts) is treated slice by slice, as
if each layer were a leaf of its own: the same masks, bit for bit, as on the
unstacked model.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from epi_jax.method import compact, selection
from epi_jax.method.layout import Leaf, can_isolate, eligible_mask, leaf_layout, path_str
from epi_jax.method.options import (INNER_NU, EPIOptions, Eligible, LayerAxes, OptionError,
                                    numeric_option, is_refresh_step)


class EPIState(NamedTuple):
  """State of EPI. Per-parameter fields are pytrees shaped like the params.

  Attributes:
    count: number of updates applied so far (int32).
    importance: EMA of the importance score s(g), per parameter (with
      ``importance="displacement"``: the initial params theta_0; with
      ``importance="inner_nu"``: an empty tuple, the importance being the
      inner optimizer's ``nu``, see ``epi_importance``).
    mask: True where the parameter is isolated (frozen), per parameter: a
      bool array shaped like the parameter, or with ``packed_mask=True`` its
      bits packed into uint8 along the last axis (see ``compact``); use
      ``unpacked_mask(state)`` for a bool mask in either case.
    first_mask: the mask of the first refresh (only with
      ``track_first_mask=True``; an empty tuple otherwise). Packed like
      ``mask``.
    num_refreshes: refreshes done so far (int32).
    isolated_fraction: isolated entries / eligible entries (float32).
    num_flipped: entries whose mask changed at the last refresh (float32).
    jaccard_prev: Jaccard overlap of the last mask with the one before it.
    jaccard_first: Jaccard overlap of the last mask with the first mask
      (-1 when not tracked).
    threshold: normalized-score threshold of the last global selection.
    out_streak: with ``release_after > 1``, per isolated parameter the number
      of consecutive refreshes it has been out of the top-k (uint8); an empty
      tuple otherwise.
  """
  count: chex.Array
  importance: optax.Updates
  mask: optax.Updates
  first_mask: Any
  num_refreshes: chex.Array
  isolated_fraction: chex.Array
  num_flipped: chex.Array
  jaccard_prev: chex.Array
  jaccard_first: chex.Array
  threshold: chex.Array
  out_streak: Any = ()


class IsolateState(NamedTuple):
  """State of ``isolate``: EPI's state beside the wrapped optimizer's."""
  epi: EPIState
  inner: optax.OptState


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


def _scores_finite(importance: str, g_leaves, p_leaves) -> jax.Array:
  """Whether every score s(g) is finite: a non-finite gradient, or a finite
  one whose square overflows (|g| > 1.8e19 in float32), fails.

  Read off the scores' sum: with ``grad_sq`` that is the squared gradient
  norm, ``optax.tree.norm``'s own sum, which a step that also clips or logs
  the norm has already (XLA computes it once for both). A finite sum means
  finite scores (they are >= 0); only a sum that is not has the scores
  themselves checked, recomputed in a ``lax.cond``: ``sum(s - s)`` is NaN
  exactly when some score is inf or NaN (XLA does not fold ``x - x`` for
  floats), one fused reduction per leaf (no score array is materialized).
  """
  def scores(g_leaves, p_leaves):
    return [_score(importance, g, p) for g, p in zip(g_leaves, p_leaves)]

  def entries_finite(g_leaves, p_leaves):
    total = sum((jnp.sum(s - s, dtype=jnp.float32) for s in scores(g_leaves, p_leaves)),
                jnp.float32(0.0))
    return jnp.isfinite(total)

  if importance == "grad_sq":
    total = optax.tree.norm(g_leaves, squared=True)
  else:
    total = sum(jnp.sum(s, dtype=jnp.float32) for s in scores(g_leaves, p_leaves))
  return jax.lax.cond(jnp.isfinite(total), lambda *_: jnp.bool_(True), entries_finite,
                      g_leaves, p_leaves)


def _real_f32(x) -> jax.Array:
  # inject_hyperparams casts hyperparameters to the params' dtype: maybe complex.
  return jnp.real(jnp.asarray(x)).astype(jnp.float32)


def _ema(options: EPIOptions, layout: list[Leaf], state: EPIState, grads, params):
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
  finite = _scores_finite(options.importance, [g_leaves[i] for i in scored],
                          [p_leaves[i] for i in scored])
  out = list(imp_leaves)
  for i in scored:
    leaf, imp, g, p = layout[i], imp_leaves[i], g_leaves[i], p_leaves[i]
    # Written as optax.scale_by_adam writes nu, so that XLA contracts it the same
    # way: with beta = b2 the two are equal bit for bit (importance="inner_nu").
    new = (1.0 - decay) * _score(options.importance, g, p) + decay * imp.astype(jnp.float32)
    if imp.dtype == jnp.bfloat16:
      new = compact.stochastic_round_bf16(new, state.count, skip_axis=leaf.axis)
    out[i] = jnp.where(finite, new.astype(imp.dtype), imp)
  return jax.tree.unflatten(treedef, out)


def _ranked(options: EPIOptions, importance, params):
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

def _scale(normalization: str, leaf: Leaf, score) -> jax.Array:
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

  Only these small arrays leave the refresh: the masks are rebuilt from them
  elementwise, leaf by leaf (``_top_masks``).
  """
  scales: list[Optional[jax.Array]]  # float32 [] or [slices] broadcast
  thrs: list[Optional[jax.Array]]    # int32: a scalar (global selection), else like the scales


def _no_cuts(options: EPIOptions, layout: list[Leaf]) -> Cuts:
  """The cuts of no refresh: scale 1, threshold NEVER, for every slice (one
  scalar threshold under global selection, as the refresh's)."""
  ones = [_scale("none", leaf, None) if leaf.any_eligible else None for leaf in layout]
  never = lambda shape: jnp.full(shape, selection.NEVER, jnp.int32)  # pylint: disable=unnecessary-lambda-assignment
  return Cuts(ones, [None if d is None else never(() if options.selection == "global" else d.shape)
                     for d in ones])


def _cuts(options: EPIOptions, layout: list[Leaf], ranked: list[jax.Array]):
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
    scales[i] = _scale(options.normalization, layout[i], _score_of(layout[i], ranked[i]))
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
      ks.append(selection._Count(jnp.broadcast_to(k.hi, shape), jnp.broadcast_to(k.lo, shape)))
    found = selection.kth_largest_bits_per_slice(operands, axes, ks, bits_fn=bits_fn)
    for i, t in zip(elig, found):
      leaf = layout[i]
      if not all(leaf.eligible):
        t = jnp.where(jnp.asarray(leaf.eligible), t, never)
      thrs[i] = leaf.broadcast(t)
    threshold = jnp.float32(0.0)
  return Cuts(scales, thrs), threshold


def _top_masks(layout: list[Leaf], ranked, scales, thrs) -> list[jax.Array]:
  """Bool top-k masks, elementwise from a refresh's per-leaf ``Cuts``."""
  return [_bits(leaf, r, d) >= t if leaf.any_eligible else jnp.zeros(leaf.shape, jnp.bool_)
          for leaf, r, d, t in zip(layout, ranked, scales, thrs)]


def select_mask(importance, options: EPIOptions, params=None) -> tuple[Any, jax.Array]:
  """The bool mask a refresh would choose from ``importance`` (and the global
  threshold): the top-k of the normalized scores. For benchmarks and analysis."""
  layout = leaf_layout(options, importance)
  ranked = jax.tree.leaves(_ranked(options, importance, params))
  cuts, threshold = _cuts(options, layout, ranked)
  masks = _top_masks(layout, ranked, *cuts)
  return jax.tree.unflatten(jax.tree.structure(importance), masks), threshold


# ---------------------------------------------------------------------------
# Masks: storage, hysteresis, statistics.
# ---------------------------------------------------------------------------

def _as_bool(mask, shape, like=None):
  """A stored (bool or packed) mask leaf as bools of ``shape`` (sharded like
  the array ``like`` under Explicit mesh axes, when given)."""
  if mask.dtype != jnp.uint8:
    return mask
  return compact.unpack(mask, shape, None if like is None else jax.typeof(like).sharding.spec)


def _store(options: EPIOptions, mask: jax.Array) -> jax.Array:
  return compact.pack(mask) if options.packed_mask else mask


def _with_hysteresis(release_after: int, top: list, old_mask: list, old_streak):
  """Bool masks of a refresh from its top-k masks, and the new out-streaks.

  With ``release_after = R > 1`` an isolated entry stays isolated until it has
  been out of the top-k at R consecutive refreshes. ``old_mask`` may be stored
  (packed) masks.
  """
  if release_after == 1:
    return list(top), old_streak
  masks, streaks = [], []
  for t, old, streak in zip(top, old_mask, old_streak):
    old = _as_bool(old, t.shape)
    streak = jnp.where(t | ~old, jnp.uint8(0), jnp.minimum(streak, jnp.uint8(254)) + jnp.uint8(1))
    masks.append(t | (old & (streak < release_after)))
    streaks.append(streak)
  return masks, streaks


def _mask_count(layout: list[Leaf], masks) -> selection._Count:
  """Set entries of per-leaf bool masks (fused reductions, a stacked leaf
  counted per slice)."""
  total = selection.count_from_int(0)
  for leaf, m in zip(layout, masks):
    total = selection._add(total, selection.leaf_count(m, leaf.axis))
  return total


def _jaccard(layout, a: list, b: list) -> jax.Array:
  inter = selection.count_to_float(_mask_count(layout, map(jnp.logical_and, a, b)))
  union = selection.count_to_float(_mask_count(layout, map(jnp.logical_or, a, b)))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def _refresh_stats(options: EPIOptions, layout, mask, old_mask, first_mask, old: RefreshStats,
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


# ---------------------------------------------------------------------------
# The update both forms share.
# ---------------------------------------------------------------------------

def _init_epi(options: EPIOptions, params) -> EPIState:
  # No leaves: an empty model, or optax.tree.map_params' placeholder, whose
  # per-parameter fields must come out as tree.maps over it.
  if jax.tree.leaves(params):
    layout = leaf_layout(options, params)
    if options.mode != "none" and not any(leaf.any_eligible for leaf in layout):
      raise ValueError("No parameter is eligible for isolation: check `eligible`.")

  def empty_mask(p):
    return _store(options, jnp.zeros_like(p, dtype=jnp.bool_))

  # tree.map over params: every per-parameter field inherits their sharding.
  # Leaves that can't be isolated (int, bool) keep their own dtype here, which
  # is what marks them ineligible in the layout of the importance.
  if options.importance == INNER_NU:  # read from the inner optimizer's state
    importance = ()
  elif options.importance == "displacement":  # the initial params theta_0, a copy
    importance = jax.tree.map(lambda p: jnp.array(
        p, jnp.complex64 if jnp.iscomplexobj(p) else
        jnp.float32 if can_isolate(p.dtype) else p.dtype, copy=True), params)
  else:
    importance = jax.tree.map(lambda p: jnp.zeros_like(
        p, dtype=options.importance_dtype if can_isolate(p.dtype) else p.dtype), params)
  # Distinct scalars (not one shared array): donated state needs distinct buffers.
  zero = lambda: jnp.zeros([], jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
  return EPIState(
      count=jnp.zeros([], jnp.int32), importance=importance,
      mask=jax.tree.map(empty_mask, params),
      first_mask=jax.tree.map(empty_mask, params) if options.track_first_mask else (),
      num_refreshes=jnp.zeros([], jnp.int32), isolated_fraction=zero(), num_flipped=zero(),
      jaccard_prev=zero(),
      jaccard_first=jnp.full([], 0.0 if options.track_first_mask else -1.0, jnp.float32),
      threshold=zero(),
      out_streak=(jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.uint8), params)
                  if options.release_after > 1 else ()))


def _update_epi(options: EPIOptions, grads, state: EPIState, params, nu=None) -> EPIState:
  """Importance EMA, then (on schedule) a refresh of the mask. With
  ``importance="inner_nu"`` no EMA: the refresh ranks ``nu``, the inner
  optimizer's second moment after this step's update.

  Under a mesh with Explicit axes (``jax.sharding.AxisType.Explicit``, what
  ``jax.make_mesh`` builds by default) the update runs with those axes Auto,
  its outputs sharded exactly as the state it replaces. Explicit sharding
  types would have to match across the refresh's ``lax.cond`` and
  ``while_loop`` carries, where per-slice reductions of sharded leaves meet
  fresh constants; with the axes Auto, the partitioner places them as on an
  Auto mesh (same masks, no gather of per-parameter arrays: tested).
  """
  if compact.explicit_mesh() is None:
    return _update_epi_auto(options, grads, state, params, nu)
  out_sharding = jax.tree.map(lambda x: jax.typeof(x).sharding, state)
  return jax.sharding.auto_axes(
      lambda g, s, p, n: _update_epi_auto(options, g, s, p, n), out_sharding=out_sharding,
  )(grads, state, params, nu)


def _update_epi_auto(options: EPIOptions, grads, state: EPIState, params, nu) -> EPIState:
  """``_update_epi`` on Auto (or no) mesh axes."""
  new_state = state._replace(count=optax.safe_increment(state.count))
  if options.importance == INNER_NU:
    importance = nu
    layout = leaf_layout(options, nu)
  else:
    layout = leaf_layout(options, state.importance)
    importance = _ema(options, layout, state, grads, params)
    new_state = new_state._replace(importance=importance)
  if options.mode == "none":
    return new_state

  step = state.count + 1  # 1-based number of this update
  do_refresh = is_refresh_step(step, options)
  if options.mode == "static":  # also once only if the count wrapped around
    do_refresh = do_refresh & (state.num_refreshes == 0)

  treedef = jax.tree.structure(importance)
  # One materialized tree feeds both the refresh and the masks: a fusion that
  # recomputed the EMA could round differently (FMA) and pick a different mask
  # than the one the refresh counted. (The float32 scores of bf16 values are
  # exact elementwise functions of it, recomputed where they are used.)
  ranked = treedef.flatten_up_to(
      jax.lax.optimization_barrier(_ranked(options, importance, params)))
  old_mask = treedef.flatten_up_to(state.mask)
  old_first = treedef.flatten_up_to(state.first_mask) if options.track_first_mask else None
  old_streak = treedef.flatten_up_to(state.out_streak) if options.release_after > 1 else ()
  old_stats = RefreshStats(state.num_refreshes, state.isolated_fraction, state.num_flipped,
                           state.jaccard_prev, state.jaccard_first, state.threshold)
  shapes = [leaf.shape for leaf in layout]

  # Only small arrays cross the cond: the refresh branch finds the cuts and
  # the statistics of the new mask, every count a fused read of the leaves it
  # counts (no mask or score is materialized in the branch); the mask itself
  # is then rebuilt elementwise outside, leaf by leaf, fused with the update
  # that it masks. Big arrays returned through a cond's branches cost copies
  # on every step.
  def refresh(operands):
    ranked, old_mask, old_first, old_streak = operands
    cuts, threshold = _cuts(options, layout, ranked)
    old = [_as_bool(m, s) for m, s in zip(old_mask, shapes)]
    mask, _ = _with_hysteresis(options.release_after, _top_masks(layout, ranked, *cuts), old,
                               old_streak)
    first = None
    if options.track_first_mask:
      first = [jnp.where(state.num_refreshes == 0, m, _as_bool(o, s))
               for m, o, s in zip(mask, old_first, shapes)]
    return cuts, _refresh_stats(options, layout, mask, old, first, old_stats, threshold)

  def keep(operands):
    del operands
    return _no_cuts(options, layout), old_stats

  cuts, stats = jax.lax.cond(do_refresh, refresh, keep,
                             (ranked, old_mask, old_first, old_streak))
  new, streak = _with_hysteresis(
      options.release_after, _top_masks(layout, ranked, *cuts),
      old_mask, old_streak)
  new = [_store(options, m) for m in new]
  pick = lambda n, o: jnp.where(do_refresh, n, o)  # pylint: disable=unnecessary-lambda-assignment
  mask = [pick(n, o) for n, o in zip(new, old_mask)]
  first_mask = state.first_mask
  if options.track_first_mask:
    is_first = do_refresh & (state.num_refreshes == 0)
    # From the mask just stored (equal to ``new`` when ``is_first``): a select
    # of two masks, not a second rebuild of the new one from the importance.
    first_mask = jax.tree.unflatten(treedef, [jnp.where(is_first, m, o)
                                              for m, o in zip(mask, old_first)])
  if options.release_after > 1:
    streak = jax.tree.unflatten(treedef, [pick(n, o) for n, o in zip(streak, old_streak)])
  return new_state._replace(mask=jax.tree.unflatten(treedef, mask), first_mask=first_mask,
                            out_streak=streak, **stats._asdict())


def _apply_mask(updates, mask):
  def apply(u, m):  # a packed mask is unpacked here, fused into the select
    return jnp.where(_as_bool(m, u.shape, u), jnp.zeros_like(u), u)
  return jax.tree.map(apply, updates, mask)


_OPTIONS_DOC = """
  Args:
    isolation_ratio: fraction p of eligible entries isolated at each refresh,
      in [0, 1]; ``k = floor(p * N_eligible)``. May be injected with
      ``optax.inject_hyperparams`` (then k is computed from the traced value).
    update_interval: refresh period T in steps (>= 1). Each refresh costs
      about 31 reads of the importance (a bisection). May be injected.
    ema_decay: importance EMA decay beta in [0, 1): ``I <- beta I + (1-beta) s(g)``.
      None (the default) is 0.99. May be injected. With ``importance="inner_nu"``
      leave it unset: beta is then the inner optimizer's b2.
    warmup_steps: W, the first refresh happens at step W (1-based); refreshes
      at steps ``W, W+T, W+2T, ...`` (``is_refresh_step``). Defaults to T.
      Nothing is isolated before.
    importance: score s(g): ``"grad_sq"`` (|g|^2, diagonal empirical Fisher,
      default), ``"grad_abs"`` (|g|), ``"taylor"`` (|g * theta|; needs params)
      or ``"displacement"`` (|theta - theta_0|, CPI-FT's update magnitude: no
      EMA, the state keeps theta_0 instead of an importance; needs params; with
      ``mode="static"`` and ``warmup_steps=W`` it is CPI-FT's mask after a
      W-step probe), or ``"inner_nu"`` (``isolate`` only: no EMA of EPI's own, a
      refresh ranks the inner optimizer's second moment, Adam's
      ``nu = b2 nu + (1 - b2) g^2``, i.e. ``grad_sq`` with beta = b2; EPI's state is
      then its mask, see docs/METHOD.md). Complex entries score by their modulus.
    normalization: per-layer normalization before selection: ``"layer_mean"``
      (divide by the layer's mean score, default), ``"layer_max"`` or
      ``"none"``. A layer is a leaf, or a slice of a stacked leaf (see
      ``layer_axes``). One reduction per layer per refresh.
    selection: ``"global"`` top-k over all eligible entries (default) or
      ``"layer"`` (top-p within each layer). Both count, never sort or gather.
    mode: ``"evolving"`` (EPI: refresh every T steps, default), ``"static"``
      (mask chosen at the first refresh and frozen for good: the
      static-isolation baseline) or ``"none"`` (track importance, isolate
      nothing).
    eligible: which parameters may be isolated: None (all), a pytree of bools
      shaped like the params, or a predicate on the path string,
      ``lambda path: "norm" not in path`` or, to name layers of stacked
      leaves, ``lambda path, layer: ...`` (``layer`` is the index along the
      leaf's layer axis, None for an unstacked leaf). Ineligible entries are
      never isolated and not counted in N. With ``optax.inject_hyperparams``
      list a callable in ``static_args`` (it would be taken for a schedule).
    layer_axes: where stacked leaves keep their layers: None (every leaf is
      one layer), a pytree shaped like the params of ``int | None`` (the axis
      indexing layers; None for unstacked leaves), or
      ``(path, shape) -> int | None``. Every slice along a leaf's layer axis is
      treated exactly as its own leaf (normalization, ``selection="layer"``,
      ``eligible``), so a scanned and an unscanned copy of a model get the
      same masks. Costs nothing extra. With ``optax.inject_hyperparams`` list
      a callable in ``static_args``.
    track_first_mask: keep the first refresh's mask to report the Jaccard
      overlap with it (``jaccard_first``). Costs one bool per parameter.
    importance_dtype: dtype of the importance EMA: None (float32) or
      ``jnp.bfloat16`` / ``"bfloat16"`` (2 bytes per parameter instead of 4).
      The bf16 EMA is computed in float32 and stochastically rounded to bf16
      (deterministic hash of the in-layer index and the step, no RNG state),
      so increments smaller than bf16's resolution are kept on average. With
      ``optax.inject_hyperparams`` pass it as a string or in ``static_args``.
    packed_mask: store the mask (and ``first_mask``) as bits, 8 per uint8
      along each leaf's last axis (1/8 byte per parameter instead of 1);
      unpacked inside the masked update. ``state.mask`` then holds the
      packed bytes: read it with ``unpacked_mask(state)``.
    release_after: release hysteresis R, an unconfirmed variant of the paper
      (None, the default, means 1: off). An isolated entry is released only
      once it has been out of the top-k at R consecutive refreshes, so more
      than k entries can be isolated. R > 1 costs one uint8 per parameter
      (``state.out_streak``).
"""


def epi_transform(isolation_ratio: float, update_interval: int,
                  ema_decay: Optional[float] = None, *, warmup_steps: Optional[int] = None,
                  importance: str = "grad_sq", normalization: str = "layer_mean",
                  selection: str = "global", mode: str = "evolving",
                  eligible: Eligible = None, layer_axes: LayerAxes = None,
                  track_first_mask: bool = False, importance_dtype=None,
                  packed_mask: bool = False, release_after: Optional[int] = None,
                  ) -> optax.GradientTransformationExtraArgs:
  """EPI, chain-first form: zeroes the incoming updates of isolated entries.

  Use it first in a chain: ``optax.chain(epi_transform(...), optax.adamw(lr))``.
  It keeps the importance EMA and the isolation mask in its state (an
  ``EPIState``), computed from the updates it receives (the raw gradients
  when it comes first).

  Warning: this masks the *gradients*. A stateful optimizer after it still
  moves isolated weights: Adam's momentum carries earlier gradients, and
  decoupled weight decay shrinks every weight. For truly frozen isolated
  weights use the wrapper form ``isolate(inner, ...)`` (or ``epi_adamw``).
  """
  options = EPIOptions(
      isolation_ratio=isolation_ratio, update_interval=update_interval, ema_decay=ema_decay,
      warmup_steps=warmup_steps, importance=importance, normalization=normalization,
      selection=selection, mode=mode, eligible=eligible, layer_axes=layer_axes,
      track_first_mask=track_first_mask, importance_dtype=importance_dtype,
      packed_mask=packed_mask, release_after=release_after)
  if options.importance == INNER_NU:
    raise OptionError("importance", "importance='inner_nu' reads the second moment of the "
                      "optimizer that EPI wraps: use the wrapper form, isolate(inner, ...) "
                      "or epi_adamw, not epi_transform.")

  def init_fn(params):
    return _init_epi(options, params)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    state = _update_epi(options, updates, state, params)
    return _apply_mask(updates, state.mask), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def isolate(inner: optax.GradientTransformation, isolation_ratio: float,
            update_interval: int, ema_decay: Optional[float] = None, *,
            warmup_steps: Optional[int] = None, importance: str = "grad_sq",
            normalization: str = "layer_mean", selection: str = "global",
            mode: str = "evolving", eligible: Eligible = None,
            layer_axes: LayerAxes = None, track_first_mask: bool = False,
            importance_dtype=None, packed_mask: bool = False,
            release_after: Optional[int] = None, reset_on_release: bool = False,
            ) -> optax.GradientTransformationExtraArgs:
  """EPI, wrapper form: isolated weights do not move at all.

  Importance is computed from the raw gradients; ``inner`` (e.g. AdamW)
  runs on the gradients as usual, and its final updates, weight decay
  included, are zeroed where the mask is True. An isolated weight is
  bit-for-bit unchanged while isolated and moves again once released (its
  ``inner`` statistics kept tracking the gradients meanwhile).

  ``reset_on_release=True`` (an unconfirmed variant of the paper, off by
  default) zeroes ``inner``'s per-parameter state (e.g. Adam's two moments)
  at the entries a refresh releases, after that step's update, so a released
  weight restarts from fresh moments. With Adam the first steps after a reset
  are larger than the learning rate (its bias correction is per optimizer,
  not per entry): about ``(1 - b1) / sqrt(1 - b2)`` = 3.2x at the defaults.
  Costs one more read and write of ``inner``'s per-parameter state per step.
  """
  options = EPIOptions(
      isolation_ratio=isolation_ratio, update_interval=update_interval, ema_decay=ema_decay,
      warmup_steps=warmup_steps, importance=importance, normalization=normalization,
      selection=selection, mode=mode, eligible=eligible, layer_axes=layer_axes,
      track_first_mask=track_first_mask, importance_dtype=importance_dtype,
      packed_mask=packed_mask, release_after=release_after)
  if not isinstance(reset_on_release, bool):
    raise ValueError(f"reset_on_release must be a bool, got {reset_on_release!r}.")
  inner = optax.with_extra_args_support(inner)
  reads_nu = options.importance == INNER_NU

  def init_fn(params):
    inner_state = inner.init(params)
    if reads_nu:
      nu = _inner_nu(inner_state)
      if len(jax.tree.leaves(nu)) != len(jax.tree.leaves(params)):
        raise ValueError("importance='inner_nu': the inner optimizer's `nu` is not shaped "
                         f"like the params ({jax.tree.structure(nu)} vs "
                         f"{jax.tree.structure(params)}).")
    return IsolateState(epi=_init_epi(options, params), inner=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    if reads_nu:  # the refresh ranks the second moment that includes this step
      inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
      epi = _update_epi(options, updates, state.epi, params, _inner_nu(inner_state))
    else:
      epi = _update_epi(options, updates, state.epi, params)
      inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    if reset_on_release:
      released = jax.tree.map(
          lambda old, new, u: _as_bool(old, u.shape, u) & ~_as_bool(new, u.shape, u),
          state.epi.mask, epi.mask, updates)
      inner_state = optax.tree_map_params(
          inner, lambda v, r: jnp.where(r, jnp.zeros_like(v), v), inner_state, released,
          transform_non_params=lambda v: v)
    return _apply_mask(inner_updates, epi.mask), IsolateState(epi=epi, inner=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


epi_transform.__doc__ += _OPTIONS_DOC
isolate.__doc__ += _OPTIONS_DOC


def epi_adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
              b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-4,
              mask=None, *, isolation_ratio: float = 0.01,
              update_interval: int = 100, ema_decay: Optional[float] = None,
              warmup_steps: Optional[int] = None, importance: str = "grad_sq",
              normalization: str = "layer_mean", selection: str = "global",
              mode: str = "evolving", eligible: Eligible = None,
              layer_axes: LayerAxes = None, track_first_mask: bool = False,
              importance_dtype=None, packed_mask: bool = False,
              release_after: Optional[int] = None, reset_on_release: bool = False,
              ) -> optax.GradientTransformationExtraArgs:
  """AdamW wrapped by ``isolate``: the EPI optimizer most users want.

  ``learning_rate`` ... ``mask`` are ``optax.adamw``'s; the EPI options are
  those of ``isolate`` (every one spelled out, so that
  ``optax.inject_hyperparams(epi_adamw)`` sees them). With
  ``importance="inner_nu"``, ``ema_decay`` may be left unset or given equal
  to ``b2``.
  """
  if importance == INNER_NU and ema_decay is not None:
    decay, beta2 = (numeric_option("ema_decay", ema_decay, integer=False),
                    numeric_option("b2", b2, integer=False))
    if decay is not None and beta2 is not None and decay != beta2:
      raise OptionError("ema_decay", f"importance='inner_nu' ranks AdamW's second moment, "
                        f"whose decay is b2={beta2!r}: ema_decay={decay!r} differs (leave "
                        "it unset).")
    ema_decay = None
  return isolate(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask),
      isolation_ratio, update_interval, ema_decay, warmup_steps=warmup_steps,
      importance=importance, normalization=normalization, selection=selection, mode=mode,
      eligible=eligible, layer_axes=layer_axes, track_first_mask=track_first_mask,
      importance_dtype=importance_dtype, packed_mask=packed_mask,
      release_after=release_after, reset_on_release=reset_on_release)


# ---------------------------------------------------------------------------
# Reading the state.
# ---------------------------------------------------------------------------

def _find(opt_state, match) -> list:
  """The nodes of a (nested) optimizer state for which ``match`` is true,
  not looking inside them: through chains, wrappers (``isolate``,
  ``MultiSteps``, ``inject_hyperparams``) and ``flax.nnx.Optimizer`` states."""
  found = []

  def visit(x):
    if match(x):
      found.append(x)
      return
    if isinstance(x, nnx.Variable):
      return visit(x.get_value())
    if isinstance(x, dict) or isinstance(x, nnx.State):
      for v in x.values():
        visit(v)
    elif isinstance(x, (tuple, list)):
      for v in x:
        visit(v)

  visit(opt_state)
  return found


def _inner_nu(inner_state):
  """The second moment ``nu`` of ``isolate``'s inner optimizer (a NamedTuple
  field named ``nu``, as ``optax.scale_by_adam``'s and its wrappers' keep)."""
  found = _find(inner_state, lambda x: isinstance(x, tuple) and "nu" in getattr(x, "_fields", ()))
  if len(found) != 1:
    raise ValueError(
        "importance='inner_nu' ranks the second moment `nu` of the optimizer that isolate "
        f"wraps (optax.adam, adamw, ...), and its state has {len(found) or 'no'} "
        f"{'such field' if len(found) < 2 else 'of them: wrap the one to read'}.")
  return found[0].nu


def epi_importance(opt_state) -> Any:
  """The importance a refresh ranks, shaped like the params: ``EPIState.importance``
  or, with ``importance="inner_nu"``, the inner optimizer's ``nu``
  (``opt_state`` must then be the whole state, not an ``EPIState``)."""
  s = opt_state if isinstance(opt_state, EPIState) else epi_state(opt_state)
  if jax.tree.leaves(s.importance) or not jax.tree.leaves(s.mask):
    return s.importance
  if isinstance(opt_state, EPIState):
    raise ValueError("This EPIState reads its importance from the inner optimizer's nu "
                     "(importance='inner_nu'): pass the whole optimizer state.")
  return _inner_nu(opt_state)


def epi_state(opt_state) -> EPIState:
  """The ``EPIState`` found anywhere inside a (nested) optimizer state.

  Works through chains, ``isolate``, ``MultiSteps``, ``inject_hyperparams``
  and the state of a ``flax.nnx.Optimizer`` (pass ``optimizer.opt_state``).
  Raises ``ValueError`` when there is none or more than one.
  """
  found = _find(opt_state, lambda x: isinstance(x, EPIState))
  if not found:
    raise ValueError("No EPIState in this optimizer state: was it built with "
                     "epi_transform / isolate / epi_adamw?")
  if len(found) > 1:
    raise ValueError(f"Found {len(found)} EPIStates; expected exactly one.")
  return found[0]


METRICS = RefreshStats._fields


def epi_metrics(opt_state) -> dict[str, jax.Array]:
  """EPI's scalar statistics (``RefreshStats``'s fields) as a dict of arrays.

  ``opt_state`` is an ``EPIState`` or any optimizer state ``epi_state`` accepts.
  """
  s = opt_state if isinstance(opt_state, EPIState) else epi_state(opt_state)
  return {k: getattr(s, k) for k in METRICS}


def unpacked_mask(state) -> Any:
  """The isolation mask as a bool pytree shaped like the params.

  ``state`` is an ``EPIState`` or any optimizer state that ``epi_state``
  accepts. Works with ``packed_mask`` on or off (the shapes come from the
  importance, which always has the params' shapes; with ``inner_nu`` and
  packed masks, pass the whole optimizer state).
  """
  s = state if isinstance(state, EPIState) else epi_state(state)
  if not any(m.dtype == jnp.uint8 for m in jax.tree.leaves(s.mask)):
    return jax.tree.map(jnp.asarray, s.mask)
  return jax.tree.map(lambda m, imp: _as_bool(m, imp.shape, imp), s.mask, epi_importance(state))


def per_layer_isolated(state, layer_axes: LayerAxes = None) -> dict[str, jax.Array]:
  """``{name: isolated fraction}`` per layer: a leaf's path, or for a stacked
  leaf ``path[l]`` per slice ``l`` along its layer axis (see ``layer_axes``)."""
  mask = unpacked_mask(state)
  options = EPIOptions(isolation_ratio=0.0, update_interval=1, layer_axes=layer_axes)
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  for (path, m), leaf in zip(flat, leaf_layout(options, mask)):
    name = path_str(path)
    if leaf.axis is None:
      out[name] = jnp.mean(m.astype(jnp.float32))
    else:
      frac = jnp.mean(m.astype(jnp.float32), axis=leaf.reduce_axes)
      for l in range(leaf.shape[leaf.axis]):
        out[f"{name}[{l}]"] = frac[l]
  return out

