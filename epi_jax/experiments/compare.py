"""The method comparison's driver: train every method and seed, evaluate, cache.

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
   :mod:`~epi_jax.experiments.claims`) and answers the papers' claims.
4. Aggregates over seeds and writes ``workdir/results.json`` (layout below),
   ``workdir/results.md`` (the verdicts, then the tables) and
   ``workdir/plots/*.png`` with :mod:`~epi_jax.experiments.report`; returns
   the results.

``compare_sequential`` (``--protocol sequential``) is the A-then-B protocol;
its ``results.json`` has ``orders: {"<A>_then_<B>": {"paired": ...}}``.

``results.json`` (mixture)::

  {"protocol": "mixture", "config": ..., "seeds": [...], "eval": {...},
   "base": {task: metrics},
   "paired": {"methods": {m: {quantity: {"value", "ci95"}}},
              "pairs": {"A - B": {quantity: {"diff", "ci95"}}}, "verdicts": [...]},
   "verdicts": ["EPI > static on average normalized score: ...", ...],
   "importance_drift": {method: curves},        # with epi.track_importance
   (sequential: orders[...]["lock_in"], as the methods' "lock_in" below)
   "methods": {method: {
       "tasks": {task: {"metric", "mean", "std", "values"}},
       "normalized": {task | "average": {"mean", "std"}},
       "average": {"mean", "std"},             # normalized average (base = 100)
       "forgetting": {task | "mean": {"mean", "std"}},  # normalized points
       "stage_transfer": {...},                # multi_stage only
       "drift": {...},                         # methods with EPI refreshes
       "grad_norms": {...},                    # logged grad norms, clipped shares
       "lock_in": {...},                       # runs with EPI refreshes (method.lock_in):
                                               # means over seeds, the first run's curves
       "runs": [...], "eval_seconds": [...]}}}

The eval settings come from ``config.eval`` (see :func:`eval_defaults`); the
trainer does not know that group, so it is split off before training.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import gguf
import numpy as np

from epi_jax import training
from epi_jax.data import datasets
from epi_jax.experiments import claims
from epi_jax.experiments import report
from epi_jax.model import loading
from epi_jax.model import setup as model_setup
from epi_jax.scoring import bootstrap
from epi_jax.scoring import metrics
from epi_jax.scoring.evaluate import (DEFAULT_NUM_EXAMPLES, DEFAULT_NUM_GENERATE, EVAL_TASKS,
                                      TASKS, evaluate)
from epi_jax.training import config as cfg_lib
from epi_jax.training import inputs
from epi_jax.training.config import METHODS
from epi_jax.utils import files

# Variants that can be compared beside the methods: {name: (method, config
# overrides)}. Clipping by the norm of the trainable gradients only; EPI
# ranking AdamW's second moment instead of its own EMA (its decay is b2).
VARIANTS = {
    "static_clip_trainable": ("static", {"optimizer.clip_scope": "trainable"}),
    "epi_clip_trainable": ("epi", {"optimizer.clip_scope": "trainable"}),
    "epi_nu": ("epi", {"epi.importance": "inner_nu", "epi.ema_decay": None}),
}
# The runs whose importance drift is read (with epi.track_importance), in the
# first seed only: full SFT's (unconstrained drift) and EPI's (its masks).
DRIFT_METHODS = ("full", "epi")


def method_config(train_cfg, name: str, seed: int, *, track_importance: bool = True):
  """``train_cfg`` for method (or variant) ``name`` and training seed ``seed``.

  ``track_importance=False`` turns ``epi.track_importance`` off for this run:
  the drift of the top-p importance set is read from the first seed's runs of
  ``DRIFT_METHODS`` only, and tracking it costs a selection over every
  parameter at each refresh (full SFT; EPI reads its mask). Where it stays on,
  the run also saves those sets (``epi.save_top_sets``, 1 bit per parameter
  per refresh): EPI's lock-in statistics compare its mask with full SFT's set
  at the same step (:func:`lock_in_vs_full`).
  """
  cfg = copy.deepcopy(train_cfg)
  with cfg.unlocked():
    method, overrides = VARIANTS.get(name, (name, {}))
    cfg.method = method
    cfg.seed = int(seed)
    if not track_importance:
      cfg.epi.track_importance = False
    cfg.epi.save_top_sets = bool(cfg.epi.get("track_importance", False))
    for key, value in overrides.items():
      cfg_lib.set_field(cfg, key, value)
  return cfg


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
          "num_generate": DEFAULT_NUM_GENERATE, "max_new_tokens": 160, "batch_size": 8,
          "generate_batch_size": 16, "seq_len": 512,
          "sample_seed": None, "logiqa_normalize": "sum", "snapshots": "all",
          "split": "test", "bootstrap_resamples": bootstrap.DEFAULT_RESAMPLES}


def to_plain(x):
  """``x`` with ConfigDicts (anything with ``to_dict``) and tuples as plain dicts and lists."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {k: to_plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_plain(v) for v in x]
  return x


