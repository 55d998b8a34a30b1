"""The method comparison: train every method and seed, evaluate, aggregate, plot.

``compare(config, workdir, methods=..., seeds=N)`` (``epi-jax compare``):

1. For seed ``k`` in ``0..N-1`` (training seed ``config.seed + k``) and each
   method, trains into ``workdir/<method>/seed<k>/`` with
   :func:`epi_jax.training.train`, skipping finished runs. Every method gets
   the same data, steps and seeds; with a stage schedule the stage ends are
   added to ``snapshot_steps`` of every method, so that every task is
   evaluated after every stage.
2. Evaluates the base model once (``workdir/base_eval.json``) and each run's
   snapshots (``eval.snapshots='all'``) or only its final one (``'final'``);
   results are cached per snapshot in ``<run>/eval/step_<N>.json`` together
   with the eval settings, so reruns only evaluate what is new.
3. Pairs every two methods on the same eval examples (paired bootstrap,
   :mod:`~epi_jax.evaluation.claims`) and answers the papers' claims.
4. Writes ``workdir/results.json`` (layout below), ``workdir/results.md`` (the
   verdicts, then the tables) and ``workdir/plots/*.png``; returns the results.

``compare_sequential`` (``--protocol sequential``) is the A-then-B protocol;
its ``results.json`` has ``orders: {"<A>_then_<B>": {"paired": ...}}``.

``results.json`` (mixture)::

  {"protocol": "mixture", "config": ..., "seeds": [...], "eval": {...},
   "base": {task: metrics},
   "paired": {"methods": {m: {quantity: {"value", "ci95"}}},
              "pairs": {"A - B": {quantity: {"diff", "ci95"}}}, "verdicts": [...]},
   "verdicts": ["EPI > static on average normalized score: ...", ...],
   "importance_drift": {method: curves},        # with epi.track_importance
   "methods": {method: {
       "tasks": {task: {"metric", "mean", "std", "values"}},
       "normalized": {task | "average": {"mean", "std"}},
       "average": {"mean", "std"},             # normalized average (base = 100)
       "forgetting": {task | "mean": {"mean", "std"}},  # normalized points
       "stage_transfer": {...},                # multi_stage only
       "drift": {...},                         # methods with EPI refreshes
       "grad_norms": {...},                    # logged grad norms, clipped shares
       "runs": [...], "eval_seconds": [...]}}}

The eval settings come from ``config.eval`` (see :func:`eval_defaults`); the
trainer does not know that group, so it is split off before training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from epi_jax.evaluation import bootstrap
from epi_jax.evaluation import claims
from epi_jax.evaluation import drift as drift_lib
from epi_jax.evaluation import forgetting as fg
from epi_jax.evaluation import metrics
from epi_jax.evaluation.evaluate import (DEFAULT_NUM_EXAMPLES, DEFAULT_NUM_GENERATE, TASKS,
                                         evaluate)

from epi_jax.training.config import METHODS
# Variants that can be compared beside the methods: clipping by the norm of
# the trainable gradients only (optimizer.clip_scope='trainable').
VARIANTS = {"static_clip_trainable": "static", "epi_clip_trainable": "epi"}


def method_config(train_cfg, name: str, seed: int):
  """``train_cfg`` for method (or variant) ``name`` and training seed ``seed``."""
  cfg = copy.deepcopy(train_cfg)
  with cfg.unlocked():
    cfg.method = VARIANTS.get(name, name)
    cfg.seed = int(seed)
    if name in VARIANTS:
      cfg.optimizer.clip_scope = "trainable"
  return cfg


def grad_norm_stats(run_dir, clip_norm: float) -> dict[str, Any] | None:
  """Mean logged ``grad_norm`` / ``trainable_grad_norm`` of a run, and the share of
  logged steps whose clipping norm exceeded ``clip_norm`` (clipped)."""
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  if not path.is_file():
    return None
  rows = [r for r in drift_lib.load_jsonl(path) if r.get("grad_norm") is not None]
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


def eval_defaults() -> dict[str, Any]:
  """The ``config.eval`` fields and their defaults.

  tasks: tasks to evaluate. num_examples: ``{task: n}`` (or an int for all).
  num_generate: GSM8K problems generated for exact match (the first ones;
  None: all). max_new_tokens: GSM8K generation budget. batch_size: eval rows per batch.
  generate_batch_size: GSM8K prompts per generation batch.
  seq_len: longest scored sequence (LogiQA: twice that). sample_seed: None for
  the first N test examples, an int for a fixed random subset.
  logiqa_normalize: 'sum' or 'mean' option log-likelihood. snapshots: 'all'
  (every snapshot, for forgetting) or 'final'. split: the split evaluated.
  bootstrap_resamples: replicates of the paired bootstrap (analysis only).
  """
  return {"tasks": list(TASKS), "num_examples": dict(DEFAULT_NUM_EXAMPLES),
          "num_generate": DEFAULT_NUM_GENERATE, "max_new_tokens": 160, "batch_size": 8, "generate_batch_size": 16, "seq_len": 512,
          "sample_seed": None, "logiqa_normalize": "sum", "snapshots": "all",
          "split": "test", "bootstrap_resamples": bootstrap.DEFAULT_RESAMPLES}


def _plain(x):
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def split_eval_config(config) -> tuple[Any, dict[str, Any]]:
  """``(trainer config without 'eval', resolved eval settings)``."""
  config = copy.deepcopy(config)
  settings = eval_defaults()
  if "eval" in config:
    given = _plain(config["eval"])
    unknown = sorted(set(given) - set(settings))
    if unknown:
      raise ValueError(f"Unknown config field(s) eval.{unknown}; known: {sorted(settings)}")
    if isinstance(given.get("num_examples"), Mapping):
      given["num_examples"] = {**settings["num_examples"], **given["num_examples"]}
    settings.update(given)
    with config.unlocked() if hasattr(config, "unlocked") else _null():
      del config["eval"]
  if settings["snapshots"] not in ("all", "final"):
    raise ValueError(f"config.eval.snapshots={settings['snapshots']!r}: expected 'all' or 'final'")
  unknown = [t for t in settings["tasks"] if t not in TASKS]
  if unknown:
    raise ValueError(f"config.eval.tasks has unknown task(s) {unknown}; known: {list(TASKS)}")
  return config, settings


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


_ANALYSIS_ONLY = ("snapshots", "bootstrap_resamples")  # not part of an eval's cache key


def _eval_key(settings: Mapping) -> str:
  keep = {k: v for k, v in settings.items() if k not in _ANALYSIS_ONLY}
  return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def _stage_ends(config) -> list[int]:
  return [int(x) for x in np.cumsum([st["steps"] for st in (config.data.stages or [])])]


def _stage_tasks(config) -> list[list[str]]:
  return [[t for t, w in st["mixture"].items() if w > 0] for st in config.data.stages]


# ----------------------------------------------------------------------------
# Evaluation data (prepared TFDS data, or the trainer's stand-in).

def standin_eval_examples(sources: Mapping[str, Sequence[Mapping]]) -> dict[str, list[dict]]:
  """Turns the trainer's synthetic "a + b = c." examples into eval examples."""
  out = {}
  for task, items in sources.items():
    exs = []
    for e in items:
      ex = copy.deepcopy(dict(e))
      answer = metrics.extract_gsm8k_answer(ex["messages"][-1]["content"]) or "0"
      if task == "gsm8k":
        ex["final_answer"] = answer
      elif task == "logiqa":
        n = int(answer)
        ex["options"] = [str(n + d) for d in (0, 1, -1, 2)]
        ex["answer"] = 0
      exs.append(ex)
    out[task] = exs
  return out


