"""The comparison's report: run summaries, their aggregate over seeds, tables, plots.

The driver (:mod:`~epi_jax.experiments.compare`) trains and evaluates; this
module turns what it gathered into ``results.json``'s ``methods`` entries and
writes the report:

* :func:`run_summary`: one run's final scores, normalized scores, forgetting
  and stage transfer, with the drift, importance drift and gradient norms
  read from its logs (``refreshes.jsonl``, ``importance_drift.jsonl``,
  ``metrics.jsonl``).
* :func:`lock_in_of`: the lock-in statistics of a run's mask
  (:mod:`epi_jax.method.lock_in`) from the counts in its ``refreshes.jsonl``,
  against a full SFT run's saved top-p sets when given.
* :func:`aggregate`: means and spreads over seeds (``{"mean", "std", "n"}``,
  non-finite values left out) of each method's run summaries.
* :func:`verdicts_markdown`, :func:`results_markdown`,
  :func:`sequential_markdown`: ``results.md`` (verdicts first, then tables).
* :func:`write_results`, :func:`write_sequential_results`: ``results.json``
  and ``results.md`` (written atomically) and, for the mixture protocol,
  ``plots/*.png`` (:mod:`~epi_jax.experiments.plots`).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from epi_jax.experiments import claims
from epi_jax.experiments import plots
from epi_jax.method import lock_in as lock_in_lib
from epi_jax.scoring import drift as drift_lib
from epi_jax.scoring import forgetting as fg
from epi_jax.scoring import metrics
from epi_jax.training import importance_drift as drift_sets
from epi_jax.utils import files


def stage_ends(config) -> list[int]:
  """The last step of each stage of ``config.data.stages`` (empty without stages)."""
  return [int(x) for x in np.cumsum([st["steps"] for st in (config.data.stages or [])])]


def stage_tasks(config) -> list[list[str]]:
  """The tasks each stage of ``config.data.stages`` trains on (weight > 0)."""
  return [[t for t, w in st["mixture"].items() if w > 0] for st in config.data.stages]


def grad_norm_stats(run_dir, clip_norm: float) -> dict[str, Any] | None:
  """Mean logged ``grad_norm`` / ``trainable_grad_norm`` of a run, and the share of
  logged steps whose clipping norm exceeded ``clip_norm`` (clipped)."""
  rows = [r for r in files.read_jsonl(pathlib.Path(run_dir) / "metrics.jsonl")
          if r.get("grad_norm") is not None]
  if not rows:
    return None
  out = {"grad_norm": float(np.mean([r["grad_norm"] for r in rows]))}
  trainable = [r["trainable_grad_norm"] for r in rows if r.get("trainable_grad_norm") is not None]
  if trainable:
    out["trainable_grad_norm"] = float(np.mean(trainable))
  if clip_norm and clip_norm > 0:
    out["clipped_all"] = float(np.mean([r["grad_norm"] > clip_norm for r in rows]))
    if trainable:
      out["clipped_trainable"] = float(np.mean([v > clip_norm for v in trainable]))
  return out


# ----------------------------------------------------------------------------
# Aggregation.

def mean_std(values) -> dict[str, Any]:
  """``{"mean", "std", "n"}`` of the finite values (None and non-finite left out)."""
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not vals:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}


def fmt_metric(task: str, r: Mapping[str, Any]) -> str:
  """A task's primary metric for a log line: ``42.0%`` or ``loss 1.234``."""
  metric, _ = metrics.PRIMARY_METRIC[task]
  v = r[metric]
  return f"{100 * v:.1f}%" if metric == "accuracy" else f"{metric} {v:.3f}"


def _tasks_only(scores: Mapping[str, Any]) -> dict[str, Any]:
  return {t: v for t, v in scores.items() if t != "average"}