def split_eval_config(config) -> tuple[Any, dict[str, Any]]:
  """``(trainer config without 'eval', resolved eval settings)``."""
  config = copy.deepcopy(config)
  settings = eval_defaults()
  if "eval" in config:
    given = to_plain(config["eval"])
    unknown = sorted(set(given) - set(settings))
    if unknown:
      raise ValueError(f"Unknown config field(s) eval.{unknown}; known: {sorted(settings)}")
    if isinstance(given.get("num_examples"), Mapping):
      given["num_examples"] = {**settings["num_examples"], **given["num_examples"]}
    settings.update(given)
    with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
      del config["eval"]
  check_eval_settings(settings, "config.eval.")
  return config, settings


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_eval_settings(settings: Mapping[str, Any], prefix: str = "config.eval.",
                        known_tasks: Sequence[str] = TASKS) -> None:
  """Checks resolved eval ``settings`` (:func:`eval_defaults`' fields) before anything runs.

  ``known_tasks``: those ``tasks`` may name (a comparison's: the benchmark tasks;
  ``epi-jax evaluate``: every task with an eval).

  Raises:
    ValueError: one line naming the first bad field as ``PREFIX + FIELD`` (e.g.
      ``config.eval.`` or the CLI's ``--eval.``), its value and what it takes.
  """
  def bad(field, value, want):
    raise ValueError(f"{prefix}{field}={value!r}: {want}")

  tasks, known = settings["tasks"], ",".join(known_tasks)
  if (isinstance(tasks, str) or not isinstance(tasks, Sequence)
      or not all(isinstance(t, str) for t in tasks)):
    bad("tasks", tasks, f"expected task names, comma-separated; known: {known}")
  unknown = [t for t in tasks if t not in known_tasks]
  if unknown:
    bad("tasks", ",".join(tasks), f"unknown task(s) {unknown}; known: {known}")
  if not tasks:
    bad("tasks", "", f"expected at least one task; known: {known}")
  num = settings["num_examples"]
  if not isinstance(num, Mapping):
    bad("num_examples", num, "expected an int >= 1 (every task) or {task: int >= 1}")
  for task, n in num.items():
    if task not in EVAL_TASKS:
      bad(f"num_examples.{task}", n, f"unknown task; known: {','.join(EVAL_TASKS)}")
    if n is not None and not (_is_int(n) and n >= 1):
      bad(f"num_examples.{task}", n, "expected an int >= 1 (or None: all)")
  for field, low, none_ok in (("num_generate", 0, True), ("max_new_tokens", 1, False),
                              ("batch_size", 1, False), ("generate_batch_size", 1, True),
                              ("seq_len", 2, False), ("bootstrap_resamples", 1, False)):
    value = settings[field]
    if not ((value is None and none_ok) or (_is_int(value) and value >= low)):
      bad(field, value, f"expected an int >= {low}" + (" or None" if none_ok else ""))
  if not (settings["sample_seed"] is None or _is_int(settings["sample_seed"])):
    bad("sample_seed", settings["sample_seed"], "expected an int or None")
  for field, choices in (("logiqa_normalize", ("sum", "mean")), ("snapshots", ("all", "final")),
                         ("split", datasets.SPLITS)):
    if settings[field] not in choices:
      bad(field, settings[field], f"expected one of {', '.join(map(repr, choices))}")


_ANALYSIS_ONLY = ("snapshots", "bootstrap_resamples")  # not part of an eval's cache key


def eval_key(settings: Mapping) -> str:
  """The cache key of eval ``settings``: a hash of those that change the results."""
  keep = {k: v for k, v in settings.items() if k not in _ANALYSIS_ONLY}
  return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


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
  probe = copy.deepcopy(config)
  with probe.unlocked():
    probe.method = "full"
    probe.data.mixture = {t: 1.0 for t in tasks}
  kwargs = inputs.ensure_data(probe)
  if "sources" in kwargs:
    return {"examples": standin_eval_examples(kwargs["sources"])}
  return {"data_dir": kwargs["data_dir"]}


