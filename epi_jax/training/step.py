"""The jit-compiled train step (one optimizer update per call).

:func:`train_step` is a pure function of a :class:`TrainState` and a batch;
:func:`make_train_step` binds a run's :class:`StepSettings` and jits it
(state donated: updated in place). The loss is the token-level cross-entropy in float32,
averaged over the loss-masked (assistant) tokens of the *global* batch; with
gradient accumulation the batch is split into micro-batches whose summed
losses are divided by the global token count, so accumulating gives the
same gradient as one big batch (up to float rounding).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from epi_jax import sharding
from epi_jax.data import ALL_CONFIGS  # live: follows the task registry
from epi_jax.method import all_finite, epi_metrics, unpacked_mask
from epi_jax.model import attention as attention_lib
from epi_jax.model import setup as model_setup
from epi_jax.training import optim


class TrainState(NamedTuple):
  """What the train step carries from one update to the next (donated: updated in place).

  Checkpoints store it as the dict ``{'step', 'params', 'opt_state'}``
  (``checkpoint.to_storable``), the layout they always had.
  """
  step: jax.Array  # int32: the updates applied so far
  params: dict[str, jax.Array]  # flat ``{path: array}`` (``model_setup.ModelSpec``)
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What :func:`train_step` is traced for: fixed for a run, closed over by ``jit``.

  Attributes:
    spec: the model's ``ModelSpec``.
    method: ``trainer.setup``'s (``optim.method``): its ``tx`` updates the
      state, and ``is_epi`` adds EPI's metrics.
    mesh: the device mesh.
    grad_specs: ``{path: PartitionSpec}`` of the params, which the gradients take.
    lr: the learning-rate schedule (``optim.schedule``), for the ``lr`` metric.
    grad_accum_steps: micro-batches per step (``optimizer.grad_accum_steps``).
    skip_nonfinite: ``optimizer.skip_nonfinite`` (``tx`` is ``apply_if_finite``).
    packed: rows may hold several segments (``data.packing``).
  """
  spec: model_setup.ModelSpec
  method: optim.Method
  mesh: jax.sharding.Mesh
  grad_specs: dict[str, P]
  lr: optax.Schedule
  grad_accum_steps: int = 1
  skip_nonfinite: bool = False
  packed: bool = True

  @classmethod
  def from_config(cls, config, spec, method: optim.Method, mesh, state_shardings: TrainState):
    """The settings of ``config`` (``state_shardings``: ``trainer.setup``'s)."""
    return cls(spec=spec, method=method, mesh=mesh,
               grad_specs=jax.tree.map(lambda s: s.spec, state_shardings.params),
               lr=optim.schedule(config),
               grad_accum_steps=int(config.optimizer.grad_accum_steps),
               skip_nonfinite=bool(config.optimizer.skip_nonfinite),
               packed=bool(config.data.packing))


