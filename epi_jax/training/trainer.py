"""The training loop: ``train``, its state's layout (``setup``), and reading finished
runs back (``load_run``).

``setup(config, mesh)`` decides the train state once: model spec, optimizer,
shardings and the step-0 state; ``train`` and ``abstract_state`` (checking a
large config without allocating it) both use it.

``train(config, workdir)`` builds the mesh, model, optimizer and data,
restores the newest checkpoint in ``workdir`` if there is one (params,
optimizer/EPI state, step, RNG and the data iterator's position, so the
continued run is identical to an uninterrupted one), then trains to
``config.total_steps``, writing metrics, checkpoints and snapshots. SIGTERM
or SIGINT stops it after the current step with a checkpoint. With
``checkpoint_every=0`` no checkpoint is written (short comparison runs that
are never resumed: they start over), only the snapshots.

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
import json
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from epi_jax import sharding
from epi_jax.model import setup as model_setup
from epi_jax.model.config import train_flops_per_token
from epi_jax.training import checkpoint as ckpt_lib
from epi_jax.training import config as cfg_lib
from epi_jax.training import inputs
from epi_jax.training import metrics as metrics_lib
from epi_jax.training import optim
from epi_jax.training import step as step_lib
from epi_jax.training import workdir as workdir_lib
from epi_jax.utils import files


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
    state: the full train state (``step.TrainState``).
  """
  model: Any
  tokenizer: Any
  step: int
  workdir: pathlib.Path
  interrupted: bool = False
  params: Any = None
  state: Any = None


class NonFiniteError(RuntimeError):
  """The loss or params became inf/nan; the run stopped, its last checkpoint is finite."""