def run_eval(model, tokenizer, settings, data_kwargs, log=print) -> dict[str, Any]:
  """``{"results": evaluate(...), "seconds"}`` of ``model`` under eval ``settings``."""
  start = time.perf_counter()
  res = evaluate(model, tokenizer, tasks=settings["tasks"], num_examples=settings["num_examples"],
                 max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"],
                 seq_len=settings["seq_len"], split=settings["split"],
                 generate_batch_size=settings["generate_batch_size"],
                 sample_seed=settings["sample_seed"], num_generate=settings["num_generate"],
                 logiqa_normalize=settings["logiqa_normalize"], **data_kwargs)
  seconds = time.perf_counter() - start
  log("  eval " + ", ".join(f"{t}: {report.fmt_metric(t, r)}" for t, r in res.items())
      + f"  ({seconds:.0f}s)")
  return {"results": res, "seconds": round(seconds, 2)}


def cached_eval(path, key: str, compute: Callable[[], dict]) -> dict:
  """The eval stored in ``path`` when it has ``eval_key`` ``key``, else ``compute()``'s
  result, stored there (atomically) with the key."""
  path = pathlib.Path(path)
  if path.is_file():
    try:
      obj = json.loads(path.read_text())
      if obj.get("eval_key") == key:
        return obj
    except json.JSONDecodeError:
      pass
  obj = {"eval_key": key, **compute()}
  files.write_text_atomic(path, json.dumps(obj, indent=1))
  return obj


def base_model(config):
  """The model training starts from (pretrained weights or seed-``config.seed`` init)."""
  spec, params, tokenizer = model_setup.build(config.model, config.seed, None)
  return spec.bind(params), tokenizer


def evaluate_run(run_dir, settings, data_kwargs, log=print) -> dict[int, dict]:
  """``{step: eval results}`` of a run's snapshots (cached in ``<run>/eval``)."""
  run_dir = pathlib.Path(run_dir)
  snaps = training.list_snapshots(run_dir)
  if not snaps:
    raise FileNotFoundError(f"No snapshots in {run_dir}/snapshots")
  if settings["snapshots"] == "final":
    snaps = snaps[-1:]
  key = eval_key(settings)
  out = {}
  for step in snaps:
    def compute(step=step):
      log(f"  evaluating {run_dir} @ step {step}")
      model, tok, _ = training.load_run(run_dir, snapshot=step)
      return run_eval(model, tok, settings, data_kwargs, log)
    out[step] = cached_eval(run_dir / "eval" / f"step_{step}.json", key, compute)
  return out


# ----------------------------------------------------------------------------
# Training and the two protocols.

def param_sizes(model_config) -> dict[str, int]:
  """``{param path: entries}`` of ``config.model`` from shapes only (no weights loaded).

  Weighs the layers when turning per-layer isolated fractions into counts
  (migration); empty when the architecture cannot be resolved.
  """
  try:
    if model_config.init == "random":
      cfg = model_setup.model_config(model_config)
    else:
      path = loading.resolve_model_path(model_config.name)
      if path.is_dir():
        cfg = loading.hf_config(json.loads((path / "config.json").read_text()))
      else:
        cfg = loading.gguf_config(loading.gguf_reader(path))
    return {k: int(np.prod(v.shape)) for k, v in model_setup.spec_for(cfg).shapes.items()}
  except Exception as e:  # pylint: disable=broad-except
    print(f"[epi_jax] layer sizes unavailable ({e}); migration weighs layers equally",
          file=sys.stderr)
    return {}


class RunInterrupted(RuntimeError):
  """A run of the comparison was stopped by a signal (SIGTERM/SIGINT) before its end."""


