"""Compile time of the train step against depth, and of the optimizer update alone.

SmolLM2-135M's shape with ``--layers`` blocks, one CPU device, abstract state
and batch (nothing allocated): the seconds to lower and compile the real
train step (``epi_jax.training.step.make_train_step``) for each method, and
the kernels XLA:CPU generated for its fusions (``plan.distinct_fusions``).
Usage::

  python benchmarks/compile_time.py --layers 2,8,30 --methods full,epi

``--optimizer_only`` compiles only the optimizer update (the trainer's
``optim.make_optimizer``: ``tx.update`` + ``optax.apply_updates``, state and
params donated) on the same abstract params, for the ``--variants`` (``full``:
AdamW; ``epi``; ``epi_compact``: bf16 importance + packed mask; a variant
``name:cut`` compiles ``name`` with a part of EPI cut out, to see what that
part costs: see ``CUTS``). Variants are compiled in turn, ``--repeats`` rounds,
and the medians are printed with their ratio to the first variant::

  python benchmarks/compile_time.py --optimizer_only --layers 30 \
      --variants full,epi,epi_compact --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from epi_jax.method import refresh, transforms
from epi_jax.model import get_config
from epi_jax.training import config as cfg_lib
from epi_jax import sharding
from epi_jax.model import setup as model_setup
from epi_jax.training import trainer
from epi_jax.training import plan
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
  step = step_lib.make_train_step(config, spec, ts.method, mesh, ts.shardings)
  t0 = time.perf_counter()
  lowered = step.lower(ts.target, batch_abs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {"method": method, "layers": layers, "scan_layers": scan,
          "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
          "kernels": plan.distinct_fusions(compiled.as_text())}


# ---------------------------------------------------------------------------
# The optimizer update alone.
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def _patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def _no_search(options, layout, ranked):
  """``refresh.find_cuts`` without normalization and search: constant scales and thresholds."""
  del ranked
  return refresh.no_cuts(options, layout), jnp.float32(0.0)


def _no_stats(options, layout, mask, old_mask, first_mask, old, threshold):
  del options, layout, mask, old_mask, first_mask
  return old._replace(threshold=threshold.astype(jnp.float32))


_SCALE = refresh.layer_scale


def _scale_one(normalization, leaf, score):
  del normalization
  return _SCALE("none", leaf, score)


def _keep_only(pred, true_fn, false_fn, *operands):
  del pred, true_fn
  return false_fn(*operands)


# Diagnostic cuts (results change: for finding where compile time goes only).
CUTS = {
    "no_scale": lambda: _patched(refresh, "layer_scale", _scale_one),
    "no_refresh": lambda: _patched(transforms.jax.lax, "cond", _keep_only),
    "no_finite": lambda: _patched(refresh, "scores_finite", lambda *_: jnp.bool_(True)),
    "no_search": lambda: _patched(refresh, "find_cuts", _no_search),
    "no_stats": lambda: _patched(refresh, "refresh_stats", _no_stats),
}


def _variant_config(name: str, scan: bool):
  c = cfg_lib.default_config()
  c.method = "full" if name == "full" else "epi"
  if name == "epi_compact":
    c.epi.importance_dtype, c.epi.packed_mask = "bfloat16", True
  elif name not in ("full", "epi"):
    raise ValueError(f"Unknown variant {name!r}: expected full, epi or epi_compact[:cut].")
  c.model.scan_layers = scan
  c.mesh.data = 1
  return cfg_lib.validate(c)


def optimizer_compile_seconds(variant: str, layers: int, scan: bool) -> dict:
  """Seconds to lower and compile ``tx.update`` + ``apply_updates`` on abstract params."""
  name, _, cut = variant.partition(":")
  config = _variant_config(name, scan)
  spec = model_setup.spec_for(get_config("smollm2-135m", num_layers=layers, scan_layers=scan))
  ts = trainer.setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]), spec)
  tx, params, opt_state = ts.tx, dict(spec.shapes), ts.abstract.opt_state

  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  jax.clear_caches()
  with CUTS[cut]() if cut else contextlib.nullcontext():
    t0 = time.perf_counter()
    lowered = jax.jit(update, donate_argnums=(1, 2)).lower(params, opt_state, params)
    t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  return {"variant": variant, "layers": layers, "scan_layers": scan, "leaves": len(params),
          "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
          "temp_mib": None if mem is None else round(mem.temp_size_in_bytes / 2**20, 1)}


def optimizer_only(variants: list[str], layers: list[int], scans: list[bool],
                   repeats: int) -> list[dict]:
  rows = []
  for n in layers:
    for scan in scans:
      runs = {v: [] for v in variants}
      for _ in range(repeats):
        for v in variants:  # in turn, so that load drifts hit every variant alike
          r = optimizer_compile_seconds(v, n, scan)
          print(json.dumps(r), flush=True)
          runs[v].append(r["lower_s"] + r["compile_s"])
      base = statistics.median(runs[variants[0]])
      for v in variants:
        med = statistics.median(runs[v])
        rows.append({"variant": v, "layers": n, "scan_layers": scan, "median_s": round(med, 2),
                     "ratio": round(med / base, 2), "runs": runs[v]})
        print(json.dumps(rows[-1]), flush=True)
  print(f"| variant | layers | scan_layers | lower + compile s (median) | / {variants[0]} |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['layers']} | {r['scan_layers']} | {r['median_s']} | "
          f"{r['ratio']} |")
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--layers", default="2,8,30")
  p.add_argument("--methods", default="full,epi")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--optimizer_only", action="store_true",
                 help="compile only the optimizer update, for --variants")
  p.add_argument("--variants", default="full,epi,epi_compact")
  p.add_argument("--scan", default="false,true", help="scan_layers values to run")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  layers = [int(n) for n in args.layers.split(",")]
  scans = [s.strip().lower() == "true" for s in args.scan.split(",")]
  if args.optimizer_only:
    return optimizer_only(args.variants.split(","), layers, scans, args.repeats)
  rows = []
  for method in args.methods.split(","):
    for n in layers:
      for scan in scans:
        r = compile_seconds(method, n, scan, args.batch, args.seq)
        rows.append(r)
        print(json.dumps(r), flush=True)
  print("| method | layers | scan_layers | lower s | compile s | kernels |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['layers']} | {r['scan_layers']} | {r['lower_s']} | "
          f"{r['compile_s']} | {r['kernels']} |")
  return rows


if __name__ == "__main__":
  main()