# ----------------------------------------------------------------------------- the train state


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The train state (``step.TrainState``) of one config on one mesh.

  Attributes:
    spec: the model's ``ModelSpec`` (flat param names, shapes, logical axes).
    method: what the method is (``optim.method``: its optimizer, EPI options,
      clip scope, what is recorded), handed to the step and the logs.
    param_shardings: ``{path: NamedSharding}`` of the params.
    abstract: the state as ``jax.ShapeDtypeStruct`` (nothing allocated).
    shardings: the state's shardings (``abstract``'s tree).
    init: params -> the step-0 state (pure: jit it, or call ``init_state``).
  """
  spec: model_setup.ModelSpec
  method: optim.Method
  param_shardings: dict[str, jax.sharding.NamedSharding]
  abstract: step_lib.TrainState
  shardings: step_lib.TrainState
  init: Callable[[dict[str, jax.Array]], step_lib.TrainState]

  @property
  def tx(self) -> Any:
    """The method's optimizer."""
    return self.method.tx

  @property
  def layer_axes(self) -> dict[str, int | None]:
    """Each param's layer axis, for EPI (``sharding.layer_axes``)."""
    return self.method.layer_axes

  @property
  def target(self) -> step_lib.TrainState:
    """``abstract`` with its shardings: a restore target, or arguments to ``jit.lower``."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract, self.shardings)

  def init_state(self, params: dict[str, jax.Array]) -> step_lib.TrainState:
    """The step-0 state on the mesh; ``params`` (placed by ``param_shardings``) are donated.

    Raises:
      ValueError: ``params`` do not have the spec's names, shapes and dtypes.
    """
    layout = lambda tree: {k: (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in tree.items()}
    got, want = layout(params), layout(self.spec.shapes)
    if got != want:
      bad = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
      raise ValueError(f"{len(bad)} params differ from the model spec in name, shape or "
                       f"dtype: {bad[:5]}")
    return jax.jit(self.init, in_shardings=(self.param_shardings,),
                   out_shardings=self.shardings, donate_argnums=0)(params)


def fresh_start(config, mesh=None) -> tuple[TrainSetup, step_lib.TrainState, Any]:
  """``(setup, step-0 state, data iterator)`` of ``config``, for scripts that
  drive their own loop (``train`` also resumes, checkpoints and logs).

  Prepares the data, builds the model (``config.model``, ``config.seed``) and
  lays out its state on ``mesh`` (default: ``sharding.make_mesh(config.mesh)``).
  """
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  ts, params, _, it = _build(config, mesh)
  return ts, ts.init_state(params), it


def _build(config, mesh):
  """``(setup, params, tokenizer, data iterator)``: the data prepared, the model
  built, its state laid out on ``mesh`` (the start of ``train`` and ``fresh_start``)."""
  data_kwargs = inputs.ensure_data(config)
  spec, params, tokenizer = model_setup.build(config.model, config.seed, mesh)
  ts = setup(config, mesh, spec)
  return ts, params, tokenizer, inputs.make_iterator(config, tokenizer, data_kwargs, mesh)


def setup(config, mesh, spec: model_setup.ModelSpec | None = None) -> TrainSetup:
  """The one place that lays out the train state of ``config`` on ``mesh``.

  Args:
    config: a validated config (``epi_jax.training.validate``).
    mesh: the device mesh (``sharding.make_mesh``).
    spec: the model's spec (for a pretrained model: ``model_setup.build``'s);
      None takes the random-init model that ``config.model`` names.

  Raises:
    ValueError: ``spec`` is None and ``config.model`` is not a random-init model.
  """
  if spec is None:
    model_config = model_setup.model_config(config.model)
    if model_config is None:
      raise ValueError(f"config.model.init={config.model.init!r}: the model's shapes come "
                       "from its weights; pass the spec of model_setup.build to setup")
    spec = model_setup.spec_for(model_config)
  method = optim.method(config, sharding.layer_axes(spec.axes))
  tx = method.tx
  param_shardings = sharding.param_shardings(mesh, spec.shapes, spec.axes)

  def init(params):
    return step_lib.TrainState(step=jnp.zeros([], jnp.int32), params=params,
                               opt_state=tx.init(params))

  abstract = jax.eval_shape(init, spec.shapes)
  shardings = sharding.state_shardings(abstract, spec.shapes, param_shardings, mesh)
  return TrainSetup(spec=spec, method=method, param_shardings=param_shardings,
                    abstract=abstract, shardings=shardings, init=init)


def abstract_state(config, mesh):
  """``(abstract train state, its shardings)`` without allocating anything.

  For checking that a large config fits (random-init model names only).
  """
  ts = setup(cfg_lib.validate(config), mesh)
  return ts.abstract, ts.shardings


# ----------------------------------------------------------------------------- train


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
      does not fit the devices, the workdir is a file or cannot be created or
      written, another run holds it, or it holds a run with a different
      config; nothing in the workdir was changed.
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
  workdir_lib.make_workdir(workdir)  # every host (its disk may not be shared)
  lock = _take_lock(workdir)
  try:
    return _train(config, workdir, mesh, changes, stop_after, t_start)
  finally:
    lock.release()


def _train(config, workdir, mesh, changes, stop_after, t_start) -> TrainResult:
  """The run itself, once ``train``'s checks passed and it holds the workdir lock."""
  is_main = jax.process_index() == 0
  total = config.total_steps

  # --- Setup: config.json, data, model, the train state's layout.
  if is_main:
    if changes:
      print("[epi_jax] resuming with config changes: " + "; ".join(
          f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()), file=sys.stderr)
    files.write_text_atomic(workdir / "config.json", cfg_lib.to_json(config))
  ts, params, tokenizer, it = _build(config, mesh)
  spec = ts.spec
  ckpt = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints, config.async_checkpointing)

  # --- Resume from the newest checkpoint, or start at step 0.
  restored = None
  if ckpt_lib.all_processes_agree(bool(ckpt.all_steps())):
    restored = ckpt.restore_latest(ts.target)
  if restored is not None:
    state, data_state, start = restored
    it.set_state(data_state)
    del params
    if is_main:
      print(f"[epi_jax] resumed from step {start}", file=sys.stderr)
      if start < total:  # a finished run continued (total_steps raised)
        (workdir / "DONE").unlink(missing_ok=True)
  else:
    start, state = 0, ts.init_state(params)

  # --- The step, and what is written beside it.
  train_step = step_lib.cached_train_step(config, spec, ts.method, mesh, ts.shardings)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, start_step=start,
                                     total_steps=total, progress_bar=config.progress_bar)
  if config.epi.get("save_top_sets", False) and jax.process_count() > 1:
    raise ValueError("config.epi.save_top_sets=True: saving top-p sets is for "
                     "single-process runs only (the sets are read whole on one host)")
  records = metrics_lib.RefreshRecords(
      ts.method, state.opt_state, writer, resumed=restored is not None,
      save_top_sets_to=workdir if is_main and config.epi.get("save_top_sets", False) else None)
  window = metrics_lib.Window(config, train_flops_per_token(spec.config, config.data.seq_len))
  unchecked = []  # (step, metrics) not yet checked for non-finite values

  def check_finite(step: int) -> None:
    """Before anything is saved or logged: stop on a non-finite step (one host sync)."""
    flags = jax.device_get([m["finite"] for _, m in unchecked])
    bad = next(((s, m) for (s, m), ok in zip(unchecked, flags) if not ok), None)
    unchecked.clear()
    if bad is not None:
      window.log_untimed(writer, step)
      raise _nonfinite_error(*bad, saved=ckpt.all_steps())

  # --- The loop: a step, then whatever is due at it.
  last = total if stop_after is None else min(total, max(stop_after, start))
  saves_checkpoints = config.checkpoint_every > 0  # 0: snapshots only, no resume
  interrupted = last < total  # stopped by stop_after
  step = start
  try:
    with _StopFlag() as stop:
      for step in range(start + 1, last + 1):
        try:
          batch = next(it)
        except StopIteration:
          raise ValueError(f"the data ran out at step {step - 1} of {total} "
                           "(data.stages shorter than total_steps?)") from None
        state, m = train_step(state, inputs.to_global(batch, mesh, config.data.batch_size))
        window.add(m)
        unchecked.append((step, m))
        records.after_step(step, m, state.opt_state)
        at_checkpoint = saves_checkpoints and (step % config.checkpoint_every == 0
                                               or step == total)
        at_log = step % config.log_every == 0 or step == total
        if at_log or at_checkpoint or step in config.snapshot_steps:
          check_finite(step)
        if at_log:
          window.log(writer, step)
        writer.advance()
        if step in config.snapshot_steps and step != total:
          ckpt_lib.save_snapshot(workdir, step, state.params)
        if at_checkpoint:
          ckpt.save(step, state, it.get_state())
        if stop.should_stop(sync_point=at_checkpoint or at_log):
          interrupted = True
          break

    # --- The end: a last checkpoint; a finished run's final snapshot and DONE.
    check_finite(step)
    if saves_checkpoints:
      ckpt.save(step, state, it.get_state())
    if not interrupted:
      ckpt_lib.save_snapshot(workdir, step, state.params)
    ckpt.wait()
  finally:
    writer.close()
    ckpt.close()
  if not interrupted and is_main:
    files.write_json_atomic(workdir / "DONE", {"step": step, "wall_time_s": time.time() - t_start})
  return TrainResult(model=spec.bind(state.params), tokenizer=tokenizer, step=step,
                     workdir=workdir, interrupted=interrupted, params=state.params,
                     state=state)