def train_and_evaluate(cfg, run_dir, label: str, settings, data_kwargs,
                       log: Callable[[str], None] = print
                       ) -> tuple[dict[int, dict], float | None]:
  """Trains ``cfg`` into ``run_dir`` (skipped when finished), evaluates its snapshots.

  Returns ``(evaluate_run's {step: eval}, training seconds)``; the seconds of a
  finished run come from its ``DONE`` file (None when it has none).
  """
  run_dir = pathlib.Path(run_dir)
  train_seconds = None
  if training.is_finished(run_dir):
    log(f"[{label}] finished run found in {run_dir}")
  else:
    log(f"[{label}] training into {run_dir}")
    start = time.time()
    result = training.train(cfg, run_dir)  # the final model is dropped: snapshots are on disk
    if result.interrupted:  # a signal stopped it: nothing to evaluate yet
      raise RunInterrupted(f"[{label}] training stopped at step {result.step} of "
                           f"{cfg.total_steps} by a signal; rerun the same command to go on "
                           "(finished runs and their evaluations are kept)")
    train_seconds = round(time.time() - start, 1)
  done = run_dir / "DONE"
  if train_seconds is None and done.is_file():
    try:
      train_seconds = json.loads(done.read_text()).get("wall_time_s")
    except json.JSONDecodeError:
      pass
  return evaluate_run(run_dir, settings, data_kwargs, log), train_seconds


def _check_methods(methods, seeds, known=METHODS):
  known = tuple(known) + tuple(v for v, (m, _) in VARIANTS.items() if m in known)
  unknown = [m for m in methods if m not in known]
  if unknown or not methods:
    raise ValueError(f"--methods: unknown or empty {list(methods)}; known: {list(known)}")
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")


def base_eval(workdir, train_cfg, settings, data_kwargs,
              log: Callable[[str], None] = print) -> dict:
  """The base model's eval results, cached in ``workdir/base_eval.json``."""
  def base_compute():
    log("evaluating the base model")
    model, tok = base_model(train_cfg)
    return run_eval(model, tok, settings, data_kwargs, log)
  return cached_eval(pathlib.Path(workdir) / "base_eval.json", eval_key(settings),
                     base_compute)["results"]


def _results_of(evals: Mapping[int, Mapping]) -> dict[int, dict]:
  return {int(s): e["results"] for s, e in evals.items()}


def lock_in_vs_full(first_runs: Mapping[str, str | pathlib.Path]) -> dict[str, dict]:
  """``{method: lock-in statistics}`` of the first seed's runs ``{method: run_dir}``
  whose refreshes log lock-in counts, with the Jaccard of their masks against the
  full SFT run's top-p sets (``first_runs["full"]``, when there)."""
  full_dir = first_runs.get("full")
  out = {}
  for m, run_dir in first_runs.items():
    locked = report.lock_in_of(run_dir, full_dir)
    if locked:
      out[m] = locked
  return out


