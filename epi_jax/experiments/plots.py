"""The comparison's plots (PNG files): drift curves, layer heatmaps, per-task bars.

Each ``plot_*`` writes one figure to ``path`` (creating its folder) and returns
the path, or None when there is nothing to plot. Inputs are the curves of
:func:`epi_jax.scoring.drift.drift_summary`, the records of a run's
``refreshes.jsonl`` / ``importance_drift.jsonl`` and the ``methods`` entries of
``results.json`` (:mod:`epi_jax.experiments.report`).
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from epi_jax.scoring import drift as drift_lib


def _nan(values) -> list:
  return [np.nan if v is None else v for v in values]


def pyplot():
  """``matplotlib.pyplot`` on the file-only Agg backend."""
  # Imported here, not at the top: matplotlib is a large import that only the plots need.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _panels(curves: Mapping[str, Mapping[str, Any]], panels, path, *, xlabel: str,
            fractions: Sequence[int]) -> pathlib.Path:
  """One figure, a panel per ``(title, values of a curve)`` of ``panels``, a line
  per curve over its ``step``; the panels at ``fractions`` span [0, 1]."""
  plt = pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
  for ax, (title, values) in zip(axes, panels):
    for label, c in curves.items():
      ys = values(c)
      if ys:
        ax.plot(c["step"], _nan(ys), marker=".", label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  for i in fractions:
    axes[i].set_ylim(0, 1.02)
  axes[0].legend(fontsize=8)
  return save(plt, fig, path)


def plot_drift(curves: Mapping[str, Mapping[str, Any]], path, *,
               what: str = "mask") -> pathlib.Path | None:
  """Jaccard vs first and vs previous set over refresh steps, one line per run.

  ``what``: ``'mask'`` (the isolation mask) or ``'top-p importance set'``.
  Curves that mean nothing (see :func:`~epi_jax.scoring.drift.meaningful`) are left out.
  """
  curves = {k: v for k, v in curves.items() if drift_lib.meaningful(v)}
  if not curves:
    return None
  entries = "isolated entries" if what == "mask" else "top-p entries"
  return _panels(curves, ((f"Jaccard vs first {what}", lambda c: c["jaccard_first"]),
                          (f"Jaccard vs previous {what}", lambda c: c["jaccard_prev"]),
                          (f"{entries} migrating across layers",
                           lambda c: c.get("migration") or [])),
                 path, xlabel="step", fractions=(0, 1))


def plot_lock_in(curves: Mapping[str, Mapping[str, Any]], path) -> pathlib.Path | None:
  """Per refresh: the share of the isolated entries released, the importance of
  the isolated entries over the trainable ones, the Jaccard of the mask vs full
  SFT's top-p set; one line per run (``lock_in_summary`` curves with ``step``).
  Runs with fewer than two refreshes (a static mask) are left out."""
  curves = {k: c for k, c in curves.items() if len(c.get("step", ())) > 1}
  if not curves:
    return None
  return _panels(curves, (("share of the isolated entries released",
                           lambda c: c.get("release_fraction")),
                          ("importance isolated / trainable", lambda c: c.get("importance_ratio")),
                          ("Jaccard of the mask vs full SFT's top-p set",
                           lambda c: c.get("jaccard_vs_full"))),
                 path, xlabel="refresh step", fractions=(0, 2))


def save(plt, fig, path) -> pathlib.Path:
  """Writes ``fig`` to ``path`` (creating its folder) and closes it."""
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_layer_heatmap(refreshes: Sequence[Mapping], path, *, title: str = "",
                       group: str = "block", sizes=None) -> pathlib.Path | None:
  """Isolated fraction per layer (rows) over refreshes (columns)."""
  rows, steps, mat = drift_lib.layer_matrix(refreshes, group=group, sizes=sizes)
  if not rows or not steps:
    return None
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(steps) + 3), max(3, 0.22 * len(rows) + 1.5)))
  im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis")
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels(rows, fontsize=6)
  ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
  ax.set_xticks(ticks)
  ax.set_xticklabels([str(steps[i]) for i in ticks], fontsize=7)
  ax.set_xlabel("refresh step")
  ax.set_title(title or "isolated fraction per layer")
  fig.colorbar(im, ax=ax, label="isolated fraction")
  return save(plt, fig, path)


def plot_task_metrics(methods: Mapping[str, Mapping[str, Any]], path, *,
                      key: str = "normalized") -> pathlib.Path | None:
  """Grouped bars: one group per task (plus ``average``), one bar per method.

  ``methods[m][key][task] = {'mean': x, 'std': s}`` (the ``results.json``
  layout of :mod:`epi_jax.experiments.report`).
  """
  names = [m for m in methods if methods[m].get(key)]
  if not names:
    return None
  tasks = list(methods[names[0]][key])
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks) + 2), 3.8))
  width = 0.8 / len(names)
  x = np.arange(len(tasks))
  for i, m in enumerate(names):
    vals = [methods[m][key].get(t, {}) for t in tasks]
    mean = [np.nan if v.get("mean") is None else v["mean"] for v in vals]
    std = [v.get("std") or 0.0 for v in vals]
    ax.bar(x + (i - (len(names) - 1) / 2) * width, mean, width, yerr=std, label=m,
           capsize=2)
  ax.set_xticks(x)
  ax.set_xticklabels(tasks)
  ax.axhline(100.0 if key == "normalized" else 0.0, color="k", lw=0.6)
  ax.set_ylabel("normalized score (base = 100)" if key == "normalized" else key)
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  return save(plt, fig, path)
