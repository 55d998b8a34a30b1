"""Evolving Parameter Isolation (EPI) as optax gradient transformations.

Two forms share one state and one update (``_update_epi``, built from ``refresh``):

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

from epi_jax.method import compact, refresh, walk
from epi_jax.method.layout import can_isolate, leaf_layout
from epi_jax.method.options import (INNER_NU, EPIOptions, Eligible, LayerAxes, OptionError,
                                    is_refresh_step, numeric_option)

# The named scope of the refresh's ``lax.cond``: its ops carry it in the
# compiled program's metadata.
REFRESH_SCOPE = "epi_refresh"


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
    return refresh.store_mask(options, jnp.zeros_like(p, dtype=jnp.bool_))

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
    importance = refresh.ema(options, layout, state, grads, params)
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
      jax.lax.optimization_barrier(refresh.ranked_values(options, importance, params)))
  old_mask = treedef.flatten_up_to(state.mask)
  old_first = treedef.flatten_up_to(state.first_mask) if options.track_first_mask else None
  old_streak = treedef.flatten_up_to(state.out_streak) if options.release_after > 1 else ()
  old_stats = refresh.RefreshStats(state.num_refreshes, state.isolated_fraction,
                                   state.num_flipped, state.jaccard_prev, state.jaccard_first,
                                   state.threshold)
  shapes = [leaf.shape for leaf in layout]

  def refreshed(operands):
    """A refresh's cuts, bool masks, out-streaks, first masks and statistics
    (every count a fused read of the leaves it counts)."""
    ranked, old_mask, old_first, old_streak = operands
    cuts, threshold = refresh.find_cuts(options, layout, ranked)
    old = [refresh.as_bool(m, s) for m, s in zip(old_mask, shapes)]
    mask, streak = refresh.with_hysteresis(
        options.release_after, refresh.top_masks(layout, ranked, *cuts), old, old_streak)
    first = None
    if options.track_first_mask:
      first = [jnp.where(state.num_refreshes == 0, m, refresh.as_bool(o, s))
               for m, o, s in zip(mask, old_first, shapes)]
    stats = refresh.refresh_stats(options, layout, mask, old, first, old_stats, threshold)
    return cuts, mask, streak, stats

  # Two lowerings of the same masks, bit for bit. The platform is the one the
  # program is compiled for (``lax.platform_dependent``), not the host's.
  # The scope names the cond in the compiled program in both, so that a plan
  # can count a plain step and a refreshing step apart (``training/plan.py``).
  def pass_through(operands):
    """The masks change only at a refresh: a plain step passes them through
    the cond untouched (no read of the scores, no write of a mask). The TPU
    compiler reads fewer bytes so (BENCHMARKS.md); XLA:CPU copies every mask
    on every plain step, outside its fused loops."""
    def refresh_branch(operands):
      _, mask, streak, stats = refreshed(operands)
      mask = [refresh.store_mask(options, m) for m in mask]
      first = operands[2]
      if options.track_first_mask:  # the first refresh's mask, as stored
        first = [jnp.where(state.num_refreshes == 0, m, o) for m, o in zip(mask, first)]
      return mask, first, streak, stats

    def keep_branch(operands):
      _, old_mask, old_first, old_streak = operands
      return old_mask, old_first, old_streak, old_stats

    with jax.named_scope(REFRESH_SCOPE):
      return jax.lax.cond(do_refresh, refresh_branch, keep_branch, operands)

  def rebuild(operands):
    """XLA:CPU: only small arrays cross the cond (the cuts and the
    statistics); the masks are rebuilt elementwise outside it every step, the
    old ones selected back on a plain step, which XLA:CPU fuses into its loops
    (no copy of a mask)."""
    def cuts_branch(operands):
      cuts, _, _, stats = refreshed(operands)
      return cuts, stats

    def no_cuts_branch(operands):
      del operands
      return refresh.no_cuts(options, layout), old_stats

    ranked, old_mask, old_first, old_streak = operands
    with jax.named_scope(REFRESH_SCOPE):
      cuts, stats = jax.lax.cond(do_refresh, cuts_branch, no_cuts_branch, operands)
    new, streak = refresh.with_hysteresis(
        options.release_after, refresh.top_masks(layout, ranked, *cuts), old_mask, old_streak)
    new = [refresh.store_mask(options, m) for m in new]
    pick = lambda n, o: jnp.where(do_refresh, n, o)  # pylint: disable=unnecessary-lambda-assignment
    mask = [pick(n, o) for n, o in zip(new, old_mask)]
    first = old_first
    if options.track_first_mask:
      is_first = do_refresh & (state.num_refreshes == 0)
      # From the mask just stored (equal to ``new`` when ``is_first``): a
      # select of two masks, not a second rebuild of the new one.
      first = [jnp.where(is_first, m, o) for m, o in zip(mask, old_first)]
    if options.release_after > 1:
      streak = [pick(n, o) for n, o in zip(streak, old_streak)]
    return mask, first, streak, stats

  mask, first, streak, stats = jax.lax.platform_dependent(
      (ranked, old_mask, old_first, old_streak), cpu=rebuild, default=pass_through)
  first_mask = jax.tree.unflatten(treedef, first) if options.track_first_mask else state.first_mask
  if options.release_after > 1:
    streak = jax.tree.unflatten(treedef, streak)
  return new_state._replace(mask=jax.tree.unflatten(treedef, mask), first_mask=first_mask,
                            out_streak=streak, **stats._asdict())


def _apply_mask(updates, mask):
  def apply(u, m):  # a packed mask is unpacked here, fused into the select
    return jnp.where(refresh.as_bool(m, u.shape, u), jnp.zeros_like(u), u)
  return jax.tree.map(apply, updates, mask)


# ---------------------------------------------------------------------------
# The transformations.
# ---------------------------------------------------------------------------

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
      bits packed into uint8, 8 rows per byte (see ``compact``); use
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

  Args:
    isolation_ratio: p, the fraction of eligible entries isolated, in [0, 1].
    update_interval: T, steps between refreshes of the mask (>= 1).
    ema_decay: beta of the importance EMA; None is 0.99 (with
      ``importance="inner_nu"``: unset, it is the inner optimizer's b2).
    warmup_steps: W, the step of the first refresh (default T).
    importance: ``"grad_sq"``, ``"grad_abs"``, ``"taylor"``, ``"displacement"``.
    normalization: ``"layer_mean"``, ``"layer_max"`` or ``"none"``.
    selection: ``"global"`` top-k or ``"layer"`` (top-p per layer).
    mode: ``"evolving"``, ``"static"`` or ``"none"`` (track importance only).
    eligible: which params may be isolated (None, bools, or a path predicate).
    layer_axes: the layer axis of each stacked leaf (pytree or callable).
    track_first_mask: keep the first mask (for ``jaccard_first``).
    importance_dtype: None (float32) or bfloat16 for the EMA.
    packed_mask: store masks as bits, 8 per byte.
    release_after: R, refreshes out of the top-k before a release (None: 1).

  Each option in full: ``EPIOptions``, which validates them once.
  """
  return epi_transform_from_options(EPIOptions.from_arguments(locals()))