def compare(config, workdir, *, methods: Sequence[str] = METHODS, seeds: int = 1,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains, evaluates and compares ``methods`` over ``seeds`` seeds (see module doc)."""
  _check_methods(methods, seeds)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  train_cfg, settings = split_eval_config(config)
  ends = report.stage_ends(train_cfg)
  if settings["snapshots"] == "all" and ends:
    with train_cfg.unlocked():
      train_cfg.snapshot_steps = tuple(sorted(set(train_cfg.snapshot_steps) | set(ends[:-1])))
  if "multi_stage" in methods and ends and ends[-1] != int(train_cfg.total_steps):
    log(f"warning: multi_stage trains {ends[-1]} steps (its stages) but the other methods "
        f"train total_steps={train_cfg.total_steps}: the methods are not step-matched")
  t0 = time.time()
  data_kwargs = eval_data(train_cfg, settings["tasks"])
  base = base_eval(workdir, train_cfg, settings, data_kwargs, log)
  per_run: dict[str, list] = {m: [] for m in methods}
  evals_by_method: dict[str, list] = {m: [] for m in methods}
  sizes = param_sizes(train_cfg.model)
  for k in range(seeds):
    for m in methods:
      run_dir = workdir / m / f"seed{k}"
      cfg = method_config(train_cfg, m, int(train_cfg.seed) + k,
                          track_importance=k == 0 and m in DRIFT_METHODS)
      if m == "multi_stage" and ends:
        with cfg.unlocked():
          cfg.total_steps = ends[-1]
      evals, train_seconds = train_and_evaluate(cfg, run_dir, f"{m} seed{k}", settings,
                                                data_kwargs, log)
      summary = report.run_summary(cfg, m, evals, base, run_dir, sizes)
      summary["run_dir"] = str(run_dir)
      summary["train_seconds"] = train_seconds
      per_run[m].append(summary)
      evals_by_method[m].append(_results_of(evals))
  # The first seed's EPI runs against full SFT's top-p sets (saved by both).
  for m, locked in lock_in_vs_full({m: runs[0]["run_dir"] for m, runs in per_run.items()
                                    if runs}).items():
    per_run[m][0]["lock_in"] = locked
  tasks = [t for t in settings["tasks"] if t in base]
  rs = claims.make_resampler(base, tasks, seeds, settings["bootstrap_resamples"])
  quantities = {m: claims.mixture_quantities(rs, base, evals_by_method[m], tasks, m)
                for m in methods}
  results = {"protocol": "mixture", "config": to_plain(config),
             "methods_order": list(methods),
             "seeds": [int(train_cfg.seed) + k for k in range(seeds)],
             "eval": settings, "base": base, "methods": report.aggregate(per_run),
             "paired": claims.analyze(rs, quantities, claims.MIXTURE_CLAIMS),
             "importance_drift": {m: runs[0]["importance_drift"] for m, runs in per_run.items()
                                  if runs and runs[0].get("importance_drift")}}
  results["verdicts"] = [v["text"] for v in results["paired"]["verdicts"]]
  results["wall_time_s"] = round(time.time() - t0, 1)
  report.write_results(workdir, results, per_run, log, sizes)
  return results


SEQUENTIAL_METHODS = ("full", "static", "epi")


def sequential_config(train_cfg, method: str, first: str, second: str, steps: int, seed: int,
                      *, track_importance: bool = False):
  """The trainer config of one sequential run: ``steps`` on ``first``, then on ``second``.

  Every method trains over these two stages (``data.staged``); ``static``
  chooses its mask once, at the end of the first stage (``epi.warmup_steps``),
  from the importance gathered on it. Multi-stage SFT in this protocol *is*
  the full run (AdamW over the same two stages), so it is not run twice.
  ``track_importance`` keeps the config's ``epi.track_importance`` (the first
  seed's full SFT and EPI runs: for EPI's Jaccard against full SFT's top-p set
  in the lock-in statistics); off otherwise.
  """
  cfg = method_config(train_cfg, method, seed, track_importance=track_importance)
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
  base = base_eval(workdir, train_cfg, settings, data_kwargs, log)
  rs = claims.make_resampler(base, tasks, seeds, settings["bootstrap_resamples"])
  orders = [tuple(tasks)] + ([tuple(reversed(tasks))] if both_orders else [])
  out_orders = {}
  for first, second in orders:
    name = f"{first}_then_{second}"
    evals_by_method = {m: [] for m in methods}
    for k in range(seeds):
      for m in methods:
        cfg = sequential_config(train_cfg, m, first, second, steps, int(train_cfg.seed) + k,
                                track_importance=k == 0 and m in DRIFT_METHODS)
        run_dir = workdir / name / m / f"seed{k}"
        evals, _ = train_and_evaluate(cfg, run_dir, f"{name} {m} seed{k}", settings,
                                      data_kwargs, log)
        evals_by_method[m].append(_results_of(evals))
    lock_ins = {m: [report.lock_in_of(workdir / name / m / f"seed{k}") for k in range(seeds)]
                for m in methods}
    for m, locked in lock_in_vs_full({m: workdir / name / m / "seed0"
                                      for m in methods}).items():
      lock_ins[m][0] = locked
    quantities = {m: claims.sequential_quantities(rs, base, evals_by_method[m], first, second,
                                                  steps, m) for m in methods}
    analysis = claims.analyze(rs, quantities, claims.SEQUENTIAL_CLAIMS,
                              suffix=f" ({first} after training {second})")
    out_orders[name] = {"first": first, "second": second, "steps_per_task": steps,
                        "runs": {m: [str(workdir / name / m / f"seed{k}") for k in range(seeds)]
                                 for m in methods},
                        "paired": analysis,
                        "lock_in": {m: agg for m, l in lock_ins.items()
                                    if (agg := report.aggregate_lock_in(l))}}
  results = {"protocol": "sequential", "tasks": tasks, "config": to_plain(config),
             "methods_order": list(methods),
             "seeds": [int(train_cfg.seed) + k for k in range(seeds)],
             "note": "multi_stage in this protocol is the full run (AdamW over the same two "
                     "stages, in that order), reported as 'full'.",
             "eval": settings, "base": base, "orders": out_orders,
             "verdicts": [v["text"] for o in out_orders.values()
                          for v in o["paired"]["verdicts"]],
             "wall_time_s": round(time.time() - t0, 1)}
  report.write_sequential_results(workdir, results, log)
  return results
