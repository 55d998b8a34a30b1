"""Drift of the top-p importance set over a run, the paper's way (``epi.track_importance``).

The paper measures drift as the Jaccard overlap of the top-p *importance*
sets between checkpoints (78% -> 45% over a run), not the overlap of a mask.
With ``config.epi.track_importance=True`` every method keeps the importance
EMA (``full`` / ``multi_stage`` through ``isolate(mode="none")``, which
isolates nothing) and, on EPI's refresh schedule (steps ``W, W+T, ...``, for
every method, static included), the trainer selects the top-p set of the
importance with EPI's own rule (layer normalization, global or per-layer
top-k, the same eligible leaves) and writes to ``importance_drift.jsonl``:

``{"step", "jaccard_prev", "jaccard_first", "top_fraction", "per_layer": {path:
fraction of the leaf in the set}}``

For EPI (``release_after=1``) the set at a refresh step is its mask; for
static it shows what the frozen mask no longer follows; for full SFT it is
the drift of an unconstrained run. The previous and first sets live on the
device (two bools per parameter). A resumed run starts over from its
restore point: its first record after the resume has ``jaccard_prev`` and
``jaccard_first`` null, and ``jaccard_first`` stays null.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

import epi_jax
from epi_jax.training import optim


def records_drift(config) -> bool:
  """Whether this run records ``importance_drift.jsonl``."""
  e = config.epi
  if not e.get("track_importance", False):
    return False
  importance = e.importance
  if config.method == "static" and e.static_importance:
    importance = e.static_importance
  # displacement keeps theta_0, not a score, in the importance slot.
  return importance != "displacement"


def _options(config, layer_axes=None):
  """EPI's options of ``config`` on the evolving schedule (refresh steps W, W+T, ...)."""
  return dataclasses.replace(optim.epi_options(config, layer_axes), mode="evolving")


def top_set_fn(config, layer_axes=None) -> Callable[[Any], Any]:
  """``fn(opt_state) -> {path: bool array}``: the top-p set of the importance,
  chosen by EPI's own rule (``epi_jax.select_mask``: the same normalization,
  selection and eligible leaves as a refresh)."""
  options = _options(config, layer_axes)
  return lambda opt_state: epi_jax.select_mask(epi_jax.epi_state(opt_state).importance,
                                               options)[0]


def _counts(top, prev, first):
  """Per-leaf int32 counts: |top|, |top & prev|, |top | prev|, the same with first."""
  count = lambda tree: [jnp.sum(x, dtype=jnp.int32) for x in jax.tree.leaves(tree)]  # pylint: disable=unnecessary-lambda-assignment
  out = {"top": count(top), "size": [jnp.int32(x.size) for x in jax.tree.leaves(top)]}
  for name, other in (("prev", prev), ("first", first)):
    if other is not None:
      out[f"and_{name}"] = count(jax.tree.map(jnp.logical_and, top, other))
      out[f"or_{name}"] = count(jax.tree.map(jnp.logical_or, top, other))
  return out


class ImportanceDrift:
  """Host-side tracker: ``record(step, opt_state)`` on the refresh schedule."""

  def __init__(self, config, *, layer_axes=None, resumed: bool = False):
    self._options = _options(config, layer_axes)
    self._select = jax.jit(top_set_fn(config, layer_axes))
    self._counts = jax.jit(_counts)
    self.prev = self.first = None
    self.resumed = resumed

  def due(self, step: int) -> bool:
    return bool(epi_jax.is_refresh_step(step, self._options))

  def record(self, step: int, opt_state) -> dict[str, Any]:
    top = self._select(opt_state)
    c = jax.device_get(self._counts(top, self.prev, self.first))
    names = sorted(top)  # the order of jax.tree.leaves on a dict
    total = float(sum(int(x) for x in c["size"]))
    rec = {"step": int(step), "top_fraction": float(sum(int(x) for x in c["top"])) / total,
           "per_layer": {k: int(n) / max(int(s), 1)
                         for k, n, s in zip(names, c["top"], c["size"])}}
    for name in ("prev", "first"):
      if f"and_{name}" in c:
        union = sum(int(x) for x in c[f"or_{name}"])
        rec[f"jaccard_{name}"] = 1.0 if union == 0 else sum(
            int(x) for x in c[f"and_{name}"]) / union
      else:
        first_ever = not self.resumed and self.prev is None
        rec[f"jaccard_{name}"] = 1.0 if first_ever else None
    if self.first is None and not self.resumed:
      self.first = top
    self.prev = top
    return rec