def run_summary(config, method: str, evals: Mapping[int, Mapping], base: Mapping,
                run_dir, sizes: Mapping[str, int] | None) -> dict[str, Any]:
  """One run's summary: ``evals`` (``{step: {"results", "seconds"}}``) against the
  base model's ``base``, and the drift and gradient norms of its logs in ``run_dir``.

  ``config`` is the run's trainer config (its stages and clipping norm);
  ``sizes`` (``{param path: entries}``) weighs the layers in the migration.
  """
  steps = sorted(evals)
  final = evals[steps[-1]]["results"]
  norm = {s: metrics.normalized_scores(evals[s]["results"], base) for s in steps}
  forget = fg.forgetting_table({s: _tasks_only(norm[s]) for s in steps})
  out = {"final": final, "normalized": norm[steps[-1]], "forgetting": forget,
         "forgetting_mean": fg.mean_defined(forget.values()), "steps": steps,
         "eval_seconds": evals[steps[-1]].get("seconds")}
  if method == "multi_stage" and config.data.stages:
    ends = stage_ends(config)
    if all(e in norm for e in ends):
      scores = {s: _tasks_only(norm[s]) for s in ends}
      out["stage_transfer"] = fg.stage_transfer(scores, ends, stage_tasks(config),
                                                base_scores={t: 100.0 for t in base})
  refreshes = drift_lib.load_refreshes(run_dir)
  if refreshes:
    out["drift"] = drift_lib.drift_summary(refreshes, sizes)
  norms = grad_norm_stats(run_dir, float(config.optimizer.clip_norm))
  if norms:
    out["grad_norms"] = norms
  top_sets = drift_lib.load_importance_drift(run_dir)
  if top_sets:
    out["importance_drift"] = drift_lib.drift_summary(top_sets, sizes)
  locked = lock_in_of(run_dir)
  if locked:
    out["lock_in"] = locked
  return out


def jaccards_vs(run_dir, reference_dir, steps: Sequence[int]) -> list[float | None]:
  """Per step, the Jaccard of the set ``run_dir`` saved (``epi.save_top_sets``) against
  the one ``reference_dir`` saved at the same step (None where either has none)."""
  out = []
  for step in steps:
    a, b = (drift_sets.load_top_set(d, step) for d in (run_dir, reference_dir))
    out.append(None if a is None or b is None else drift_sets.packed_jaccard(a, b))
  return out


def lock_in_of(run_dir, full_dir=None) -> dict[str, Any] | None:
  """The lock-in statistics of the run in ``run_dir`` (None when its refreshes
  carry no ``lock_in`` counts: not an EPI run, or logged before they existed);
  ``full_dir``: a full SFT run of the same steps whose top-p sets were saved, for
  ``jaccard_vs_full`` at each refresh."""
  refreshes = drift_lib.load_refreshes(run_dir)
  if not refreshes or not all("lock_in" in r for r in refreshes):
    return None
  steps = [int(r["step"]) for r in refreshes]
  jaccards = None if full_dir is None else jaccards_vs(run_dir, full_dir, steps)
  return {"step": steps, **lock_in_lib.lock_in_summary([r["lock_in"] for r in refreshes],
                                                        jaccards)}


LOCK_IN_SCALARS = ("mean_release_fraction", "mean_spell_refreshes", "ongoing_spell_share",
                   "mean_importance_ratio", "mean_jaccard_vs_full")


