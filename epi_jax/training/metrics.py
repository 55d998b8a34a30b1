"""What a run records, and where: ``metrics.jsonl``, ``refreshes.jsonl``,
``importance_drift.jsonl``, TensorBoard, a progress bar.

``Window`` turns the steps between two logs into one ``metrics.jsonl`` record
(``window_record``: loss, per-task losses, lr, grad norm, timing, EPI's
statistics); ``RefreshRecords`` records what happens on the refresh
schedule: a ``refreshes.jsonl`` record at each EPI mask refresh
(``RefreshLog``) and, with ``epi.track_importance``, an
``importance_drift.jsonl`` record of the top-p importance set
(``importance_drift.ImportanceDrift``); ``MetricsWriter`` writes them. Only
process 0 writes. On resume, records after the restored step (logged by the interrupted run after
its last checkpoint) are dropped, so each step appears once.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time
from typing import Any

import jax
import numpy as np
import tqdm

from epi_jax.method import METRICS, epi_state, is_refresh_step
from epi_jax.method import lock_in
from epi_jax.method import per_layer_isolated as _per_layer
from epi_jax.model import setup as model_setup
from epi_jax.training import importance_drift
from epi_jax.training import step as step_lib
from epi_jax.utils import files


def _clean(v):
  if isinstance(v, (np.floating, float)):
    v = float(v)
    return v if math.isfinite(v) else None
  if isinstance(v, (np.integer, int)):
    return int(v)
  if isinstance(v, dict):
    return {k: _clean(x) for k, x in v.items()}
  if isinstance(v, np.ndarray) and v.ndim == 0:
    return _clean(v.item())
  return v


def _truncate(path: pathlib.Path, after_step: int) -> None:
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line).get("step", 0) <= after_step:
        keep.append(line)
    except json.JSONDecodeError:
      continue  # a line cut by the kill
  files.write_text_atomic(path, "".join(l + "\n" for l in keep))


class MetricsWriter:
  """Writes metrics of one run (a no-op on processes other than 0)."""

  def __init__(self, workdir, *, enabled: bool, start_step: int, total_steps: int,
               progress_bar: bool = True):
    self.enabled = enabled
    self.workdir = pathlib.Path(workdir)
    self._tb = self._bar = None
    if not enabled:
      return
    self.metrics_path = self.workdir / "metrics.jsonl"
    self.refreshes_path = self.workdir / "refreshes.jsonl"
    self.importance_path = self.workdir / "importance_drift.jsonl"
    for path in (self.metrics_path, self.refreshes_path, self.importance_path):
      _truncate(path, start_step)
    try:
      # Imported here, by process 0 alone: tensorboardX takes seconds to import.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=start_step + 1)
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      self._tb = None
    if progress_bar:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def _append(self, path: pathlib.Path, record: dict[str, Any], scalars: dict[str, Any]):
    """One JSON line of ``record`` (already cleaned) and its TensorBoard ``scalars``."""
    with path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(k, float(v), record["step"])

  def log(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = _clean(record)
    self._append(self.metrics_path, record, {k: v for k, v in record.items() if k != "step"})
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)

  def refresh(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = _clean(record)
    self._append(self.refreshes_path, record,
                 {f"isolated/{k}": v for k, v in record.get("per_layer", {}).items()})

  def importance(self, record: dict[str, Any]) -> None:
    """One record of the top-p importance set's drift (see ``importance_drift``)."""
    if not self.enabled:
      return
    record = _clean(record)
    self._append(self.importance_path, record,
                 {f"importance/{k}": record.get(k) for k in ("jaccard_prev", "jaccard_first")})

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


# ----------------------------------------------------------------------------- records


class Window:
  """The steps since the last log: their metrics and time, logged as one record.

  The run's first step compiles: its time is reported apart (``first_step_s``)
  and the step time (``step_time``, ``tokens_per_s``) counts the steps after it.
  """

  def __init__(self, config, flops_per_token: float | None):
    self._config, self._flops_per_token = config, flops_per_token
    self._compiled = False
    self._reset()

  def _reset(self) -> None:
    self._metrics, self._timed_steps, self._first_step_s = [], 0, None
    self._start = time.perf_counter()

  def add(self, m: dict[str, jax.Array]) -> None:
    """One step's metrics (waits for the step only when it is the run's first)."""
    self._metrics.append(m)
    if self._compiled:
      self._timed_steps += 1
      return
    jax.block_until_ready(m)
    self._first_step_s = time.perf_counter() - self._start
    self._start, self._compiled = time.perf_counter(), True

  def log(self, writer: MetricsWriter, step: int) -> None:
    """Writes the window's record (waiting for its last step) and starts a new window."""
    jax.block_until_ready(self._metrics[-1])
    elapsed = time.perf_counter() - self._start
    writer.log(window_record(step, self._metrics, self._config, elapsed, self._timed_steps,
                             self._first_step_s, self._flops_per_token))
    self._reset()

  def log_untimed(self, writer: MetricsWriter, step: int) -> None:
    """The steps so far without timing, when the run stops (a non-finite step)."""
    if self._metrics:
      writer.log(window_record(step, self._metrics, self._config, 0.0, 0, None))


