"""Evolving Parameter Isolation (EPI) as optax gradient transformations.

Two forms share one state and one refresh rule:

* ``epi_transform``: chain-first. ``optax.chain(epi_transform(...), adamw)``
  zeroes the *gradients* of isolated entries. Cheap and composable, but a
  stateful optimizer after it still moves isolated weights (Adam momentum,
  decoupled weight decay).
* ``isolate(inner, ...)``: a wrapper. Importance comes from the raw
  gradients, ``inner`` runs as usual, and its *final* updates are zeroed at
  isolated entries, so isolated weights are bit-for-bit frozen.

See ``EPI_SPEC.md`` (shared with the project) for the default semantics.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from epi_jax.method import compact, selection

IMPORTANCES = ("grad_sq", "grad_abs", "taylor", "displacement")
NORMALIZATIONS = ("layer_mean", "layer_max", "none")
SELECTIONS = ("global", "layer")
MODES = ("evolving", "static", "none")

Eligible = Union[None, Any, Callable[[str], bool]]
# Threshold bits resolved per pass of the selection (see
# selection.kth_largest_bits). 1 (bisection, 31 cheap passes) measured 5-10x
# faster on CPU than 4 (8 passes of 15 compares each): BENCHMARKS.md.
_BITS_PER_PASS = 1


class EPIState(NamedTuple):
  """State of EPI. Per-parameter fields are pytrees shaped like the params.

  Attributes:
    count: number of updates applied so far (int32).
    importance: EMA of the importance score s(g), per parameter.
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


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate(isolation_ratio, update_interval, ema_decay, warmup_steps,
              importance, normalization, selection_, mode, bits_per_pass):
  # Traced values (from inject_hyperparams) are checked where they are set.
  if _is_number(isolation_ratio) and not 0.0 <= isolation_ratio <= 1.0:
    raise ValueError(f"isolation_ratio must be in [0, 1], got {isolation_ratio}.")
  if _is_number(update_interval) and (update_interval < 1
                                      or int(update_interval) != update_interval):
    raise ValueError(f"update_interval must be an integer >= 1, got {update_interval}.")
  if _is_number(ema_decay) and not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
  if warmup_steps is not None and _is_number(warmup_steps) and (
      warmup_steps < 0 or int(warmup_steps) != warmup_steps):
    raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps}.")
  for name, value, allowed in (("importance", importance, IMPORTANCES),
                               ("normalization", normalization, NORMALIZATIONS),
                               ("selection", selection_, SELECTIONS),
                               ("mode", mode, MODES)):
    if value not in allowed:
      raise ValueError(f"Unknown {name}={value!r}; expected one of {allowed}.")
  if not isinstance(bits_per_pass, int) or not 1 <= bits_per_pass <= 8:
    raise ValueError(f"bits_per_pass must be an int in [1, 8], got {bits_per_pass}.")


