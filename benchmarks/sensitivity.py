"""Sensitivity of EPI to the isolation ratio p and the refresh interval T.

For every ``(p, T)`` in ``--ratios x --intervals`` and every seed, trains
``method=epi`` with :func:`epi_jax.training.train` into
``WORKDIR/epi_p<p>_T<T>/seed<k>``; the ``full`` and ``static`` baselines
(``--baselines``; static at the config's own ``epi.isolation_ratio``) are
trained once per seed into ``WORKDIR/<method>/seed<k>``. Runs are evaluated
with the code of ``epi-jax compare`` (:mod:`epi_jax.experiments.compare`): the
base model once (``WORKDIR/base_eval.json``), each run's snapshots cached in
``<run>/eval/step_<N>.json``, scores normalized to base = 100, and the mask
drift read from ``refreshes.jsonl``. Finished runs and cached evals are
skipped, so an interrupted sweep resumes where it stopped.

Outputs: ``WORKDIR/sensitivity.json``, ``WORKDIR/sensitivity.md`` (rows p,
columns T: normalized average; final Jaccard vs the first mask; then one row
per run with the per-task scores) and ``WORKDIR/sensitivity.png`` (heatmaps).

  python benchmarks/sensitivity.py --config configs/tiny.py --workdir runs/sensitivity \\
      --ratios 0.005,0.01,0.05 --intervals 2,5,10 --steps 30 --seeds 1 \\
      --config.data.seq_len=128 --config.data.mixture.logiqa=0.0 \\
      --eval.num_examples=8 --eval.max_new_tokens=16

``--config.FIELD=VALUE`` overrides a trainer field and ``--eval.FIELD=VALUE``
an eval setting (as for ``epi-jax compare``; values are Python literals, else
strings). The eval defaults to ``eval.snapshots='final'`` here.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import sys
import time

import numpy as np

from epi_jax.experiments import cli
from epi_jax.training import config as cfg_lib
from epi_jax.experiments import compare as cmp
from epi_jax.experiments import plots
from epi_jax.experiments import report

REPO = pathlib.Path(__file__).resolve().parents[1]


def _floats(text):
  return [float(x) for x in text.split(",") if x.strip()]


def _ints(text):
  return [int(x) for x in text.split(",") if x.strip()]


def _split_config_args(argv):
  """``(rest, {dotted field: value})`` of ``--config.FIELD=VALUE`` (or ``... VALUE``) flags."""
  return cli.split_prefixed_args(argv, "--config.")


def apply_config_overrides(config, overrides):
  """Sets ``config.a.b = value`` for each ``{'a.b': value}``; unknown groups raise."""
  with config.unlocked():
    for key, value in overrides.items():
      *groups, leaf = key.split(".")
      node = config
      for g in groups:
        if g not in node:
          raise ValueError(f"--config.{key}: unknown config field {g!r}")
        node = node[g]
      if leaf not in node and not groups[-1:] == ["mixture"]:
        raise ValueError(f"--config.{key}: unknown config field {leaf!r}")
      node[leaf] = value
  return config


def cell_name(ratio: float, interval: int) -> str:
  return f"epi_p{ratio:g}_T{int(interval)}"


# ----------------------------------------------------------------------------
# The sweep.

def sweep(config, workdir, *, ratios, intervals, seeds=1, baselines=("full", "static"),
          log=print):
  """Trains and evaluates the grid and the baselines; returns (and writes) the results."""
  if not ratios or not intervals:
    raise ValueError("--ratios and --intervals must each name at least one value")
  if any(not 0 < p < 1 for p in ratios):
    raise ValueError(f"--ratios must lie in (0, 1), got {ratios}")
  if any(t < 1 for t in intervals):
    raise ValueError(f"--intervals must be >= 1, got {intervals}")
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")
  bad = [m for m in baselines if m not in ("full", "static", "multi_stage")]
  if bad:
    raise ValueError(f"--baselines: unknown method(s) {bad}; use full, static, multi_stage")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  train_cfg, settings = cmp.split_eval_config(config)
  data_kwargs = cmp.eval_data(train_cfg, settings["tasks"])
  base = cmp.base_eval(workdir, train_cfg, settings, data_kwargs, log)
  sizes = cmp.param_sizes(train_cfg.model)

  def run_one(name, method, seed_offset, epi=None):
    run_dir = workdir / name / f"seed{seed_offset}"
    cfg = copy.deepcopy(train_cfg)
    with cfg.unlocked():
      cfg.method = method
      cfg.seed = int(train_cfg.seed) + seed_offset
      for k, v in (epi or {}).items():
        cfg.epi[k] = v
    evals, train_seconds = cmp.train_and_evaluate(cfg, run_dir, f"{name} seed{seed_offset}",
                                                  settings, data_kwargs, log)
    summary = report.run_summary(cfg, method, evals, base, run_dir, sizes)
    summary["run_dir"] = str(run_dir)
    summary["train_seconds"] = train_seconds
    if summary.get("drift"):
      prev = [v for v in summary["drift"]["jaccard_prev"][1:] if v is not None]
      summary["drift"]["mean_jaccard_prev"] = sum(prev) / len(prev) if prev else None
    return summary

  cells, per_cell = [], {}
  for k in range(seeds):
    for m in baselines:
      per_cell.setdefault(m, []).append(run_one(m, m, k))
    for p in ratios:
      for t in intervals:
        name = cell_name(p, t)
        if k == 0:
          cells.append({"name": name, "isolation_ratio": p, "update_interval": t})
        per_cell.setdefault(name, []).append(
            run_one(name, "epi", k, {"isolation_ratio": float(p), "update_interval": int(t)}))
  agg = report.aggregate(per_cell)
  for name, runs in per_cell.items():
    prev = [r["drift"].get("mean_jaccard_prev") for r in runs if r.get("drift")]
    if prev:
      agg[name]["drift"]["mean_jaccard_prev"] = report.mean_std(prev)
  results = {"config": cmp.to_plain(config),
             "seeds": [int(train_cfg.seed) + k for k in range(seeds)], "eval": settings,
             "ratios": [float(p) for p in ratios], "intervals": [int(t) for t in intervals],
             "baselines": list(baselines), "cells": cells, "base": base, "methods": agg,
             "wall_time_s": round(time.time() - t0, 1)}
  (workdir / "sensitivity.json").write_text(json.dumps(results, indent=1, default=str))
  table = sensitivity_markdown(results)
  (workdir / "sensitivity.md").write_text(table)
  plot_heatmaps(results, workdir / "sensitivity.png")
  log("\n" + table)
  log(f"wrote {workdir}/sensitivity.json, sensitivity.md, sensitivity.png "
      f"({results['wall_time_s']:.0f}s)")
  return results


# ----------------------------------------------------------------------------
# Tables and plots.

def _grid(results, fn):
  """``[[fn(entry) for T] for p]`` over the sweep's cells."""
  m = results["methods"]
  return [[fn(m.get(cell_name(p, t), {})) for t in results["intervals"]]
          for p in results["ratios"]]


