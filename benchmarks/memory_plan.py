"""Per-device memory of the real train step, compiled for a fake mesh of CPU devices.

Nothing is allocated: the train state and the batch are abstract
(``jax.ShapeDtypeStruct`` with the trainer's shardings), the train step is
lowered and compiled for ``--devices`` fake CPU devices, and per device it
prints, in GiB: params, optimizer state (AdamW), EPI state, batch, the
compiled program's temporary memory (``compiled.memory_analysis()``) and
their sum, for ``method=full``, ``method=epi`` and ``method=epi`` with the
compact EPI state (bfloat16 importance, bit-packed masks). Usage::

  python benchmarks/memory_plan.py --config configs/tpu_llama3_8b.py \\
      --mesh.fsdp=8 --mesh.tensor=1 --data.seq_len=4096 --data.batch_size=8

Overrides are ``--FIELD=VALUE`` (or ``--config.FIELD=VALUE``) of the trainer
config; values are parsed as Python literals where they parse. The CPU
compiler's temporary memory is an estimate of an accelerator's (its fusion
and scheduling differ), not a measurement on one.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time

VARIANTS = {
    "full": {"method": "full"},
    "epi": {"method": "epi"},
    "epi compact": {"method": "epi", "epi.importance_dtype": "bfloat16",
                    "epi.packed_mask": True},
}
UNITS = {"GiB": 2 ** 30, "MiB": 2 ** 20}


def _set(config, dotted: str, value):
  *groups, field = dotted.split(".")
  node = config
  for g in groups:
    node = node[g]
  node[field] = value


def _parse(value: str):
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def _bytes(leaves_and_shardings) -> int:
  """Per-device bytes of ``[(ShapeDtypeStruct, Sharding), ...]``."""
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
             for a, s in leaves_and_shardings)


def plan(config) -> dict:
  """The per-device memory of ``config``'s train step (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from epi_jax.method.isolation import epi_state
  from epi_jax.training import config as cfg_lib
  from epi_jax.training import optim, sharding, trainer
  from epi_jax.training import step as step_lib

  config = cfg_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  ts = trainer.setup(config, mesh)
  abstract, shardings = ts.abstract, ts.shardings
  pairs = lambda tree, shard: list(zip(jax.tree.leaves(tree), jax.tree.leaves(shard)))
  params_b = _bytes(pairs(abstract["params"], shardings["params"]))
  opt_b = _bytes(pairs(abstract["opt_state"], shardings["opt_state"]))
  epi_b = (_bytes(pairs(epi_state(abstract["opt_state"]), epi_state(shardings["opt_state"])))
           if optim.is_epi(config) else 0)
  other_b = _bytes(pairs({k: abstract[k] for k in ("step", "rng")},
                         {k: shardings[k] for k in ("step", "rng")}))
  b, l = config.data.batch_size, config.data.seq_len
  bsh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((b, l), dt, sharding=bsh) for k, dt in (
      ("inputs", "int32"), ("targets", "int32"), ("loss_mask", "float32"),
      ("segment_ids", "int32"), ("positions", "int32"), ("task_ids", "int32"))}
  batch_b = _bytes([(a, a.sharding) for a in batch.values()])
  step = step_lib.make_train_step(config, ts.spec, ts.tx, mesh, shardings)
  t0 = time.perf_counter()
  compiled = step.lower(ts.target, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp_b = int(mem.temp_size_in_bytes)
  total = params_b + opt_b + other_b + batch_b + temp_b
  return {
      "method": config.method, "model": config.model.name,
      "scan_layers": config.model.scan_layers, "remat": config.model.remat,
      "mesh": dict(zip(sharding.MESH_AXES, (int(mesh.shape[a]) for a in sharding.MESH_AXES))),
      "batch_size": b, "seq_len": l, "grad_accum_steps": config.optimizer.grad_accum_steps,
      "num_params": sum(math.prod(p.shape) for p in jax.tree.leaves(abstract["params"])),
      "bytes": {"params": params_b, "optimizer": opt_b - epi_b, "epi": epi_b,
                "step_rng": other_b, "batch": batch_b, "temp": temp_b, "total": total,
                "compiled_arguments": int(mem.argument_size_in_bytes),
                "compiled_outputs": int(mem.output_size_in_bytes),
                "compiled_alias": int(mem.alias_size_in_bytes)},
      "compile_s": round(compile_s, 1),
  }


def _row(name, r, unit: str) -> str:
  g = {k: v / UNITS[unit] for k, v in r["bytes"].items()}
  fits = " / ".join("yes" if r["bytes"]["total"] <= cap * 2 ** 30 else "no" for cap in (95, 80))
  return (f"| {name} | {g['params']:.2f} | {g['optimizer']:.2f} | {g['epi']:.2f} | "
          f"{g['batch']:.3f} | {g['temp']:.2f} | {g['total']:.2f} | {fits} |")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="a trainer config file (configs/*.py)")
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"comma-separated subset of {list(VARIANTS)}")
  p.add_argument("--json", default=None, help="also write the results to this file")
  p.add_argument("--unit", default="GiB", choices=list(UNITS))
  args, rest = p.parse_known_args(argv)
  overrides = []
  for arg in rest:
    if not arg.startswith("--") or "=" not in arg:
      p.error(f"unrecognized argument {arg!r} (overrides are --FIELD=VALUE)")
    key, value = arg[2:].split("=", 1)
    overrides.append((key.removeprefix("config."), _parse(value)))

  flag = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("memory_plan_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  results = []
  u = args.unit
  print(f"| variant | params {u} | optimizer {u} | EPI {u} | batch {u} | temp {u} | "
        f"total {u} | fits 95 / 80 GiB |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.variants.split(","):
    if name not in VARIANTS:
      p.error(f"unknown variant {name!r}; known: {list(VARIANTS)}")
    config = module.get_config()
    for key, value in [*overrides, *VARIANTS[name].items()]:
      try:
        _set(config, key, value)
      except (KeyError, AttributeError) as e:
        raise SystemExit(f"unknown config field {key!r} ({e})") from None
    r = plan(config)
    r["variant"] = name
    results.append(r)
    print(_row(name, r, u), flush=True)
  first = results[0]
  print(f"per device; {first['model']}, {first['num_params'] / 1e9:.2f}B params, "
        f"mesh {first['mesh']}, batch {first['batch_size']} x {first['seq_len']} "
        f"(grad accum {first['grad_accum_steps']}), scan_layers={first['scan_layers']}, "
        f"remat={first['remat']}; compile s: "
        + ", ".join(f"{r['variant']} {r['compile_s']}" for r in results), file=sys.stderr)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