def epi_transform_from_options(options: EPIOptions) -> optax.GradientTransformationExtraArgs:
  """``epi_transform`` with its options given as one ``EPIOptions``."""
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


class IsolateState(NamedTuple):
  """State of ``isolate``: EPI's state beside the wrapped optimizer's."""
  epi: EPIState
  inner: optax.OptState


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

  ``inner`` receives the extra argument ``trainable``: a bool pytree like
  the updates, True at the entries not isolated before this update (at a
  refresh step, the mask in force before the refresh), unless the caller
  passes ``trainable`` itself. A transformation that takes it (e.g. a
  clip by the norm of the trainable gradients) sees which entries can move;
  a plain optax transformation ignores it.

  Args:
    inner: the optimizer whose final updates are masked (e.g. ``optax.adamw``).
    isolation_ratio: p, the fraction of eligible entries isolated, in [0, 1].
    update_interval: T, steps between refreshes of the mask (>= 1).
    ema_decay: beta of the importance EMA; None is 0.99 (with
      ``importance="inner_nu"``: unset, it is the inner optimizer's b2).
    warmup_steps: W, the step of the first refresh (default T).
    importance: ``"grad_sq"``, ``"grad_abs"``, ``"taylor"``, ``"displacement"`` or
      ``"inner_nu"`` (the inner optimizer's second moment: no importance state).
    normalization: ``"layer_mean"``, ``"layer_max"`` or ``"none"``.
    selection: ``"global"`` top-k or ``"layer"`` (top-p per layer).
    mode: ``"evolving"``, ``"static"`` or ``"none"`` (track importance only).
    eligible: which params may be isolated (None, bools, or a path predicate).
    layer_axes: the layer axis of each stacked leaf (pytree or callable).
    track_first_mask: keep the first mask (for ``jaccard_first``).
    importance_dtype: None (float32) or bfloat16 for the EMA.
    packed_mask: store masks as bits, 8 per byte.
    release_after: R, refreshes out of the top-k before a release (None: 1).
    reset_on_release: zero ``inner``'s moments of entries a refresh releases.

  Each option in full: ``EPIOptions``, which validates them once.
  """
  return isolate_from_options(inner, EPIOptions.from_arguments(locals()),
                              reset_on_release=reset_on_release)


def isolate_from_options(inner: optax.GradientTransformation, options: EPIOptions, *,
                         reset_on_release: bool = False,
                         ) -> optax.GradientTransformationExtraArgs:
  """``isolate`` with its EPI options given as one ``EPIOptions``."""
  if not isinstance(reset_on_release, bool):
    raise ValueError(f"reset_on_release must be a bool, got {reset_on_release!r}.")
  inner = optax.with_extra_args_support(inner)
  reads_nu = options.importance == INNER_NU

  def init_fn(params):
    inner_state = inner.init(params)
    if reads_nu:
      nu = walk.inner_nu(inner_state)
      if len(jax.tree.leaves(nu)) != len(jax.tree.leaves(params)):
        raise ValueError("importance='inner_nu': the inner optimizer's `nu` is not shaped "
                         f"like the params ({jax.tree.structure(nu)} vs "
                         f"{jax.tree.structure(params)}).")
    return IsolateState(epi=_init_epi(options, params), inner=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    if "trainable" not in extra_args:  # the mask in force before this step's refresh
      # Dead code, dropped by XLA, where no inner transformation reads it.
      extra_args["trainable"] = jax.tree.map(
          lambda m, u: ~refresh.as_bool(m, u.shape, u), state.epi.mask, updates)
    if reads_nu:  # the refresh ranks the second moment that includes this step
      inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
      epi = _update_epi(options, updates, state.epi, params, walk.inner_nu(inner_state))
    else:
      epi = _update_epi(options, updates, state.epi, params)
      inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    if reset_on_release:
      released = jax.tree.map(
          lambda old, new, u: (refresh.as_bool(old, u.shape, u)
                               & ~refresh.as_bool(new, u.shape, u)),
          state.epi.mask, epi.mask, updates)
      inner_state = optax.tree_map_params(
          inner, lambda v, r: jnp.where(r, jnp.zeros_like(v), v), inner_state, released,
          transform_non_params=lambda v: v)
    return _apply_mask(inner_updates, epi.mask), IsolateState(epi=epi, inner=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)




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
  arguments = dict(locals())
  if importance == INNER_NU and ema_decay is not None:
    decay, beta2 = (numeric_option("ema_decay", ema_decay, integer=False),
                    numeric_option("b2", b2, integer=False))
    if decay is not None and beta2 is not None and decay != beta2:
      raise OptionError("ema_decay", f"importance='inner_nu' ranks AdamW's second moment, "
                        f"whose decay is b2={beta2!r}: ema_decay={decay!r} differs (leave "
                        "it unset).")
    arguments["ema_decay"] = None
  return isolate_from_options(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask),
      EPIOptions.from_arguments(arguments), reset_on_release=reset_on_release)