def aggregate_lock_in(summaries: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
  """Means over seeds of the runs' lock-in scalars, and the first run's curves."""
  runs = [s for s in summaries if s]
  if not runs:
    return None
  out = {k: mean_std([r.get(k) for r in runs]) for k in LOCK_IN_SCALARS}
  out["first_run"] = runs[0]
  return out


def lock_in_markdown(lock_ins: Mapping[str, Mapping[str, Any] | None]) -> str:
  """Table of the lock-in statistics (means over seeds), one row per method."""
  rows = {m: e for m, e in lock_ins.items() if e}
  if not rows:
    return ""
  lines = ["Lock-in of the mask (epi_jax.method.lock_in): share of the isolated entries a "
           "refresh releases, isolation spell length in refreshes (completed + ongoing), share "
           "of spells never released, mean importance of the entries isolated before a "
           "refresh / of the trainable ones, Jaccard of the mask vs full SFT's top-p set at "
           "the same step:", "",
           "| method | released / refresh | spell (refreshes) | never released "
           "| importance isolated / trainable | Jaccard vs full SFT |",
           "|---|---|---|---|---|---|"]
  for m, e in rows.items():
    cells = [plus_minus(e.get(k), 1, 3) for k in LOCK_IN_SCALARS]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def aggregate(per_run: Mapping[str, Sequence[Mapping]]) -> dict[str, Any]:
  """Means and spreads over seeds of each method's run summaries."""
  methods = {}
  for m, runs in per_run.items():
    if not runs:
      continue
    tasks = list(runs[0]["final"])
    entry = {"tasks": {}, "normalized": {}, "forgetting": {}}
    for t in tasks:
      metric, _ = metrics.PRIMARY_METRIC[t]
      vals = [r["final"][t][metric] for r in runs]
      entry["tasks"][t] = {"metric": metric, **mean_std(vals), "values": vals}
      if metric == "loss" and "perplexity" in runs[0]["final"][t]:
        entry["tasks"][t]["perplexity"] = mean_std([r["final"][t]["perplexity"] for r in runs])
      if t in metrics.SECONDARY_METRIC:
        second = metrics.SECONDARY_METRIC[t]
        entry.setdefault("secondary", {})[t] = {
            "metric": second, **mean_std([r["final"][t].get(second) for r in runs])}
    for t in list(tasks) + ["average"]:
      entry["normalized"][t] = mean_std([r["normalized"].get(t) for r in runs])
    entry["average"] = entry["normalized"]["average"]
    for t in tasks:
      entry["forgetting"][t] = mean_std([r["forgetting"].get(t) for r in runs])
    entry["forgetting"]["mean"] = mean_std([r["forgetting_mean"] for r in runs])
    if any("stage_transfer" in r for r in runs):
      st = [r["stage_transfer"] for r in runs if "stage_transfer" in r]
      entry["stage_transfer"] = {
          "old_task_drop": mean_std([s["mean_old_task_drop"] for s in st]),
          "new_task_gain": mean_std([s["mean_new_task_gain"] for s in st]),
          "per_task": st[0]}
    drifts = [r["drift"] for r in runs if r.get("drift")]
    if drifts:
      entry["drift"] = {
          "final_jaccard_first": mean_std([d["final_jaccard_first"] for d in drifts]),
          "num_refreshes": mean_std([d["num_refreshes"] for d in drifts]),
          "mean_migration": mean_std([fg.mean_defined(d["migration"]) for d in drifts])}
    norms = [r["grad_norms"] for r in runs if r.get("grad_norms")]
    if norms:
      entry["grad_norms"] = {k: mean_std([n.get(k) for n in norms]) for k in norms[0]}
    imp = [r["importance_drift"] for r in runs if r.get("importance_drift")]
    if imp:
      entry["importance_drift"] = {
          "final_jaccard_first": mean_std([d["final_jaccard_first"] for d in imp]),
          "mean_jaccard_prev": mean_std([fg.mean_defined(d["jaccard_prev"][1:]) for d in imp]),
          "mean_migration": mean_std([fg.mean_defined(d["migration"]) for d in imp])}
    locked = aggregate_lock_in([r.get("lock_in") for r in runs])
    if locked:
      entry["lock_in"] = locked
    entry["runs"] = [r["run_dir"] for r in runs]
    entry["eval_seconds"] = [r["eval_seconds"] for r in runs]
    entry["train_seconds"] = [r.get("train_seconds") for r in runs]
    methods[m] = entry
  return methods


# ----------------------------------------------------------------------------
# Tables.

def plus_minus(ms: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
  """``mean ± std`` of a :func:`mean_std` (± only over two or more values), ``–`` when None."""
  if ms is None or ms.get("mean") is None:
    return "–"
  s = f"{scale * ms['mean']:.{digits}f}"
  if ms.get("n", 1) > 1:
    s += f" ± {scale * ms['std']:.{digits}f}"
  return s


def verdicts_markdown(results: Mapping[str, Any]) -> str:
  """The verdicts, one line each, and how their intervals were obtained."""
  paired = results.get("paired") or next(iter(results.get("orders", {}).values()),
                                         {}).get("paired", {})
  seeds = len(results.get("seeds", [])) or 1
  how = (f"paired bootstrap over eval examples{' and seeds' if seeds > 1 else ''}, "
         f"{paired.get('resamples', '?')} resamples, 95% intervals of the difference, in "
         "normalized points (base = 100)")
  lines = [f"Verdicts ({how}):", ""]
  lines += [f"- {v}" for v in results.get("verdicts", [])] or ["- (no claim applies to "
                                                                "these methods)"]
  return "\n".join(lines) + "\n"


def _pairs_table(paired: Mapping, columns: Sequence[tuple[str, str]]) -> list[str]:
  lines = ["| difference | " + " | ".join(c for c, _ in columns) + " |",
           "|" + "---|" * (len(columns) + 1)]
  for pair, q in paired.get("pairs", {}).items():
    lines.append(f"| {pair} | " + " | ".join(claims.ci_cell(q.get(k)) for _, k in columns)
                 + " |")
  return lines


def results_markdown(results: Mapping[str, Any]) -> str:
  """Verdicts first, then the paper-style tables of ``results.json``."""
  methods, base = results["methods"], results["base"]
  tasks = [t for t in results["eval"]["tasks"] if t in base]
  secondary = [t for t in tasks if t in metrics.SECONDARY_METRIC]
  head = ["method"] + [
      f"{t} ({'acc %' if metrics.PRIMARY_METRIC[t][0] == 'accuracy' else 'loss'})"
      for t in tasks] + ["average (norm.)", "forgetting (norm.)"] + [
      f"{t} EM %" for t in secondary]
  ev = results["eval"]
  lines = [verdicts_markdown(results) if "verdicts" in results else "",
           f"Seeds: {results['seeds']}. Eval: {ev['num_examples']} examples per task "
           f"({ev['split']} split); loss = answer tokens' mean NLL (GSM8K: of the reference "
           f"solution); GSM8K exact match on the first {ev.get('num_generate')} problems, "
           f"greedy, max {ev['max_new_tokens']} new tokens. Normalized scores: base model "
           "= 100 (see docs/RESULTS.md).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def cell(task, ms):
    acc = metrics.PRIMARY_METRIC[task][0] == "accuracy"
    return plus_minus(ms, 100.0 if acc else 1.0, 1 if acc else 3)

  base_cells = [cell(t, {"mean": metrics.primary_score(t, base[t]), "n": 1}) for t in tasks]
  base_cells += ["100.0", "–"] + [
      plus_minus({"mean": base[t].get(metrics.SECONDARY_METRIC[t]), "n": 1}, 100.0)
      for t in secondary]
  lines.append("| base | " + " | ".join(base_cells) + " |")
  for m, e in methods.items():
    row = [m] + [cell(t, e["tasks"].get(t)) for t in tasks]
    row += [plus_minus(e["average"]), plus_minus(e["forgetting"].get("mean"))]
    row += [plus_minus((e.get("secondary") or {}).get(t), 100.0) for t in secondary]
    lines.append("| " + " | ".join(row) + " |")
  paired = results.get("paired")
  if paired and paired.get("pairs"):
    lines += ["", "Paired differences A - B (normalized points, 95% CI; forgetting: lower is "
              "better, the rest higher is better):", ""]
    lines += _pairs_table(paired, [("average", "average"), ("forgetting", "forgetting")]
                          + [(t, f"task:{t}") for t in tasks])
  lines += ["", "Normalized per-task scores (base = 100; higher is better):", "",
            "| method | " + " | ".join(tasks) + " | average |",
            "|" + "---|" * (len(tasks) + 2)]
  for m, e in methods.items():
    lines.append(f"| {m} | " + " | ".join(plus_minus(e["normalized"].get(t)) for t in tasks)
                 + f" | {plus_minus(e['average'])} |")
  lines += ["", "Forgetting per task (best earlier snapshot minus final, normalized points; "
            "negative = still improving):", "",
            "| method | " + " | ".join(tasks) + " | mean |", "|" + "---|" * (len(tasks) + 2)]
  for m, e in methods.items():
    lines.append(f"| {m} | " + " | ".join(plus_minus(e["forgetting"].get(t)) for t in tasks)
                 + f" | {plus_minus(e['forgetting'].get('mean'))} |")
  extra = [(m, e) for m, e in methods.items() if "stage_transfer" in e or "drift" in e]
  if extra:
    lines += ["", "| method | old-task drop | new-task gain | Jaccard vs first mask (final) "
              "| refreshes | mean migration |", "|---|---|---|---|---|---|"]
    for m, e in extra:
      st, d = e.get("stage_transfer", {}), e.get("drift", {})
      cells = [plus_minus(st.get("old_task_drop")), plus_minus(st.get("new_task_gain")),
               plus_minus(d.get("final_jaccard_first"), 1, 3),
               plus_minus(d.get("num_refreshes"), 1, 0), plus_minus(d.get("mean_migration"), 1, 3)]
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
  clipped = [(m, e["grad_norms"]) for m, e in methods.items() if e.get("grad_norms")]
  if clipped:
    lines += ["", "Gradient norms (mean over logged steps) and the share of logged steps "
              "clipped, by the norm of all gradients and of the trainable ones:", "",
              "| method | grad norm (all) | grad norm (trainable) | clipped (all) | "
              "clipped (trainable) |", "|---|---|---|---|---|"]
    for m, n in clipped:
      cells = [plus_minus(n.get(key), 1, digits)
               for key, digits in (("grad_norm", 3), ("trainable_grad_norm", 3),
                                   ("clipped_all", 2), ("clipped_trainable", 2))]
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
  if results.get("importance_drift"):
    lines += ["", importance_drift_markdown(results["importance_drift"])]
  locked = lock_in_markdown({m: e.get("lock_in") for m, e in methods.items()})
  if locked:
    lines += ["", locked]
  return "\n".join(lines) + "\n"


def sequential_markdown(results: Mapping[str, Any]) -> str:
  """Verdicts first, then per order the drop on A and gain on B of every method."""
  lines = [verdicts_markdown(results),
           f"Seeds: {results['seeds']}. Eval: {results['eval']['num_examples']} examples per "
           "task. Normalized points (base = 100), 95% paired bootstrap intervals. "
           + results.get("note", ""), ""]
  for name, o in results["orders"].items():
    a, b, paired = o["first"], o["second"], o["paired"]
    lines += [f"### {a} ({o['steps_per_task']} steps), then {b} ({o['steps_per_task']} steps)",
              "", f"| method | drop on {a} | gain on {b} | {a} after {a} | {a} at end | "
              f"{b} after {a} | {b} at end |", "|---|---|---|---|---|---|---|"]
    for m, q in paired["methods"].items():
      cells = [q.get("drop"), q.get("gain"), q.get(f"after_a:{a}"), q.get(f"task:{a}"),
               q.get(f"after_a:{b}"), q.get(f"task:{b}")]
      lines.append(f"| {m} | " + " | ".join(claims.ci_cell(c, key="value") for c in cells)
                   + " |")
    lines += ["", "Paired differences A - B (drop: lower is better; gain: higher is better):",
              ""]
    lines += _pairs_table(paired, [(f"drop on {a}", "drop"), (f"gain on {b}", "gain")])
    lines.append("")
    locked = lock_in_markdown(o.get("lock_in") or {})
    if locked:
      lines += [locked, ""]
  return "\n".join(lines) + "\n"


def _fixed3(v) -> str:
  return "–" if v is None else f"{v:.3f}"


def importance_drift_markdown(drifts: Mapping[str, Mapping[str, Any]]) -> str:
  """Table of the top-p importance sets' Jaccard over the run, one column per method."""
  drifts = {m: d for m, d in drifts.items() if d.get("step")}
  if not drifts:
    return ""
  steps = sorted({s for d in drifts.values() for s in d["step"]})
  lines = ["Drift of the top-p importance set (the paper's measure: Jaccard vs the first / "
           "the previous set; migration = share of the set that changed layer):", "",
           "| step | " + " | ".join(f"{m} vs first | {m} vs prev | {m} migration"
                                     for m in drifts) + " |",
           "|---|" + "---|---|---|" * len(drifts)]
  for s in steps:
    cells = []
    for d in drifts.values():
      i = d["step"].index(s) if s in d["step"] else None
      cells += [_fixed3(None if i is None else d[key][i])
                for key in ("jaccard_first", "jaccard_prev", "migration")]
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Writing the report.

def _write_json_and_markdown(workdir: pathlib.Path, results: Mapping[str, Any],
                             table: str) -> None:
  # default=str: the config may hold values JSON does not know (kept readable as text).
  files.write_text_atomic(workdir / "results.json",
                          json.dumps(results, indent=1, default=str))
  files.write_text_atomic(workdir / "results.md", table)


def _run_label(method: str, run_dir) -> str:
  return f"{method}/{pathlib.Path(run_dir).name}"


def write_results(workdir, results: Mapping[str, Any],
                  per_run: Mapping[str, Sequence[Mapping]], log: Callable[[str], None] = print,
                  sizes: Mapping[str, int] | None = None) -> None:
  """The mixture protocol's ``results.json``, ``results.md`` and ``plots/*.png``.

  ``per_run``: ``{method: [run_summary with "run_dir"]}``; the drift plots show
  every run, the layer heatmaps one run per method.
  """
  workdir = pathlib.Path(workdir)
  table = results_markdown(results)
  _write_json_and_markdown(workdir, results, table)
  out = workdir / "plots"
  plots.plot_task_metrics(results["methods"], out / "tasks_normalized.png")
  curves, first_refreshes = {}, {}
  for m, runs in per_run.items():
    for r in runs:
      if r.get("drift"):
        curves[_run_label(m, r["run_dir"])] = r["drift"]
        first_refreshes.setdefault(m, r["run_dir"])
  plots.plot_drift(curves, out / "drift.png")
  for m, run_dir in first_refreshes.items():
    plots.plot_layer_heatmap(drift_lib.load_refreshes(run_dir), out / f"layer_heatmap_{m}.png",
                             title=f"{m}: isolated fraction per block", sizes=sizes)
  imp_curves = {_run_label(m, r["run_dir"]): r["importance_drift"]
                for m, runs in per_run.items() for r in runs if r.get("importance_drift")}
  plots.plot_drift(imp_curves, out / "importance_drift.png", what="top-p importance set")
  for m, runs in per_run.items():
    if runs and runs[0].get("importance_drift"):
      plots.plot_layer_heatmap(drift_lib.load_importance_drift(runs[0]["run_dir"]),
                               out / f"importance_layers_{m}.png",
                               title=f"{m}: fraction of each block in the top-p importance set",
                               sizes=sizes)
  log("\n" + table)
  log(f"wrote {workdir / 'results.json'}, {workdir / 'results.md'} and {out}/*.png")


def write_sequential_results(workdir, results: Mapping[str, Any],
                             log: Callable[[str], None] = print) -> None:
  """The sequential protocol's ``results.json``, ``results.md`` and, per order,
  ``plots/<order>_*.png``: the lock-in curves of each method's first run, the
  mask's and the importance set's drift of every run that has them, and the
  layer heatmap of each method's first run with refreshes."""
  workdir = pathlib.Path(workdir)
  table = sequential_markdown(results)
  _write_json_and_markdown(workdir, results, table)
  out = workdir / "plots"
  for name, order in results["orders"].items():
    plots.plot_lock_in({m: agg["first_run"] for m, agg in order.get("lock_in", {}).items()},
                       out / f"{name}_lock_in.png")
    refreshes = {_run_label(m, d): drift_lib.load_refreshes(d)
                 for m, dirs in order["runs"].items() for d in dirs}
    plots.plot_drift({k: drift_lib.drift_summary(r) for k, r in refreshes.items() if r},
                     out / f"{name}_drift.png")
    top_sets = {_run_label(m, d): drift_lib.load_importance_drift(d)
                for m, dirs in order["runs"].items() for d in dirs}
    plots.plot_drift({k: drift_lib.drift_summary(r) for k, r in top_sets.items() if r},
                     out / f"{name}_importance_drift.png", what="top-p importance set")
    for m, dirs in order["runs"].items():
      first = refreshes[_run_label(m, dirs[0])] if dirs else []
      if len(first) > 1:
        plots.plot_layer_heatmap(first, out / f"{name}_layer_heatmap_{m}.png",
                                 title=f"{m}: isolated fraction per block ({name})")
  log("\n" + table)
  log(f"wrote {workdir / 'results.json'}, {workdir / 'results.md'} and {out}/*.png")
