"""fp32 matmul throughput, XLA:CPU (jax.jit) against torch, at SmolLM2-135M's shapes.

Tells whether a train-step gap to the PyTorch peer (benchmarks/peer_torch.py)
is in the matmuls or elsewhere. One process per library, 2 warm-up calls,
median of 7. ``--grad`` times each shape's three products of a training step
together: the forward ``x @ w`` and the backward ``dy @ w.T`` and ``x.T @ dy``::

  python benchmarks/matmul.py            # both, in turn
  python benchmarks/matmul.py --grad
  XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/matmul.py --only jax
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

# (tokens, in, out): the LM head, the MLP up/gate and down, the attention q/out and k/v.
SHAPES = ((1024, 576, 49152), (1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576),
          (1024, 576, 192))


def _time(fn, reps: int = 7) -> float:
  for _ in range(2):
    fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def run(lib: str, threads: int, grad: bool = False) -> list[tuple[tuple[int, int, int], float]]:
  rng = np.random.default_rng(0)
  out = []
  for m, k, n in SHAPES:
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    d = rng.standard_normal((m, n), dtype=np.float32)
    if lib == "torch":
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(threads)
      ta, tb, td = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(d)
      fn = (lambda: (ta @ tb, td @ tb.T, ta.T @ td)) if grad else (lambda: ta @ tb)
      out.append(((m, k, n), _time(fn)))
    else:
      import jax  # pylint: disable=g-import-not-at-top
      f = jax.jit((lambda x, y, dy: (x @ y, dy @ y.T, x.T @ dy)) if grad else
                  (lambda x, y, dy: x @ y))
      ja, jb, jd = jax.device_put(a), jax.device_put(b), jax.device_put(d)
      out.append(((m, k, n), _time(lambda: jax.block_until_ready(f(ja, jb, jd)))))
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", choices=("jax", "torch"))
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--grad", action="store_true", help="forward and both backward products")
  args = p.parse_args(argv)
  products = 3 if args.grad else 1
  if args.only:
    for (m, k, n), t in run(args.only, args.threads, args.grad):
      print(f"{args.only:6s} {m} x {k} x {n}: {t * 1e3:8.1f} ms  "
            f"{products * 2 * m * k * n / t / 1e9:6.1f} GFLOP/s")
    return
  for lib in ("torch", "jax"):
    subprocess.run([sys.executable, __file__, "--only", lib, "--threads", str(args.threads)]
                   + (["--grad"] if args.grad else []), check=True)


if __name__ == "__main__":
  main()
