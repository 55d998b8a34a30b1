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

For EPI (``release_after=1``) the set at a refresh step is its mask, which
the tracker reads instead of selecting it a second time; for
static it shows what the frozen mask no longer follows; for full SFT it is
the drift of an unconstrained run. The previous and first sets live on the
device (two bools per parameter). A resumed run starts over from its
restore point: its first record after the resume has ``jaccard_prev`` and
``jaccard_first`` null, and ``jaccard_first`` stays null.

With ``config.epi.save_top_sets`` the set of each record (for EPI: its mask,
whatever ``release_after``) is also saved, for comparing runs step by step
(EPI's mask against full SFT's top-p set: ``epi_jax.method.lock_in``), as
``top_sets/step_<N>.npy``: the leaves flattened in ``jax.tree.leaves`` order,
concatenated and bit-packed (:func:`packed_set`; read with :func:`load_top_set`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import epi_jax
from epi_jax.method import jaccard
from epi_jax.method.layout import leaf_layout
from epi_jax.model import setup as model_setup


def _options(method):
  """EPI's options of ``method`` on the evolving schedule (refresh steps W, W+T, ...)."""
  return dataclasses.replace(method.epi_options, mode="evolving")


def top_set_fn(method) -> Callable[[Any], Any]:
  """``fn(opt_state) -> {path: bool array}``: the top-p set of the importance,
  chosen by EPI's own rule (``epi_jax.select_mask``: the same normalization,
  selection and eligible leaves as a refresh)."""
  options = _options(method)
  return lambda opt_state: epi_jax.select_mask(epi_jax.epi_importance(opt_state),
                                               options)[0]


def _counts(layout, top, prev, first):
  """Per-layer int32 counts (a leaf's, or a stacked leaf's per slice):
  |top|, |top & prev|, |top | prev|, the same with first."""
  def count(tree):
    return [jnp.sum(x, axis=leaf.reduce_axes, dtype=jnp.int32)
            for x, leaf in zip(jax.tree.leaves(tree), layout)]
  out = {"top": count(top)}
  for name, other in (("prev", prev), ("first", first)):
    if other is not None:
      out[f"and_{name}"] = count(jax.tree.map(jnp.logical_and, top, other))
      out[f"or_{name}"] = count(jax.tree.map(jnp.logical_or, top, other))
  return out


TOP_SETS_DIR = "top_sets"


def packed_set(tree) -> jax.Array:
  """A bool pytree as one uint8 array: the leaves flattened, concatenated, bit-packed."""
  return jnp.packbits(jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)]))


def top_set_path(run_dir, step: int):
  return pathlib.Path(run_dir) / TOP_SETS_DIR / f"step_{int(step)}.npy"


def load_top_set(run_dir, step: int) -> np.ndarray | None:
  """The packed set a run saved at ``step`` (None when it saved none there)."""
  path = top_set_path(run_dir, step)
  return np.load(path) if path.is_file() else None


def packed_jaccard(a: np.ndarray, b: np.ndarray) -> float:
  """Jaccard overlap of two sets packed by :func:`packed_set` (1.0 when both are empty)."""
  if a.shape != b.shape:
    raise ValueError(f"packed sets of different sizes: {a.size} and {b.size} bytes "
                     "(runs of different models?)")
  return jaccard(int(np.unpackbits(a & b).sum()), int(np.unpackbits(a | b).sum()))


class ImportanceDrift:
  """Host-side tracker: ``record(step, opt_state)`` on the refresh schedule
  (``save_to``: a run's workdir, to save each set under ``top_sets/``)."""

  def __init__(self, method, *, resumed: bool = False, save_to=None):
    self._save_to = save_to
    # EPI's saved set is its mask, even with hysteresis (release_after > 1).
    self._pack = jax.jit((lambda state, top: packed_set(epi_jax.unpacked_mask(state)))
                         if method.name == "epi" else (lambda state, top: packed_set(top)))
    self._options = _options(method)
    # EPI without hysteresis refreshes on this schedule to exactly this top-p
    # set (its mask): read it instead of selecting over every parameter again.
    self.reads_mask = method.name == "epi" and self._options.release_after == 1
    self._select = jax.jit(epi_jax.unpacked_mask if self.reads_mask
                           else top_set_fn(method))
    self._counts = None  # jitted on the first record, for the leaves' layout
    self.prev = self.first = None
    self.resumed = resumed

  def due(self, step: int) -> bool:
    return bool(epi_jax.is_refresh_step(step, self._options))

  def record(self, step: int, opt_state) -> dict[str, Any]:
    top = self._select(opt_state)
    if self._save_to is not None:
      path = top_set_path(self._save_to, step)
      path.parent.mkdir(parents=True, exist_ok=True)
      np.save(path, np.asarray(jax.device_get(self._pack(opt_state, top))))
    if self._counts is None:
      self._layout = leaf_layout(self._options, top)
      self._counts = jax.jit(functools.partial(_counts, self._layout))
      self._entries = sum(math.prod(leaf.shape) for leaf in self._layout)
    c = jax.device_get(self._counts(top, self.prev, self.first))
    total = lambda counts: sum(int(np.sum(n)) for n in counts)  # pylint: disable=unnecessary-lambda-assignment
    rec = {"step": int(step), "top_fraction": total(c["top"]) / max(self._entries, 1),
           "per_layer": {}}
    for name, n, leaf in zip(sorted(top), c["top"], self._layout):
      size = max(leaf.slice_size, 1)
      if leaf.axis is None:  # sorted: the order of jax.tree.leaves on a dict
        rec["per_layer"][name] = int(n) / size
      else:  # a stacked leaf: one entry per layer, named as unscanned
        for l, nl in enumerate(np.asarray(n).tolist()):
          rec["per_layer"][model_setup.layer_name(f"{name}[{l}]")] = nl / size
    for name in ("prev", "first"):
      if f"and_{name}" in c:
        rec[f"jaccard_{name}"] = jaccard(total(c[f"and_{name}"]), total(c[f"or_{name}"]))
      else:
        first_ever = not self.resumed and self.prev is None
        rec[f"jaccard_{name}"] = 1.0 if first_ever else None
    if self.first is None and not self.resumed:
      self.first = top
    self.prev = top
    return rec
