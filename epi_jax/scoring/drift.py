"""Drift analysis of the isolation mask and of the importance (numbers only).

Inputs are a run's ``refreshes.jsonl`` (one object per EPI refresh: ``step``,
``isolated_fraction``, ``num_flipped``, ``jaccard_prev``, ``jaccard_first``,
``per_layer: {param_path: isolated fraction}``), its ``importance_drift.jsonl``
(the paper's measure: the top-p *importance* set on the refresh schedule, for
every method with ``epi.track_importance``, full SFT included; same keys, see
``epi_jax.training.importance_drift``) or masks themselves (bool arrays or
pytrees of them) for the pure metric functions:

* :func:`jaccard`: ``|A & B| / |A | B|`` of two masks (1.0 when both are empty);
  :func:`num_flipped`: entries that differ; :func:`jaccard_curves`: a sequence
  of masks against the first and the previous one.
* :func:`layer_fractions`: a flat mask's isolated fraction per layer;
  :func:`layer_shares`: how the isolated entries are spread over the layers
  (each layer's share of all isolated entries).
* :func:`migration`: the fraction of isolated entries that moved to another
  layer between two refreshes, ``0.5 * sum_l |share_l(t) - share_l(t-1)|``
  (the total-variation distance of the shares; a lower bound on the entries
  that changed layer, exact when no layer both gains and loses).
* :func:`top_set`, :func:`top_set_curves`: the top-p set of importance
  snapshots and its drift (the reference for the trainer's on-device tracker).

For runs: :func:`load_refreshes`, :func:`load_importance_drift`,
:func:`drift_summary` (the curves), :func:`layer_matrix` (per block over
refreshes). The plots are in :mod:`~epi_jax.experiments.plots`, the tables in
:mod:`~epi_jax.experiments.report`.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from epi_jax.method import selection
from epi_jax.utils import files


def _leaves(mask) -> list[np.ndarray]:
  return [np.asarray(x, bool).ravel() for x in jax.tree_util.tree_leaves(mask)]


def jaccard(a, b) -> float:
  """Jaccard overlap of two masks (arrays or pytrees of the same structure), counted
  on the host (``epi_jax.method.jaccard`` of the counts)."""
  la, lb = _leaves(a), _leaves(b)
  if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
    raise ValueError("masks must have the same structure and shapes")
  return selection.jaccard(sum(int(np.sum(x & y)) for x, y in zip(la, lb)),
                           sum(int(np.sum(x | y)) for x, y in zip(la, lb)))


def num_flipped(a, b) -> int:
  """Entries whose isolation state differs between two masks."""
  return sum(int(np.sum(x != y)) for x, y in zip(_leaves(a), _leaves(b)))


def jaccard_curves(masks: Sequence[Any]) -> dict[str, list[float]]:
  """Jaccard of each mask against the first and the previous one."""
  if not masks:
    return {"jaccard_first": [], "jaccard_prev": []}
  return {"jaccard_first": [jaccard(masks[0], m) for m in masks],
          "jaccard_prev": [1.0] + [jaccard(p, m) for p, m in zip(masks[:-1], masks[1:])]}


def layer_fractions(mask: Mapping[str, Any]) -> dict[str, float]:
  """``{layer: isolated fraction}`` of a flat ``{path: bool array}`` mask."""
  return {k: float(np.mean(np.asarray(v, bool))) for k, v in mask.items()}


def layer_shares(fractions: Mapping[str, float],
                 sizes: Mapping[str, int] | None = None) -> dict[str, float]:
  """Each layer's share of the isolated entries (sums to 1; all 0 if none).

  ``sizes`` (entries per layer) turns fractions into counts; without it all
  layers weigh the same.
  """
  counts = {k: float(f) * float(sizes.get(k, 1) if sizes else 1)
            for k, f in fractions.items()}
  total = sum(counts.values())
  return {k: (c / total if total > 0 else 0.0) for k, c in counts.items()}


def migration(prev: Mapping[str, float], cur: Mapping[str, float],
              sizes: Mapping[str, int] | None = None) -> float:
  """Fraction of isolated entries that changed layer (total-variation distance)."""
  a, b = layer_shares(prev, sizes), layer_shares(cur, sizes)
  keys = set(a) | set(b)
  return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in keys)


# ----------------------------------------------------------------------------
# Runs: refreshes.jsonl, importance_drift.jsonl

def load_refreshes(workdir) -> list[dict]:
  """A run's refreshes (``workdir/refreshes.jsonl``), sorted by step."""
  return sorted(files.read_jsonl(pathlib.Path(workdir) / "refreshes.jsonl"),
                key=lambda r: int(r.get("step", 0)))


