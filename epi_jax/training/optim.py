"""The optimizer of each method, as one optax transformation.

* ``full`` and ``multi_stage``: AdamW (``clip_by_global_norm`` first), with
  a linear warmup + cosine learning-rate schedule.
* ``static``: the same AdamW wrapped by ``epi_jax.isolate(mode='static')``:
  the mask chosen at the first refresh stays frozen.
* ``epi``: ``epi_jax.isolate(mode='evolving', track_first_mask=True)``.
* ``epi.track_importance=True`` with ``full``/``multi_stage``: AdamW inside
  ``isolate(mode='none')``, which tracks the importance and isolates nothing
  (for the drift analysis, ``importance_drift``).

Clipping sits *inside* the EPI wrapper, so the importance EMA is computed
from the raw (unclipped) gradients: the importance measures the loss's
sensitivity, and a clipping factor that changes from step to step would only
rescale it by step. AdamW sees the clipped gradients, exactly as in ``full``,
so the only difference between the methods is the isolation. With
``epi.importance="inner_nu"`` the importance *is* AdamW's second moment, so
it is that of the clipped gradients (each step's g^2 scaled by its clip
factor squared).
Weight decay applies to matrices (ndim >= 2) only, not to norm scales or
biases.

``optimizer.clip_scope="trainable"`` (static and epi) clips by the norm of
the trainable (not isolated) gradients only (:func:`clip_by_trainable_norm`):
the isolated entries are by construction those with the largest g^2, so in
the global norm they can dominate and shrink every trainable entry's step
(MaxText meets the same effect with frozen parameters and masks first).
``isolate`` hands its inner transformation the mask in force before the
update as the extra argument ``trainable``; at a refresh step the new mask
applies to that step's update but the clipping norm still uses the previous
one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

import epi_jax
from epi_jax.method.options import INNER_NU, OptionError


def schedule(config) -> optax.Schedule:
  """Warmup (linear from 0) then cosine decay to ``lr * min_lr_ratio``."""
  o = config.optimizer
  lr = float(o.learning_rate)
  warmup = int(o.warmup_steps)
  decay_steps = max(int(config.total_steps), warmup + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
      decay_steps=decay_steps, end_value=lr * float(o.min_lr_ratio))


def trainable_norm(updates, trainable) -> jax.Array:
  """Global L2 norm of ``updates`` over the entries where ``trainable`` is True."""
  sq = jax.tree.map(lambda u, t: jnp.sum(jnp.where(t, jnp.square(u.astype(jnp.float32)), 0.0)),
                    updates, trainable)
  return jnp.sqrt(sum(jax.tree.leaves(sq)))


def clip_by_trainable_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """``optax.clip_by_global_norm`` with the norm of the trainable entries only.

  The extra argument ``trainable`` (a bool pytree like the updates) selects
  them; without it every entry counts (``clip_by_global_norm``). Every update
  is scaled by the same factor (isolate zeroes the isolated ones afterwards).
  """
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, trainable=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if trainable is None else trainable_norm(updates, trainable)
    keep = norm < max_norm
    # Same arithmetic as optax.clip_by_global_norm (max_norm / norm, no epsilon).
    updates = jax.tree.map(lambda u: jnp.where(keep, u, (u / norm.astype(u.dtype)) * max_norm),
                           updates)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clips_trainable(config) -> bool:
  """Whether the clip is by the norm of the trainable entries (clip_scope='trainable')."""
  o = config.optimizer
  return is_epi(config) and o.clip_scope == "trainable" and bool(o.clip_norm and o.clip_norm > 0)


def _decays(params, layer_axes):
  """Weight decay on matrices: ndim >= 2 per layer (a stacked layer axis not counted)."""
  if not layer_axes:
    return jax.tree.map(lambda p: p.ndim >= 2, params)
  # tree_map_with_path, not a dict comprehension: optax.tree_map_params (used by
  # reset_on_release) calls init with a leafless placeholder for the params.
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim - (layer_axes.get(path[0].key) is not None) >= 2, params)


def _adamw(config, layer_axes=None) -> optax.GradientTransformation:
  o = config.optimizer
  adamw = optax.adamw(schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay,
                      mask=lambda params: _decays(params, layer_axes))
  if o.clip_norm and o.clip_norm > 0:
    clip = (clip_by_trainable_norm(o.clip_norm) if clips_trainable(config)
            else optax.clip_by_global_norm(o.clip_norm))
    return optax.chain(clip, adamw)
  return adamw


def eligible_fn(config):
  """EPI's eligibility predicate: no path containing a ``config.epi.exclude`` substring."""
  exclude = tuple(config.epi.exclude)
  return lambda path: not any(s in path for s in exclude)