def eval_data(config, tasks) -> dict[str, Any]:
  """``evaluate`` kwargs for the data of ``config`` (prepares it if needed)."""
  from epi_jax.training import inputs  # pylint: disable=g-import-not-at-top
  probe = copy.deepcopy(config)
  with probe.unlocked():
    probe.method = "full"
    probe.data.mixture = {t: 1.0 for t in tasks}
  kwargs = inputs.ensure_data(probe)
  if "sources" in kwargs:
    return {"examples": standin_eval_examples(kwargs["sources"])}
  return {"data_dir": kwargs["data_dir"]}


def run_eval(model, tokenizer, settings, data_kwargs, log=print) -> dict[str, Any]:
  start = time.perf_counter()
  res = evaluate(model, tokenizer, tasks=settings["tasks"], num_examples=settings["num_examples"],
                 max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"],
                 seq_len=settings["seq_len"], split=settings["split"],
                 generate_batch_size=settings["generate_batch_size"],
                 sample_seed=settings["sample_seed"], num_generate=settings["num_generate"],
                 logiqa_normalize=settings["logiqa_normalize"], **data_kwargs)
  seconds = time.perf_counter() - start
  log("  eval " + ", ".join(f"{t}: {_fmt_metric(t, r)}" for t, r in res.items())
      + f"  ({seconds:.0f}s)")
  return {"results": res, "seconds": round(seconds, 2)}


