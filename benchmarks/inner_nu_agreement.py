"""How far EPI's masks move when the importance is AdamW's second moment.

For each refresh interval T in ``--intervals``, one EPI run of ``--config``
(SmolLM2-135M on the real mixture by default) with
``epi.importance="inner_nu"`` (no clipping, so AdamW's ``nu`` is the EMA of
the raw gradients), and beside it two trackers fed the same raw gradients,
whose updates are discarded (they do not change the trajectory):

* ``ema b2``: EPI's own ``grad_sq`` EMA with ``beta = b2`` (the same quantity;
  any difference is float rounding of ``1 - b2``, see docs/METHOD.md);
* ``ema 0.99``: EPI's default ``beta``, a much shorter horizon than b2 = 0.999.

At each refresh it prints the Jaccard overlap of the run's mask with each
tracker's, and writes them to ``--out`` (JSON).

  python benchmarks/inner_nu_agreement.py --config configs/smollm2_multitask.py \\
      --steps 40 --intervals 2,10 --out benchmarks/inner_nu_agreement.json
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

import epi_jax
from epi_jax import sharding
from epi_jax.scoring.drift import jaccard
from epi_jax.training import config as cfg_lib
from epi_jax.training import inputs, optim, step as step_lib
from epi_jax.training.trainer import fresh_start


def _run(args, t: int) -> list[dict]:
  config = cfg_lib.load_config_file(args.config)
  with config.unlocked():
    config.method, config.total_steps = "epi", args.steps
    config.epi.importance, config.epi.ema_decay = "inner_nu", None
    config.epi.isolation_ratio, config.epi.update_interval = args.ratio, t
    config.epi.warmup_steps = None
    config.optimizer.clip_norm = 0.0
    config.data.batch_size, config.data.seq_len = args.batch_size, args.seq_len
    config.data.stages = ()
    config.data.mixture = {"gsm8k": 1.0, "code_alpaca": 1.0, "alpaca": 1.0, "chat": 1.0}
  config = cfg_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  ts, state, it = fresh_start(config, mesh)
  spec = ts.spec

  b2 = float(config.optimizer.b2)
  kw = dict(eligible=optim.eligible_fn(config), layer_axes=ts.layer_axes)
  trackers = {"ema b2": epi_jax.epi_transform(args.ratio, t, b2, **kw),
              "ema 0.99": epi_jax.epi_transform(args.ratio, t, 0.99, **kw)}
  tstates = {k: tx.init(state.params) for k, tx in trackers.items()}
  packed = bool(config.data.packing)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(state, tstates, batch):
    def loss(p):
      s, _ = step_lib.loss_sums(spec, p, batch, packed)
      return s / jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    value, grads = jax.value_and_grad(loss)(state.params)
    updates, opt_state = ts.tx.update(grads, state.opt_state, state.params)
    tstates = {k: trackers[k].update(grads, s, state.params)[1] for k, s in tstates.items()}
    new = state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return new, tstates, value

  rows = []
  for s in range(1, args.steps + 1):
    batch = inputs.to_global(next(it), mesh, config.data.batch_size)
    state, tstates, value = step(state, tstates, batch)
    if s % t:
      continue
    ref = jax.tree.leaves(epi_jax.unpacked_mask(state.opt_state))
    row = {"step": s, "loss": float(value),
           "jaccard_ema_b2": jaccard(ref, jax.tree.leaves(epi_jax.unpacked_mask(
               tstates["ema b2"]))),
           "jaccard_ema_0.99": jaccard(ref, jax.tree.leaves(epi_jax.unpacked_mask(
               tstates["ema 0.99"]))),
           "jaccard_prev": float(epi_jax.epi_state(state.opt_state).jaccard_prev),
           "isolated_fraction": float(epi_jax.epi_state(state.opt_state).isolated_fraction)}
    rows.append(row)
    print(f"T={t} " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/smollm2_multitask.py")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--intervals", default="2,10")
  p.add_argument("--ratio", type=float, default=0.05)
  p.add_argument("--batch_size", type=int, default=2)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  intervals = [int(t) for t in args.intervals.split(",")]

  rows = {t: _run(args, t) for t in intervals}
  out = {"config": args.config, "steps": args.steps, "batch_size": args.batch_size,
         "seq_len": args.seq_len, "isolation_ratio": args.ratio,
         "by_interval": {str(t): r for t, r in rows.items()}}
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
