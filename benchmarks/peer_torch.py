"""Our train step against the PyTorch peer, side by side on this machine (issue 13).

The peer is what a user of this machine class would otherwise run: transformers'
``LlamaForCausalLM`` built from a ``LlamaConfig`` with our model's shapes (random
init), ``torch.optim.AdamW``, loss on all positions, ``torch.set_num_threads`` =
our thread count. Ours is the trainer's jitted step (``training.step``) with the
same shapes and the same batch of token ids, for method ``full`` and ``epi``.
Each measurement is its own process, run in turn (torch, full, epi) for several
rounds; the table gives medians and the ratio peer_time / our_time (> 1: we are
faster), and the achieved GFLOP/s (model FLOPs per token x tokens/s).

  python benchmarks/peer_torch.py                       # SmolLM2-135M, 4 x 256, fp32
  python benchmarks/peer_torch.py --batch 2 --seq 128
  python benchmarks/peer_torch.py --smoke               # tiny sizes (the suite runs it)
  python benchmarks/peer_torch.py --scan_layers         # ours with the blocks scanned
  python benchmarks/peer_torch.py --interleaved         # our full and EPI steps, one process

``--interleaved`` builds our full and EPI steps in one process and runs them
alternately (``--steps`` each after their first), so the EPI / full step ratio
is free of the drift between processes that the separate runs see. The first
steps (compile included) are not comparable with the separate runs' (the
second compile shares the process with the first step's buffers).

Timings on a shared machine are noise: run it with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SMOKE = dict(model="tiny", batch=2, seq=32, steps=3, rounds=1)


def _tokens(batch: int, seq: int, vocab: int, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)


def _model_config(name: str):
  from epi_jax.model.config import get_config  # pylint: disable=g-import-not-at-top
  return get_config(name)


def worker_torch(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  cfg = _model_config(args.model)
  model = LlamaForCausalLM(LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_position_embeddings,
      attn_implementation="sdpa", torch_dtype=torch.float32))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  ids = torch.from_numpy(_tokens(args.batch, args.seq, cfg.vocab_size).astype("int64"))
  inputs, targets = ids[:, :-1], ids[:, 1:]
  times, losses = [], []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
    losses.append(float(loss))
  return {"first_step_s": times[0], "step_s": statistics.median(times[1:]), "losses": losses}


def build_ours(args, method: str):
  """``(step, state, batch)``: the trainer's jitted step for ``method`` at the
  shapes of ``args``, its initial state (random init) and the batch of
  :func:`_tokens` (loss on all positions). Also used by ``profile_step.py``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from epi_jax.training import config as cfg_lib  # pylint: disable=g-import-not-at-top
  from epi_jax import sharding  # pylint: disable=g-import-not-at-top
  from epi_jax.model import setup as model_setup  # pylint: disable=g-import-not-at-top
  from epi_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from epi_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  c = cfg_lib.default_config()
  c.method, c.model.name, c.model.init = method, args.model, "random"
  c.model.scan_layers = args.scan_layers
  c.data.batch_size, c.data.seq_len, c.mesh.data = args.batch, args.seq, 1
  c.total_steps, c.optimizer.warmup_steps = 1000, 0
  c.epi.update_interval = 1000  # a plain (non-refreshing) EPI step is timed
  c = cfg_lib.validate(c)
  mesh = sharding.make_mesh(c.mesh)
  spec, params, _ = model_setup.build(c.model, c.seed, mesh)
  ts = trainer.setup(c, mesh, spec)
  state = ts.init_state(params)
  step = step_lib.make_train_step(c, spec, ts.method, mesh, ts.shardings)
  ids = _tokens(args.batch, args.seq, spec.config.vocab_size)
  b, l = args.batch, args.seq
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
           "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
           "segment_ids": np.ones((b, l), np.int32), "loss_mask": np.ones((b, l), np.int32),
           "task_ids": np.zeros((b, l), np.int32)}
  batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()},
                         sharding.batch_sharding(mesh))
  return step, state, batch


