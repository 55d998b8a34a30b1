"""Per-device memory of the real train step, compiled for a fake mesh of CPU devices.

A thin wrapper of ``epi_jax.training.plan.compile_plan`` (one implementation;
``epi-jax plan`` compiles the same for a TPU topology with the TPU compiler).

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
import json
import os
import sys

VARIANTS = {
    "full": {"method": "full"},
    "epi": {"method": "epi"},
    "epi compact": {"method": "epi", "epi.importance_dtype": "bfloat16",
                    "epi.packed_mask": True},
}
UNITS = {"GiB": 2 ** 30, "MiB": 2 ** 20}


def plan(config) -> dict:
  """The per-device memory of ``config``'s train step on this machine's devices:
  ``epi_jax.training.plan.compile_plan`` (the one implementation, also behind
  ``epi-jax plan``), in this script's units."""
  import jax  # pylint: disable=g-import-not-at-top
  from epi_jax.training.plan import compile_plan  # pylint: disable=g-import-not-at-top
  r = compile_plan(config, jax.devices(), update=False)
  b = dict(r["bytes"])
  b["optimizer"] -= b["step"]  # compile_plan counts the step counter with the optimizer
  keys = ("method", "model", "scan_layers", "remat", "mesh", "batch_size", "seq_len",
          "grad_accum_steps", "num_params", "compile_s")
  return {**{k: r[k] for k in keys}, "bytes": b}


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
  raw = []
  for arg in rest:
    if not arg.startswith("--") or "=" not in arg:
      p.error(f"unrecognized argument {arg!r} (overrides are --FIELD=VALUE)")
    raw.append(arg[2:].split("=", 1))

  flag = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  from epi_jax.training.config import literal, load_config_file  # pylint: disable=g-import-not-at-top
  from epi_jax.training.config import set_field  # pylint: disable=g-import-not-at-top
  overrides = [(key.removeprefix("config."), literal(value)) for key, value in raw]

  results = []
  u = args.unit
  print(f"| variant | params {u} | optimizer {u} | EPI {u} | batch {u} | temp {u} | "
        f"total {u} | fits 95 / 80 GiB |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.variants.split(","):
    if name not in VARIANTS:
      p.error(f"unknown variant {name!r}; known: {list(VARIANTS)}")
    config = load_config_file(args.config)
    for key, value in [*overrides, *VARIANTS[name].items()]:
      try:
        set_field(config, key, value)
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