def loss_sums(spec, params, batch, packed: bool = True):
  """``(sum of CE over masked tokens, (per-task CE sums, per-task token counts))``.

  ``packed``: rows may hold several segments (``config.data.packing``).
  """
  model = spec.bind(params)
  logits = model(batch["inputs"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"], packed=packed).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w = batch["loss_mask"].astype(jnp.float32)
  # task_ids of padding are -1: one_hot gives a zero row.
  num_tasks = len(ALL_CONFIGS)  # read when traced: a task registered at run time counts
  per_task = jax.nn.one_hot(batch["task_ids"], num_tasks, dtype=jnp.float32) * w[..., None]
  return jnp.sum(ce * w), (jnp.einsum("blt,bl->t", per_task, ce), per_task.sum((0, 1)))


# Compiled steps kept for runs in this process whose configs differ only in
# their seed: the seed enters the initial state, not the step, so the runs of
# a comparison's later seeds trace and compile nothing (epi-jax compare).
_STEP_CACHE: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_STEP_CACHE_SIZE = 8


def cached_train_step(config, spec, method: optim.Method, mesh, state_shardings: TrainState
                      ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """:func:`make_train_step`, reused for a config equal to an earlier one but for its seed.

  The key is the whole config but ``seed`` (and, for static/EPI,
  ``epi.track_importance``) and ``epi.save_top_sets``, the mesh and the registered tasks:
  ``spec``, ``method`` and ``state_shardings`` are functions of those
  (``trainer.setup``), so the kept step is the one this call would build.
  The last ``_STEP_CACHE_SIZE`` are kept.
  """
  plain = config.to_dict()
  plain.pop("seed", None)
  if method.is_epi:  # their state holds the importance either way; the
    plain["epi"].pop("track_importance", None)  # drift tracker is host-side
  plain["epi"].pop("save_top_sets", None)  # host-side too
  key = (json.dumps(plain, sort_keys=True, default=list), mesh, tuple(ALL_CONFIGS))
  if key in _STEP_CACHE:
    _STEP_CACHE.move_to_end(key)
    return _STEP_CACHE[key]
  step = make_train_step(config, spec, method, mesh, state_shardings)
  _STEP_CACHE[key] = step
  while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
    _STEP_CACHE.popitem(last=False)
  return step


def gradients(params, batch, settings: StepSettings):
  """``(grads, loss_sum, task_loss_sum, task_tokens, denom)`` of the global batch.

  The gradients are of the mean over the batch's ``denom`` loss tokens,
  summed over ``settings.grad_accum_steps`` micro-batches.
  """
  s = settings
  denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

  def grads_and_sums(b):
    def f(p):
      total, aux = loss_sums(s.spec, p, b, s.packed)
      return total / denom, (total, aux)
    return jax.grad(f, has_aux=True)(params)

  accum = s.grad_accum_steps
  if accum == 1:
    grads, (loss_sum, (tl, tt)) = grads_and_sums(batch)
  else:
    # Micro-batch j takes rows j, j+A, ...: every device keeps its share.
    def split(x):
      b = x.shape[0]
      x = x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)
      return sharding.constrain(x, P(None, sharding.BATCH_AXES, *[None] * (x.ndim - 2)), s.mesh)
    micro = jax.tree.map(split, batch)

    def body(carry, mb):
      g, (loss, (tl, tt)) = grads_and_sums(mb)
      acc_g, acc_s, acc_tl, acc_tt = carry
      return (jax.tree.map(jnp.add, acc_g, g), acc_s + loss, acc_tl + tl, acc_tt + tt), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    num_tasks = len(ALL_CONFIGS)
    init = (zeros, jnp.zeros([], jnp.float32), jnp.zeros([num_tasks], jnp.float32),
            jnp.zeros([num_tasks], jnp.float32))
    (grads, loss_sum, tl, tt), _ = jax.lax.scan(body, init, micro)
  # Gradients laid out like their params: with scan_layers the stacked
  # gradients are otherwise free to be replicated (a full copy per device).
  grads = sharding.constrain(grads, s.grad_specs, s.mesh)
  return grads, loss_sum, tl, tt, denom


def train_step(state: TrainState, batch, *,
               settings: StepSettings) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update: ``(state, batch) -> (new state, metrics)`` (pure).

  ``metrics`` holds device scalars: ``loss`` (token mean), ``task_loss_sum`` and
  ``task_tokens`` (per task, for windowed per-task means), ``tokens``,
  ``grad_norm`` (before clipping), ``lr``, ``finite`` (the step kept the params
  finite: loss, gradients and new params all finite; with
  ``optimizer.skip_nonfinite`` only the new params, and ``skipped_steps`` counts
  the updates skipped so far), and for EPI methods the EPI state's statistics
  and ``trainable_grad_norm`` (the norm of the gradients of the entries not
  isolated: by the mask in force before this step, what
  ``clip_scope='trainable'`` clips by; in a program compiled for CPU by the
  mask after it, the entries this step's update trained; the two differ only
  at a refresh step).
  """
  s, params = settings, state.params
  # Traced for the mesh's devices: their platform picks the kernels (the
  # splash Mosaic kernel for TPUs, also when compiled on a CPU host).
  with attention_lib.on_mesh(s.mesh):
    grads, loss_sum, tl, tt, denom = gradients(params, batch, s)
  grad_norm = optax.tree.norm(grads)
  # isolate hands its inner clip the mask in force before this step (``trainable``).
  updates, opt_state = s.method.tx.update(grads, state.opt_state, params)
  if s.method.is_epi:
    # Off CPU over the mask in force before this step (the one the trainable
    # clip uses): read beside the global norm, it costs no pass of its own (2%
    # of a plain step's bytes on TPU, BENCHMARKS.md). XLA:CPU would copy every
    # mask read so, the update overwriting it in place: there, the new mask.
    # The two differ only at a refresh.
    trainable = lambda st: jax.tree.map(jnp.logical_not, unpacked_mask(st))  # pylint: disable=unnecessary-lambda-assignment
    trainable_grad_norm = jax.lax.platform_dependent(
        grads, cpu=lambda g: optim.trainable_norm(g, trainable(opt_state)),
        default=lambda g: optim.trainable_norm(g, trainable(state.opt_state)))
  new_params = optax.apply_updates(params, updates)
  new_state = TrainState(step=state.step + 1, params=new_params, opt_state=opt_state)
  loss = loss_sum / denom
  finite = all_finite(new_params)
  if not s.skip_nonfinite:
    finite &= jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  metrics = {"loss": loss, "task_loss_sum": tl, "task_tokens": tt,
             "tokens": jnp.sum(batch["loss_mask"] > 0), "grad_norm": grad_norm,
             "lr": s.lr(state.step), "finite": finite}
  if s.skip_nonfinite:  # optax.apply_if_finite's state is the outermost
    metrics["skipped_steps"] = opt_state.total_notfinite
  if s.method.is_epi:
    metrics.update(epi_metrics(opt_state), trainable_grad_norm=trainable_grad_norm)
  return new_state, metrics


def make_train_step(config, spec, method: optim.Method, mesh, state_shardings: TrainState
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """:func:`train_step` for ``config``, jitted on ``mesh`` with the state donated.

  ``state_shardings``: the state's (``trainer.setup``'s), kept in and out.
  """
  settings = StepSettings.from_config(config, spec, method, mesh, state_shardings)
  step = functools.partial(train_step, settings=settings)
  out_shardings = (state_shardings, sharding.replicated(mesh))
  if sharding.has_explicit_axes(mesh):
    # The model's ops are placed by the partitioner (Auto), as on an Auto
    # mesh; the state keeps its Explicit shardings in and out.
    step = jax.sharding.auto_axes(step, out_sharding=out_shardings)
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=out_shardings, donate_argnums=0)