# ----------------------------------------------------------------------------- the loop's helpers


def _nonfinite_error(step: int, m: dict[str, Any], saved: list[int]) -> NonFiniteError:
  return NonFiniteError(
      f"the loss or params became non-finite at step {step} (loss={float(m['loss'])}, "
      f"grad_norm={float(m['grad_norm'])}); stopped without saving that state. "
      + (f"The newest checkpoint (step {saved[-1]}) is finite; " if saved else
         "No checkpoint was written yet; ")
      + "lower optimizer.learning_rate or check the data and resume, or set "
      "optimizer.skip_nonfinite=True to skip such steps.")


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
      return bool(np.any(multihost_utils.process_allgather(np.array(local))))
    return local

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


# ----------------------------------------------------------------------------- starting a run


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
    except workdir_lib.RunRefused as e:  # locked, or the workdir is not writable
      problem = e
  _refuse_unless_all_ok(problem, "workdir locked")
  return lock


# ----------------------------------------------------------------------------- finished runs


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
    raise FileNotFoundError(f"No snapshots in {workdir}/snapshots yet (a run writes one at "
                            "each of config.snapshot_steps and when it finishes)")
  if snapshot is None:
    snapshot = snaps[-1]
  if snapshot not in snaps:
    raise FileNotFoundError(f"No snapshot {snapshot} in {workdir}; have {snaps}")
  spec, tokenizer = model_setup.spec_and_tokenizer(config.model)
  params = ckpt_lib.load_snapshot(workdir, snapshot, spec.shapes)
  return spec.bind(params), tokenizer, config
