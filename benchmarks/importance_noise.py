"""Is EPI's top-p set signal or batch noise? Split-half agreement of the importance (issue 36).

Trains full SFT with ``--config`` (the study's model and step by default)
for ``--steps`` steps: the first half on the first task of ``--tasks``, the
second half on the second, as the sequential protocol does. Each step's batch
is split in two halves (rows ``0::2`` and ``1::2``); the update uses their sum,
the step's gradient. Beside it, for each ``beta`` in ``--betas``, three EPI
importance trackers (``epi_transform(mode="none")``'s EMA, EPI's own top-p
selection: layer normalization, global top-k, the same eligible leaves) are
fed the raw gradients of half A, of half B, and of the whole batch; their
updates are discarded. Every ``--every`` steps each tracker selects its top-p
set and the script records, per beta:

* ``split_half``: Jaccard(set from half A, set from half B). Two estimates
  from disjoint data at the same parameters: where they agree, the set is a
  property of the model and the task; where they do not, it is the batches'.
  With ``beta = 0`` it is the batch-to-batch Jaccard of the instantaneous
  importance, at half the batch.
* ``consecutive``: Jaccard(whole-batch set now, ``--every`` steps ago), what
  EPI's refresh at ``T = --every`` would change (with ``beta = 0``: the
  batch-to-batch Jaccard at the full batch).

Outputs ``--out`` (JSON: one record per measured step, and per beta the mean
over each task's half). Choose beta where the split-half agreement is well
above beta = 0's, and T of the order of the EMA's window ``1 / (1 - beta)``.

  python benchmarks/importance_noise.py --config configs/study.py --steps 40 \\
      --betas 0,0.5,0.9,0.97 --every 5 --out docs/study/importance_noise.json
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import runpy
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import epi_jax
from epi_jax import sharding
from epi_jax.method.inspection import select_mask
from epi_jax.method.options import EPIOptions
from epi_jax.scoring.drift import jaccard
from epi_jax.training import config as cfg_lib
from epi_jax.training import inputs, optim, step as step_lib
from epi_jax.training.trainer import fresh_start
from epi_jax.utils import files


def _config(args):
  config = cfg_lib.load_config_file(args.config)
  first, second = args.tasks
  half = args.steps // 2
  with config.unlocked():
    config.method, config.total_steps = "full", args.steps
    config.checkpoint_every = 0
    config.epi.track_importance = False
    config.data.stages = [{"mixture": {first: 1.0}, "steps": half},
                          {"mixture": {second: 1.0}, "steps": args.steps - half}]
  return cfg_lib.validate(config)


def run(args) -> dict:
  config = _config(args)
  if config.data.batch_size % 2:
    raise SystemExit(f"importance_noise: the batch ({config.data.batch_size} rows) must split "
                     "into two equal halves")
  mesh = sharding.make_mesh(config.mesh)
  ts, state, it = fresh_start(config, mesh)
  spec = ts.spec
  packed = bool(config.data.packing)
  e = config.epi

  kw = dict(importance=e.importance, normalization=e.normalization, selection=e.selection,
            eligible=optim.eligible_fn(config), layer_axes=ts.layer_axes)
  parts = ("A", "B", "AB")
  # mode="none": the EMA only; the top-p set is selected below, at measured steps.
  trackers = {(b, h): epi_jax.epi_transform(e.isolation_ratio, args.every, b, mode="none",
                                            packed_mask=True, **kw)
              for b in args.betas for h in parts}
  options = EPIOptions(isolation_ratio=e.isolation_ratio, update_interval=args.every, **kw)
  select = jax.jit(lambda imp, p: select_mask(imp, options, p)[0])
  tstates = {k: tx.init(state.params) for k, tx in trackers.items()}

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(state, tstates, batch):
    params = state.params
    denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def grads_of(rows):
      def loss(p):
        return step_lib.loss_sums(spec, p, rows, packed)[0] / denom
      return jax.value_and_grad(loss)(params)

    (la, ga) = grads_of(jax.tree.map(lambda x: x[0::2], batch))
    (lb, gb) = grads_of(jax.tree.map(lambda x: x[1::2], batch))
    grads = {"A": ga, "B": gb, "AB": jax.tree.map(jnp.add, ga, gb)}
    updates, opt_state = ts.tx.update(grads["AB"], state.opt_state, params)
    tstates = {k: trackers[k].update(grads[k[1]], s, params)[1] for k, s in tstates.items()}
    new = state._replace(step=state.step + 1, params=optax.apply_updates(params, updates),
                        opt_state=opt_state)
    return new, tstates, la + lb

  def top_set(k):
    imp = epi_jax.epi_importance(tstates[k])
    return [np.asarray(x) for x in jax.tree.leaves(select(imp, state.params))]

  records, prev = [], {}
  t0 = time.time()
  for s in range(1, args.steps + 1):
    batch = inputs.to_global(next(it), mesh, config.data.batch_size)
    state, tstates, loss = step(state, tstates, batch)
    if s % args.every:
      continue
    task = args.tasks[0] if s <= args.steps // 2 else args.tasks[1]
    rec = {"step": s, "task": task, "loss": float(loss), "seconds": round(time.time() - t0, 1),
           "split_half": {}, "consecutive": {}}
    for b in args.betas:
      sets = {h: top_set((b, h)) for h in parts}
      rec["split_half"][str(b)] = round(jaccard(sets["A"], sets["B"]), 4)
      if b in prev:
        rec["consecutive"][str(b)] = round(jaccard(sets["AB"], prev[b]), 4)
      prev[b] = sets["AB"]
    records.append(rec)
    print(json.dumps(rec), flush=True)

  summary = {}
  for task in args.tasks:
    rows = [r for r in records if r["task"] == task]
    summary[task] = {
        "split_half": {str(b): _mean([r["split_half"][str(b)] for r in rows])
                       for b in args.betas},
        "consecutive": {str(b): _mean([r["consecutive"].get(str(b)) for r in rows])
                        for b in args.betas}}
  return {"config": args.config, "tasks": list(args.tasks), "steps": args.steps,
          "every": args.every, "betas": args.betas, "batch_size": config.data.batch_size,
          "seq_len": config.data.seq_len, "isolation_ratio": e.isolation_ratio,
          "importance": e.importance, "normalization": e.normalization,
          "selection": e.selection, "records": records, "mean_by_task": summary}


def _mean(values):
  values = [v for v in values if v is not None]
  return round(float(np.mean(values)), 4) if values else None


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/study.py")
  p.add_argument("--tasks", default=None,
                 help="two tasks, trained in order (default: configs/study.py's PAIR)")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--every", type=int, default=5)
  p.add_argument("--betas", default="0,0.5,0.9,0.97")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.tasks is None:
    pair = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "configs" / "study.py"))["PAIR"]
    args.tasks = list(pair)
  else:
    args.tasks = args.tasks.split(",")
  if len(args.tasks) != 2:
    p.error(f"--tasks: expected two tasks, got {args.tasks}")
  try:
    args.betas = [float(b) for b in args.betas.split(",")]
  except ValueError:
    p.error(f"--betas: expected numbers in [0, 1), got {args.betas!r}")
  if not all(0.0 <= b < 1.0 for b in args.betas):
    p.error(f"--betas: each must be in [0, 1), got {args.betas}")
  if args.every < 1 or args.steps < 2 * args.every:
    p.error("--every must be >= 1 and --steps >= 2 * --every")
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  out = run(args)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(pathlib.Path(args.out), json.dumps(out, indent=1) + "\n")
  for task, m in out["mean_by_task"].items():
    print(f"{task}: split-half {m['split_half']}  consecutive {m['consecutive']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
