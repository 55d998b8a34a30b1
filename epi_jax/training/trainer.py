"""The training loop: ``train``, and reading finished runs back (``load_run``).

``train(config, workdir)`` builds the mesh, model, optimizer and data,
restores the newest checkpoint in ``workdir`` if there is one (params,
optimizer/EPI state, step, RNG and the data iterator's position, so the
continued run is identical to an uninterrupted one), then trains to
``config.total_steps``, writing metrics, checkpoints and snapshots. SIGTERM
or SIGINT stops it after the current step with a checkpoint.

Before anything in ``workdir`` is written: the mesh must fit, no other run may
hold the workdir (``WORKDIR/LOCK``) and an existing run's ``config.json`` must
mean the same as ``config`` (see ``workdir.py``); a refused start raises
``RunRefused`` and changes nothing. Every step reports whether it kept loss,
gradients and params finite; that is checked (one host sync) before every
log, snapshot and checkpoint, so a non-finite state is never saved: the run
raises ``NonFiniteError`` instead (or, with ``optimizer.skip_nonfinite``,
such updates are skipped).

Multi-process (``jax.distributed`` initialized first, see ``distributed.py``):
every process runs this same function; each loads only its rows of the
deterministic global batch (so the data does not depend on the process
count), all take part in every checkpoint and snapshot, and process 0 alone
writes ``config.json``, metrics, TensorBoard and ``DONE``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epi_jax.method import METRICS, epi_state, is_refresh_step
from epi_jax.model.config import train_flops_per_token
from epi_jax.training import checkpoint as ckpt_lib
from epi_jax.training import config as cfg_lib
from epi_jax.training import importance_drift
from epi_jax.training import inputs
from epi_jax.training import metrics as metrics_lib
from epi_jax.training import model as model_lib
from epi_jax.training import optim, sharding
from epi_jax.training import step as step_lib
from epi_jax.training import workdir as workdir_lib


@dataclasses.dataclass
class TrainResult:
  """What ``train`` returns.

  Attributes:
    model: the nnx Llama with the final (or, when interrupted, current) params.
    tokenizer: its tokenizer.
    step: the last completed step.
    workdir: the run directory.
    interrupted: stopped early (signal or ``stop_after``) with a checkpoint.
    params: the flat params ``{path: array}`` behind ``model``.
    state: the full train state ``{'step', 'params', 'opt_state', 'rng'}``.
  """
  model: Any
  tokenizer: Any
  step: int
  workdir: pathlib.Path
  interrupted: bool = False
  params: Any = None
  state: Any = None


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop checks it after every step (see should_stop)."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signum = signum
    print(f"\n[epi_jax] got signal {signum}: checkpointing after this step",
          file=sys.stderr)

  def should_stop(self, sync_point: bool) -> bool:
    """Whether to stop now. With several processes all must stop at the same
    step, which takes a cross-process gather: done only at ``sync_point`` steps
    (log/checkpoint steps, which sync anyway), never as a per-step host sync."""
    local = self.signum is not None
    if jax.process_count() > 1:
      if not sync_point:
        return False
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(np.any(multihost_utils.process_allgather(np.array(local))))
    return local

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _window_record(step, window, config, elapsed, timed_steps, compile_s,
                   flops_per_token=None):
  host = jax.device_get(window)
  rec = {"step": step, "loss": float(np.mean([m["loss"] for m in host]))}
  tl = np.sum([m["task_loss_sum"] for m in host], axis=0)
  tt = np.sum([m["task_tokens"] for m in host], axis=0)
  for i, task in enumerate(step_lib.ALL_CONFIGS):
    if tt[i] > 0:
      rec[f"loss/{task}"] = float(tl[i] / tt[i])
  last = host[-1]
  rec.update(lr=float(last["lr"]), grad_norm=float(last["grad_norm"]),
             loss_tokens=int(sum(int(m["tokens"]) for m in host)))
  if timed_steps > 0:
    step_time = elapsed / timed_steps
    rec.update(step_time=step_time,
               tokens_per_s=config.data.batch_size * config.data.seq_len / step_time)
    if flops_per_token:  # achieved model FLOP/s: utilisation on any backend
      rec["gflops"] = flops_per_token * rec["tokens_per_s"] / 1e9
  if compile_s is not None:
    rec["first_step_s"] = compile_s
  if "skipped_steps" in last:
    rec["skipped_steps"] = int(last["skipped_steps"])
  if optim.is_epi(config):
    rec.update(_epi_record(last), trainable_grad_norm=float(last["trainable_grad_norm"]))
  return rec


def _epi_record(metrics) -> dict:
  """EPI's statistics (``epi_jax.epi_metrics``) of a step's metrics, as numbers."""
  return {k: int(metrics[k]) if k == "num_refreshes" else float(metrics[k])
          for k in METRICS if k != "threshold"}


def _write_json_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)  # atomic: never a half-written file


def _write_json(path: pathlib.Path, obj) -> None:
  _write_json_text(path, json.dumps(obj, indent=2, sort_keys=True, default=list))


def _init_fn(config, tx):
  rng0 = jax.random.key_data(jax.random.key(config.seed))

  def init_state(params):
    return {"step": jnp.zeros([], jnp.int32), "params": params,
            "opt_state": tx.init(params), "rng": rng0}

  return init_state


def abstract_state(config, mesh):
  """``(abstract train state, its shardings)`` without allocating anything.

  For checking that a large config fits (random-init model names only).
  """
  config = cfg_lib.validate(config)
  spec = model_lib.spec_for(model_lib.model_config(config.model))
  tx = optim.make_optimizer(config, sharding.layer_axes(spec.axes))
  p_shard = sharding.param_shardings(mesh, spec.shapes, spec.axes)
  abstract = jax.eval_shape(_init_fn(config, tx), spec.shapes)
  return abstract, sharding.state_shardings(abstract, spec.shapes, p_shard, mesh)


class NonFiniteError(RuntimeError):
  """The loss or params became inf/nan; the run stopped, its last checkpoint is finite."""


def _refuse_unless_all_ok(problem: workdir_lib.RunRefused | None, what: str) -> None:
  """Raises ``problem`` (found by process 0) on every process."""
  if ckpt_lib.all_processes_agree(problem is not None):
    raise problem or workdir_lib.RunRefused(f"process 0 refused to start ({what}); "
                                            "see its message")


def _check_workdir(config, workdir: pathlib.Path, allow_config_change: bool):
  """The allowed config changes against ``config.json``, or RunRefused (reads only)."""
  changes, problem = {}, None
  path = workdir / "config.json"
  if jax.process_index() == 0 and path.exists():
    try:
      saved = json.loads(cfg_lib.to_json(cfg_lib.from_json(path.read_text())))
    except (ValueError, TypeError) as e:
      problem = workdir_lib.RunRefused(f"{path} cannot be read ({e}): not resuming over "
                                       "it; use a new --workdir or restore the file")
    else:
      try:
        changes = workdir_lib.check_resume(saved, json.loads(cfg_lib.to_json(config)),
                                           workdir=workdir,
                                           allow_config_change=allow_config_change)
      except workdir_lib.ConfigChanged as e:
        problem = e
  _refuse_unless_all_ok(problem, "config mismatch")
  return changes


def _take_lock(workdir: pathlib.Path):
  lock, problem = workdir_lib.WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except workdir_lib.WorkdirLocked as e:
      problem = e
  _refuse_unless_all_ok(problem, "workdir locked")
  return lock


def train(config, workdir, *, stop_after: int | None = None,
          allow_config_change: bool = False) -> TrainResult:
  """Trains (or resumes) one run in ``workdir``; see the module docstring.

  Args:
    config: an ``ml_collections.ConfigDict`` (validated here first).
    workdir: the run directory (created).
    stop_after: stop with a checkpoint once this global step is reached
      (simulates a kill in tests); None trains to ``total_steps``.
    allow_config_change: resume although fields in
      ``workdir.SAFE_FIELDS`` (total_steps, log_every, ...) differ from the
      workdir's ``config.json``.

  Raises:
    ValueError: a bad config. ``workdir.RunRefused`` (a ValueError): the mesh
      does not fit the devices, another run holds the workdir, or it holds a
      run with a different config; nothing in the workdir was changed.
    NonFiniteError: the loss or params became non-finite (the checkpoints
      written before stay, all finite).
  """
  t_start = time.time()
  config = cfg_lib.validate(config)
  workdir = pathlib.Path(workdir)
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as e:
    raise workdir_lib.RunRefused(str(e)) from None
  bs_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.data.batch_size % (bs_shards * config.optimizer.grad_accum_steps):
    raise workdir_lib.RunRefused(
        f"config.data.batch_size={config.data.batch_size} must be divisible by "
        f"grad_accum_steps x data x fsdp = {config.optimizer.grad_accum_steps} x {bs_shards}")
  changes = _check_workdir(config, workdir, allow_config_change)
  workdir.mkdir(parents=True, exist_ok=True)  # every host (its disk may not be shared)
  lock = _take_lock(workdir)
  try:
    return _train(config, workdir, mesh, changes, stop_after, t_start)
  finally:
    lock.release()


def _train(config, workdir, mesh, changes, stop_after, t_start) -> TrainResult:
  is_main = jax.process_index() == 0
  if is_main:
    if changes:
      print("[epi_jax] resuming with config changes: " + "; ".join(
          f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()), file=sys.stderr)
    _write_json_text(workdir / "config.json", cfg_lib.to_json(config))
  data_kwargs = inputs.ensure_data(config)
  spec, params, tokenizer = model_lib.build(config.model, config.seed, mesh)
  layer_axes = sharding.layer_axes(spec.axes)
  tx = optim.make_optimizer(config, layer_axes)
  p_shard = sharding.param_shardings(mesh, spec.shapes, spec.axes)
  init_state = _init_fn(config, tx)
  abstract = jax.eval_shape(init_state, params)
  st_shard = sharding.state_shardings(abstract, spec.shapes, p_shard, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints, config.async_checkpointing)
  it = inputs.make_iterator(config, tokenizer, data_kwargs, mesh)
  restored = None
  if ckpt_lib.all_processes_agree(bool(ckpt.all_steps())):
    restored = ckpt.restore_latest(jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, st_shard))
  if restored is not None:
    state, data_state, step = restored
    it.set_state(data_state)
    del params
    if is_main:
      print(f"[epi_jax] resumed from step {step}", file=sys.stderr)
      if step < config.total_steps:  # a finished run continued (total_steps raised)
        (workdir / "DONE").unlink(missing_ok=True)
  else:
    step = 0
    state = jax.jit(init_state, in_shardings=(p_shard,), out_shardings=st_shard,
                    donate_argnums=0)(params)
  total = config.total_steps
  num_refreshes = (int(epi_state(state["opt_state"]).num_refreshes)
                   if optim.is_epi(config) else 0)

  train_step = step_lib.make_train_step(config, spec, tx, mesh, st_shard)
  flops_per_token = train_flops_per_token(spec.config, config.data.seq_len)
  epi_opts = optim.epi_options(config, layer_axes) if optim.is_epi(config) else None
  per_layer = (jax.jit(functools.partial(step_lib.per_layer_isolated, layer_axes=layer_axes))
               if epi_opts is not None else None)
  drift = (importance_drift.ImportanceDrift(config, layer_axes=layer_axes,
                                            resumed=restored is not None)
           if importance_drift.records_drift(config) else None)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, start_step=step,
                                     total_steps=total,
                                     progress_bar=config.progress_bar)
  interrupted = False
  window, t_window, timed, compile_s, first = [], time.perf_counter(), 0, None, True
  unchecked = []  # (step, metrics) not yet checked for non-finite values

  def check_finite():
    """Before anything is saved or logged: stop on a non-finite step (one host sync)."""
    flags = jax.device_get([m["finite"] for _, m in unchecked])
    bad = next(((s, m) for (s, m), ok in zip(unchecked, flags) if not ok), None)
    unchecked.clear()
    if bad is None:
      return
    s, m = bad
    if window:
      writer.log(_window_record(step, window, config, 0.0, 0, None))
    saved = ckpt.all_steps()
    raise NonFiniteError(
        f"the loss or params became non-finite at step {s} (loss={float(m['loss'])}, "
        f"grad_norm={float(m['grad_norm'])}); stopped without saving that state. "
        + (f"The newest checkpoint (step {saved[-1]}) is finite; " if saved else
           "No checkpoint was written yet; ")
        + "lower optimizer.learning_rate or check the data and resume, or set "
        "optimizer.skip_nonfinite=True to skip such steps.")

  try:
    with _StopFlag() as stop:
      while step < total:
        if stop_after is not None and step >= stop_after:
          interrupted = True
          break
        try:
          batch = next(it)
        except StopIteration:
          raise ValueError(f"the data ran out at step {step} of {total} "
                           "(data.stages shorter than total_steps?)") from None
        state, m = train_step(state, inputs.to_global(batch, mesh, config.data.batch_size))
        step += 1
        window.append(m)
        unchecked.append((step, m))
        if first:  # the first step compiles: timed separately
          jax.block_until_ready(m)
          compile_s = time.perf_counter() - t_window
          t_window, first = time.perf_counter(), False
        else:
          timed += 1
        if epi_opts is not None and is_refresh_step(step, epi_opts):
          n = int(m["num_refreshes"])
          if n > num_refreshes:
            num_refreshes = n
            layers = jax.device_get(per_layer(state["opt_state"]))
            writer.refresh({"step": step, **_epi_record(m),
                            "per_layer": {k: float(v) for k, v in layers.items()}})
        if drift is not None and drift.due(step):
          writer.importance(drift.record(step, state["opt_state"]))
        at_checkpoint = step % config.checkpoint_every == 0 or step == total
        at_log = step % config.log_every == 0 or step == total
        if at_log or at_checkpoint or step in config.snapshot_steps:
          check_finite()
        if at_log:
          jax.block_until_ready(m)
          elapsed = time.perf_counter() - t_window
          writer.log(_window_record(step, window, config, elapsed, timed, compile_s,
                                    flops_per_token))
          window, t_window, timed, compile_s = [], time.perf_counter(), 0, None
        writer.advance()
        if step in config.snapshot_steps and step != total:
          ckpt_lib.save_snapshot(workdir, step, state["params"])
        if at_checkpoint:
          ckpt.save(step, state, it.get_state())
        if stop.should_stop(sync_point=at_checkpoint or at_log):
          interrupted = True
          break
    check_finite()
    ckpt.save(step, state, it.get_state())
    if not interrupted:
      ckpt_lib.save_snapshot(workdir, step, state["params"])
    ckpt.wait()
  finally:
    writer.close()
    ckpt.close()
  if not interrupted and is_main:
    _write_json(workdir / "DONE", {"step": step, "wall_time_s": time.time() - t_start})
  return TrainResult(model=spec.bind(state["params"]), tokenizer=tokenizer, step=step,
                     workdir=workdir, interrupted=interrupted, params=state["params"],
                     state=state)


def is_finished(workdir) -> bool:
  """Whether the run in ``workdir`` completed (``DONE`` exists)."""
  return (pathlib.Path(workdir) / "DONE").exists()


def list_snapshots(workdir) -> list[int]:
  """Steps with a params-only snapshot, sorted."""
  return ckpt_lib.list_snapshots(workdir)


def load_config(workdir):
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"No config.json in {workdir}: not a training run directory")
  return cfg_lib.from_json(path.read_text())


def load_run(workdir, snapshot: int | None = None):
  """``(model, tokenizer, config)`` of a run's snapshot (default: the final one)."""
  config = load_config(workdir)
  snaps = list_snapshots(workdir)
  if not snaps:
    raise FileNotFoundError(f"No snapshots in {workdir}/snapshots")
  if snapshot is None:
    snapshot = snaps[-1]
  if snapshot not in snaps:
    raise FileNotFoundError(f"No snapshot {snapshot} in {workdir}; have {snaps}")
  if config.model.init == "random":
    tokenizer, spec = model_lib.ByteTokenizer(), model_lib.spec_for(
        model_lib.model_config(config.model))
  else:
    spec, _, tokenizer = model_lib.load_for_eval(config.model)
  params = ckpt_lib.load_snapshot(workdir, snapshot, spec.shapes)
  return spec.bind(params), tokenizer, config