def _mean(ms):
  return None if not ms or ms.get("mean") is None else ms["mean"]


def _avg(e):
  return _mean(e.get("average"))


def _jac(e):
  return _mean(e.get("drift", {}).get("final_jaccard_first"))


def sensitivity_markdown(results) -> str:
  """The p x T tables and the per-run table of ``sensitivity.json``."""
  pm = report.plus_minus
  methods, ev = results["methods"], results["eval"]
  tasks = [t for t in ev["tasks"] if t in results["base"]]
  ts = results["intervals"]
  head = "| p \\ T | " + " | ".join(str(t) for t in ts) + " |"
  sep = "|" + "---|" * (len(ts) + 1)

  def grid(title, fmt):
    lines = [title, "", head, sep]
    for p in results["ratios"]:
      lines.append(f"| {p:g} | " + " | ".join(fmt(methods.get(cell_name(p, t), {}))
                                               for t in ts) + " |")
    return lines + [""]

  drift = lambda e, k, d=3: pm(e.get("drift", {}).get(k), 1, d)
  lines = [f"Seeds: {results['seeds']}. Eval: {ev['num_examples']} examples per task "
           f"({ev['split']} split), GSM8K greedy, max {ev['max_new_tokens']} new tokens. "
           "Normalized scores: base model = 100.", ""]
  lines += grid("Normalized average (base = 100):", lambda e: pm(e.get("average")))
  base_rows = [f"{m} {pm(methods[m]['average'])}" for m in results["baselines"] if m in methods]
  if base_rows:
    lines += ["Baselines: " + ", ".join(base_rows) + ".", ""]
  lines += grid("Final Jaccard vs first mask:", lambda e: drift(e, "final_jaccard_first"))
  lines += grid("Mean Jaccard vs previous mask (per refresh):",
                lambda e: drift(e, "mean_jaccard_prev"))
  lines += grid("Refreshes:", lambda e: drift(e, "num_refreshes", 0))
  lines += ["Per run (normalized per-task scores, base = 100):", "",
            "| run | p | T | " + " | ".join(tasks) + " | average | Jaccard first | train s |",
            "|" + "---|" * (len(tasks) + 6)]
  rows = [(m, "–", "–") for m in results["baselines"]]
  rows += [(c["name"], f"{c['isolation_ratio']:g}", str(c["update_interval"]))
           for c in results["cells"]]
  for name, p, t in rows:
    e = methods.get(name)
    if not e:
      continue
    secs = [s for s in e.get("train_seconds", []) if s is not None]
    lines.append(f"| {name} | {p} | {t} | "
                 + " | ".join(pm(e["normalized"].get(t_)) for t_ in tasks)
                 + f" | {pm(e['average'])} | {drift(e, 'final_jaccard_first')} | "
                 + (f"{sum(secs) / len(secs):.0f}" if secs else "–") + " |")
  return "\n".join(lines) + "\n"


