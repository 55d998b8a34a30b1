"""EPI performance suite: optimizer step overhead, refresh cost, state bytes, sharding, model.

Writes JSON (``--out``) and prints a Markdown table. Usage::

  python benchmarks/run.py --out benchmarks/results.json            # CPU, all parts
  python benchmarks/run.py --parts opt,refresh --sizes 1e6,1e7      # a subset
  python benchmarks/run.py --device gpu --out benchmarks/results_gpu.json

Timings are medians over ``--reps`` rounds; in each round every variant runs
once, side by side (interleaved), so background load hits them alike. The
mask refresh (every ``update_interval`` = 100 steps by default) is timed as a
separate step and amortized: ``step + (refresh_step - step) / 100``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

INTERVAL = 100  # the default update_interval of epi_adamw


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def _params(n, jnp):
  """n parameters as a few 2-D leaves (1024 columns), like a model's matrices."""
  rows = max(1, n // 1024)
  leaves = 4 if rows >= 64 else 1
  return {f"w{i}": jnp.zeros((rows // leaves, 1024), jnp.float32) + 0.01
          for i in range(leaves)}


def bench_opt(sizes, reps):
  import jax
  import jax.numpy as jnp
  import optax
  import epi_jax
  compact = dict(importance_dtype=jnp.bfloat16, packed_mask=True)
  # T=INTERVAL: the plain step (fewer than INTERVAL calls: no refresh). T=1:
  # every step refreshes, which times the refresh step.
  variants = {
      "adamw": lambda T: optax.adamw(1e-3),
      "isolate(adamw)": lambda T: epi_jax.isolate(optax.adamw(1e-3), 0.01, T),
      "isolate(adamw) compact": lambda T: epi_jax.isolate(optax.adamw(1e-3), 0.01, T,
                                                          **compact),
      "isolate(adamw) inner_nu": lambda T: epi_jax.isolate(optax.adamw(1e-3), 0.01, T,
                                                           importance="inner_nu"),
      "isolate(adamw) inner_nu packed": lambda T: epi_jax.isolate(
          optax.adamw(1e-3), 0.01, T, importance="inner_nu", packed_mask=True),
      "chain(epi, adamw)": lambda T: optax.chain(epi_jax.epi_transform(0.01, T),
                                                 optax.adamw(1e-3)),
      "chain(epi, adamw) compact": lambda T: optax.chain(
          epi_jax.epi_transform(0.01, T, **compact), optax.adamw(1e-3)),
  }
  out = []
  for n_req in sizes:
    params = _params(int(n_req), jnp)
    n = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
    r = max(3, reps if n < 5e7 else 3)
    runs = {name: {"step": [], "refresh": []} for name in variants}
    # Two phases (plain steps, then refresh steps), each holding only its own
    # compiled functions and states: a refresh between two timed plain steps
    # would disturb them, and both sets at 100M do not fit in memory together.
    for kind, T in (("step", INTERVAL), ("refresh", 1)):
      live = {}
      for name, make in variants.items():
        if kind == "refresh" and name == "adamw":
          continue
        tx = make(T)

        def step(p, s, g, tx=tx):
          u, s = tx.update(g, s, p)
          return optax.apply_updates(p, u), s

        fn = jax.jit(step, donate_argnums=(0, 1))
        p = jax.tree.map(jnp.copy, params)
        s = tx.init(p)
        p, s = jax.block_until_ready(fn(p, s, grads))  # compile
        live[name] = [fn, p, s]
      for _ in range(r):
        for name, (fn, p, s) in live.items():
          t0 = time.perf_counter()
          p, s = jax.block_until_ready(fn(p, s, grads))
          runs[name][kind].append(time.perf_counter() - t0)
          live[name] = [fn, p, s]
      del live
    base = _median(runs["adamw"]["step"])
    for name, st in runs.items():
      step_s = _median(st["step"])
      ref_s = _median(st["refresh"]) if st["refresh"] else step_s
      amort = step_s + (ref_s - step_s) / INTERVAL
      if name != "adamw":
        assert r < INTERVAL  # the plain-step runs never reached a refresh
      out.append(dict(n=n, variant=name, step_s=step_s, refresh_step_s=ref_s,
                      amortized_s=amort, ratio_vs_adamw=amort / base, reps=r))
      print(f"opt n={n:.2e} {name:28s} step {step_s*1e3:8.2f} ms  refresh-step "
            f"{ref_s*1e3:8.2f} ms  amortized x{amort / base:.3f}", flush=True)
    del runs
  return out


def bench_refresh(sizes, reps):
  import jax
  import jax.numpy as jnp
  import epi_jax
  from epi_jax.method import selection
  options = epi_jax.EPIOptions(isolation_ratio=0.01, update_interval=INTERVAL)
  out = []
  for n_req in sizes:
    params = _params(int(n_req), jnp)
    n = sum(x.size for x in jax.tree.leaves(params))
    k = n // 100
    imp = jax.tree.map(lambda p: jax.random.exponential(jax.random.key(2), p.shape), params)
    fns = {"epi select (1 bit/pass)": jax.jit(lambda i: epi_jax.select_mask(i, options))}
    # The same search resolving 4 bits per pass (8 bits/pass: 34 s at 1e7 on CPU, left out).
    count_k = selection.count_from_int(k)
    fns["epi select (4 bit/pass)"] = jax.jit(lambda i: selection.kth_largest_bits(
        [selection.score_bits(x / jnp.mean(x)) for x in jax.tree.leaves(i)], count_k, 4))
    flat = lambda i: jnp.concatenate([x.ravel() for x in jax.tree.leaves(i)])  # noqa: E731
    fns["lax.top_k"] = jax.jit(lambda i: jax.lax.top_k(flat(i), k)[0][-1])
    fns["sort"] = jax.jit(lambda i: jnp.sort(flat(i))[n - k])
    times = {name: [] for name in fns}
    for name, f in fns.items():
      jax.block_until_ready(f(imp))
    r = max(2, reps if n < 5e7 else 2)
    for _ in range(r):
      for name, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(imp))
        times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
      out.append(dict(n=n, method=name, seconds=_median(ts), reps=r))
      print(f"refresh n={n:.2e} {name:26s} {_median(ts)*1e3:10.1f} ms", flush=True)
  # Growth exponent: slope of log(time) against log(n).
  for name in {o["method"] for o in out}:
    pts = [(math.log(o["n"]), math.log(o["seconds"])) for o in out if o["method"] == name]
    if len(pts) >= 2:
      mx = sum(p[0] for p in pts) / len(pts)
      my = sum(p[1] for p in pts) / len(pts)
      slope = (sum((x - mx) * (y - my) for x, y in pts)
               / sum((x - mx) ** 2 for x, _ in pts))
      out.append(dict(method=name, growth_exponent=slope))
      print(f"refresh {name:26s} time ~ n^{slope:.2f}")
  return out


def bench_bytes():
  import jax.numpy as jnp
  import epi_jax
  from epi_jax.method import compact
  params = _params(1 << 20, jnp)
  n = sum(x.size for x in params.values())
  out = []
  for dtype in (None, jnp.bfloat16, "inner_nu"):
    for packed in (False, True):
      for track in (False, True):
        if dtype == "inner_nu":  # EPI's own state inside isolate(adamw): its masks
          s = epi_jax.epi_state(epi_jax.epi_adamw(
              1e-3, isolation_ratio=0.01, update_interval=INTERVAL, importance="inner_nu",
              packed_mask=packed, track_first_mask=track).init(params))
        else:
          s = epi_jax.epi_transform(0.01, INTERVAL, importance_dtype=dtype, packed_mask=packed,
                                    track_first_mask=track).init(params)
        b = compact.num_bytes(s) / n
        out.append(dict(importance_dtype=dtype if dtype == "inner_nu" else
                        str(jnp.dtype(dtype or jnp.float32)),
                        packed_mask=packed, track_first_mask=track, bytes_per_param=b))
        print(f"bytes/param {out[-1]}")
  return out


_SHARDED = r"""
import json, time, jax, jax.numpy as jnp, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import epi_jax
mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
n_rows = {rows}
shapes = {{"w0": (n_rows, 1024), "w1": (n_rows, 1024), "b": (8192,)}}
specs = {{"w0": P("fsdp", "tensor"), "w1": P("tensor", "fsdp"), "b": P("fsdp")}}
res = {{}}
with jax.set_mesh(mesh):
  sh = {{k: NamedSharding(mesh, s) for k, s in specs.items()}}
  imp = jax.device_put({{k: jax.random.exponential(jax.random.key(0), s) for k, s in shapes.items()}}, sh)
  options = epi_jax.EPIOptions(isolation_ratio=0.01, update_interval=100)
  f = jax.jit(lambda i: epi_jax.select_mask(i, options))
  hlo = f.lower(imp).compile().as_text()
  jax.block_until_ready(f(imp))
  ts = []
  for _ in range(5):
    t0 = time.perf_counter(); jax.block_until_ready(f(imp)); ts.append(time.perf_counter() - t0)
  mask, thr = f(imp)
  n = sum(x.size for x in jax.tree.leaves(imp))
  for packed in (False, True):
    tx = epi_jax.epi_adamw(1e-3, isolation_ratio=0.01, update_interval=1,
                           importance_dtype=jnp.bfloat16 if packed else None, packed_mask=packed)
    params = jax.device_put({{k: jnp.zeros(s) for k, s in shapes.items()}}, sh)
    st = tx.init(params)
    step_hlo = jax.jit(tx.update).lower(params, st, params).compile().as_text()
    res["update_all_gather_" + ("compact" if packed else "default")] = "all-gather" in step_hlo
  res.update(n=n, devices=jax.device_count(), select_s=sorted(ts)[2],
             select_all_gather="all-gather" in hlo, select_all_reduce="all-reduce" in hlo,
             selected=int(sum(int(m.sum()) for m in jax.tree.leaves(mask))), k=n // 100,
             mask_sharding={{k: str(m.sharding.spec) for k, m in mask.items()}})
print("RESULT " + json.dumps(res))
"""


def _subprocess(code, env_extra):
  env = dict(os.environ, **env_extra)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not line:
    return {"error": out.stderr[-2000:]}
  return json.loads(line[-1][7:])


def bench_sharded(rows):
  res = _subprocess(_SHARDED.format(rows=rows), {
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
  print(f"sharded {res}")
  return res


def bench_model(batch, seq, steps):
  out = []
  here = os.path.dirname(os.path.abspath(__file__))
  # Ratios: one process, the three variants' steps interleaved (model_step.py
  # --worker interleaved). Peak memory: one process per variant.
  cmd = [sys.executable, os.path.join(here, "model_step.py"), "--worker", "interleaved",
         "--batch", str(batch), "--seq", str(seq), "--steps", str(max(steps, 9))]
  p = subprocess.run(cmd, capture_output=True, text=True)
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
  res = json.loads(line[0][7:]) if line and not p.returncode else {"error": p.stderr[-2000:]}
  res["what"] = "interleaved"
  print(f"model {res}", flush=True)
  out.append(res)
  for opt in ("full", "epi", "epi_compact"):
    cmd = [sys.executable, os.path.join(here, "model_step.py"), "--worker", "step",
           "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--opt", opt]
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    res = json.loads(line[0][7:]) if line and not p.returncode else {"error": p.stderr[-2000:]}
    res.update(opt=opt, batch=batch, seq=seq)
    print(f"model {res}", flush=True)
    out.append(res)
  return out


def _table(results):
  lines = []
  if "opt" in results:
    lines += ["| n params | variant | step ms | refresh step ms | amortized / adamw |",
              "|---|---|---|---|---|"]
    for o in results["opt"]:
      lines.append(f"| {o['n']:.3g} | {o['variant']} | {o['step_s']*1e3:.2f} | "
                   f"{o['refresh_step_s']*1e3:.2f} | {o['ratio_vs_adamw']:.3f} |")
    lines.append("")
  if "refresh" in results:
    lines += ["| n | method | ms |", "|---|---|---|"]
    for o in results["refresh"]:
      if "n" in o:
        lines.append(f"| {o['n']:.3g} | {o['method']} | {o['seconds']*1e3:.1f} |")
    lines += ["", "| method | growth exponent |", "|---|---|"]
    for o in results["refresh"]:
      if "growth_exponent" in o:
        lines.append(f"| {o['method']} | {o['growth_exponent']:.2f} |")
    lines.append("")
  if "bytes" in results:
    lines += ["| importance dtype | packed mask | first mask | bytes/param |", "|---|---|---|---|"]
    for o in results["bytes"]:
      lines.append(f"| {o['importance_dtype']} | {o['packed_mask']} | "
                   f"{o['track_first_mask']} | {o['bytes_per_param']:.3f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results.json")
  p.add_argument("--parts", default="opt,refresh,bytes,sharded",
                 help="comma list of opt,refresh,bytes,sharded,model")
  p.add_argument("--sizes", default="1e6,1e7,1e8")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--sharded-rows", type=int, default=2048)
  p.add_argument("--model-batch", type=int, default=2)
  p.add_argument("--model-seq", type=int, default=128)
  p.add_argument("--model-steps", type=int, default=3)
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
  import jax
  parts = args.parts.split(",")
  sizes = [float(s) for s in args.sizes.split(",")]
  results = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
             "cpu_count": os.cpu_count(), "args": vars(args)}
  if "bytes" in parts:
    results["bytes"] = bench_bytes()
  if "opt" in parts:
    results["opt"] = bench_opt(sizes, args.reps)
  if "refresh" in parts:
    results["refresh"] = bench_refresh(sizes, args.reps)
  if "sharded" in parts:
    results["sharded"] = bench_sharded(args.sharded_rows)
  if "model" in parts:
    results["model"] = bench_model(args.model_batch, args.model_seq, args.model_steps)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(_table(results))


if __name__ == "__main__":
  main()
