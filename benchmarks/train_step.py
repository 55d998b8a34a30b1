"""Step time, tokens/s and peak RSS of the trainer: method=full vs method=epi.

Each run is a subprocess (``epi-jax train`` on a fresh workdir) so that its
``ru_maxrss`` is its own. Usage::

  python benchmarks/train_step.py --config configs/tiny.py --steps 8
  python benchmarks/train_step.py --config configs/smollm2_multitask.py --steps 4
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile


_CHILD = ("import resource, sys; from epi_jax.cli import main; rc = main(sys.argv[1:]); "
          "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
          "file=sys.stderr); sys.exit(rc)")


def run(config: str, method: str, steps: int, extra: list[str]) -> dict:
  workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"bench-{method}-"))
  cmd = [sys.executable, "-c", _CHILD, "train", "--config", config, "--workdir", str(workdir),
         f"--config.method={method}", f"--config.total_steps={steps}", "--config.log_every=1",
         f"--config.checkpoint_every={steps}", "--config.progress_bar=False",
         "--config.mesh.data=1", *extra]
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(out.stderr[-3000:])
  rss = [l for l in out.stderr.splitlines() if l.startswith("MAXRSS_KIB")]
  cfg = json.loads((workdir / "config.json").read_text())
  recs = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  timed = [r for r in recs if "step_time" in r][1:]  # warm steps only
  st = sum(r["step_time"] for r in timed) / len(timed)
  tokens = cfg["data"]["batch_size"] * cfg["data"]["seq_len"]
  return {"method": method, "batch": cfg["data"]["batch_size"], "seq_len": cfg["data"]["seq_len"],
          "step_time_s": round(st, 4), "tokens_per_s": round(tokens / st, 1),
          "first_step_s": round(recs[0]["first_step_s"], 2),
          "peak_rss_gib": round(int(rss[0].split()[1]) / 2**20, 3),
          "final_loss": recs[-1]["loss"], "timed_steps": len(timed)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--config", required=True)
  p.add_argument("--steps", type=int, default=6)
  args, extra = p.parse_known_args(argv)
  results = {}
  for method in ("full", "epi"):
    r = run(args.config, method, args.steps, extra)
    results[method] = r
  for r in results.values():
    print(json.dumps(r))
  print(f"epi/full step time ratio: {results['epi']['step_time_s'] / results['full']['step_time_s']:.3f}")


if __name__ == "__main__":
  main()
