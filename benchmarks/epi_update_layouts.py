"""EPI's optimizer update alone at Llama-3-8B on a TPU slice, with the stacked
layer axis replicated (the trainer's layout) and sharded, per selection scope.

The issue-31 targets for the update compiled alone (``tx.update`` +
``optax.apply_updates``, params and optimizer state donated, as ``epi-jax
plan``'s ``epi_update``): temporaries <= 2 GiB per chip and no collective that
moves importance, masks or scores (all-gather, all-to-all, collective-permute,
reduce-scatter), for ``selection`` "global" and "layer", with the ``layers``
axis replicated and sharded over ``fsdp`` (the trainer never shards it; users
who shard their stacked params that way get this layout).

  python benchmarks/epi_update_layouts.py --topology v5p-8 --out docs/plan/epi_update_layouts_v5p-8.json

Writes one record per (layout, variant) and prints a markdown table. Compile
only (libtpu); a finished record is kept when the output file exists (resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> config fields
    "adamw (full)": {"method": "full"},
    "epi global": {"method": "epi", "epi.selection": "global"},
    "epi layer": {"method": "epi", "epi.selection": "layer"},
    "epi_compact global": {"method": "epi", "epi.selection": "global",
                           "epi.importance_dtype": "bfloat16", "epi.packed_mask": True},
    "epi_compact layer": {"method": "epi", "epi.selection": "layer",
                          "epi.importance_dtype": "bfloat16", "epi.packed_mask": True},
}
LAYOUTS = ("layers replicated", "layers sharded")
MOVING = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def _layers_sharded(ts, mesh):
  """``ts`` with every stacked param's ``layers`` axis over ``fsdp`` (the other
  logical rules as the trainer's; a mesh axis is used once per array)."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from epi_jax import sharding  # pylint: disable=g-import-not-at-top
  rules = (("layers", "fsdp"),) + tuple(r for r in sharding.LOGICAL_AXIS_RULES
                                        if r[0] != "layers")
  spec = ts.spec
  params = {k: NamedSharding(mesh, sharding.logical_to_spec(spec.axes.get(k), v.shape, mesh,
                                                            rules=rules))
            for k, v in spec.shapes.items()}
  return dataclasses.replace(ts, param_shardings=params, shardings=sharding.state_shardings(
      ts.abstract, spec.shapes, params, mesh))


def run(topology: str, model: str, out: pathlib.Path) -> list[dict]:
  from epi_jax import sharding  # pylint: disable=g-import-not-at-top
  from epi_jax.training import config as cfg_lib, plan, trainer  # pylint: disable=g-import-not-at-top
  topo = plan.topology(topology)
  devices = plan.topology_devices(topo)
  records = json.loads(out.read_text()) if out.exists() else []
  done = {(r["layout"], r["variant"]) for r in records}
  for layout in LAYOUTS:
    for name, fields in VARIANTS.items():
      if (layout, name) in done:
        continue
      config = cfg_lib.load_config_file(str(REPO / "configs" / "tpu_llama3_8b.py"))
      for key, value in {"model.name": model, "mesh.data": 1, "mesh.fsdp": -1,
                         "mesh.tensor": 1, **fields}.items():
        cfg_lib.set_field(config, key, value)
      config = cfg_lib.validate(config)
      mesh = sharding.make_mesh(config.mesh, devices)
      ts = trainer.setup(config, mesh)
      if layout == "layers sharded":
        ts = _layers_sharded(ts, mesh)
      temp, collectives = plan._update_alone(ts)  # pylint: disable=protected-access
      stacked = max((k for k in ts.spec.shapes if "layers" in (ts.spec.axes.get(k) or ())),
                    key=lambda k: ts.spec.shapes[k].size, default=None)
      records.append({"topology": topology, "model": model, "layout": layout, "variant": name,
                      "largest_stacked_param": stacked, "its_spec":
                          str(ts.param_shardings[stacked].spec) if stacked else None,
                      "temp_gib": temp / plan.GIB, "collectives": collectives,
                      "moving": sum(collectives[k] for k in MOVING)})
      out.write_text(json.dumps(records, indent=1))
      print(f"{layout} | {name} | {temp / plan.GIB:.3g} GiB | {collectives}", flush=True)
  return records


def table(records) -> str:
  rows = ["| layout | variant | update-alone temp GiB | all-reduce | all-gather / all-to-all / "
          "collective-permute / reduce-scatter |", "|---|---|---|---|---|"]
  for r in records:
    c = r["collectives"]
    rows.append(f"| {r['layout']} | {r['variant']} | {r['temp_gib']:.3g} | {c['all-reduce']} | "
                f"{' / '.join(str(c[k]) for k in MOVING)} |")
  return "\n".join(rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--topology", default="v5p-8")
  p.add_argument("--model", default="llama-3-8b")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  print(table(run(args.topology, args.model, pathlib.Path(args.out))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
