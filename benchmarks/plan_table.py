"""The TPU plan of the users' 7-9B configs: `epi-jax plan` over models x sequence lengths x slices.

For every cell (model, seq_len, topology) runs ``epi-jax plan`` (one process
per cell: an 8B compile holds several GiB of host memory) with
configs/tpu_llama3_8b.py, the model replaced by ``--models``, the mesh all FSDP
(``data=1, fsdp=-1, tensor=1``) and a global batch of ``--rows_per_chip`` rows
per chip, for ``--methods``. Each cell's records go to ``OUT/<model>_<seq>_<topology>.json``;
a cell whose file exists is skipped, so a rerun resumes. Then ``OUT/plan_table.md``
tabulates every finished cell: per chip HBM and fit, EPI's extra HBM over full
SFT's (and its state's share), bytes per step against full's (a plain step, a
refreshing one, and their average over the schedule at the config's T; and the
floor: full's plus what EPI must read and write), the estimated step
time and MFU (a roofline estimate, labelled so), collectives, compile time.

  python benchmarks/plan_table.py --out docs/plan \\
      --models llama-3-8b,qwen2-7b --seq_lens 2048,4096 --topologies v5p-8,v5p-64,v5e-256
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tpu_llama3_8b.py"


def cell_name(model: str, seq_len: int, topology: str) -> str:
  return f"{model}_{seq_len}_{topology}"


def plan_command(config: str, model: str, seq_len: int, topology: str, chips: int,
                 rows_per_chip: int, methods: str, json_path: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "epi_jax.cli", "plan", "--config", config,
          "--topology", topology, "--methods", methods, "--json", str(json_path),
          f"--config.model.name={model}", f"--config.data.seq_len={seq_len}",
          f"--config.data.batch_size={rows_per_chip * chips}",
          "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1"]


def _bytes_vs_full(r, full) -> tuple[str, str]:
  """(plain step / refreshing step / amortized over the schedule, each against
  full SFT's step; the floor: full's plus the least EPI must add)."""
  if not full or not full.get("bytes_per_step"):
    return "–", "–"
  base = full.get("bytes_per_plain_step", full["bytes_per_step"])
  if "bytes_per_plain_step" not in r:  # a plan from before the split: both branches counted
    return f"{r['bytes_per_step'] / base:.2f}x (both branches)", "–"
  parts = [r[k] for k in ("bytes_per_plain_step", "bytes_per_refresh_step", "bytes_per_step")]
  floor = r.get("bytes_epi_floor")
  return (" / ".join(f"{b / base:.2f}x" for b in parts),
          f"{(base + floor) / base:.2f}x" if floor else "–")


def table(cells: dict[str, list[dict]]) -> str:
  """Markdown rows, one per (cell, method), EPI's extras against the cell's full SFT."""
  lines = ["| model | seq | slice | method | total / HBM GiB | fits | EPI state GiB | "
           "extra over full GiB | temp GiB | bytes/step vs full: plain / refresh / at T | "
           "EPI floor | est. step s | est. MFU | update-alone temp GiB | step collectives | "
           "compile s |",
           "|---" * 16 + "|"]
  for name, records in cells.items():
    model, seq, topo = name.rsplit("_", 2)
    full = next((r for r in records if r["method_name"] == "full"), None)
    for r in records:
      h = r["hbm_gib"]
      extra = f"{h['total'] - full['hbm_gib']['total']:+.2f}" if full and r is not full else "–"
      ratio, floor = _bytes_vs_full(r, full)
      upd = r.get("epi_update") or {}
      coll = ", ".join(f"{k} {v}" for k, v in sorted(r.get("collectives", {}).items()) if v)
      lines.append(
          f"| {model} | {seq} | {topo} | {r['method_name']} | {h['total']:.1f} / "
          f"{h['capacity']:g} | {'yes' if r['fits'] else '**no**'} | {h.get('epi', 0):.2f} | "
          f"{extra} | {h['temp']:.1f} | {ratio} | {floor} | "
          f"{r.get('est_step_s', float('nan')):.3g} | {r.get('est_mfu', float('nan')):.0%} | "
          f"{upd.get('temp_gib', 0.0):.3g} | {coll} | {r.get('compile_s', float('nan')):.0f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--config", default=str(CONFIG))
  p.add_argument("--models", default="llama-3-8b,qwen2-7b")
  p.add_argument("--seq_lens", default="2048,4096")
  p.add_argument("--topologies", default="v5p-8,v5p-64,v5e-256")
  p.add_argument("--methods", default="full,epi,epi_compact")
  p.add_argument("--rows_per_chip", type=int, default=2)
  args = p.parse_args(argv)
  sys.path.insert(0, str(REPO))
  from epi_jax.training import plan  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  cells = {}
  for model in args.models.split(","):
    for seq in (int(s) for s in args.seq_lens.split(",")):
      for topo in args.topologies.split(","):
        name = cell_name(model, seq, topo)
        path = out / f"{name}.json"
        if not path.exists():
          chips = plan.topology(topo).chips
          cmd = plan_command(args.config, model, seq, topo, chips, args.rows_per_chip, args.methods,
                             path.with_suffix(".tmp"))
          print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
          t0 = time.time()
          rc = subprocess.call(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
          if rc != 0:
            print(f"[{name}] failed (exit {rc}) after {time.time() - t0:.0f} s", flush=True)
            continue
          path.with_suffix(".tmp").replace(path)
        cells[name] = json.loads(path.read_text())
  (out / "plan_table.md").write_text(table(cells))
  print(table(cells))
  return 0


if __name__ == "__main__":
  sys.exit(main())
