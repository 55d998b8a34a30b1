"""fp32 matmul throughput, XLA:CPU (jax.jit) against torch, at SmolLM2-135M's shapes.

Tells whether a train-step gap to the PyTorch peer (benchmarks/peer_torch.py)
is in the matmuls or elsewhere. One process per library, 2 warm-up calls,
median of 7::

  python benchmarks/matmul.py            # both, in turn
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

# (tokens, in, out): the LM head, the MLP up/gate and down, the attention out.
SHAPES = ((1024, 576, 49152), (1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576))


def _time(fn, reps: int = 7) -> float:
  for _ in range(2):
    fn()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def run(lib: str, threads: int) -> list[tuple[tuple[int, int, int], float]]:
  rng = np.random.default_rng(0)
  out = []
  for m, k, n in SHAPES:
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    if lib == "torch":
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(threads)
      ta, tb = torch.from_numpy(a), torch.from_numpy(b)
      out.append(((m, k, n), _time(lambda: ta @ tb)))
    else:
      import jax  # pylint: disable=g-import-not-at-top
      f = jax.jit(lambda x, y: x @ y)
      ja, jb = jax.device_put(a), jax.device_put(b)
      out.append(((m, k, n), _time(lambda: f(ja, jb).block_until_ready())))
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", choices=("jax", "torch"))
  p.add_argument("--threads", type=int, default=os.cpu_count())
  args = p.parse_args(argv)
  if args.only:
    for (m, k, n), t in run(args.only, args.threads):
      print(f"{args.only:6s} {m} x {k} x {n}: {t * 1e3:8.1f} ms  {2 * m * k * n / t / 1e9:6.1f} GFLOP/s")
    return
  for lib in ("torch", "jax"):
    subprocess.run([sys.executable, __file__, "--only", lib, "--threads", str(args.threads)],
                   check=True)


if __name__ == "__main__":
  main()