def _cached(path: pathlib.Path, key: str, compute: Callable[[], dict]) -> dict:
  if path.is_file():
    try:
      obj = json.loads(path.read_text())
      if obj.get("eval_key") == key:
        return obj
    except json.JSONDecodeError:
      pass
  obj = {"eval_key": key, **compute()}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(path)
  return obj


def base_model(config):
  """The model training starts from (pretrained weights or seed-``config.seed`` init)."""
  from epi_jax.training import model as model_lib  # pylint: disable=g-import-not-at-top
  spec, params, tokenizer = model_lib.build(config.model, config.seed, None)
  return spec.bind(params), tokenizer


def evaluate_run(run_dir, settings, data_kwargs, log=print) -> dict[int, dict]:
  """``{step: eval results}`` of a run's snapshots (cached in ``<run>/eval``)."""
  from epi_jax.training import list_snapshots, load_run  # pylint: disable=g-import-not-at-top
  run_dir = pathlib.Path(run_dir)
  snaps = list_snapshots(run_dir)
  if not snaps:
    raise FileNotFoundError(f"No snapshots in {run_dir}/snapshots")
  if settings["snapshots"] == "final":
    snaps = snaps[-1:]
  key = _eval_key(settings)
  out = {}
  for step in snaps:
    def compute(step=step):
      log(f"  evaluating {run_dir} @ step {step}")
      model, tok, _ = load_run(run_dir, snapshot=step)
      return run_eval(model, tok, settings, data_kwargs, log)
    out[step] = _cached(run_dir / "eval" / f"step_{step}.json", key, compute)
  return out


# ----------------------------------------------------------------------------
# Aggregation.

def _ms(values) -> dict[str, Any]:
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not vals:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}


def _fmt_metric(task, r) -> str:
  metric, _ = metrics.PRIMARY_METRIC[task]
  v = r[metric]
  return f"{100 * v:.1f}%" if metric == "accuracy" else f"{metric} {v:.3f}"