def is_epi(config) -> bool:
  return config.method in ("static", "epi")


def epi_options(config, layer_axes=None) -> epi_jax.EPIOptions:
  """The EPI options of ``config``: the one mapping from the config to EPI,
  validated by ``EPIOptions`` (raises ``ValueError``). ``full``/``multi_stage``
  with ``epi.track_importance`` get ``mode="none"`` (track, isolate nothing)."""
  e = config.epi
  importance = e.importance
  if config.method == "static" and e.static_importance:
    importance = e.static_importance  # e.g. CPI-FT's "displacement"
  mode = {"static": "static", "epi": "evolving"}.get(config.method, "none")
  ema_decay = e.ema_decay
  if importance == INNER_NU:  # AdamW's nu: its decay is optimizer.b2
    if ema_decay is not None and ema_decay != config.optimizer.b2:
      raise OptionError("ema_decay", f"importance='inner_nu' ranks AdamW's second moment, "
                        f"whose decay is optimizer.b2={config.optimizer.b2!r}: "
                        f"ema_decay={ema_decay!r} differs (set it to None).")
    ema_decay = None
  return epi_jax.EPIOptions(
      isolation_ratio=e.isolation_ratio, update_interval=e.update_interval,
      ema_decay=ema_decay, warmup_steps=e.warmup_steps, importance=importance,
      normalization=e.normalization, selection=e.selection, mode=mode,
      eligible=eligible_fn(config), layer_axes=layer_axes,
      track_first_mask=config.method == "epi", importance_dtype=e.importance_dtype,
      packed_mask=e.packed_mask, release_after=e.release_after)


def tracks_importance(config) -> bool:
  """Whether the optimizer state holds EPI's importance (static, epi, or
  ``epi.track_importance`` with full/multi_stage)."""
  return is_epi(config) or bool(config.epi.get("track_importance", False))


@dataclasses.dataclass(frozen=True)
class Method:
  """What ``config.method`` is, decided once (:func:`method`) and handed down
  to the train step, the logs and the drift tracker.

  Attributes:
    name: ``config.method``.
    tx: its optimizer (the module docstring).
    epi_options: the options of the ``isolate`` inside ``tx`` (``mode="none"``
      for full/multi_stage with ``epi.track_importance``); None when ``tx``
      holds no EPI state.
    is_epi: static or epi: the state has a mask, the step records EPI's
      statistics and ``trainable_grad_norm``.
    clips_trainable: the clip is by the norm of the trainable entries
      (``clip_scope="trainable"``; ``isolate`` hands it the mask).
    records_drift: the run records ``importance_drift.jsonl``.
    layer_axes: each param's layer axis (``sharding.layer_axes``), or None.
  """
  name: str
  tx: optax.GradientTransformation
  epi_options: epi_jax.EPIOptions | None
  is_epi: bool
  clips_trainable: bool
  records_drift: bool
  layer_axes: Any = None

  @property
  def tracks_importance(self) -> bool:
    """The optimizer state holds EPI's importance (static, epi, or ``epi.track_importance``)."""
    return self.epi_options is not None


def method(config, layer_axes=None) -> Method:
  """The :class:`Method` of ``config`` (``layer_axes``: as for :func:`make_optimizer`)."""
  options = epi_options(config, layer_axes) if tracks_importance(config) else None
  return Method(
      name=config.method, tx=_optimizer(config, options, layer_axes), epi_options=options,
      is_epi=is_epi(config), clips_trainable=clips_trainable(config),
      # displacement keeps theta_0, not a score, in the importance slot.
      records_drift=(bool(config.epi.get("track_importance", False))
                     and options.importance != "displacement"),
      layer_axes=layer_axes)


def make_optimizer(config, layer_axes=None) -> optax.GradientTransformation:
  """The optax transformation of ``config.method`` (see the module docstring).

  ``layer_axes``: ``{param path: layer axis or None}`` (``sharding.layer_axes``
  of the model's logical axes): with ``model.scan_layers`` EPI and the weight
  decay mask then treat every slice of a stacked param as its own layer.

  With ``optimizer.skip_nonfinite`` it is wrapped in ``optax.apply_if_finite``:
  a step with non-finite gradients leaves params and optimizer (EPI) state as
  they were.
  """
  return method(config, layer_axes).tx


def _optimizer(config, options, layer_axes) -> optax.GradientTransformation:
  tx = _adamw(config, layer_axes)
  if options is not None:
    tx = epi_jax.isolate_from_options(tx, options, reset_on_release=config.epi.reset_on_release)
  if config.optimizer.skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)  # never give up
  return tx
