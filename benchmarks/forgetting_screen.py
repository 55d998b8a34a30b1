"""Which ordered pair of tasks forgets most: full SFT's drop on the first task (issue 36).

For every unordered pair {A, B} of ``--tasks``, runs the sequential protocol
of ``epi-jax compare`` with full SFT only, one seed, both orders
(``--steps_per_task`` steps on A, then as many on B, and B then A), into
``WORKDIR/<A>_<B>``; the drop on A (A's normalized score at the end of A
minus at the end, with its bootstrap interval) of each order is one row.
Finished runs and cached evals are skipped, so a rerun resumes.

Outputs ``WORKDIR/screen.json`` and ``WORKDIR/screen.md`` (rows sorted by
drop, largest first; the first is the pair for configs/study.py's PAIR).

  python benchmarks/forgetting_screen.py --config configs/study.py --workdir runs/study/screen \\
      --steps_per_task 8 --num_examples 32 [--tasks gsm8k,chat,...] \\
      [--config.FIELD=VALUE ...] [--eval.FIELD=VALUE ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
from typing import Any, Mapping, Sequence

from epi_jax.experiments import cli
from epi_jax.scoring.evaluate import TASKS
from epi_jax.utils import files


def unordered_pairs(tasks: Sequence[str]) -> list[tuple[str, str]]:
  """Each pair of ``tasks`` once, in their order (both orders are run per pair)."""
  return list(itertools.combinations(tasks, 2))


def drop_rows(pair_results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
  """``[{"first", "second", "drop", "ci95"}]`` from each pair's sequential
  ``results.json``, sorted by drop, largest first (an undefined drop last)."""
  rows = []
  for results in pair_results.values():
    for order in results["orders"].values():
      drop = order["paired"]["methods"]["full"]["drop"]
      rows.append({"first": order["first"], "second": order["second"],
                   "drop": drop.get("value"), "ci95": drop.get("ci95")})
  return sorted(rows, key=lambda r: (r["drop"] is None, -(r["drop"] or 0.0)))


def screen_markdown(rows: Sequence[Mapping[str, Any]], steps: int, examples: int) -> str:
  lines = [f"Full SFT's drop on the first task (normalized points, base = 100; "
           f"{steps} + {steps} steps, 1 seed, {examples} eval examples per task, 95% "
           "bootstrap interval), largest first:", "",
           "| first (A) | then (B) | drop on A | 95% interval |", "|---|---|---|---|"]
  for r in rows:
    ci = "–" if not r["ci95"] else f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]"
    drop = "–" if r["drop"] is None else f"{r['drop']:+.2f}"
    lines.append(f"| {r['first']} | {r['second']} | {drop} | {ci} |")
  return "\n".join(lines) + "\n"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--steps_per_task", type=int, default=8)
  p.add_argument("--num_examples", type=int, default=32)
  args, rest = p.parse_known_args(argv)
  args.tasks = [t for t in args.tasks.split(",") if t]
  unknown = [t for t in args.tasks if t not in TASKS]
  if unknown or len(args.tasks) < 2 or len(set(args.tasks)) != len(args.tasks):
    p.error(f"--tasks: expected two or more different tasks of {','.join(TASKS)}, "
            f"got {','.join(args.tasks)}")
  if args.steps_per_task < 1 or args.num_examples < 1:
    p.error("--steps_per_task and --num_examples must be >= 1")
  bad = [a for a in rest if not a.startswith(("--config.", "--eval."))]
  if bad:
    p.error(f"unknown arguments {bad}: only --config.FIELD=VALUE and --eval.FIELD=VALUE "
            "pass through")
  return args, rest


def main(argv=None) -> int:
  args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
  workdir = pathlib.Path(args.workdir)
  pair_results = {}
  for a, b in unordered_pairs(args.tasks):
    out = workdir / f"{a}_{b}"
    rc = cli.compare_main(
        ["--config", args.config, "--workdir", str(out), "--protocol", "sequential",
         "--tasks", f"{a},{b}", "--methods", "full", "--seeds", "1", "--both_orders=true",
         f"--config.total_steps={2 * args.steps_per_task}",
         f"--eval.num_examples={args.num_examples}", *passthrough])
    if rc != 0:
      print(f"forgetting_screen: the pair {a},{b} failed (exit {rc})", file=sys.stderr)
      return rc
    pair_results[f"{a}_{b}"] = json.loads((out / "results.json").read_text())
  rows = drop_rows(pair_results)
  table = screen_markdown(rows, args.steps_per_task, args.num_examples)
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_text_atomic(workdir / "screen.json", json.dumps(
      {"tasks": args.tasks, "steps_per_task": args.steps_per_task,
       "num_examples": args.num_examples, "rows": rows}, indent=1))
  files.write_text_atomic(workdir / "screen.md", table)
  print("\n" + table)
  if rows and rows[0]["drop"] is not None:
    print(f"forgets most: {rows[0]['first']} then {rows[0]['second']} "
          f"(configs/study.py PAIR = ({rows[0]['first']!r}, {rows[0]['second']!r}))")
  return 0


if __name__ == "__main__":
  sys.exit(main())
