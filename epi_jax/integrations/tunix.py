"""EPI in Tunix's ``PeftTrainer`` (and MaxText's SFT, a ``PeftTrainer`` subclass).

``PeftTrainer`` takes any optax transformation (``nnx.Optimizer(model, tx,
wrt=nnx.Param)``, or ``wrt=nnx.LoRAParam`` for a LoRA model), so EPI drops in
as ``epi_jax.epi_adamw(...)``. This module adds what our own trainer does
around it:

* ``epi_optimizer(model, ...)``: AdamW inside ``isolate``, built as our
  trainer builds it: ``inject_hyperparams`` (Tunix logs the learning rate
  from it), ``layer_axes`` read from the model's stacked params, norms and
  embeddings not eligible, weight decay on matrices only, optional clipping
  inside EPI (the importance sees the raw gradients). ``wrap_optimizer(tx,
  model, ...)`` does the same around any optimizer (MaxText's).
* ``EPIHook``: a Tunix training hook logging ``epi_metrics`` (and per-layer
  isolated fractions at refreshes) to the trainer's metrics logger.

Clipping: ``PeftTrainer`` (Tunix 0.1.7) has no clipping option of its own;
clipping is part of the optax transformation it is given. ``max_grad_norm``
here puts it inside EPI, and ``clip_scope="trainable"`` clips by the norm of
the entries not isolated before the step (``clip_by_trainable_norm``, fed
the mask by ``isolate`` itself, as in our train step). Tunix's
logged ``grad_norm`` stays the global norm of all raw gradients.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from epi_jax.method import METRICS, epi_state, isolate, per_layer_isolated
from epi_jax.method.layout import path_str
from epi_jax.method.options import EPIOptions, is_refresh_step
from epi_jax.training.optim import clip_by_trainable_norm

INSTALL = ("`make tunix` in an epi_jax checkout, or pip install --no-deps google-tunix==0.1.7, "
           "then requirements/tunix.txt with the installed versions held (README: 'EPI in "
           "Tunix')")

try:
  from tunix.sft import hooks as _hooks
  from tunix.sft import metrics_logger as _metrics_logger
  from tunix.sft import utils as _sft_utils
except ImportError as e:
  raise ImportError(f"epi_jax.integrations.tunix needs Tunix ({e}); install it with: "
                    f"{INSTALL}") from e

__all__ = ["EPIHook", "epi_optimizer", "model_layer_axes", "wrap_optimizer"]


def _key(path: str) -> str:
  # nnx.Optimizer initializes the state from Variables (paths end in "/value")
  # and updates it with pure arrays (no suffix): one key for both.
  return path[:-len("/value")] if path.endswith("/value") else path


def _wrt(model):
  """What ``PeftTrainer`` optimizes: the LoRA params of a LoRA model, else all params."""
  return nnx.LoRAParam if _sft_utils.is_lora_enabled(model) else nnx.Param


def model_layer_axes(model: nnx.Module, wrt=None, axis_name: str = "layers"
                     ) -> Optional[dict[str, Optional[int]]]:
  """``{param path: layer axis or None}`` from the params' sharding names.

  A stacked (``nnx.vmap``/``nnx.scan``-made) param carries ``axis_name`` in its
  ``out_sharding`` metadata at the axis that indexes layers (``nnx.PARTITION_NAME``;
  MaxText and this project name it ``"layers"``). None when no param is stacked.
  ``wrt`` defaults to what ``PeftTrainer`` trains (LoRA params or all params).
  """
  wrt = _wrt(model) if wrt is None else wrt
  axes = {}
  for path, var in nnx.to_flat_state(nnx.state(model, wrt)):
    meta = var.get_metadata()
    names = tuple(meta.get("out_sharding") or meta.get("sharding_names") or ())
    axes["/".join(map(str, path))] = names.index(axis_name) if axis_name in names else None
  return axes if any(a is not None for a in axes.values()) else None


def _is_auto(axes) -> bool:
  return isinstance(axes, str) and axes == "auto"


def _axes_fn(axes):
  """``(path, shape) -> axis`` from None, a ``{path: axis}`` dict or such a callable."""
  if axes is None or callable(axes):
    return axes
  if not isinstance(axes, dict):
    raise ValueError("layer_axes must be 'auto', None, a {path: axis} dict or a callable "
                     f"(path, shape) -> axis, got {type(axes).__name__}.")
  return lambda path, shape: axes.get(_key(path))


def wrap_optimizer(inner: optax.GradientTransformation, model: Optional[nnx.Module], *,
                   isolation_ratio: float, update_interval: int, ema_decay: float = 0.99,
                   warmup_steps: Optional[int] = None, mode: str = "evolving",
                   max_grad_norm: Optional[float] = None, clip_scope: str = "trainable",
                   exclude: Sequence[str] = ("norm", "embed"), layer_axes: Any = "auto",
                   track_first_mask: bool = True,
                   **epi_options) -> optax.GradientTransformationExtraArgs:
  """Any optimizer (e.g. MaxText's ``get_optimizer``) inside EPI, for ``model``.

  Args:
    inner: the optimizer; its final updates are zeroed at isolated entries.
    model: the model the trainer gets (LoRA or not), read only for
      ``layer_axes="auto"``.
    isolation_ratio, update_interval, ema_decay, warmup_steps, mode: EPI's
      (``epi_jax.isolate``); further EPI options go in ``epi_options``.
    max_grad_norm: clip the gradients ``inner`` sees to this norm (None: no
      clipping). EPI's importance always sees the raw gradients.
    clip_scope: ``"trainable"`` (the norm of the entries not isolated before
      the step) or ``"global"`` (``optax.clip_by_global_norm``).
    exclude: params whose path contains one of these substrings are never
      isolated (norm scales and embeddings by default).
    layer_axes: ``"auto"`` (read from the model: ``model_layer_axes(model)``),
      None, a ``{path: axis}`` dict or a callable ``(path, shape) -> axis``.
    track_first_mask: keep the first mask for ``jaccard_first``.
  """
  if clip_scope not in ("trainable", "global"):
    raise ValueError(f"clip_scope must be 'trainable' or 'global', got {clip_scope!r}.")
  if max_grad_norm is not None and not max_grad_norm > 0:
    raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}.")
  if isinstance(exclude, str):
    raise ValueError(f"exclude must be a sequence of substrings, got the string {exclude!r}.")
  if _is_auto(layer_axes) and model is None:
    raise ValueError("layer_axes='auto' reads the model: pass it, or layer_axes=None.")
  axes = _axes_fn(model_layer_axes(model) if _is_auto(layer_axes) else layer_axes)
  exclude = tuple(exclude)
  trainable = max_grad_norm is not None and clip_scope == "trainable"
  if max_grad_norm is not None:
    clip = (clip_by_trainable_norm(max_grad_norm) if trainable
            else optax.clip_by_global_norm(max_grad_norm))
    inner = optax.chain(clip, inner)
  return isolate(inner, isolation_ratio, update_interval, ema_decay, warmup_steps=warmup_steps,
                 mode=mode, eligible=lambda path: not any(s in path for s in exclude),
                 layer_axes=axes, track_first_mask=track_first_mask, **epi_options)


def epi_optimizer(model: nnx.Module, learning_rate: optax.ScalarOrSchedule, *,
                  isolation_ratio: float, update_interval: int,
                  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 1e-4, layer_axes: Any = "auto",
                  **wrap_options) -> optax.GradientTransformationExtraArgs:
  """EPI-AdamW for ``PeftTrainer(model, epi_optimizer(model, ...), config)``.

  ``learning_rate`` (a float or an optax schedule) is injected with
  ``optax.inject_hyperparams``, so that Tunix logs it. ``b1`` ... ``weight_decay``
  are AdamW's, weight decay on matrices only (ndim >= 2 per layer), as in our
  trainer. The other arguments are ``wrap_optimizer``'s.
  """
  axes = _axes_fn(model_layer_axes(model) if _is_auto(layer_axes) else layer_axes)

  def decays(params):  # matrices only; a stacked leaf's layer axis does not count
    def stacked(p, x):
      return axes is not None and axes(path_str(p), x.shape) is not None
    return jax.tree_util.tree_map_with_path(lambda p, x: x.ndim - stacked(p, x) >= 2, params)

  def make(learning_rate):
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decays)
    return wrap_optimizer(adamw, model, isolation_ratio=isolation_ratio,
                          update_interval=update_interval, layer_axes=axes, **wrap_options)

  make(0.0)  # validates every option now, not at the first init
  return optax.inject_hyperparams(make, hyperparam_dtype=jnp.float32)(learning_rate=learning_rate)


class EPIHook(_hooks.TrainingHooks):
  """Logs EPI's statistics to the ``PeftTrainer``'s metrics logger.

  At every ``log_every``-th step and at every refresh: ``epi_metrics``
  (``{prefix}isolated_fraction``, ``jaccard_prev``, ``jaccard_first``,
  ``num_refreshes``, ``num_flipped``, ``threshold``); at refreshes also
  ``{prefix}isolated/<layer>`` per layer (a stacked param's slices as
  ``path[l]``). Steps are Tunix's (1-based, as its loss).

  Tunix writes a step's metrics one step late (after the next step is
  dispatched) and donates the optimizer state to each step, so the hook
  copies the statistics on device when a logged step's state is current
  (``on_train_step_start``) and fetches them when Tunix writes that step:
  steps that log nothing cost no device work and no host sync.

  ``update_interval``, ``warmup_steps`` and ``mode`` must be the optimizer's
  (they say which steps refresh, on the host). ``layer_axes``: ``"auto"``
  (read from ``trainer.model``) or what the optimizer was given.
  ``wrapped``: the trainer's other hooks (a trainer takes one hooks object,
  e.g. MaxText's ``SFTTrainingHooks``); each call goes to them first.
  """

  def __init__(self, update_interval: int, warmup_steps: Optional[int] = None,
               mode: str = "evolving", *, log_every: int = 1, layer_axes: Any = "auto",
               prefix: str = "epi/", wrapped: Optional[_hooks.TrainingHooks] = None):
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
      raise ValueError(f"log_every must be an int >= 1, got {log_every!r}.")
    self._options = EPIOptions(isolation_ratio=0.0, update_interval=update_interval,
                               warmup_steps=warmup_steps, mode=mode)
    self.log_every = log_every
    self.prefix = prefix
    self._layer_axes = layer_axes
    self._pending = {}  # step -> (scalars, per-layer or None), on device
    self._scalars = jax.jit(lambda s: jnp.stack([jnp.asarray(x, jnp.float32) for x in s]))
    self._per_layer = None
    self.wrapped = wrapped

  def is_refresh(self, step: int) -> bool:
    return step >= 1 and bool(is_refresh_step(step, self._options))

  def logs(self, step: int) -> bool:
    return step >= 1 and (step % self.log_every == 0 or self.is_refresh(step))

  def _snapshot(self, trainer, step: int):
    epi = epi_state(nnx.as_pure(trainer.optimizer.opt_state))
    scalars = self._scalars(tuple(getattr(epi, k) for k in METRICS))
    layers = None
    if self.is_refresh(step):
      if self._per_layer is None:
        axes = self._layer_axes
        axes = _axes_fn(model_layer_axes(trainer.model) if _is_auto(axes) else axes)
        self._per_layer = jax.jit(lambda s: per_layer_isolated(s, axes))
      layers = self._per_layer(epi)
    return scalars, layers

  def on_train_step_start(self, train_ctx):
    if self.wrapped is not None:
      self.wrapped.on_train_step_start(train_ctx)
    step = train_ctx.train_steps  # updates done: the state is that of this step
    if self.logs(step) and step not in self._pending:
      self._pending[step] = self._snapshot(train_ctx, step)

  def on_train_step_end(self, train_ctx, train_step, train_loss):
    if self.wrapped is not None:
      self.wrapped.on_train_step_end(train_ctx, train_step, train_loss)
    if not self.logs(train_step):
      return
    snapshot = self._pending.pop(train_step, None)
    for s in [s for s in self._pending if s < train_step]:
      del self._pending[s]  # e.g. the restored step of a resumed run (logged before)
    if snapshot is None:
      if train_ctx.train_steps != train_step:
        return  # not a state this hook saw
      snapshot = self._snapshot(train_ctx, train_step)  # the last step, written at close()
    scalars, layers = jax.device_get(snapshot)
    log = train_ctx.metrics_logger.log
    mode = _metrics_logger.Mode.TRAIN
    for name, value in zip(METRICS, scalars):
      log(train_ctx.metrics_prefix, self.prefix + name, np.float32(value), mode, train_step)
    for name, value in (layers or {}).items():
      log(train_ctx.metrics_prefix, f"{self.prefix}isolated/{name}", np.float32(value), mode,
          train_step)

  def on_train_start(self, train_ctx):
    if self.wrapped is not None:
      self.wrapped.on_train_start(train_ctx)

  def on_train_end(self, train_ctx):
    if self.wrapped is not None:
      self.wrapped.on_train_end(train_ctx)

  def on_eval_step_start(self, train_ctx):
    if self.wrapped is not None:
      self.wrapped.on_eval_step_start(train_ctx)

  def on_eval_step_end(self, train_ctx, eval_loss):
    if self.wrapped is not None:
      self.wrapped.on_eval_step_end(train_ctx, eval_loss)