def path_str(path) -> str:
  """'a/b/0/kernel' for a jax key path: what ``eligible`` predicates receive."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _eligible_tree(eligible: Eligible, params) -> Any:
  """A pytree of Python bools shaped like params."""
  if eligible is None:
    return jax.tree.map(lambda _: True, params)
  if callable(eligible) and not isinstance(eligible, (dict, list, tuple)):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: bool(eligible(path_str(p))), params)
  params_struct = jax.tree.structure(params)
  try:
    elig_struct = jax.tree.structure(eligible)
  except Exception as e:  # pragma: no cover - defensive
    raise ValueError(f"eligible is not a pytree: {e}") from e
  if elig_struct != params_struct:
    raise ValueError(
        "eligible does not match the params: expected a pytree of bools with "
        f"structure {params_struct}, got {elig_struct}.")
  leaves = jax.tree.leaves(eligible)
  for leaf in leaves:
    if not isinstance(leaf, (bool, jnp.bool_)) and not (
        hasattr(leaf, "dtype") and leaf.shape == () and leaf.dtype == bool):
      raise ValueError(f"eligible leaves must be Python bools, got {leaf!r}.")
  return jax.tree.map(bool, eligible)


def _score(importance: str, g, p):
  g = g.astype(jnp.float32)
  if importance == "grad_sq":
    return g * g
  if importance == "grad_abs":
    return jnp.abs(g)
  if p is None:
    raise ValueError("importance='taylor' needs params: pass params to update().")
  return jnp.abs(g * p.astype(jnp.float32))


def _scale(normalization: str, imp) -> jax.Array:
  """The per-leaf factor that normalizes scores: ``1 / (mean + tiny)`` etc.

  Scores are multiplied by it rather than divided by the mean: XLA:CPU's
  vectorized division is not correctly rounded, so two fusions dividing the
  same values could disagree in the last bit; a product is exact everywhere.
  """
  imp = imp.astype(jnp.float32)
  tiny = jnp.finfo(jnp.float32).tiny
  if normalization == "layer_mean":
    return 1.0 / (jnp.mean(imp) + tiny)
  if normalization == "layer_max":
    return 1.0 / (jnp.max(imp) + tiny)
  return jnp.float32(1.0)


def _all_finite(tree) -> jax.Array:
  """Whether every entry of every leaf is finite, in one fused read per leaf.

  ``sum(x - x)`` is NaN exactly when some entry is inf or NaN (and 0
  otherwise; XLA does not fold ``x - x`` for floats). On XLA:CPU it is ~1.8x
  faster than ``all(isfinite(x))``, which materializes a bool array first.
  """
  total = sum(jnp.sum(x - x, dtype=jnp.float32) for x in jax.tree.leaves(tree))
  return jnp.isfinite(total)


def _mask_count(masks) -> selection._Count:
  """Set entries of a tree of bool or packed (uint8) masks."""
  total = selection.count_from_int(0)
  for m in jax.tree.leaves(masks):
    n = compact.popcount(m) if m.dtype == jnp.uint8 else selection.count_true(m)
    total = selection._add(total, selection._split(n))
  return total


# Bitwise ops act on bool and packed masks alike.
def _jaccard(a, b) -> jax.Array:
  inter = selection.count_to_float(_mask_count(jax.tree.map(jnp.bitwise_and, a, b)))
  union = selection.count_to_float(_mask_count(jax.tree.map(jnp.bitwise_or, a, b)))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def _importance_dtype(importance_dtype):
  if importance_dtype is None:
    return jnp.dtype(jnp.float32)
  if isinstance(importance_dtype, jax.core.Tracer) or (
      hasattr(importance_dtype, "shape") and hasattr(importance_dtype, "dtype")):
    raise ValueError(
        "importance_dtype is an array, not a dtype: with optax.inject_hyperparams "
        "pass it as a string ('bfloat16') or list it in static_args.")
  try:
    dtype = jnp.dtype(importance_dtype)
  except TypeError as e:
    raise ValueError(f"Unknown importance_dtype={importance_dtype!r}.") from e
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(
        f"importance_dtype must be float32 or bfloat16, got {importance_dtype!r}.")
  return dtype


class _Core:
  """The shared importance-and-mask machinery of both forms."""

  def __init__(self, isolation_ratio, update_interval, ema_decay, warmup_steps,
               importance, normalization, selection_, mode, eligible,
               track_first_mask, importance_dtype, bits_per_pass,
               packed_mask=False, release_after=None):
    _validate(isolation_ratio, update_interval, ema_decay, warmup_steps,
              importance, normalization, selection_, mode, bits_per_pass)
    self.ratio = isolation_ratio
    self.interval = update_interval
    self.decay = ema_decay
    self.warmup = update_interval if warmup_steps is None else warmup_steps
    self.importance = importance
    self.normalization = normalization
    self.selection = selection_
    self.mode = mode
    self.eligible = eligible
    self.track_first_mask = track_first_mask
    self.importance_dtype = _importance_dtype(importance_dtype)
    self.bits_per_pass = bits_per_pass
    if not isinstance(packed_mask, bool):
      raise ValueError(f"packed_mask must be a bool, got {packed_mask!r}.")
    self.packed = packed_mask
    if release_after is None:
      release_after = 1
    if isinstance(release_after, jax.core.Tracer) or hasattr(release_after, "dtype"):
      raise ValueError("release_after is an array: with optax.inject_hyperparams list it "
                       "in static_args (it sets the state's structure).")
    if (not isinstance(release_after, int) or isinstance(release_after, bool)
        or not 1 <= release_after <= 255):
      raise ValueError(f"release_after must be an int in [1, 255], got {release_after!r}.")
    self.release_after = release_after
    if importance == "displacement" and self.importance_dtype != jnp.float32:
      raise ValueError("importance='displacement' keeps the initial params in float32; "
                       "it does not take importance_dtype=bfloat16.")

  def _empty_mask(self, p):
    m = jnp.zeros_like(p, dtype=jnp.bool_)
    return compact.pack(m) if self.packed else m

  def store_mask(self, mask):
    """A bool mask tree in the state's storage format."""
    return jax.tree.map(compact.pack, mask) if self.packed else mask

  def init(self, params) -> EPIState:
    elig = _eligible_tree(self.eligible, params)
    n_eligible = sum(int(p.size) for p, e in zip(jax.tree.leaves(params),
                                                 jax.tree.leaves(elig)) if e)
    if n_eligible == 0 and self.mode != "none":
      raise ValueError("No parameter is eligible for isolation: check `eligible`.")
    # tree.map over params: every per-parameter field inherits their sharding.
    if self.importance == "displacement":  # the initial params theta_0, a copy
      importance = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
    else:
      importance = jax.tree.map(
          lambda p: jnp.zeros_like(p, dtype=self.importance_dtype), params)
    mask = jax.tree.map(self._empty_mask, params)
    first_mask = (jax.tree.map(self._empty_mask, params)
                  if self.track_first_mask else ())
    # Distinct scalars (not one shared array): donated state needs distinct buffers.
    zero = lambda: jnp.zeros([], jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
    return EPIState(
        count=jnp.zeros([], jnp.int32), importance=importance, mask=mask,
        first_mask=first_mask, num_refreshes=jnp.zeros([], jnp.int32),
        isolated_fraction=zero(), num_flipped=zero(), jaccard_prev=zero(),
        jaccard_first=jnp.full([], 0.0 if self.track_first_mask else -1.0, jnp.float32),
        threshold=zero(),
        out_streak=(jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.uint8), params)
                    if self.release_after > 1 else ()))

  def _float_scores(self, importance) -> list[jax.Array]:
    """float32 importance leaves (bf16 ones with tie-breaking low bits)."""
    leaves = jax.tree.leaves(importance)
    if self.importance_dtype == jnp.bfloat16:
      return [compact.dequantize_with_tiebreak(imp, i) for i, imp in enumerate(leaves)]
    return [imp.astype(jnp.float32) for imp in leaves]

  def _thresholds(self, importance, elig) -> tuple[list, list, jax.Array]:
    """Per-leaf normalization scales and score-bit thresholds of a
    refresh, and the global threshold as a float (for reporting)."""
    imp_leaves = self._float_scores(importance)
    elig_leaves = jax.tree.leaves(elig)
    scales = [_scale(self.normalization, imp) if e else jnp.float32(1.0)
              for imp, e in zip(imp_leaves, elig_leaves)]
    bits = [selection.score_bits(imp * d) if e else None
            for imp, d, e in zip(imp_leaves, scales, elig_leaves)]
    never = jnp.int32(selection.NEVER)  # above every score's bits
    if self.selection == "global":
      n = sum(int(imp.size) for imp, e in zip(imp_leaves, elig_leaves) if e)
      k = selection.topk_count(self.ratio, n)
      thr = selection.kth_largest_bits([b for b in bits if b is not None], k,
                                       self.bits_per_pass)
      thrs = [thr if b is not None else never for b in bits]
    else:  # per-leaf top-p
      thrs = [selection.kth_largest_bits(
                  [b], selection.topk_count(self.ratio, int(b.size)),
                  self.bits_per_pass) if b is not None else never for b in bits]
      thr = jnp.int32(0)
    threshold = jax.lax.bitcast_convert_type(jnp.maximum(thr, 0), jnp.float32)
    return scales, thrs, threshold

  def _masks(self, importance, elig, scales, thrs) -> Any:
    """Bool masks: normalized score bits at or above the leaf's threshold.
    Elementwise, given the scalars of ``_thresholds``."""
    imp_leaves = self._float_scores(importance)
    masks = [selection.score_bits(imp * d) >= t if e else jnp.zeros(imp.shape, jnp.bool_)
             for imp, e, d, t in zip(imp_leaves, jax.tree.leaves(elig), scales, thrs)]
    return jax.tree.unflatten(jax.tree.structure(importance), masks)

  def _select(self, importance, elig) -> tuple[Any, jax.Array]:
    """New mask from the importance: top-k of layer-normalized scores."""
    scales, thrs, threshold = self._thresholds(importance, elig)
    return self._masks(importance, elig, scales, thrs), threshold

  def _with_hysteresis(self, top, old_mask, old_streak) -> tuple[Any, Any]:
    """The stored mask of a refresh from its top-k bool mask, and the new
    out-streaks. With ``release_after = R > 1`` an isolated entry stays
    isolated until it has been out of the top-k at R consecutive refreshes."""
    if self.release_after == 1:
      return self.store_mask(top), old_streak

    def leaf(t, old, streak):
      if old.dtype == jnp.uint8:
        old = compact.unpack(old, t.shape)
      streak = jnp.where(t | ~old, jnp.uint8(0),
                         jnp.minimum(streak, jnp.uint8(254)) + jnp.uint8(1))
      return t | (old & (streak < self.release_after)), streak

    out = jax.tree.map(leaf, top, old_mask, old_streak)
    outer = jax.tree.structure(top)
    mask, streak = jax.tree.transpose(outer, jax.tree.structure((0, 0)), out)
    return self.store_mask(mask), streak

  def update(self, grads, state: EPIState, params) -> EPIState:
    """Importance EMA, then (on schedule) a refresh of the mask."""
    elig = _eligible_tree(self.eligible, grads)
    decay = jnp.asarray(self.decay, jnp.float32)
    finite = _all_finite(grads)

    def ema(leaf, imp, g, p):
      new = decay * imp.astype(jnp.float32) + (1.0 - decay) * _score(self.importance, g, p)
      if imp.dtype == jnp.bfloat16:
        new = compact.stochastic_round_bf16(new, state.count, leaf)
      # A step with a non-finite gradient leaves the importance unchanged.
      return jnp.where(finite, new.astype(imp.dtype), imp)

    imp_leaves, treedef = jax.tree.flatten(state.importance)
    g_leaves = treedef.flatten_up_to(grads)
    p_leaves = (treedef.flatten_up_to(params) if params is not None
                else [None] * len(imp_leaves))
    if self.importance == "displacement":
      # CPI-FT's score: how far each weight moved from theta_0 (kept in
      # `importance`), read from the params at the refresh; no EMA.
      if params is None:
        raise ValueError("importance='displacement' needs params: pass params to update().")
      importance = state.importance
      scores = jax.tree.unflatten(treedef, [
          jnp.abs(p.astype(jnp.float32) - i) for i, p in zip(imp_leaves, p_leaves)])
    else:
      importance = scores = jax.tree.unflatten(treedef, [
          ema(i, *args) for i, args in enumerate(zip(imp_leaves, g_leaves, p_leaves))])

    step = state.count + 1  # t + 1, with t the update count before this update.
    warmup = jnp.asarray(self.warmup, jnp.int32)
    interval = jnp.asarray(self.interval, jnp.int32)
    scheduled = (step >= warmup) & (jnp.mod(step - warmup, interval) == 0)
    if self.mode == "evolving":
      do_refresh = scheduled
    elif self.mode == "static":
      do_refresh = scheduled & (state.num_refreshes == 0)
    else:
      do_refresh = jnp.bool_(False)

    # Only scalars cross the cond: the refresh branch finds the per-leaf
    # thresholds (and the statistics of the new mask); the mask itself is then
    # rebuilt elementwise outside, fused with the update that it masks. Big
    # arrays returned through a cond's branches cost copies on every step.
    n_leaves = len(jax.tree.leaves(importance))
    never = jnp.int32(selection.NEVER)

    def refresh(importance, old_mask, old_first, old_streak, old_scalars):
      num_refreshes = old_scalars[0]
      scales, thrs, threshold = self._thresholds(importance, elig)
      mask, _ = self._with_hysteresis(self._masks(importance, elig, scales, thrs),
                                      old_mask, old_streak)
      n_elig = selection.count_to_float(selection.count_from_int(
          sum(int(i.size) for i, e in zip(jax.tree.leaves(importance),
                                          jax.tree.leaves(elig)) if e)))
      isolated = selection.count_to_float(_mask_count(mask))
      flipped = selection.count_to_float(_mask_count(
          jax.tree.map(jnp.bitwise_xor, mask, old_mask)))
      first = num_refreshes == 0
      jaccard_prev = jnp.where(first, 1.0, _jaccard(mask, old_mask))
      if self.track_first_mask:
        first_mask = jax.tree.map(lambda new, o: jnp.where(first, new, o), mask, old_first)
        jaccard_first = _jaccard(mask, first_mask)
      else:
        jaccard_first = old_scalars[5]
      scalars = (num_refreshes + 1,
                 (isolated / jnp.maximum(n_elig, 1.0)).astype(jnp.float32),
                 flipped.astype(jnp.float32), jaccard_prev.astype(jnp.float32),
                 jnp.asarray(jaccard_first, jnp.float32), threshold.astype(jnp.float32))
      return [jnp.asarray(d, jnp.float32) for d in scales], list(thrs), scalars

    def keep(importance, old_mask, old_first, old_streak, old_scalars):
      del importance, old_mask, old_first, old_streak
      return [jnp.float32(1.0)] * n_leaves, [never] * n_leaves, old_scalars

    if self.mode == "none":
      new_state = state
    else:
      # One materialized score tree feeds both the refresh and the masks: a
      # fusion that recomputed the EMA could round differently (FMA) and pick
      # a different mask than the one the refresh counted.
      scores = jax.lax.optimization_barrier(scores)
      old_scalars = (state.num_refreshes, state.isolated_fraction, state.num_flipped,
                     state.jaccard_prev, state.jaccard_first, state.threshold)
      scales, thrs, scalars = jax.lax.cond(
          do_refresh, refresh, keep, scores, state.mask, state.first_mask,
          state.out_streak, old_scalars)
      new, streak = self._with_hysteresis(self._masks(scores, elig, scales, thrs),
                                          state.mask, state.out_streak)
      mask = jax.tree.map(lambda n, o: jnp.where(do_refresh, n, o), new, state.mask)
      streak = jax.tree.map(lambda n, o: jnp.where(do_refresh, n, o), streak,
                            state.out_streak)
      first_mask = state.first_mask
      if self.track_first_mask:
        is_first = do_refresh & (state.num_refreshes == 0)
        first_mask = jax.tree.map(lambda n, o: jnp.where(is_first, n, o), new, first_mask)
      new_state = state._replace(
          mask=mask, first_mask=first_mask, num_refreshes=scalars[0],
          isolated_fraction=scalars[1], num_flipped=scalars[2], jaccard_prev=scalars[3],
          jaccard_first=scalars[4], threshold=scalars[5], out_streak=streak)
    return new_state._replace(count=optax.safe_increment(state.count),
                              importance=importance)


