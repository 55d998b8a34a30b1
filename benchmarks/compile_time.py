"""Compile time of the train step against depth, with and without ``scan_layers``.

SmolLM2-135M's shape with ``--layers`` blocks, one CPU device, abstract state
and batch (nothing allocated): the seconds to lower and compile the real
train step (``epi_jax.training.step.make_train_step``) for each method.
Usage::

  python benchmarks/compile_time.py --layers 2,8,30 --methods full,epi
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from epi_jax.model import get_config
from epi_jax.training import config as cfg_lib
from epi_jax.training import model_setup
from epi_jax.training import sharding, trainer
from epi_jax.training import step as step_lib


def compile_seconds(method: str, layers: int, scan: bool, batch: int, seq: int) -> dict:
  c = cfg_lib.default_config()
  c.method = method
  c.model.scan_layers = scan
  c.data.batch_size, c.data.seq_len = batch, seq
  c.mesh.data = 1
  config = cfg_lib.validate(c)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  spec = model_setup.spec_for(get_config("smollm2-135m", num_layers=layers, scan_layers=scan))
  ts = trainer.setup(config, mesh, spec)
  bsh = sharding.batch_sharding(mesh)
  batch_abs = {k: jax.ShapeDtypeStruct((batch, seq), dt, sharding=bsh) for k, dt in (
      ("inputs", "int32"), ("targets", "int32"), ("loss_mask", "float32"),
      ("segment_ids", "int32"), ("positions", "int32"), ("task_ids", "int32"))}
  step = step_lib.make_train_step(config, spec, ts.tx, mesh, ts.shardings)
  t0 = time.perf_counter()
  lowered = step.lower(ts.target, batch_abs)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return {"method": method, "layers": layers, "scan_layers": scan,
          "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--layers", default="2,8,30")
  p.add_argument("--methods", default="full,epi")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=256)
  args = p.parse_args(argv)
  rows = []
  for method in args.methods.split(","):
    for layers in (int(n) for n in args.layers.split(",")):
      for scan in (False, True):
        r = compile_seconds(method, layers, scan, args.batch, args.seq)
        rows.append(r)
        print(json.dumps(r), flush=True)
  print("| method | layers | scan_layers | lower s | compile s |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['layers']} | {r['scan_layers']} | {r['lower_s']} | "
          f"{r['compile_s']} |")
  return rows


if __name__ == "__main__":
  main()
