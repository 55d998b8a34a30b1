"""Where the trainer's train step spends its time, per compiled op (issue 13, item 2).

Builds the step of ``peer_torch.py`` (the trainer's jitted step, random init,
loss on all positions), compiles it, runs a few steps under
``jax.profiler.trace`` and reads the per-thunk events of the trace (XLA:CPU
names each with its HLO op). Each op is classified from the optimized HLO:

* phase: ``forward`` / ``backward`` (from JAX's ``jvp(...)`` /
  ``transpose(...)`` in the op's metadata) or ``update`` (everything outside
  the gradient: clipping, the optimizer, EPI);
* kind: ``matmul`` (dots and the fusions built around them), ``vocab``
  (any other op with a vocab-sized dimension: the logits, softmax, CE),
  ``reduce``, ``scatter``, ``copy`` (copies, transposes, concatenates) or
  ``elementwise`` (the remaining fusions).

It prints the per-step seconds of each (phase, kind), the top ops, and with
``--out`` writes them as JSON.

  python benchmarks/profile_step.py --method full             # SmolLM2-135M, 4 x 256
  python benchmarks/profile_step.py --method epi --batch 2 --seq 128
  python benchmarks/profile_step.py --smoke                   # tiny sizes (the suite runs it)

Timings on a shared machine are noise: run it with nothing else running.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_torch  # pylint: disable=g-import-not-at-top,wrong-import-position

SMOKE = dict(model="tiny", batch=2, seq=32, steps=2, top=10)
_SKIP = {"parameter", "constant", "broadcast", "bitcast", "reshape", "get-tuple-element",
         "tuple", "iota", "convert"}
_MOVES = {"copy", "transpose", "concatenate", "dynamic-update-slice", "slice"}


def _split_instruction(line: str):
  """``(name, shape, opcode, rest)`` of one HLO instruction line, or None."""
  m = re.match(r"\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$", line)
  if not m:
    return None
  name, rest = m.groups()
  depth = 0
  for i, ch in enumerate(rest):  # the shape ends at the first space outside brackets
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == " " and depth == 0:
      shape, tail = rest[:i], rest[i + 1:]
      op = re.match(r"([\w\-]+)\(", tail)
      return (name, shape, op.group(1), tail) if op else None
  return None


def parse_hlo(text: str) -> dict[str, dict]:
  """``{instruction: {opcode, shape, fused (opcodes inside a fusion), op_name}}``."""
  computations, current, info = {}, None, {}
  for line in text.splitlines():
    head = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      current = computations.setdefault(head.group(1), [])
      continue
    parsed = _split_instruction(line)
    if not parsed:
      continue
    name, shape, opcode, tail = parsed
    calls = re.search(r"calls=%?([\w.\-]+)", tail)
    op_name = re.search(r'op_name="([^"]*)"', tail)
    info[name] = {"opcode": opcode, "shape": shape, "calls": calls.group(1) if calls else None,
                  "op_name": op_name.group(1) if op_name else ""}
    if current is not None:
      current.append(name)
  for v in info.values():
    inner = [info[n] for n in computations.get(v["calls"] or "", [])]
    v["fused"] = sorted({i["opcode"] for i in inner} - _SKIP)
    if not v["op_name"]:  # a fusion's metadata: that of its ops
      v["op_name"] = next((i["op_name"] for i in inner if i["op_name"]), "")
  return info


def classify(op: dict, vocab: int) -> tuple[str, str]:
  """``(phase, kind)`` of one op (see the module docstring)."""
  name = op["op_name"]
  phase = "backward" if "transpose(" in name else "forward" if "jvp(" in name else "update"
  ops = set(op["fused"]) | {op["opcode"]}
  if ops & {"dot", "convolution"}:
    kind = "matmul"
  elif re.search(rf"\b{vocab}\b", op["shape"]):
    kind = "vocab"
  elif "scatter" in ops:
    kind = "scatter"
  elif "reduce" in ops or "reduce-window" in ops:
    kind = "reduce"
  elif ops & _MOVES and not ops - _MOVES - {"fusion"}:
    kind = "copy"
  else:
    kind = "elementwise"
  return phase, kind


def trace_events(trace_dir: str) -> list[dict]:
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not path:
    raise SystemExit(f"no perfetto trace under {trace_dir}")
  data = json.load(gzip.open(path[0]))
  return data["traceEvents"] if isinstance(data, dict) else data


def profile(args, method: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  step, state, batch = peer_torch.build_ours(args, method)
  compiled = step.lower(state, batch).compile()
  text = compiled.as_text()
  module = re.match(r"HloModule\s+([\w.\-]+)", text).group(1)  # the step's, no other jit's
  ops = parse_hlo(text)
  vocab = peer_torch._model_config(args.model).vocab_size  # pylint: disable=protected-access
  for _ in range(2):  # warm: the first call allocates
    state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, m = compiled(state, batch)
        jax.block_until_ready(m["loss"])
    wall = (time.perf_counter() - t0) / args.steps
    events = trace_events(tmp)
  per_op = collections.Counter()
  for e in events:
    a = e.get("args") or {}
    if e.get("ph") == "X" and a.get("hlo_op") and a.get("hlo_module") == module:
      per_op[a["hlo_op"]] += e.get("dur", 0.0) / 1e6 / args.steps
  table = collections.Counter()
  rows = []
  for name, s in per_op.items():
    op = ops.get(name, {"opcode": name, "shape": "", "fused": [], "op_name": ""})
    phase, kind = classify(op, vocab)
    table[(phase, kind)] += s
    rows.append({"op": name, "s": s, "phase": phase, "kind": kind, "opcode": op["opcode"],
                 "shape": op["shape"][:60], "fused": op["fused"],
                 "jax_op": "/".join(op["op_name"].split("/")[-2:])[:70]})
  rows.sort(key=lambda r: -r["s"])
  # The same op in every layer, summed: one line per (phase, kind, what it fuses, jax op).
  groups = collections.defaultdict(lambda: {"s": 0.0, "count": 0})
  for r in rows:
    g = groups[(r["phase"], r["kind"], ",".join(r["fused"]) or r["opcode"], r["jax_op"])]
    g["s"] += r["s"]
    g["count"] += 1
  grouped = sorted(({"phase": k[0], "kind": k[1], "ops": k[2], "jax_op": k[3], **v}
                    for k, v in groups.items()), key=lambda g: -g["s"])
  return {"method": method, "wall_step_s": wall, "ops_s": sum(per_op.values()),
          "by_phase_kind": {f"{p}/{k}": v for (p, k), v in sorted(table.items())},
          "top": rows[:args.top], "top_grouped": grouped[:args.top], "num_ops": len(rows)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--method", default="full", help="comma-separated: full, epi, ...")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=3, help="traced steps (after 2 warm ones)")
  p.add_argument("--top", type=int, default=25, help="ops listed")
  p.add_argument("--scan_layers", action="store_true")
  p.add_argument("--smoke", action="store_true", help="tiny sizes; checks it runs")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  args = p.parse_args(argv)
  if args.smoke:
    for k, v in SMOKE.items():
      setattr(args, k, v)
  results = {}
  for method in args.method.split(","):
    r = results[method] = profile(args, method)
    print(f"\n{method}: {args.model} {args.batch} x {args.seq}  wall {r['wall_step_s']:.3f} "
          f"s/step (traced)  ops {r['ops_s']:.3f} s/step in {r['num_ops']} ops")
    for key, s in sorted(r["by_phase_kind"].items(), key=lambda kv: -kv[1]):
      print(f"  {key:24s} {s:7.3f} s  {100 * s / max(r['ops_s'], 1e-12):5.1f}%")
    print(f"  {'s':>7s}  {'count':>5s}  {'phase/kind':22s} fused ops / jax op (summed over layers)")
    for g in r["top_grouped"]:
      print(f"  {g['s']:7.3f}  {g['count']:5d}  {g['phase'] + '/' + g['kind']:22s} "
            f"{g['ops'][:50]:50s} {g['jax_op']}")
    print(f"  {'s':>7s}  {'phase/kind':22s} {'op':28s} {'shape':34s} fused / jax op")
    for row in r["top"]:
      print(f"  {row['s']:7.3f}  {row['phase'] + '/' + row['kind']:22s} {row['op'][:28]:28s} "
            f"{row['shape'][:34]:34s} {','.join(row['fused'])[:40]} {row['jax_op']}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "results": results}, f, indent=2)
  return results


if __name__ == "__main__":
  main()