def worker_ours(args, method: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  step, state, batch = build_ours(args, method)
  times, losses = [], []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    loss = float(jax.block_until_ready(m["loss"]))
    times.append(time.perf_counter() - t0)
    losses.append(loss)
  return {"first_step_s": times[0], "step_s": statistics.median(times[1:]), "losses": losses}


def interleaved(args) -> dict:
  """Our full and EPI steps in one process, run alternately; medians."""
  import jax  # pylint: disable=g-import-not-at-top
  built, first = {}, {}
  for method in ("full", "epi"):
    t0 = time.perf_counter()
    step, state, batch = build_ours(args, method)
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    first[method] = time.perf_counter() - t0
    built[method] = [step, state, batch]
  times = {m: [] for m in built}
  for r in range(args.steps):
    for method in (("full", "epi") if r % 2 == 0 else ("epi", "full")):  # neither always first
      step, state, batch = built[method]
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m["loss"])
      times[method].append(time.perf_counter() - t0)
      built[method][1] = state
  rows = {m: {"step_s": statistics.median(t), "steps_s": t, "build_and_first_step_s": first[m]}
          for m, t in times.items()}
  ratio = rows["epi"]["step_s"] / rows["full"]["step_s"]
  print(f"{args.model}{' (scan_layers)' if args.scan_layers else ''}  {args.batch} x "
        f"{args.seq} fp32, one process, {args.steps} steps each, alternated (median)")
  for m, row in rows.items():
    print(f"{m:6s} {row['step_s']:8.3f} s/step   build + first step {first[m]:7.1f} s")
  print(f"epi/full step {ratio:.4f}")
  return {"model": args.model, "batch": args.batch, "seq": args.seq,
          "scan_layers": args.scan_layers, "interleaved": True, "rows": rows,
          "epi_over_full": ratio}


def _run_worker(what: str, args) -> dict:
  cmd = [sys.executable, __file__, "--worker", what, "--model", args.model,
         "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
         "--threads", str(args.threads)] + (["--scan_layers"] if args.scan_layers else [])
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    raise SystemExit(f"worker {what} failed:\n{out.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=4, help="per process; the first one compiles")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--scan_layers", action="store_true",
                 help="our model with its blocks stacked and run by lax.scan")
  p.add_argument("--interleaved", action="store_true",
                 help="our full and EPI steps alternated in one process (no peer)")
  p.add_argument("--smoke", action="store_true", help="tiny sizes; checks it runs")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  p.add_argument("--worker", choices=("torch", "full", "epi"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.smoke:
    for k, v in SMOKE.items():
      setattr(args, k, v)
  if args.worker:
    r = worker_torch(args) if args.worker == "torch" else worker_ours(args, args.worker)
    print("RESULT " + json.dumps(r), flush=True)
    return r
  if args.interleaved:
    result = interleaved(args)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result

  runs = {w: [] for w in ("torch", "full", "epi")}
  for _ in range(args.rounds):
    for w in runs:
      runs[w].append(_run_worker(w, args))
  from epi_jax.model.config import train_flops_per_token  # pylint: disable=g-import-not-at-top
  flops = train_flops_per_token(_model_config(args.model), args.seq) * args.batch * args.seq
  peer = statistics.median(r["step_s"] for r in runs["torch"])
  result = {"model": args.model, "batch": args.batch, "seq": args.seq, "threads": args.threads,
            "scan_layers": args.scan_layers,
            "rounds": args.rounds, "flops_per_step": flops, "rows": {}}
  print(f"{args.model}{' (scan_layers)' if args.scan_layers else ''}  "
        f"{args.batch} x {args.seq} fp32  {args.threads} threads  "
        f"{args.rounds} rounds (median)")
  print(f"{'step':10s} {'s/step':>8s} {'first step s':>13s} {'GFLOP/s':>8s} {'peer/ours':>10s}")
  for w, rs in runs.items():
    st = statistics.median(r["step_s"] for r in rs)
    first = statistics.median(r["first_step_s"] for r in rs)
    row = {"step_s": st, "first_step_s": first, "gflops": flops / st / 1e9,
           "speed_vs_peer": peer / st, "first_loss": rs[0]["losses"][0],
           "rounds_step_s": [r["step_s"] for r in rs],
           "rounds_first_step_s": [r["first_step_s"] for r in rs]}
    result["rows"][w] = row
    print(f"{w:10s} {st:8.3f} {first:13.2f} {row['gflops']:8.1f} {peer / st:10.3f}")
  full = result["rows"]["full"]
  print(f"epi/full step {result['rows']['epi']['step_s'] / full['step_s']:.3f}, "
        f"first step {result['rows']['epi']['first_step_s'] / full['first_step_s']:.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