def _as_bool(mask, shape):
  """A stored (bool or packed) mask leaf as bools of ``shape``."""
  return compact.unpack(mask, shape) if mask.dtype == jnp.uint8 else mask


def _apply_mask(updates, mask):
  def apply(u, m):  # a packed mask is unpacked here, fused into the select
    return jnp.where(_as_bool(m, u.shape), jnp.zeros_like(u), u)
  return jax.tree.map(apply, updates, mask)


_OPTIONS_DOC = """
  Args:
    isolation_ratio: fraction p of eligible entries isolated at each refresh,
      in [0, 1]; ``k = floor(p * N_eligible)``. May be injected with
      ``optax.inject_hyperparams`` (then k is computed from the traced value).
    update_interval: refresh period T in steps (>= 1). Each refresh costs
      about 31 reads of the importance (a bisection).
    ema_decay: importance EMA decay beta in [0, 1): ``I <- beta I + (1-beta) s(g)``.
      May be injected.
    warmup_steps: W, the first refresh happens at step W (1-based); refreshes
      at steps ``W, W+T, W+2T, ...``. Defaults to T. Nothing is isolated before.
    importance: score s(g): ``"grad_sq"`` (g^2, diagonal empirical Fisher,
      default), ``"grad_abs"`` (|g|), ``"taylor"`` (|g * theta|; needs params)
      or ``"displacement"`` (|theta - theta_0|, CPI-FT's update magnitude: no
      EMA, the state keeps theta_0 instead of an importance; needs params; with
      ``mode="static"`` and ``warmup_steps=W`` it is CPI-FT's mask after a
      W-step probe).
    normalization: per-leaf normalization before selection: ``"layer_mean"``
      (divide by the leaf's mean score, default), ``"layer_max"`` or ``"none"``.
    selection: ``"global"`` top-k over all eligible entries (default) or
      ``"layer"`` (top-p within each leaf).
    mode: ``"evolving"`` (EPI: refresh every T steps, default), ``"static"``
      (mask chosen at the first refresh and frozen for good: the
      static-isolation baseline) or ``"none"`` (track importance, isolate
      nothing).
    eligible: which leaves may be isolated: None (all), a pytree of bools
      shaped like the params, or a predicate on the path string
      (e.g. ``lambda path: "norm" not in path``). Ineligible leaves are never
      isolated and are not counted in N.
    track_first_mask: keep the first refresh's mask to report the Jaccard
      overlap with it (``jaccard_first``). Costs one bool per parameter.
    importance_dtype: dtype of the importance EMA: None (float32) or
      ``jnp.bfloat16`` / ``"bfloat16"`` (2 bytes per parameter instead of 4).
      The bf16 EMA is computed in float32 and stochastically rounded to bf16
      (deterministic hash of index and step, no RNG state), so increments
      smaller than bf16's resolution are kept on average. With
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
                  ema_decay: float = 0.99, *, warmup_steps: Optional[int] = None,
                  importance: str = "grad_sq", normalization: str = "layer_mean",
                  selection: str = "global", mode: str = "evolving",
                  eligible: Eligible = None, track_first_mask: bool = False,
                  importance_dtype=None, packed_mask: bool = False,
                  release_after: Optional[int] = None,
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
  core = _Core(isolation_ratio, update_interval, ema_decay, warmup_steps,
               importance, normalization, selection, mode, eligible,
               track_first_mask, importance_dtype, _BITS_PER_PASS, packed_mask,
               release_after)

  def init_fn(params):
    return core.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    state = core.update(updates, state, params)
    return _apply_mask(updates, state.mask), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def isolate(inner: optax.GradientTransformation, isolation_ratio: float,
            update_interval: int, ema_decay: float = 0.99, *,
            warmup_steps: Optional[int] = None, importance: str = "grad_sq",
            normalization: str = "layer_mean", selection: str = "global",
            mode: str = "evolving", eligible: Eligible = None,
            track_first_mask: bool = False, importance_dtype=None,
            packed_mask: bool = False, release_after: Optional[int] = None,
            reset_on_release: bool = False,
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
  core = _Core(isolation_ratio, update_interval, ema_decay, warmup_steps,
               importance, normalization, selection, mode, eligible,
               track_first_mask, importance_dtype, _BITS_PER_PASS, packed_mask,
               release_after)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return IsolateState(epi=core.init(params), inner=inner.init(params))

  if not isinstance(reset_on_release, bool):
    raise ValueError(f"reset_on_release must be a bool, got {reset_on_release!r}.")

  def update_fn(updates, state, params=None, **extra_args):
    epi = core.update(updates, state.epi, params)
    inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    if reset_on_release:
      released = jax.tree.map(
          lambda old, new, u: _as_bool(old, u.shape) & ~_as_bool(new, u.shape),
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
              update_interval: int = 100, ema_decay: float = 0.99,
              **epi_options) -> optax.GradientTransformationExtraArgs:
  """AdamW wrapped by ``isolate``: the EPI optimizer most users want.

  ``learning_rate`` ... ``mask`` are ``optax.adamw``'s; the EPI options are
  those of ``isolate``.
  """
  return isolate(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                             weight_decay=weight_decay, mask=mask),
                 isolation_ratio, update_interval, ema_decay, **epi_options)


def epi_state(opt_state) -> EPIState:
  """The ``EPIState`` found anywhere inside a (nested) optimizer state.

  Works through chains, ``isolate``, ``MultiSteps``, ``inject_hyperparams``
  and the state of a ``flax.nnx.Optimizer`` (pass ``optimizer.opt_state``).
  Raises ``ValueError`` when there is none or more than one.
  """
  found = []

  def visit(x):
    if isinstance(x, EPIState):
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
  if not found:
    raise ValueError("No EPIState in this optimizer state: was it built with "
                     "epi_transform / isolate / epi_adamw?")
  if len(found) > 1:
    raise ValueError(f"Found {len(found)} EPIStates; expected exactly one.")
  return found[0]


def unpacked_mask(state) -> Any:
  """The isolation mask as a bool pytree shaped like the params.

  ``state`` is an ``EPIState`` or any optimizer state that ``epi_state``
  accepts. Works with ``packed_mask`` on or off (the shapes come from the
  importance, which always has the params' shapes).
  """
  s = state if isinstance(state, EPIState) else epi_state(state)
  return jax.tree.map(lambda m, imp: _as_bool(m, imp.shape), s.mask, s.importance)
