"""Metrics output: ``metrics.jsonl``, ``refreshes.jsonl``, TensorBoard, a progress bar.

Only process 0 writes. On resume, records after the restored step (logged
by the interrupted run after its last checkpoint) are dropped, so each step
appears once.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np


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
  path.write_text("".join(l + "\n" for l in keep))


def read_jsonl(path) -> list[dict[str, Any]]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


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
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=start_step + 1)
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      self._tb = None
    if progress_bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def log(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = _clean(record)
    with self.metrics_path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, record["step"])
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)

  def refresh(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with self.refreshes_path.open("a") as f:
      f.write(json.dumps(_clean(record)) + "\n")
    if self._tb is not None:
      for k, v in record.get("per_layer", {}).items():
        self._tb.add_scalar(f"isolated/{k}", float(v), record["step"])

  def importance(self, record: dict[str, Any]) -> None:
    """One record of the top-p importance set's drift (see ``importance_drift``)."""
    if not self.enabled:
      return
    with self.importance_path.open("a") as f:
      f.write(json.dumps(_clean(record)) + "\n")
    if self._tb is not None:
      for k in ("jaccard_prev", "jaccard_first"):
        if record.get(k) is not None:
          self._tb.add_scalar(f"importance/{k}", float(record[k]), record["step"])

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()