def _run_summary(config, method, evals: Mapping[int, Mapping], base: Mapping,
                 run_dir: pathlib.Path, sizes) -> dict[str, Any]:
  steps = sorted(evals)
  final = evals[steps[-1]]["results"]
  norm = {s: metrics.normalized_scores(evals[s]["results"], base) for s in steps}
  forget = fg.forgetting_table({s: {t: v for t, v in norm[s].items() if t != "average"}
                                for s in steps})
  out = {"final": final, "normalized": norm[steps[-1]], "forgetting": forget,
         "forgetting_mean": fg.mean_defined(forget.values()), "steps": steps,
         "eval_seconds": evals[steps[-1]].get("seconds")}
  if method == "multi_stage" and config.data.stages:
    ends = _stage_ends(config)
    if all(e in norm for e in ends):
      scores = {s: {t: v for t, v in norm[s].items() if t != "average"} for s in ends}
      out["stage_transfer"] = fg.stage_transfer(scores, ends, _stage_tasks(config),
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
  return out


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
      entry["tasks"][t] = {"metric": metric, **_ms(vals), "values": vals}
      if metrics.PRIMARY_METRIC[t][0] == "loss" and "perplexity" in runs[0]["final"][t]:
        entry["tasks"][t]["perplexity"] = _ms([r["final"][t]["perplexity"] for r in runs])
      if t in metrics.SECONDARY_METRIC:
        second = metrics.SECONDARY_METRIC[t]
        entry.setdefault("secondary", {})[t] = {
            "metric": second, **_ms([r["final"][t].get(second) for r in runs])}
    for t in list(tasks) + ["average"]:
      entry["normalized"][t] = _ms([r["normalized"].get(t) for r in runs])
    entry["average"] = entry["normalized"]["average"]
    for t in tasks:
      entry["forgetting"][t] = _ms([r["forgetting"].get(t) for r in runs])
    entry["forgetting"]["mean"] = _ms([r["forgetting_mean"] for r in runs])
    if any("stage_transfer" in r for r in runs):
      st = [r["stage_transfer"] for r in runs if "stage_transfer" in r]
      entry["stage_transfer"] = {
          "old_task_drop": _ms([s["mean_old_task_drop"] for s in st]),
          "new_task_gain": _ms([s["mean_new_task_gain"] for s in st]),
          "per_task": st[0]}
    drifts = [r["drift"] for r in runs if r.get("drift")]
    if drifts:
      entry["drift"] = {"final_jaccard_first": _ms([d["final_jaccard_first"] for d in drifts]),
                        "num_refreshes": _ms([d["num_refreshes"] for d in drifts]),
                        "mean_migration": _ms([fg.mean_defined(d["migration"]) for d in drifts])}
    norms = [r["grad_norms"] for r in runs if r.get("grad_norms")]
    if norms:
      entry["grad_norms"] = {k: _ms([n.get(k) for n in norms]) for k in norms[0]}
    imp = [r["importance_drift"] for r in runs if r.get("importance_drift")]
    if imp:
      entry["importance_drift"] = {
          "final_jaccard_first": _ms([d["final_jaccard_first"] for d in imp]),
          "mean_jaccard_prev": _ms([fg.mean_defined(d["jaccard_prev"][1:]) for d in imp]),
          "mean_migration": _ms([fg.mean_defined(d["migration"]) for d in imp])}
    entry["runs"] = [r["run_dir"] for r in runs]
    entry["eval_seconds"] = [r["eval_seconds"] for r in runs]
    entry["train_seconds"] = [r.get("train_seconds") for r in runs]
    methods[m] = entry
  return methods


# ----------------------------------------------------------------------------
# Tables.

def _pm(ms, scale=1.0, digits=1) -> str:
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
    return _pm(ms, 100.0 if acc else 1.0, 1 if acc else 3)

  base_cells = [cell(t, {"mean": metrics.primary_score(t, base[t]), "n": 1}) for t in tasks]
  base_cells += ["100.0", "–"] + [
      _pm({"mean": base[t].get(metrics.SECONDARY_METRIC[t]), "n": 1}, 100.0) for t in secondary]
  lines.append("| base | " + " | ".join(base_cells) + " |")
  for m, e in methods.items():
    row = [m] + [cell(t, e["tasks"].get(t)) for t in tasks]
    row += [_pm(e["average"]), _pm(e["forgetting"].get("mean"))]
    row += [_pm((e.get("secondary") or {}).get(t), 100.0) for t in secondary]
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
    lines.append(f"| {m} | " + " | ".join(_pm(e["normalized"].get(t)) for t in tasks)
                 + f" | {_pm(e['average'])} |")
  lines += ["", "Forgetting per task (best earlier snapshot minus final, normalized points; "
            "negative = still improving):", "",
            "| method | " + " | ".join(tasks) + " | mean |", "|" + "---|" * (len(tasks) + 2)]
  for m, e in methods.items():
    lines.append(f"| {m} | " + " | ".join(_pm(e["forgetting"].get(t)) for t in tasks)
                 + f" | {_pm(e['forgetting'].get('mean'))} |")
  extra = [(m, e) for m, e in methods.items() if "stage_transfer" in e or "drift" in e]
  if extra:
    lines += ["", "| method | old-task drop | new-task gain | Jaccard vs first mask (final) "
              "| refreshes | mean migration |", "|---|---|---|---|---|---|"]
    for m, e in extra:
      st, d = e.get("stage_transfer", {}), e.get("drift", {})
      lines.append(f"| {m} | {_pm(st.get('old_task_drop'))} | {_pm(st.get('new_task_gain'))}"
                   f" | {_pm(d.get('final_jaccard_first'), 1, 3)} | "
                   f"{_pm(d.get('num_refreshes'), 1, 0)} | {_pm(d.get('mean_migration'), 1, 3)} |")
  clipped = [(m, e["grad_norms"]) for m, e in methods.items() if e.get("grad_norms")]
  if clipped:
    lines += ["", "Gradient norms (mean over logged steps) and the share of logged steps "
              "clipped, by the norm of all gradients and of the trainable ones:", "",
              "| method | grad norm (all) | grad norm (trainable) | clipped (all) | "
              "clipped (trainable) |", "|---|---|---|---|---|"]
    for m, n in clipped:
      lines.append(f"| {m} | {_pm(n.get('grad_norm'), 1, 3)} | "
                   f"{_pm(n.get('trainable_grad_norm'), 1, 3)} | "
                   f"{_pm(n.get('clipped_all'), 1, 2)} | {_pm(n.get('clipped_trainable'), 1, 2)} |")
  if results.get("importance_drift"):
    lines += ["", drift_lib.importance_drift_markdown(results["importance_drift"])]
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
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Driver.

def param_sizes(model_config) -> dict[str, int]:
  """``{param path: entries}`` of ``config.model`` from shapes only (no weights loaded).

  Weighs the layers when turning per-layer isolated fractions into counts
  (migration); empty when the architecture cannot be resolved.
  """
  try:
    from epi_jax.training import model as model_lib  # pylint: disable=g-import-not-at-top
    if model_config.init == "random":
      cfg = model_lib.model_config(model_config)
    else:
      from epi_jax.model import loading  # pylint: disable=g-import-not-at-top
      path = loading.resolve_model_path(model_config.name)
      if path.is_dir():
        cfg = loading.hf_config(json.loads((path / "config.json").read_text()))
      else:
        import gguf  # pylint: disable=g-import-not-at-top
        cfg = loading.gguf_config(gguf.GGUFReader(path))
    return {k: int(np.prod(v.shape)) for k, v in model_lib.spec_for(cfg).shapes.items()}
  except Exception as e:  # pylint: disable=broad-except
    print(f"[epi_jax] layer sizes unavailable ({e}); migration weighs layers equally",
          file=sys.stderr)
    return {}


def _train_and_evaluate(cfg, run_dir: pathlib.Path, label: str, settings, data_kwargs,
                        log) -> tuple[dict[int, dict], float | None]:
  """Trains ``cfg`` into ``run_dir`` (skipped when finished), evaluates its snapshots."""
  from epi_jax.training import is_finished, train  # pylint: disable=g-import-not-at-top
  train_seconds = None
  if is_finished(run_dir):
    log(f"[{label}] finished run found in {run_dir}")
  else:
    log(f"[{label}] training into {run_dir}")
    start = time.time()
    result = train(cfg, run_dir)
    train_seconds = round(time.time() - start, 1)
    del result
  done = run_dir / "DONE"
  if train_seconds is None and done.is_file():
    try:
      train_seconds = json.loads(done.read_text()).get("wall_time_s")
    except json.JSONDecodeError:
      pass
  return evaluate_run(run_dir, settings, data_kwargs, log), train_seconds


def _check_methods(methods, seeds, known=METHODS):
  known = tuple(known) + tuple(v for v, m in VARIANTS.items() if m in known)
  unknown = [m for m in methods if m not in known]
  if unknown or not methods:
    raise ValueError(f"--methods: unknown or empty {list(methods)}; known: {list(known)}")
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")


def _base_eval(workdir, train_cfg, settings, data_kwargs, log) -> dict:
  def base_compute():
    log("evaluating the base model")
    model, tok = base_model(train_cfg)
    return run_eval(model, tok, settings, data_kwargs, log)
  return _cached(workdir / "base_eval.json", _eval_key(settings), base_compute)["results"]


def _results_of(evals: Mapping[int, Mapping]) -> dict[int, dict]:
  return {int(s): e["results"] for s, e in evals.items()}


def compare(config, workdir, *, methods: Sequence[str] = METHODS, seeds: int = 1,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains, evaluates and compares ``methods`` over ``seeds`` seeds (see module doc)."""
  _check_methods(methods, seeds)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  train_cfg, settings = split_eval_config(config)
  ends = _stage_ends(train_cfg)
  if settings["snapshots"] == "all" and ends:
    with train_cfg.unlocked():
      train_cfg.snapshot_steps = tuple(sorted(set(train_cfg.snapshot_steps) | set(ends[:-1])))
  if "multi_stage" in methods and ends and ends[-1] != int(train_cfg.total_steps):
    log(f"warning: multi_stage trains {ends[-1]} steps (its stages) but the other methods "
        f"train total_steps={train_cfg.total_steps}: the methods are not step-matched")
  t0 = time.time()
  data_kwargs = eval_data(train_cfg, settings["tasks"])
  base = _base_eval(workdir, train_cfg, settings, data_kwargs, log)
  per_run: dict[str, list] = {m: [] for m in methods}
  evals_by_method: dict[str, list] = {m: [] for m in methods}
  sizes = param_sizes(train_cfg.model)
  for k in range(seeds):
    for m in methods:
      run_dir = workdir / m / f"seed{k}"
      cfg = method_config(train_cfg, m, int(train_cfg.seed) + k)
      if m == "multi_stage" and ends:
        with cfg.unlocked():
          cfg.total_steps = ends[-1]
      evals, train_seconds = _train_and_evaluate(cfg, run_dir, f"{m} seed{k}", settings,
                                                 data_kwargs, log)
      summary = _run_summary(cfg, m, evals, base, run_dir, sizes)
      summary["run_dir"] = str(run_dir)
      summary["train_seconds"] = train_seconds
      per_run[m].append(summary)
      evals_by_method[m].append(_results_of(evals))
  tasks = [t for t in settings["tasks"] if t in base]
  rs = claims.make_resampler(base, tasks, seeds, settings["bootstrap_resamples"])
  quantities = {m: claims.mixture_quantities(rs, base, evals_by_method[m], tasks, m)
                for m in methods}
  results = {"protocol": "mixture",
             "config": _plain(config.to_dict() if hasattr(config, "to_dict") else config),
             "methods_order": list(methods), "seeds": [int(train_cfg.seed) + k for k in range(seeds)],
             "eval": settings, "base": base, "methods": aggregate(per_run),
             "paired": claims.analyze(rs, quantities, claims.MIXTURE_CLAIMS),
             "importance_drift": {m: runs[0]["importance_drift"] for m, runs in per_run.items()
                                  if runs and runs[0].get("importance_drift")}}
  results["verdicts"] = [v["text"] for v in results["paired"]["verdicts"]]
  results["wall_time_s"] = round(time.time() - t0, 1)
  _write_outputs(workdir, results, per_run, log, sizes)
  return results


SEQUENTIAL_METHODS = ("full", "static", "epi")


def sequential_config(train_cfg, method: str, first: str, second: str, steps: int, seed: int):
  """The trainer config of one sequential run: ``steps`` on ``first``, then on ``second``.

  Every method trains over these two stages (``data.staged``); ``static``
  chooses its mask once, at the end of the first stage (``epi.warmup_steps``),
  from the importance gathered on it. Multi-stage SFT in this protocol *is*
  the full run (AdamW over the same two stages), so it is not run twice.
  """
  cfg = method_config(train_cfg, method, seed)
  with cfg.unlocked():
    cfg.data.staged = True
    cfg.data.stages = [{"mixture": {first: 1.0}, "steps": int(steps)},
                       {"mixture": {second: 1.0}, "steps": int(steps)}]
    cfg.total_steps = 2 * int(steps)
    cfg.snapshot_steps = (int(steps),)
    if cfg.method == "static":
      cfg.epi.warmup_steps = int(steps)
  return cfg


def compare_sequential(config, workdir, *, tasks: Sequence[str],
                       methods: Sequence[str] = SEQUENTIAL_METHODS, seeds: int = 1,
                       both_orders: bool = True, log: Callable[[str], None] = print
                       ) -> dict[str, Any]:
  """The sequential protocol (CPI-FT's Table 2): train task A, then task B.

  Each run trains ``config.total_steps // 2`` steps on A, then as many on B
  (:func:`sequential_config`), into ``workdir/<A>_then_<B>/<method>/seed<k>``;
  with ``both_orders`` B then A too. Only A and B are evaluated, at the end
  of A and at the end. Reports, per order and method, the drop on A (its
  normalized score at the end of A minus at the end) and the gain on B, with
  paired bootstrap intervals, and the verdicts of ``claims.SEQUENTIAL_CLAIMS``.
  """
  _check_methods(methods, seeds, SEQUENTIAL_METHODS)
  tasks = list(tasks)
  if len(tasks) != 2 or tasks[0] == tasks[1] or any(t not in TASKS for t in tasks):
    raise ValueError(f"--tasks: expected two different tasks A,B of {list(TASKS)}, got {tasks}")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  train_cfg, settings = split_eval_config(config)
  steps = int(train_cfg.total_steps) // 2
  if steps < 1:
    raise ValueError(f"config.total_steps={train_cfg.total_steps}: the sequential protocol "
                     "trains total_steps // 2 steps per task, so it needs >= 2")
  settings = {**settings, "tasks": tasks, "snapshots": "all"}
  t0 = time.time()
  data_kwargs = eval_data(train_cfg, tasks)
  base = _base_eval(workdir, train_cfg, settings, data_kwargs, log)
  rs = claims.make_resampler(base, tasks, seeds, settings["bootstrap_resamples"])
  orders = [tuple(tasks)] + ([tuple(reversed(tasks))] if both_orders else [])
  out_orders = {}
  for first, second in orders:
    name = f"{first}_then_{second}"
    evals_by_method = {m: [] for m in methods}
    for k in range(seeds):
      for m in methods:
        cfg = sequential_config(train_cfg, m, first, second, steps, int(train_cfg.seed) + k)
        run_dir = workdir / name / m / f"seed{k}"
        evals, _ = _train_and_evaluate(cfg, run_dir, f"{name} {m} seed{k}", settings,
                                       data_kwargs, log)
        evals_by_method[m].append(_results_of(evals))
    quantities = {m: claims.sequential_quantities(rs, base, evals_by_method[m], first, second,
                                                  steps, m) for m in methods}
    analysis = claims.analyze(rs, quantities, claims.SEQUENTIAL_CLAIMS,
                              suffix=f" ({first} after training {second})")
    out_orders[name] = {"first": first, "second": second, "steps_per_task": steps,
                        "runs": {m: [str(workdir / name / m / f"seed{k}") for k in range(seeds)]
                                 for m in methods},
                        "paired": analysis}
  results = {"protocol": "sequential", "tasks": tasks,
             "config": _plain(config.to_dict() if hasattr(config, "to_dict") else config),
             "methods_order": list(methods),
             "seeds": [int(train_cfg.seed) + k for k in range(seeds)],
             "note": "multi_stage in this protocol is the full run (AdamW over the same two "
                     "stages, in that order), reported as 'full'.",
             "eval": settings, "base": base, "orders": out_orders,
             "verdicts": [v["text"] for o in out_orders.values()
                          for v in o["paired"]["verdicts"]],
             "wall_time_s": round(time.time() - t0, 1)}
  (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
  table = sequential_markdown(results)
  (workdir / "results.md").write_text(table)
  log("\n" + table)
  log(f"wrote {workdir / 'results.json'} and {workdir / 'results.md'}")
  return results


def _write_outputs(workdir: pathlib.Path, results, per_run, log, sizes=None):
  (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
  table = results_markdown(results)
  (workdir / "results.md").write_text(table)
  plots = workdir / "plots"
  drift_lib.plot_task_metrics(results["methods"], plots / "tasks_normalized.png")
  curves, first_refreshes = {}, {}
  for m, runs in per_run.items():
    for r in runs:
      if r.get("drift"):
        curves[f"{m}/{pathlib.Path(r['run_dir']).name}"] = r["drift"]
        first_refreshes.setdefault(m, r["run_dir"])
  drift_lib.plot_drift(curves, plots / "drift.png")
  for m, run_dir in first_refreshes.items():
    drift_lib.plot_layer_heatmap(drift_lib.load_refreshes(run_dir),
                                 plots / f"layer_heatmap_{m}.png",
                                 title=f"{m}: isolated fraction per block", sizes=sizes)
  imp_curves = {f"{m}/{pathlib.Path(r['run_dir']).name}": r["importance_drift"]
                for m, runs in per_run.items() for r in runs if r.get("importance_drift")}
  drift_lib.plot_drift(imp_curves, plots / "importance_drift.png", what="top-p importance set")
  for m, runs in per_run.items():
    if runs and runs[0].get("importance_drift"):
      drift_lib.plot_layer_heatmap(drift_lib.load_importance_drift(runs[0]["run_dir"]),
                                   plots / f"importance_layers_{m}.png",
                                   title=f"{m}: fraction of each block in the top-p importance set",
                                   sizes=sizes)
  log("\n" + table)
  log(f"wrote {workdir / 'results.json'}, {workdir / 'results.md'} and {plots}/*.png")


def load_config_file(path: str):
  """``get_config()`` of a config file."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--config: no such file {path}")
  spec = importlib.util.spec_from_file_location(f"_epi_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config: {path} defines no get_config()")
  return module.get_config()
