"""A plain step of ``isolate(adamw)`` on XLA:CPU: EPI's two lowerings against AdamW.

EPI compiles its masks in one of two ways (``transforms._update_epi_auto``): for
CPU, the refresh's cond returns only the cuts and every step rebuilds the masks
outside it; elsewhere (TPU) a plain step passes the stored masks through the
cond, which XLA:CPU copies. This times both on CPU, the other one traced with
``lax.platform_dependent`` taking its default branch, interleaved with AdamW in
one process: the median of ``--reps`` rounds, each one step of every program.
Usage::

  python benchmarks/plain_step_lowering.py  # 8 x (1024, 1024) + 4 x (1024,): 8.4M params
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import epi_jax

VARIANTS = ("adamw", "epi_cpu", "epi_default")


def build(variant: str, params, grads, update_interval: int):
  """A compiled step (params and state donated) and its initial arguments."""
  if variant == "adamw":
    tx = optax.adamw(1e-3)
  else:
    tx = epi_jax.isolate(optax.adamw(1e-3), 0.01, update_interval, track_first_mask=True)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = [jnp.array(x, copy=True) for x in params]
  s = tx.init(p)
  platform_dependent = jax.lax.platform_dependent
  if variant == "epi_default":  # the lowering of a platform other than CPU
    jax.lax.platform_dependent = lambda *args, default, **_: default(*args)
  try:
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, grads).compile()
  finally:
    jax.lax.platform_dependent = platform_dependent
  return compiled, p, s


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=25)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--size", type=int, default=1024, help="matrices (size, size)")
  parser.add_argument("--update_interval", type=int, default=1000)
  args = parser.parse_args()
  if args.warmup + args.reps >= args.update_interval:
    parser.error("every timed step must be a plain step: warmup + reps < update_interval")
  n = args.size
  shapes = [(n, n)] * 8 + [(n,)] * 4
  rng = np.random.default_rng(0)
  params = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
  grads = [jnp.asarray(rng.standard_normal(s) * 1e-2, jnp.float32) for s in shapes]
  runs = {v: list(build(v, params, grads, args.update_interval)) for v in VARIANTS}
  times = {v: [] for v in VARIANTS}
  for i in range(args.warmup + args.reps):
    for v, run in runs.items():
      t0 = time.perf_counter()
      run[1], run[2] = run[0](run[1], run[2], grads)
      jax.block_until_ready((run[1], run[2]))
      if i >= args.warmup:
        times[v].append(time.perf_counter() - t0)
  ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
  print(f"{sum(int(np.prod(s)) for s in shapes) / 1e6:.1f}M params, {len(shapes)} leaves, "
        f"median of {args.reps}: " + ", ".join(f"{v} {t:.1f} ms" for v, t in ms.items())
        + "; EPI/AdamW: " + ", ".join(f"{v} x{ms[v] / ms['adamw']:.2f}" for v in VARIANTS[1:]))


if __name__ == "__main__":
  main()
