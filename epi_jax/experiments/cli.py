"""``epi-jax compare`` and ``epi-jax evaluate``.

  epi-jax compare --config configs/NAME.py --workdir DIR \\
      --methods full,multi_stage,static,epi --seeds N \\
      [--config.FIELD=VALUE ...] [--eval.FIELD=VALUE ...]
  epi-jax compare --protocol sequential --tasks A,B --config ... --workdir DIR \\
      [--methods full,static,epi] [--seeds N] [--both_orders=false]
  epi-jax evaluate --workdir RUN [--snapshot N] [--eval.FIELD=VALUE ...]
  epi-jax evaluate --model smollm2-135m-instruct [--eval.FIELD=VALUE ...]
  epi-jax evaluate --model HuggingFaceTB/SmolLM2-135M-Instruct[@REVISION] [...]

``--config.FIELD=VALUE`` overrides a trainer field (ml_collections
``config_flags``). ``--eval.FIELD=VALUE`` overrides an eval setting (see
:func:`epi_jax.experiments.compare.eval_defaults`), on top of the config's
``eval`` group when it has one: ``--eval.num_examples=8`` (all tasks),
``--eval.num_examples.gsm8k=8``, ``--eval.tasks=gsm8k,logiqa``,
``--eval.snapshots=final``. Values are Python literals, else strings.

``--protocol mixture`` (default) trains every method on the task mixture;
``--protocol sequential --tasks A,B`` trains A for ``total_steps // 2``
steps, then B as long (and B then A, unless ``--both_orders=false``), and
reports the drop on A and the gain on B (``compare.compare_sequential``).
Both print the verdicts on the paper's claims first.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from epi_jax import training
from epi_jax.experiments import compare as cmp
from epi_jax.experiments import report
from epi_jax.model import load_pretrained
from epi_jax.scoring.evaluate import EVAL_TASKS
from epi_jax.training import config as cfg_lib
from epi_jax.training import distributed
from epi_jax.training.cli import parse_config_flags, unknown_overrides
from epi_jax.utils.usage import ArgumentParser, fail, wants_help


def split_prefixed_args(argv, prefix: str) -> tuple[list[str], dict]:
  """Separates ``PREFIX.FIELD=VALUE`` (or ``PREFIX.FIELD VALUE``) flags from the rest.

  Returns ``(rest, {dotted field: literal value})``; e.g. prefix ``"--eval."``.
  """
  rest, overrides = [], {}
  it = iter(argv)
  for arg in it:
    if not arg.startswith(prefix):
      rest.append(arg)
      continue
    body = arg[len(prefix):]
    if "=" in body:
      key, value = body.split("=", 1)
    else:
      key, value = body, next(it, None)
      if value is None:
        raise ValueError(f"{arg}: missing value")
    overrides[key] = cfg_lib.literal(value)
  return rest, overrides


def split_eval_args(argv) -> tuple[list[str], dict]:
  """Separates ``--eval.FIELD=VALUE`` flags from the rest; returns ``(rest, overrides)``."""
  return split_prefixed_args(argv, "--eval.")


def apply_eval_overrides(settings: dict, overrides: dict, known_tasks=cmp.TASKS) -> dict:
  """Applies ``{'num_examples.gsm8k': 8, 'tasks': 'a,b', ...}`` to eval settings.

  Raises:
    ValueError: one line naming the first bad ``--eval.FIELD`` (an unknown
      field, or a value :func:`compare.check_eval_settings` refuses).
  """
  settings = json.loads(json.dumps(settings))
  for key, value in overrides.items():
    path = key.split(".")
    if path[0] not in settings or len(path) > 2 or (len(path) == 2
                                                   and path[0] != "num_examples"):
      raise ValueError(f"Unknown eval setting --eval.{key}; known: {sorted(settings)}")
    if path[0] == "tasks" and isinstance(value, str):
      value = [t for t in value.split(",") if t]
    if path == ["num_examples"] and not isinstance(value, dict):
      if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"--eval.num_examples={value!r}: expected an int >= 1 (every task) "
                         "or --eval.num_examples.TASK=N")
      value = {t: value for t in settings["num_examples"]}
    if len(path) == 1:
      settings[path[0]] = value
    else:
      settings["num_examples"][path[1]] = value
  cmp.check_eval_settings(settings, "--eval.", known_tasks)
  return settings


# What a bad command line or config raises before anything runs: flags.Error covers
# absl's IllegalFlagValueError and UnrecognizedFlagError; a config file or override
# that does not fit the trainer raises the others.
_USAGE_ERRORS = (flags.Error, ValueError, FileNotFoundError, AttributeError, TypeError,
                 KeyError)


def _parse_compare(argv):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Training config file.", flag_values=fv,
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "Comparison directory.", flag_values=fv)
  distributed.define_flags(fv)
  flags.DEFINE_string("methods", None, "Comma-separated methods (default: all of the "
                      "protocol's).", flag_values=fv)
  flags.DEFINE_enum("protocol", "mixture", ["mixture", "sequential"],
                    "mixture: all tasks at once; sequential: task A, then task B.",
                    flag_values=fv)
  flags.DEFINE_string("tasks", None, "sequential protocol: the two tasks, A,B.", flag_values=fv)
  flags.DEFINE_bool("both_orders", True, "sequential protocol: also B then A.", flag_values=fv)
  flags.DEFINE_integer("seeds", 1, "Number of seeds per method.", flag_values=fv)
  bad = unknown_overrides(argv) or parse_config_flags(fv, argv, "epi-jax compare")
  if bad:
    raise ValueError(bad)
  return fv


def compare_main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  usage = ("usage: epi-jax compare --config configs/NAME.py --workdir DIR "
           "[--protocol mixture|sequential --tasks A,B] "
           "[--methods full,multi_stage,static,epi] [--seeds N] "
           "[--config.FIELD=VALUE ...] [--eval.FIELD=VALUE ...]")
  if wants_help(argv):
    print(usage + "\n\n" + (__doc__ or ""))
    return 0
  try:
    rest, overrides = split_eval_args(argv)
    fv = _parse_compare(rest)
    if fv.config is None or not fv.workdir:
      raise ValueError("--config and --workdir are required (see epi-jax compare --help)")
    config = fv.config
    train_cfg, settings = cmp.split_eval_config(config)
    training.validate(train_cfg)  # a bad trainer config fails before the base model's evaluation
    settings = apply_eval_overrides(settings, overrides)
    with config.unlocked():
      config.eval = settings
    default = cmp.SEQUENTIAL_METHODS if fv.protocol == "sequential" else cmp.METHODS
    methods = [m for m in (fv.methods or ",".join(default)).split(",") if m]
    tasks = [t for t in (fv.tasks or "").split(",") if t]
    if fv.protocol == "sequential" and len(tasks) != 2:
      raise ValueError("--protocol sequential needs --tasks A,B (two tasks)")
    if fv.protocol == "mixture" and tasks:
      raise ValueError("--tasks is for --protocol sequential (the mixture protocol "
                       "evaluates --eval.tasks)")
  except _USAGE_ERRORS as e:
    return fail("epi-jax compare", e)
  del train_cfg
  try:
    distributed.initialize_from_flags(fv)
    with distributed.fail_fast():
      if fv.protocol == "sequential":
        cmp.compare_sequential(config, fv.workdir, tasks=tasks, methods=methods,
                               seeds=fv.seeds, both_orders=fv.both_orders)
      else:
        cmp.compare(config, fv.workdir, methods=methods, seeds=fv.seeds)
  except ValueError as e:
    return fail("epi-jax compare", e)
  except training.NonFiniteError as e:
    print(f"epi-jax compare: {e}", file=sys.stderr)
    return 4
  except cmp.RunInterrupted as e:
    print(f"epi-jax compare: {e}", file=sys.stderr)
    return 130
  return 0


def verdicts_main(argv=None) -> int:
  """``epi-jax verdicts DIR ...``: prints the verdicts of comparisons' ``results.json``."""
  argv = list(sys.argv[1:] if argv is None else argv)
  usage = "usage: epi-jax verdicts DIR [DIR ...]  (comparison workdirs)"
  if wants_help(argv):
    print(usage)
    return 0
  if not argv:
    return fail("epi-jax verdicts", "give at least one comparison directory (see "
                "epi-jax verdicts --help)")
  status = 0
  for d in argv:
    path = pathlib.Path(d) / "results.json"
    try:
      results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      status = fail("epi-jax verdicts", f"cannot read {path} ({e})")
      continue
    print(f"== {d} ({results.get('protocol', 'mixture')}) ==")
    print(report.verdicts_markdown(results))
  return status


