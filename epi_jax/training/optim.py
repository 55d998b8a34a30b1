"""The optimizer of each method, as one optax transformation.

* ``full`` and ``multi_stage``: AdamW (``clip_by_global_norm`` first), with
  a linear warmup + cosine learning-rate schedule.
* ``static``: the same AdamW wrapped by ``epi_jax.isolate(mode='static')``:
  the mask chosen at the first refresh stays frozen.
* ``epi``: ``epi_jax.isolate(mode='evolving', track_first_mask=True)``.

Clipping sits *inside* the EPI wrapper, so the importance EMA is computed
from the raw (unclipped) gradients: the importance measures the loss's
sensitivity, and a clipping factor that changes from step to step would only
rescale it by step. AdamW sees the clipped gradients, exactly as in ``full``,
so the only difference between the methods is the isolation.
Weight decay applies to matrices (ndim >= 2) only, not to norm scales or
biases.
"""

from __future__ import annotations

import jax
import optax

import epi_jax


def schedule(config) -> optax.Schedule:
  """Warmup (linear from 0) then cosine decay to ``lr * min_lr_ratio``."""
  o = config.optimizer
  lr = float(o.learning_rate)
  warmup = int(o.warmup_steps)
  decay_steps = max(int(config.total_steps), warmup + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
      decay_steps=decay_steps, end_value=lr * float(o.min_lr_ratio))


def _adamw(config) -> optax.GradientTransformation:
  o = config.optimizer
  adamw = optax.adamw(schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay,
                      mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  if o.clip_norm and o.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
  return adamw


def eligible_fn(config):
  """EPI's eligibility predicate: no path containing a ``config.epi.exclude`` substring."""
  exclude = tuple(config.epi.exclude)
  return lambda path: not any(s in path for s in exclude)


def is_epi(config) -> bool:
  return config.method in ("static", "epi")


def epi_options(config, layer_axes=None) -> epi_jax.EPIOptions:
  """The EPI options of ``config`` (method static or epi): the one mapping from
  the config to EPI, validated by ``EPIOptions`` (raises ``ValueError``)."""
  e = config.epi
  importance = e.importance
  if config.method == "static" and e.static_importance:
    importance = e.static_importance  # e.g. CPI-FT's "displacement"
  return epi_jax.EPIOptions(
      isolation_ratio=e.isolation_ratio, update_interval=e.update_interval,
      ema_decay=e.ema_decay, warmup_steps=e.warmup_steps, importance=importance,
      normalization=e.normalization, selection=e.selection,
      mode="static" if config.method == "static" else "evolving",
      eligible=eligible_fn(config), layer_axes=layer_axes,
      track_first_mask=config.method == "epi", importance_dtype=e.importance_dtype,
      packed_mask=e.packed_mask, release_after=e.release_after)


def make_optimizer(config, layer_axes=None) -> optax.GradientTransformation:
  """The optax transformation of ``config.method`` (see the module docstring).

  With ``optimizer.skip_nonfinite`` it is wrapped in ``optax.apply_if_finite``:
  a step with non-finite gradients leaves params and optimizer (EPI) state as
  they were.
  """
  tx = _method_optimizer(config, layer_axes)
  if config.optimizer.skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)  # never give up
  return tx


def _method_optimizer(config, layer_axes) -> optax.GradientTransformation:
  inner = _adamw(config)
  if not is_epi(config):
    return inner
  o = epi_options(config, layer_axes)
  return epi_jax.isolate(
      inner, o.isolation_ratio, o.update_interval, o.ema_decay, warmup_steps=o.warmup_steps,
      importance=o.importance, normalization=o.normalization, selection=o.selection,
      mode=o.mode, eligible=o.eligible, layer_axes=o.layer_axes,
      track_first_mask=o.track_first_mask, importance_dtype=o.importance_dtype,
      packed_mask=o.packed_mask, release_after=o.release_after,
      reset_on_release=config.epi.reset_on_release)
