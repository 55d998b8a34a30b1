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
import numpy as np

IMPORTANCES = ("grad_sq", "grad_abs", "taylor", "displacement", "inner_nu")
# The importance that is no EMA of EPI's own: ``isolate``'s inner optimizer's
# second moment (Adam's ``nu``), read where it lives.
INNER_NU = "inner_nu"
DEFAULT_EMA_DECAY = 0.99
NORMALIZATIONS = ("layer_mean", "layer_max", "none")
SELECTIONS = ("global", "layer")
MODES = ("evolving", "static", "none")

# None (all), a pytree of bools shaped like the params, or a predicate on the
# path string, ``(path) -> bool`` or ``(path, layer) -> bool``.
Eligible = Union[None, Any, Callable[..., bool]]
# None (no stacked leaves), a pytree of ``int | None`` shaped like the params,
# or ``(path, shape) -> int | None``: the axis of a leaf that indexes layers.
LayerAxes = Union[None, Any, Callable[[str, tuple], Optional[int]]]


def numeric_option(field: str, x, *, integer: bool) -> Optional[float]:
  """The value of a numeric option: a Python number for a concrete one, None
  for a traced scalar (``optax.inject_hyperparams`` under jit), taken as given.

  Raises ``OptionError`` naming ``field`` for anything that is not a real
  number or a scalar array of one: a bool, a string, None, a schedule, an
  array of another shape.
  """
  def bad(what):
    raise OptionError(field, f"{field} {what}, got {x!r}.")

  if isinstance(x, (bool, np.bool_)):
    bad("must be a number, not a bool")
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    if integer:
      bad("must be an int")
    return float(x)
  if callable(x):
    bad("is a callable: to schedule it, wrap the optimizer in optax.inject_hyperparams "
        "and pass the schedule there")
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    bad("must be a number")
  if x.shape != ():
    bad(f"must be a scalar, not an array of shape {tuple(x.shape)}")
  if not (jnp.issubdtype(x.dtype, jnp.number)):
    bad(f"must be a number, not an array of {x.dtype}")
  if isinstance(x, jax.core.Tracer):
    return None
  value = complex(x).real if jnp.iscomplexobj(x) else float(x)
  # inject_hyperparams casts numbers to the params' dtype, so an injected
  # integer may arrive as a float array: integral values are accepted.
  if integer and int(value) != value:
    bad("must be an integer")
  return value


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
  traced ones are taken as given. ``ema_decay=None`` is 0.99, except with
  ``importance="inner_nu"``, where it stays None: the decay is the inner
  optimizer's (Adam's ``b2``), and any other value is refused.

  Attributes:
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
      along each leaf's second-to-last axis (1/8 byte per parameter instead
      of 1; the last axis keeps its width and sharding, see ``compact``);
      unpacked inside the masked update. ``state.mask`` then holds the
      packed bytes: read it with ``unpacked_mask(state)``.
    release_after: release hysteresis R, an unconfirmed variant of the paper
      (None, the default, means 1: off). An isolated entry is released only
      once it has been out of the top-k at R consecutive refreshes, so more
      than k entries can be isolated. R > 1 costs one uint8 per parameter
      (``state.out_streak``).
  """
  isolation_ratio: Any
  update_interval: Any
  ema_decay: Any = None
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

    ratio = numeric_option("isolation_ratio", self.isolation_ratio, integer=False)
    if ratio is not None and not 0.0 <= ratio <= 1.0:
      bad("isolation_ratio", "must be in [0, 1]")
    interval = numeric_option("update_interval", self.update_interval, integer=True)
    if interval is not None and interval < 1:
      bad("update_interval", "must be an integer >= 1")
    if self.importance == INNER_NU:
      if self.ema_decay is not None:
        raise OptionError("ema_decay", "importance='inner_nu' reads the inner optimizer's "
                          "second moment, whose decay is its b2: leave ema_decay unset "
                          f"(got {self.ema_decay!r}; epi_adamw checks it against b2).")
    elif self.ema_decay is None:
      object.__setattr__(self, "ema_decay", DEFAULT_EMA_DECAY)
    else:
      decay = numeric_option("ema_decay", self.ema_decay, integer=False)
      if decay is not None and not 0.0 <= decay < 1.0:
        bad("ema_decay", "must be in [0, 1)")
    if self.warmup_steps is not None:
      warmup = numeric_option("warmup_steps", self.warmup_steps, integer=True)
      if warmup is not None and warmup < 0:
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
    if self.importance == INNER_NU and self.importance_dtype != jnp.float32:
      raise OptionError("importance_dtype", "importance='inner_nu' keeps no importance of "
                        "its own (it reads the inner optimizer's nu, in nu's dtype): "
                        "importance_dtype does not apply.")
    if self.importance == "displacement" and self.importance_dtype != jnp.float32:
      raise OptionError("importance_dtype", "importance='displacement' keeps the initial "
                        "params; it does not take importance_dtype=bfloat16.")
    for name in ("eligible", "layer_axes"):
      if isinstance(getattr(self, name), (jax.Array, jax.core.Tracer)):
        raise OptionError(name, f"{name} is an array: with optax.inject_hyperparams a "
                          f"callable {name} is taken for a schedule; list '{name}' in "
                          "static_args.")

  @classmethod
  def from_arguments(cls, arguments) -> "EPIOptions":
    """The options among a factory's ``locals()``: every field by its name, so
    a new option is a field here and a keyword in the factories' signatures."""
    return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})

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