def evaluate_main(argv=None) -> int:
  """``epi-jax evaluate``: prints one snapshot's (or a pretrained model's) metrics as JSON."""
  argv = list(sys.argv[1:] if argv is None else argv)
  prog = "epi-jax evaluate"
  parser = ArgumentParser(prog=prog, description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", help="a training run directory")
  parser.add_argument("--snapshot", type=int, default=None,
                      help="step of the snapshot (default: the final one)")
  parser.add_argument("--model", help="evaluate a pretrained model instead of a run: a known "
                      "name, a Hub id org/name[@revision], a .gguf file or a checkpoint dir")
  parser.add_argument("--data_dir", default=None, help="prepared data (default: the run's)")
  parser.add_argument("--output", default=None, help="also write the JSON here")
  if wants_help(argv):
    parser.print_help()
    return 0
  try:
    rest, overrides = split_eval_args(argv)
  except ValueError as e:
    return fail(prog, e)
  args = parser.parse_args(rest)
  if bool(args.workdir) == bool(args.model):
    return fail(prog, "give exactly one of --workdir RUN or --model NAME")
  try:
    settings = apply_eval_overrides(cmp.eval_defaults(), overrides, known_tasks=EVAL_TASKS)
  except ValueError as e:
    return fail(prog, e)
  if args.model:
    try:
      model, tok, _ = load_pretrained(args.model)
    except (FileNotFoundError, ValueError) as e:
      return fail(prog, e)
    data_kwargs = {"data_dir": args.data_dir}
    out = cmp.run_eval(model, tok, settings, data_kwargs, log=_err)
  else:
    run = pathlib.Path(args.workdir)
    try:
      config = training.load_config(run)
    except (FileNotFoundError, ValueError) as e:
      return fail(prog, e)
    data_kwargs = ({"data_dir": args.data_dir} if args.data_dir
                   else cmp.eval_data(config, settings["tasks"]))
    snaps = training.list_snapshots(run)
    step = args.snapshot if args.snapshot is not None else (snaps[-1] if snaps else None)
    if step is None or step not in snaps:
      return fail(prog, f"--snapshot: no snapshot {step} in {run}; have {snaps}")

    def compute():
      model, tok, _ = training.load_run(run, snapshot=step)
      return cmp.run_eval(model, tok, settings, data_kwargs, log=_err)
    key = cmp.eval_key(settings)
    # Its own cache file per settings, so it never evicts compare's step_<N>.json.
    out = cmp.cached_eval(run / "eval" / f"step_{step}_{key}.json", key, compute)
    out = {"step": step, **out}
  text = json.dumps(out, indent=1)
  print(text)
  if args.output:
    pathlib.Path(args.output).write_text(text)
  return 0


def _err(msg: str):
  print(msg, file=sys.stderr, flush=True)
