"""CPU attention: ``einsum`` vs ``xla`` (jax.nn.dot_product_attention), forward + backward.

Both are compiled first, then timed interleaved (A B A B ...) in one process so
that load on a shared machine hits both alike; the median of ``--reps`` runs
is printed. Usage::

  python benchmarks/attention.py --batch 4 --seq 512 --heads 9 --kv-heads 3 --head-dim 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from epi_jax.model.attention import attention


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--heads", type=int, default=9)
  p.add_argument("--kv-heads", type=int, default=3)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--reps", type=int, default=9)
  p.add_argument("--impls", default="einsum,xla")
  args = p.parse_args(argv)
  b, l, h, kh, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  r = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(r[0], (b, l, h, d))
  k = jax.random.normal(r[1], (b, l, kh, d))
  v = jax.random.normal(r[2], (b, l, kh, d))
  seg = np.ones((b, l), np.int32)
  seg[:, l // 2:] = 2  # two packed segments per row
  seg = jnp.asarray(seg)
  fns = {}
  for impl in args.impls.split(","):
    loss = lambda q, k, v, impl=impl: jnp.sum(
        attention(q, k, v, q_segment_ids=seg, implementation=impl) ** 2)
    fns[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(fns[impl](q, k, v))
  times = {impl: [] for impl in fns}
  for _ in range(args.reps):
    for impl, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(q, k, v))
      times[impl].append(time.perf_counter() - t)
  for impl, ts in times.items():
    print(json.dumps({"impl": impl, "shape": [b, l, h, kh, d], "median_s":
                      round(statistics.median(ts), 5), "reps": args.reps,
                      "backend": jax.default_backend()}))


if __name__ == "__main__":
  main()