def load_importance_drift(workdir) -> list[dict]:
  """A run's top-p importance sets (``workdir/importance_drift.jsonl``), sorted by step."""
  return sorted(files.read_jsonl(pathlib.Path(workdir) / "importance_drift.jsonl"),
                key=lambda r: int(r.get("step", 0)))


def top_set(scores, ratio: float):
  """The top-``ratio`` entries of ``scores`` (an array or a pytree, pooled), as bools.

  ``k = floor(ratio * N)`` as EPI computes it (``selection.num_selected``); ties
  at the threshold are all kept. For analysis
  of saved importance snapshots (the trainer selects on the device with
  EPI's own rule, ``epi_jax.training.importance_drift``).
  """
  leaves, treedef = jax.tree_util.tree_flatten(scores)
  flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
  k = selection.num_selected(ratio, flat.size)
  thr = np.inf if k == 0 else np.partition(flat, flat.size - k)[flat.size - k]
  return jax.tree_util.tree_unflatten(treedef, [np.asarray(x) >= thr for x in leaves])


def top_set_curves(snapshots: Sequence[Any], ratio: float) -> dict[str, list[float]]:
  """Jaccard of the top-``ratio`` sets of importance snapshots vs the first and
  the previous snapshot (the paper's drift measure)."""
  return jaccard_curves([top_set(s, ratio) for s in snapshots])


_BLOCK = re.compile(r"layers[^0-9]{0,3}(\d+)")


def block_of(path: str) -> str:
  """``'block 07'`` for a parameter path inside decoder block 7, else the path's head."""
  m = _BLOCK.search(path)
  if m:
    return f"block {int(m.group(1)):02d}"
  return re.split(r"[./]", path.strip("/"))[0] or path


def drift_summary(refreshes: Sequence[Mapping], sizes: Mapping[str, int] | None = None
                  ) -> dict[str, Any]:
  """Curves over refreshes: step, jaccard_first/prev, isolated fraction, migration."""
  steps = [int(r["step"]) for r in refreshes]
  # Negative: not tracked (jaccard_first of a run without track_first_mask is -1).
  get = lambda key: [None if r.get(key) is None or float(r[key]) < 0 else float(r[key])  # pylint: disable=unnecessary-lambda-assignment
                     for r in refreshes]
  per_layer = [r.get("per_layer") or {} for r in refreshes]
  mig = [None] + [migration(p, c, sizes) if p and c else None
                  for p, c in zip(per_layer[:-1], per_layer[1:])]
  jf = [v for v in get("jaccard_first")[1:] if v is not None]
  return {"step": steps, "jaccard_first": get("jaccard_first"),
          "jaccard_prev": get("jaccard_prev"), "isolated_fraction": get("isolated_fraction"),
          "num_flipped": get("num_flipped"), "migration": mig,
          "final_jaccard_first": jf[-1] if jf else None,
          "num_refreshes": len(refreshes)}


def layer_matrix(refreshes: Sequence[Mapping], group: str = "block",
                 sizes: Mapping[str, int] | None = None
                 ) -> tuple[list[str], list[int], np.ndarray]:
  """``(rows, steps, fractions [rows, refreshes])`` of isolated fraction per layer.

  ``group='leaf'`` keeps one row per parameter; ``'block'`` averages the
  leaves of each decoder block (size-weighted when ``sizes`` is given).
  """
  if group not in ("block", "leaf"):
    raise ValueError(f"group must be 'block' or 'leaf', got {group!r}")
  steps = [int(r["step"]) for r in refreshes]
  keys = sorted({k for r in refreshes for k in (r.get("per_layer") or {})})
  rowname = (lambda k: k) if group == "leaf" else block_of
  rows = sorted({rowname(k) for k in keys})
  mat = np.full((len(rows), len(steps)), np.nan)
  for j, r in enumerate(refreshes):
    num, den = {}, {}
    for k, f in (r.get("per_layer") or {}).items():
      w = float(sizes.get(k, 1)) if sizes else 1.0
      name = rowname(k)
      num[name] = num.get(name, 0.0) + w * float(f)
      den[name] = den.get(name, 0.0) + w
    for i, name in enumerate(rows):
      if den.get(name):
        mat[i, j] = num[name] / den[name]
  return rows, steps, mat


def meaningful(curve: Mapping[str, Any]) -> bool:
  """Whether a drift curve says anything: two or more points with a tracked
  Jaccard (a static mask, chosen once, has one point, trivially 1)."""
  values = [v for v in curve.get("jaccard_first") or [] if v is not None]
  return len(curve.get("step") or []) >= 2 and len(values) >= 2
