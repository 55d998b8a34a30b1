"""EPI's options, validated in one place, and the refresh schedule.

``EPIOptions`` is what ``epi_transform``, ``isolate`` and ``epi_adamw`` build
from their keyword arguments (and what the trainer builds from its config), so
every option is checked once, here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

IMPORTANCES = ("grad_sq", "grad_abs", "taylor", "displacement")
NORMALIZATIONS = ("layer_mean", "layer_max", "none")
SELECTIONS = ("global", "layer")
MODES = ("evolving", "static", "none")

# None (all), a pytree of bools shaped like the params, or a predicate on the
# path string, ``(path) -> bool`` or ``(path, layer) -> bool``.
Eligible = Union[None, Any, Callable[..., bool]]
# None (no stacked leaves), a pytree of ``int | None`` shaped like the params,
# or ``(path, shape) -> int | None``: the axis of a leaf that indexes layers.
LayerAxes = Union[None, Any, Callable[[str, tuple], Optional[int]]]


def _concrete(x) -> Optional[float]:
  """A Python number for a number or a concrete scalar array; None if traced."""
  if isinstance(x, bool):
    return None
  if isinstance(x, (int, float)):
    return x
  if isinstance(x, jax.core.Tracer) or not hasattr(x, "dtype") or getattr(x, "shape", None) != ():
    return None
  try:
    return complex(x).real if jnp.iscomplexobj(x) else float(x)
  except Exception:  # pylint: disable=broad-except
    return None


def _importance_dtype(importance_dtype) -> jnp.dtype:
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


class OptionError(ValueError):
  """A bad EPI option; ``field`` names it."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


@dataclasses.dataclass(frozen=True, kw_only=True)
class EPIOptions:
  """Every option of EPI, validated on construction (see ``epi_transform``).

  ``isolation_ratio``, ``ema_decay`` and ``update_interval`` may be arrays
  (traced under ``optax.inject_hyperparams``); concrete values are checked,
  traced ones are taken as given.
  """
  isolation_ratio: Any
  update_interval: Any
  ema_decay: Any = 0.99
  warmup_steps: Optional[int] = None
  importance: str = "grad_sq"
  normalization: str = "layer_mean"
  selection: str = "global"
  mode: str = "evolving"
  eligible: Eligible = None
  layer_axes: LayerAxes = None
  track_first_mask: bool = False
  importance_dtype: Any = None
  packed_mask: bool = False
  release_after: Optional[int] = None

  def __post_init__(self):
    def bad(field, what):
      raise OptionError(field, f"{field} {what}, got {getattr(self, field)!r}.")

    ratio = _concrete(self.isolation_ratio)
    if ratio is not None and not 0.0 <= ratio <= 1.0:
      bad("isolation_ratio", "must be in [0, 1]")
    interval = _concrete(self.update_interval)
    if interval is not None and (interval < 1 or int(interval) != interval):
      bad("update_interval", "must be an integer >= 1")
    decay = _concrete(self.ema_decay)
    if decay is not None and not 0.0 <= decay < 1.0:
      bad("ema_decay", "must be in [0, 1)")
    warmup = _concrete(self.warmup_steps)
    if warmup is not None and (warmup < 0 or int(warmup) != warmup):
      bad("warmup_steps", "must be an integer >= 0")
    for name, allowed in (("importance", IMPORTANCES), ("normalization", NORMALIZATIONS),
                          ("selection", SELECTIONS), ("mode", MODES)):
      if getattr(self, name) not in allowed:
        bad(name, f"is unknown: expected one of {allowed}")
    for name in ("track_first_mask", "packed_mask"):
      if not isinstance(getattr(self, name), bool):
        bad(name, "must be a bool")
    try:
      object.__setattr__(self, "importance_dtype", _importance_dtype(self.importance_dtype))
    except ValueError as e:
      raise OptionError("importance_dtype", str(e)) from None
    r = 1 if self.release_after is None else self.release_after
    if isinstance(r, jax.core.Tracer) or hasattr(r, "dtype"):
      raise OptionError("release_after", "release_after is an array: with "
                        "optax.inject_hyperparams list it in static_args (it sets the "
                        "state's structure).")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 255:
      bad("release_after", "must be an int in [1, 255]")
    object.__setattr__(self, "release_after", r)
    if self.importance == "displacement" and self.importance_dtype != jnp.float32:
      raise OptionError("importance_dtype", "importance='displacement' keeps the initial "
                        "params; it does not take importance_dtype=bfloat16.")
    for name in ("eligible", "layer_axes"):
      if isinstance(getattr(self, name), (jax.Array, jax.core.Tracer)):
        raise OptionError(name, f"{name} is an array: with optax.inject_hyperparams a "
                          f"callable {name} is taken for a schedule; list '{name}' in "
                          "static_args.")

  @property
  def warmup(self):
    """W: the step of the first refresh (``update_interval`` when unset)."""
    return self.update_interval if self.warmup_steps is None else self.warmup_steps


def is_refresh_step(step, options: EPIOptions):
  """Whether the update numbered ``step`` (1-based) refreshes the mask.

  Plain arithmetic on Python ints or arrays: evolving refreshes at the steps
  ``s >= 1`` with ``s >= W`` and ``(s - W) % T == 0`` (``W, W+T, ...``; with
  ``W = 0``: ``T, 2T, ...``); static only at the first of them; ``mode="none"``
  never.
  """
  w, t = options.warmup, options.update_interval
  if options.mode == "none":
    return step != step  # False, as a bool or a bool array like `step`
  if options.mode == "static":
    return step == w + t * (w < 1)  # the first scheduled step: W, or T if W = 0
  return (step >= w) & (step >= 1) & ((step - w) % t == 0)