def plot_heatmaps(results, path):
  """Two heatmaps over (p, T): normalized average and final Jaccard vs first mask."""
  plt = plots.pyplot()
  panels = [("normalized average (base = 100)", _grid(results, _avg), "viridis", "{:.1f}"),
            ("final Jaccard vs first mask", _grid(results, _jac), "magma", "{:.3f}")]
  fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(results["intervals"]),
                                          1.5 + 0.7 * len(results["ratios"])))
  for ax, (title, grid, cmap, fmt) in zip(axes, panels):
    mat = np.array([[np.nan if v is None else v for v in row] for row in grid], float)
    im = ax.imshow(mat, cmap=cmap, aspect="auto")
    for i in range(mat.shape[0]):
      for j in range(mat.shape[1]):
        if math.isfinite(mat[i, j]):
          ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center", fontsize=8,
                  color="w" if mat[i, j] < np.nanmean(mat) else "k")
    ax.set_xticks(range(len(results["intervals"])))
    ax.set_xticklabels([str(t) for t in results["intervals"]])
    ax.set_yticks(range(len(results["ratios"])))
    ax.set_yticklabels([f"{p:g}" for p in results["ratios"]])
    ax.set_xlabel("update_interval T")
    ax.set_ylabel("isolation_ratio p")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
  return plots.save(plt, fig, path)


# ----------------------------------------------------------------------------
# CLI.

def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  sys.path.insert(0, str(REPO))
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=str(REPO / "configs" / "tiny.py"),
                      help="training config file (default configs/tiny.py)")
  parser.add_argument("--workdir", default="runs/sensitivity", help="output directory")
  parser.add_argument("--ratios", default="0.005,0.01,0.05", help="isolation ratios p")
  parser.add_argument("--intervals", default="2,5,10", help="update intervals T")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps of every run (default: config.total_steps)")
  parser.add_argument("--seeds", type=int, default=1, help="seeds per run")
  parser.add_argument("--baselines", default="full,static",
                      help="methods trained once per seed as reference ('' for none)")
  try:
    rest, eval_overrides = cli.split_eval_args(argv)
    rest, config_overrides = _split_config_args(rest)
    args = parser.parse_args(rest)
    config = apply_config_overrides(cfg_lib.load_config_file(args.config), config_overrides)
    with config.unlocked():
      if args.steps is not None:
        if args.steps < 1:
          raise ValueError(f"--steps must be >= 1, got {args.steps}")
        config.total_steps = args.steps
        config.snapshot_steps = tuple(s for s in config.snapshot_steps if s < args.steps)
    _, settings = cmp.split_eval_config(config)
    settings["snapshots"] = "final"
    settings = cli.apply_eval_overrides(settings, eval_overrides)
    with config.unlocked():
      config.eval = settings
    sweep(config, args.workdir, ratios=_floats(args.ratios), intervals=_ints(args.intervals),
          seeds=args.seeds, baselines=[m for m in args.baselines.split(",") if m])
  except (ValueError, FileNotFoundError) as e:
    print(f"sensitivity: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
