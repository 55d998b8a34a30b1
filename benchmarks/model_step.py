"""Measures SmolLM2-135M on this machine: GGUF load, forward, one AdamW step.

Each measurement runs in its own subprocess so that its peak RSS
(``ru_maxrss``) is its own. Usage::

  python benchmarks/model_step.py [--batch 4] [--seq 256] [--dtype float32]
      [--remat] [--steps 3] [--opt full|epi|epi_compact]
  python benchmarks/model_step.py --worker interleaved --batch 2 --seq 128 --steps 9

``--worker interleaved`` times full, epi, epi compact and epi refreshing at
every step in one process, one step of each in turn (``--steps`` rounds), with
donated params and optimizer state like the trainer's step, and reports
medians and ratios (epi's with its refresh amortized at T=100): side by side,
so that the machine's drift cancels out of the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def worker(what: str, args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from epi_jax.model import load_pretrained

  start = time.perf_counter()
  dtype = getattr(jnp, args.dtype)
  model, _, config = load_pretrained("smollm2-135m-instruct", param_dtype=dtype)
  if args.remat:
    model.config = config = dataclasses.replace(config, remat=True)
  jax.block_until_ready(nnx.state(model))
  result = {"what": what, "load_s": time.perf_counter() - start}
  if what == "load":
    return {**result, "peak_rss_gib": _peak_rss_gib()}
  rng = jax.random.key(0)
  tokens = jax.random.randint(rng, (args.batch, args.seq), 0, config.vocab_size)
  if what == "forward":
    fwd = nnx.jit(lambda m, t: m(t))
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(model, tokens))
    result["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
      jax.block_until_ready(fwd(model, tokens))
    dt = (time.perf_counter() - t0) / args.steps
    result.update(forward_s=dt, tokens_per_s=args.batch * args.seq / dt)
  else:
    if args.opt == "full":
      tx = optax.adamw(1e-5)
    else:
      import epi_jax
      compact = (dict(importance_dtype=jnp.bfloat16, packed_mask=True)
                 if args.opt == "epi_compact" else {})
      tx = epi_jax.epi_adamw(1e-5, isolation_ratio=0.01, update_interval=100, **compact)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens):
      def loss_fn(m):
        logits = m(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, tokens[:, 1:]).mean()
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      opt.update(model, grads)
      return loss

    t0 = time.perf_counter()
    loss = float(step(model, opt, tokens))
    result["compile_and_first_step_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
      loss = float(step(model, opt, tokens))
    dt = (time.perf_counter() - t0) / args.steps
    result.update(step_s=dt, train_tokens_per_s=args.batch * args.seq / dt,
                  loss=loss)
  result["peak_rss_gib"] = _peak_rss_gib()
  return result


def _pure_step(graphdef, rest, tx):
  """``(params, opt_state, tokens) -> (params, opt_state, loss)``, donated."""
  import jax
  import optax
  from flax import nnx

  def loss_fn(params, tokens):
    model = nnx.merge(graphdef, params, rest)
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def interleaved(args) -> dict:
  import statistics
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  import epi_jax
  from epi_jax.model import load_pretrained

  model, _, config = load_pretrained("smollm2-135m-instruct",
                                     param_dtype=getattr(jnp, args.dtype))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, config.vocab_size)
  compact = dict(importance_dtype=jnp.bfloat16, packed_mask=True)
  txs = {"full": optax.adamw(1e-5),
         "epi": epi_jax.epi_adamw(1e-5, isolation_ratio=0.01, update_interval=100),
         "epi_compact": epi_jax.epi_adamw(1e-5, isolation_ratio=0.01, update_interval=100,
                                          **compact),
         # Refreshes at every step: times the refresh step, amortized below.
         "epi_refresh": epi_jax.epi_adamw(1e-5, isolation_ratio=0.01, update_interval=1)}
  live, result = {}, {"batch": args.batch, "seq": args.seq, "rounds": args.steps}
  for name, tx in txs.items():
    fn = _pure_step(graphdef, rest, tx)
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    t0 = time.perf_counter()
    p, s, _ = jax.block_until_ready(fn(p, s, tokens))
    result[f"{name}_compile_and_first_step_s"] = time.perf_counter() - t0
    live[name] = [fn, p, s, []]
  for _ in range(args.steps):  # < update_interval: no refresh is timed
    for name, run in live.items():
      fn, p, s, times = run
      t0 = time.perf_counter()
      p, s, _ = jax.block_until_ready(fn(p, s, tokens))
      times.append(time.perf_counter() - t0)
      run[1], run[2] = p, s
  for name, run in live.items():
    result[f"{name}_step_s"] = statistics.median(run[3])
  for name in ("epi", "epi_compact"):
    result[f"{name}_over_full"] = result[f"{name}_step_s"] / result["full_step_s"]
  # The default interval: one refresh step per 100 steps.
  amortized = result["epi_step_s"] + (result["epi_refresh_step_s"] - result["epi_step_s"]) / 100
  result["epi_amortized_over_full"] = amortized / result["full_step_s"]
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--remat", action="store_true")
  p.add_argument("--worker", choices=("load", "forward", "step", "interleaved"))
  p.add_argument("--opt", default="full", choices=("full", "epi", "epi_compact"),
                 help="optimizer of the step: adamw, epi_adamw, epi_adamw bf16+packed")
  args = p.parse_args(argv)
  if args.worker == "interleaved":
    print("RESULT " + json.dumps(interleaved(args)), flush=True)
    return
  if args.worker:
    print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
    return
  import jax
  print(f"# jax {jax.__version__}, devices {jax.devices()}, batch {args.batch} x "
        f"seq {args.seq}, {args.dtype}{' remat' if args.remat else ''}")
  for what in ("load", "forward", "step"):
    cmd = [sys.executable, __file__, "--worker", what] + [
        a for a in (argv if argv is not None else sys.argv[1:])]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
      print(f"{what}: failed\n{out.stderr[-3000:]}")
      continue
    res = json.loads(line[0][7:])
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in res.items()), flush=True)


if __name__ == "__main__":
  main()