def window_record(step: int, metrics: list[dict[str, Any]], config, elapsed: float,
                  timed_steps: int, first_step_s: float | None,
                  flops_per_token: float | None = None) -> dict[str, Any]:
  """The ``metrics.jsonl`` record of the steps ``metrics`` that end at ``step``.

  ``elapsed`` seconds over ``timed_steps`` steps give the step time (none when
  0); ``first_step_s`` is the compiling first step's time, when in the window.
  """
  host = jax.device_get(metrics)
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
  if first_step_s is not None:
    rec["first_step_s"] = first_step_s
  if "skipped_steps" in last:
    rec["skipped_steps"] = int(last["skipped_steps"])
  if "trainable_grad_norm" in last:  # static and epi (optim.Method.is_epi)
    rec.update(epi_record(last), trainable_grad_norm=float(last["trainable_grad_norm"]))
  return rec


def epi_record(metrics: dict[str, Any]) -> dict[str, float | int]:
  """EPI's statistics (``epi_jax.epi_metrics``) of a step's metrics, as numbers."""
  return {k: int(metrics[k]) if k == "num_refreshes" else float(metrics[k])
          for k in METRICS if k != "threshold"}


def per_layer_isolated(opt_state, layer_axes=None) -> dict[str, jax.Array]:
  """``{param path: isolated fraction}`` of the current EPI mask; a stacked
  leaf's layers are named as in the unscanned layout (``model_setup.layer_name``),
  as ``importance_drift`` names its ``per_layer``."""
  return {model_setup.layer_name(k): v for k, v in _per_layer(opt_state, layer_axes).items()}


class RefreshLog:
  """``refreshes.jsonl``: a record at each EPI mask refresh, with each layer's isolated
  fraction and the refresh's ``lock_in`` counts (``epi_jax.method.lock_in``:
  released, entered, importance of the entries isolated before it; a no-op
  for methods without EPI).

  The mask before a refresh is kept on the device (as bits: 1/8 byte per
  parameter) and read only on refresh steps.
  """

  def __init__(self, method, opt_state, writer: MetricsWriter):
    self._writer = writer
    self._opts = method.epi_options if method.is_epi else None
    if self._opts is None:
      return
    self._count = int(epi_state(opt_state).num_refreshes)  # a resumed run's refreshes
    self._per_layer = jax.jit(functools.partial(per_layer_isolated,
                                                layer_axes=method.layer_axes))
    self._counts = jax.jit(functools.partial(lock_in.state_counts, options=self._opts))
    self._copy = jax.jit(lock_in.stored_mask_copy)
    # A resumed run's mask is the one after its last logged refresh.
    self._prev_mask = self._copy(opt_state)

  def after_step(self, step: int, m: dict[str, jax.Array], opt_state) -> None:
    """Writes a record when step ``step`` (metrics ``m``) refreshed the mask."""
    if self._opts is None or not is_refresh_step(step, self._opts):
      return
    n = int(m["num_refreshes"])  # a host sync, on refresh steps only
    if n <= self._count:  # no new refresh at this step
      return
    self._count = n
    layers, counts = jax.device_get((self._per_layer(opt_state),
                                     self._counts(self._prev_mask, opt_state)))
    self._prev_mask = self._copy(opt_state)
    self._writer.refresh({"step": step, **epi_record(m),
                          "per_layer": {k: float(v) for k, v in layers.items()},
                          "lock_in": {k: counts[k] for k in lock_in.COUNT_KEYS}})


class RefreshRecords:
  """Everything a run records on EPI's refresh schedule, decided once from its
  :class:`~epi_jax.training.optim.Method`: the mask's refreshes
  (``refreshes.jsonl``, for static and EPI) and the drift of the top-p
  importance set (``importance_drift.jsonl``, ``method.records_drift``; with
  ``save_top_sets_to``, each set under that workdir's ``top_sets/``).

  ``resumed``: the run restored a checkpoint (the drift tracker's first and
  previous sets are gone with the process that had them).
  """

  def __init__(self, method, opt_state, writer: MetricsWriter, *, resumed: bool = False,
               save_top_sets_to=None):
    self._writer = writer
    self._refreshes = RefreshLog(method, opt_state, writer)
    self._drift = (importance_drift.ImportanceDrift(method, resumed=resumed,
                                                    save_to=save_top_sets_to)
                   if method.records_drift else None)

  def after_step(self, step: int, m: dict[str, jax.Array], opt_state) -> None:
    """Writes what is due after step ``step`` (its metrics ``m``, the new ``opt_state``)."""
    self._refreshes.after_step(step, m, opt_state)
    if self._drift is not None and self._drift.due(step):
      self._writer.importance(self._drift.record(step, opt_state))
