"""``epi-jax plan``: compile the real train step for a TPU or GPU topology on any machine.

  epi-jax plan --config configs/tpu_llama3_8b.py --topology v5p-8 \\
      [--methods full,epi,epi_compact] [--json PATH] [--config.FIELD=VALUE ...]
  epi-jax plan --config configs/gpu_qwen2_7b.py --topology h100-8

Nothing is allocated and no weights are read: the train state and the batch
are abstract (``jax.ShapeDtypeStruct`` with the trainer's shardings,
``trainer.setup``), the mesh (``config.mesh``; ``-1`` fills) is laid over the
compile-only devices of the topology
(``jax.experimental.topologies.get_topology_desc``), and the step that
``epi-jax train`` runs (``step.make_train_step``) is lowered and compiled by
the TPU compiler (libtpu: ``pip install 'epi_jax[tpu]'``) or, for NVIDIA H100
GPUs (``h100-N``), by XLA's GPU compiler through the CUDA plugin for a target
description of the H100, without a GPU (``pip install 'epi_jax[gpu-plan]'``:
the plugin and ``ptxas``, no CUDA libraries). Per method it prints a table row
and, with ``--json``, one record (per chip; a GPU is a chip here):

* ``hbm_gib``: ``params``, ``optimizer`` (its state, plus the step counter and
  RNG), ``epi`` (EPI's importance and masks), ``batch``, ``padding`` (what the
  device's tiled layouts add to those: the compiled step's argument size less
  their logical bytes), ``temp`` (the compiled step's temporaries,
  ``memory_analysis()``); ``total`` is their sum, and
  ``capacity`` the chip's HBM (on a GPU the share of it that JAX's allocator
  takes, ``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 unless set); ``fits``:
  ``total <= capacity``.
* ``flops_per_step``: the model's FLOPs of the step per chip, from
  ``train_flops_per_token`` (6N plus attention per token; the usual MFU
  accounting, no remat recompute), NOT the compiler's count: XLA's
  ``cost_analysis()`` counts a scanned loop's body once (``compiler_flops``
  gives it as reported). So a scanned and an unscanned build agree.
* ``bytes_per_step``: HBM bytes the step reads and writes per chip:
  ``cost_analysis()``'s ``bytes accessed`` plus, for each ``while`` loop with a
  known trip count (the scanned layers, gradient accumulation), ``trip - 1``
  more times its body's bytes, estimated from the compiled HLO as XLA counts
  them (every op of the body reads its operands and writes its result; a
  fusion reads only the slices of an operand it only slices, e.g. one layer
  of the stacked params; a dynamic-update-slice writes only its update).
  ``cost_analysis()`` counts every branch of a ``lax.cond``; EPI's refresh
  (the cond named :data:`~epi_jax.method.transforms.REFRESH_SCOPE`) runs one
  of its two: ``bytes_per_plain_step`` leaves the refresh branch out,
  ``bytes_per_refresh_step`` the other, and ``bytes_per_step`` is their
  average over the run's schedule (``refresh_share``: the share of
  ``total_steps`` that refresh, 1/T for evolving EPI).
  ``bytes_both_branches``: the compiler's way, both branches counted.
  ``bytes_epi_floor``: the least a plain step of EPI can add to full SFT's
  (read and write the importance, read the mask; the gradient is read anyway).
  (A deviceless GPU executable has no ``cost_analysis()``: XLA's cost analysis
  of its optimized HLO module is run with the CPU client instead.)
* ``est_step_s``, ``est_mfu``: a roofline ESTIMATE, ``max(executed FLOPs /
  peak bf16 FLOP/s, bytes / HBM bandwidth)`` from the chip's published figures
  (:data:`CHIPS`), the executed FLOPs being ``flops_per_step`` plus a third
  with ``model.remat`` (the recomputed forward), and ``est_mfu =
  flops_per_step / (est_step_s x peak)``: a bound, not a prediction
  (collectives, overlap and kernel efficiency are not modelled).
* ``collectives``: each collective's count in the compiled step (async
  ``-start``/``-done`` pairs counted once); ``epi_update``: the optimizer
  update alone (``tx.update`` + ``optax.apply_updates``, jitted with the step's
  shardings, params and optimizer state donated): its ``temp_gib`` and
  ``collectives`` (the refresh branch included); ``epi_update_all_gathers``.
* ``attention_kernel``: what the compiled program runs for attention;
  ``compile_s``: the step's compile time on this machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time

from epi_jax.utils import platforms
from epi_jax.utils.usage import ArgumentParser, fail

PROG = "epi-jax plan"
INSTALL = "pip install 'epi_jax[tpu]'"
INSTALL_GPU = "pip install 'epi_jax[gpu-plan]'"
METHODS = {
    "full": {"method": "full"},
    "epi": {"method": "epi"},
    "epi_compact": {"method": "epi", "epi.importance_dtype": "bfloat16",
                    "epi.packed_mask": True},
    # The importance read from AdamW's nu: EPI's state is its masks.
    "epi_nu": {"method": "epi", "epi.importance": "inner_nu", "epi.ema_decay": None},
    "epi_nu_packed": {"method": "epi", "epi.importance": "inner_nu", "epi.ema_decay": None,
                      "epi.packed_mask": True},
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """An accelerator's published figures (Cloud TPU system architecture pages;
  NVIDIA's H100 datasheet: dense bf16, HBM3 of the SXM part)."""
  name: str
  hbm_gib: float
  peak_bf16_flops: float    # FLOP/s
  hbm_bytes_per_s: float


CHIPS = {
    "v4": Chip("TPU v4", 32, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32, 918e12, 1640e9),
    "h100": Chip("NVIDIA H100 SXM 80GB", 84929347584 / 2 ** 30, 989e12, 3.35e12),
}
# The H100 as XLA's GPU compiler sees it without one: the fields of XLA's
# xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb (stream_executor.GpuTargetConfigProto),
# plus the cuDNN version (9.8, the plugin's minimum) for cuDNN's fusions.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPUS_PER_HOST = 8
# chips -> the slice's shape in chips; v4/v5p names count TensorCores (2 per chip).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice or a GPU cluster as its compiler's plugin names it, and how to ask for it."""
  name: str           # as the user gave it
  compiler_name: str  # get_topology_desc's name: libtpu's v5e:2x2, CUDA's 1x1x8
  generation: str     # a CHIPS key
  chips: int
  options: tuple = ()  # get_topology_desc keyword arguments
  platform: str = "tpu"

  @property
  def chip(self) -> Chip:
    """The chip's figures; a GPU's capacity is what JAX's allocator may take."""
    chip = CHIPS[self.generation]
    if self.platform == "cuda":
      fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
      chip = dataclasses.replace(chip, hbm_gib=chip.hbm_gib * fraction)
    return chip


def topology(name: str) -> Topology:
  """``v5e-4``, ``v5e-256``, ``v5p-8`` (4 chips), ``v5p-64``, ``v4-8``, ``v6e-8``, ...,
  or libtpu's own ``GEN:AxB[xC]`` (e.g. ``v5e:2x2``); ``h100-N``: N H100
  GPUs, 8 per host (N up to 8, or a multiple of 8).

  Hosts as on the real slices: v5e/v6e slices of up to 8 chips are one host
  (of 1, 4 or 8 chips), larger ones 4 chips per host; v4/v5p 4 chips per host
  (megacore: one device per chip).

  Raises:
    ValueError: a name this table does not know.
  """
  m = re.fullmatch(r"h100-(\d+)", name.strip().lower())
  if m:
    n = int(m.group(1))
    if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
      raise ValueError(f"--topology {name}: h100-N is N GPUs, {GPUS_PER_HOST} per host: "
                       f"N from 1 to {GPUS_PER_HOST}, or a multiple of {GPUS_PER_HOST}")
    hosts, per_host = max(1, n // GPUS_PER_HOST), min(n, GPUS_PER_HOST)
    return Topology(name, f"1x{hosts}x{per_host}", "h100", n,
                    (("target_config", H100_TARGET_CONFIG),), platform="cuda")
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name.strip().lower())
  if m:
    gen, n = m.group(1), int(m.group(2))
    if gen in ("v5e", "v6e"):
      if n not in _SHAPES_2D:
        raise ValueError(f"--topology {name}: {gen} slices have {sorted(_SHAPES_2D)} chips")
      host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(n, (2, 2, 1))
      wrap = {128: (False, True, False), 256: (True, True, False)}.get(n, (False,) * 3)
      return Topology(name, f"{gen}:{_SHAPES_2D[n]}", gen, n, (
          ("chip_config_name", "default"), ("chips_per_host_bounds", host),
          ("num_slices", 1), ("wrap", wrap)))
    chips = n // 2
    if n % 2 or chips not in _SHAPES_3D:
      raise ValueError(f"--topology {name}: {gen}-N counts TensorCores (2 per chip); "
                       f"N in {sorted(2 * c for c in _SHAPES_3D)}")
    wrap = (True,) * 3 if chips >= 64 else (False,) * 3
    return Topology(name, f"{gen}:{_SHAPES_3D[chips]}", gen, chips, (
        ("chip_config_name", "megacore"), ("chips_per_host_bounds", (2, 2, 1)),
        ("num_slices", 1), ("wrap", wrap)))
  m = re.fullmatch(r"(v4|v5e|v5p|v5|v6e):(\d+(?:x\d+)+)", name.strip().lower())
  if m:
    gen = {"v5": "v5p"}.get(m.group(1), m.group(1))
    chips = math.prod(int(x) for x in m.group(2).split("x"))
    options = (("chip_config_name", "megacore"),) if gen in ("v4", "v5p") else ()
    return Topology(name, f"{gen}:{m.group(2)}", gen, chips, options)
  raise ValueError(f"--topology {name!r}: not a TPU slice or GPU name this plan knows (e.g. "
                   "v5e-4, v5e-256, v5p-8, v5p-64, v4-8, v6e-8, libtpu's v5e:2x2, or h100-8)")


def _quiet_libtpu_env(topo: Topology) -> None:
  """Off a TPU VM libtpu asks the VM metadata for the worker hostnames and the
  accelerator type and prints errors when it cannot: say them ourselves.
  Several compile-only processes may load libtpu at once (no chip to share)."""
  if platforms.tpu_chips():
    return
  cloud = {"v5e": f"v5litepod-{topo.chips}", "v6e": f"v6e-{topo.chips}"}.get(
      topo.generation, f"{topo.generation}-{2 * topo.chips}")
  for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_ACCELERATOR_TYPE", cloud)):
    os.environ.setdefault(key, value)


def missing_compiler(topo: Topology) -> str | None:
  """What ``topo``'s compiler lacks on this machine, with the line that installs
  it; None when it can compile."""
  if topo.platform == "tpu" and not platforms.libtpu_available():
    return f"compiling for TPU needs the TPU compiler (libtpu): {INSTALL}"
  if topo.platform == "cuda" and not (platforms.cuda_plugin_available()
                                      and platforms.ptxas_available()):
    return f"compiling for GPU needs the CUDA plugin and ptxas: {INSTALL_GPU}"
  return None


def topology_devices(topo: Topology):
  """The compile-only devices of ``topo`` (loads libtpu or the CUDA plugin)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if topo.platform == "cuda":
    # The CUDA plugin reads the shape from its ``topology`` option, not the name.
    desc = topologies.get_topology_desc(platform="cuda", topology=topo.compiler_name,
                                        **dict(topo.options))
    return list(desc.devices)
  _quiet_libtpu_env(topo)
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.compiler_name,
                                      **dict(topo.options))
  return list(desc.devices)


# ----------------------------------------------------------------------------- the compiled step


def count_collectives(hlo_text: str) -> dict[str, int]:
  """``{kind: count}`` of the collectives in an HLO module's text (every kind of
  :data:`COLLECTIVES` present; an async ``-start``/``-done`` pair counts once)."""
  counts = collections.Counter(
      m.group(1) for m in re.finditer(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(",
                                      hlo_text))
  return {k: int(counts.get(k, 0)) for k in COLLECTIVES}


def distinct_fusions(hlo_text: str) -> int:
  """Distinct fused computations in a compiled module's text, names and metadata
  left out: XLA:CPU generates code once per distinct body, so this is the
  number of kernels it compiles for the fusions (leaves of one shape whose
  fusions differ, e.g. by a baked-in slice offset, each cost a kernel)."""
  bodies = set()
  for comp in re.split(r"\n(?=\S)", hlo_text):
    if comp.startswith(("%fused", "fused")):
      body = comp[comp.index("{") + 1:]
      body = re.sub(r"metadata=\{[^}]*\}", "", re.sub(r"%[\w.\-]+", "%x", body))
      bodies.add(re.sub(r", backend_config=\S+", "", body))
  return len(bodies)


_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]"
                    r"(?:\{([\d,]*)(?::([^}]*))?\})?")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all",
         "partition-id", "replica-id", "iota", "copy-start", "copy-done", "while",
         "conditional", "call", "opt-barrier"}


def _shapes(text: str) -> list[tuple[int, int]]:
  """``[(bytes, leading dim), ...]`` of the array shapes written in ``text``, in
  their layouts' tiles where given (TPU: ``{1,0:T(8,128)}`` pads the two most
  minor dimensions to 8 x 128, as the device stores them)."""
  out = []
  for dtype, dims, minor_to_major, attrs in _SHAPE.findall(text):
    size = _BYTES.get(dtype) or max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)
    d = [int(x) for x in dims.split(",") if x]
    padded = list(d)
    tile = re.match(r"T\(([\d,]+)\)", attrs or "")
    order = [int(x) for x in minor_to_major.split(",") if x]
    if tile and order and len(order) == len(d):
      t = [int(x) for x in tile.group(1).split(",")]
      for k, tk in enumerate(reversed(t)):  # the tile's last dim is the most minor
        if k < len(order):
          dim = order[k]
          padded[dim] = -(-padded[dim] // tk) * tk
    out.append((size * math.prod(padded), d[0] if d else 0))
  return out


def _computations(hlo_text: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      name = head.group(2)
      comps[name] = []
      if head.group(1):
        comps["__entry__"] = comps[name]
    elif name is not None and line.strip() == "}":
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def _trip_count(line: str, comps) -> int | None:
  """A ``while``'s trip count: XLA's ``known_trip_count``, or its condition's
  ``i < N`` (a counter from 0, as ``lax.scan``/``fori_loop`` lower)."""
  known = re.search(r"known_trip_count\D*(\d+)", line)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", line)
  lines = comps.get(cond.group(1), []) if cond else []
  root = next((ln for ln in lines if ln.lstrip().startswith("ROOT")), "")
  if " compare(" not in root or "direction=LT" not in root:
    return None
  consts = dict(re.findall(r"%([\w.\-]+)\s*=\s*s\d+\[\]\S*\s+constant\((\d+)\)",
                           "\n".join(lines)))
  args = re.findall(r"%([\w.\-]+)", root.split("compare(", 1)[1].split(")", 1)[0])
  return int(consts[args[1]]) if len(args) == 2 and args[1] in consts else None


def _fusion_reads(lines) -> tuple[dict[int, float], float | None]:
  """What a fused computation reads of each parameter and writes, as XLA's cost
  analysis counts it: a parameter used only through (dynamic-)slices reads the
  slices; a dynamic-update-slice root writes its update (in place), its target
  operand is not read. ``({param index: bytes or -1 (whole)}, written or None)``."""
  params, sizes, users, root = {}, {}, collections.defaultdict(list), None
  for line in lines:
    m = _INSTR.match(line)
    if not m:
      continue
    name, result, opcode, rest = m.groups()
    sizes[name] = sum(b for b, _ in _shapes(result))
    if opcode == "parameter":
      params[name] = int(re.match(r"\s*(\d+)", rest).group(1))
      continue
    operands = re.findall(r"%([\w.\-]+)", re.split(r"\),\s*[a-z_]+=", rest, maxsplit=1)[0])
    for i, op in enumerate(operands):
      users[op].append((opcode, i, name, operands))
    if line.lstrip().startswith("ROOT"):
      root = (opcode, operands)
  reads = {}
  for name, index in params.items():
    uses = users.get(name, [])
    if uses and all(op in ("dynamic-slice", "slice") and i == 0 for op, i, _, _ in uses):
      reads[index] = float(sum(sizes[u] for _, _, u, _ in uses))
    elif (uses and root and root[0] == "dynamic-update-slice" and root[1]
          and root[1][0] == name and len(uses) == 1):
      reads[index] = 0.0
    else:
      reads[index] = -1.0
  written = None
  if root and root[0] == "dynamic-update-slice" and len(root[1]) > 1:
    written = float(sizes.get(root[1][1], 0))
  return reads, written


def _body_bytes(lines, comps) -> float:
  """One iteration's HBM bytes of a loop body, counted as XLA's cost analysis
  counts a computation: each op reads its operands and writes its result; a
  fusion reads only the slices of an operand that it only slices, and a
  dynamic-update-slice (fused or not) writes only its update."""
  sizes = {}
  for line in lines:
    m = _INSTR.match(line)
    if m:
      sizes[m.group(1)] = sum(b for b, _ in _shapes(m.group(2)))
  total = 0.0
  for line in lines:
    m = _INSTR.match(line)
    if not m or m.group(3) in _FREE:
      continue
    name, _, opcode, rest = m.groups()
    operands = re.findall(r"%([\w.\-]+)", re.split(r"\),\s*[a-z_]+=", rest, maxsplit=1)[0])
    ins = [sizes.get(n, 0) for n in operands]
    out = sizes[name]
    if opcode == "dynamic-slice":
      total += 2 * out
    elif opcode == "dynamic-update-slice":
      total += 2 * (ins[1] if len(ins) > 1 else out)
    elif opcode == "fusion":
      callee = re.search(r"calls=%?([\w.\-]+)", line)
      reads, written = _fusion_reads(comps.get(callee.group(1), [])) if callee else ({}, None)
      total += sum(b if reads.get(i, -1.0) < 0 else reads[i] for i, b in enumerate(ins))
      total += out if written is None else written
    else:
      total += out + sum(ins)
  return total


def _branches(line: str) -> list[str]:
  """A ``conditional``'s branch computations by index (a predicate's: false, true)."""
  listed = re.search(r"branch_computations=\{([^}]*)\}", line)
  if listed:
    return re.findall(r"%?([\w.\-]+)", listed.group(1))
  pair = [re.search(name + r"=%?([\w.\-]+)", line) for name in ("false_computation",
                                                                  "true_computation")]
  return [m.group(1) for m in pair if m]


def _run_bytes(name, comps, *, loops: bool, pick, found: list | None, depth: int = 0) -> float:
  """HBM bytes of one run of computation ``name``: its own ops (:func:`_body_bytes`)
  and what its loops, conditionals and calls run. ``loops``: a loop's body counts
  its trip count times (else once, as ``cost_analysis()`` counts it); a
  conditional counts every branch (as ``cost_analysis()`` does) unless
  ``pick(line)`` names the one taken."""
  lines = comps.get(name, [])
  total = _body_bytes(lines, comps)
  if depth > 8:
    return total
  run = lambda callee, n=1: n * _run_bytes(callee, comps, loops=loops, pick=pick,  # pylint: disable=unnecessary-lambda-assignment
                                           found=found, depth=depth + 1)
  for line in lines:
    m = _INSTR.match(line)
    if not m:
      continue
    if m.group(3) == "while":
      body = re.search(r"body=%?([\w.\-]+)", line)
      n = _trip_count(line, comps)
      if body and body.group(1) in comps:
        if n and found is not None:
          found.append(n)
        total += run(body.group(1), n if (loops and n) else 1)
    elif m.group(3) == "conditional":
      taken = pick(line) if pick else None
      total += sum(run(b) for i, b in enumerate(_branches(line)) if taken in (None, i))
    elif m.group(3) == "call":
      callee = re.search(r"to_apply=%?([\w.\-]+)", line)
      if callee:
        total += run(callee.group(1))
  return total


def loop_extra_bytes(hlo_text: str, picks=(None,)) -> tuple[list[float], list[int]]:
  """What to add to ``cost_analysis()``'s bytes for the bytes a step runs:
  ``cost_analysis()`` counts each ``while`` body once and every branch of a
  conditional; a run executes a body its trip count times (nested loops
  multiply) and, with a ``pick(conditional's line) -> branch index or None``,
  only the branch taken. Returns that difference for each of ``picks`` (None:
  every branch; estimated from the compiled HLO, parsed once, :func:`_body_bytes`)
  and the loops' known trip counts."""
  comps = _computations(hlo_text)
  if "__entry__" not in comps:
    return [0.0] * len(picks), []
  found: list[int] = []
  counted = _run_bytes("__entry__", comps, loops=False, pick=None, found=None)
  ran = [_run_bytes("__entry__", comps, loops=True, pick=pick, found=found if i == 0 else None)
         for i, pick in enumerate(picks)]
  return [r - counted for r in ran], found


def refresh_branch(scope: str, refresh: bool):
  """A ``pick`` for :func:`loop_extra_bytes`: the branch that a step takes
  (``refresh``: 1, the true branch of a ``lax.cond``; else 0) in a conditional
  that the named scope ``scope`` wraps; None (every branch) elsewhere."""
  pattern = re.compile(r'op_name="[^"]*\b' + re.escape(scope) + r'/cond"')
  return lambda line: int(refresh) if " conditional(" in line and pattern.search(line) else None


def _cost(compiled) -> dict:
  """XLA's cost analysis of a compiled program. A deviceless GPU executable has
  none (UNIMPLEMENTED): the same analysis of its optimized HLO module is run
  with the CPU client."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    cost = None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  if cost:
    return dict(cost)
  try:
    import jax  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    module = compiled.runtime_executable().hlo_modules()[0]
    return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))
  except Exception:  # pylint: disable=broad-except
    return {}


def attention_kernel(hlo_text: str, implementation: str) -> str:
  """What the compiled program runs for attention (``implementation`` resolved)."""
  if implementation == "splash":
    if "tpu_custom_call" in hlo_text:
      return "splash (Mosaic kernel)"
    return "splash (Pallas interpret mode: XLA ops)"
  if implementation == "cudnn":  # packed rows fall back to XLA (attention.attention)
    return "cudnn (fused kernel)" if "__cudnn$fmha" in hlo_text else "xla (XLA fusions)"
  return {"xla": "xla (XLA fusions)", "einsum": "einsum (XLA fusions)"}.get(
      implementation, implementation)


@contextlib.contextmanager
def no_persistent_cache():
  """Compiles within neither read nor write JAX's persistent compilation cache:
  compile-only devices have no client to load a cached program with, and a
  plan's programs are for another machine. (JAX decides whether the cache is
  used once per process: reset before and after.)"""
  from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  cc.reset_cache()
  try:
    with jax_config.enable_compilation_cache(False):
      yield
  finally:
    cc.reset_cache()


def _bytes_of(pairs) -> int:
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in pairs)


def abstract_batch(config, mesh):
  """The step's batch as ``ShapeDtypeStruct`` s on ``mesh`` (nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from epi_jax import sharding  # pylint: disable=g-import-not-at-top
  b, l = config.data.batch_size, config.data.seq_len
  bsh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((b, l), dt, sharding=bsh) for k, dt in (
      ("inputs", "int32"), ("targets", "int32"), ("loss_mask", "float32"),
      ("segment_ids", "int32"), ("positions", "int32"), ("task_ids", "int32"))}


def _refresh_share(config, method) -> float:
  """The share of the run's ``total_steps`` that refresh the mask (``1 / T``
  for evolving EPI, once for static, 0 without EPI's schedule)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from epi_jax.method.options import is_refresh_step  # pylint: disable=g-import-not-at-top
  if method.epi_options is None or not method.is_epi:
    return 0.0
  steps = np.arange(1, max(1, int(config.total_steps)) + 1)
  return float(np.mean(is_refresh_step(steps, method.epi_options)))


def _update_alone(ts):
  """The optimizer update compiled alone: (temp bytes, collectives)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  def update(params, opt_state, grads):
    updates, opt_state = ts.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  sh = ts.shardings
  fn = jax.jit(update, in_shardings=(sh.params, sh.opt_state, sh.params),
               out_shardings=(sh.params, sh.opt_state), donate_argnums=(0, 1))
  target = ts.target
  with no_persistent_cache():
    compiled = fn.lower(target.params, target.opt_state, target.params).compile()
  return (int(compiled.memory_analysis().temp_size_in_bytes),
          count_collectives(compiled.as_text()))


def compile_plan(config, devices, *, chip: Chip | None = None, update: bool = True) -> dict:
  """Compiles ``config``'s train step for a mesh over ``devices`` and measures it.

  Args:
    config: a trainer config (validated here).
    devices: the devices (real or compile-only) that ``config.mesh`` is laid over.
    chip: their published figures (capacity, roofline); None: no estimates.
    update: also compile the optimizer update alone (``epi_update``).

  Returns:
    the record described in the module docstring, plus ``bytes`` (the same
    parts in bytes, and the compiled step's argument/output/alias sizes) and
    the model, mesh and batch it was compiled for.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from epi_jax.method.inspection import epi_state  # pylint: disable=g-import-not-at-top
  from epi_jax.method.transforms import REFRESH_SCOPE  # pylint: disable=g-import-not-at-top
  from epi_jax.model import attention as attention_lib  # pylint: disable=g-import-not-at-top
  from epi_jax.model.config import train_flops_per_token  # pylint: disable=g-import-not-at-top
  from epi_jax.training import config as cfg_lib  # pylint: disable=g-import-not-at-top
  from epi_jax import sharding  # pylint: disable=g-import-not-at-top
  from epi_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from epi_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  config = cfg_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  ts = trainer.setup(config, mesh)
  abstract, shardings = ts.abstract, ts.shardings
  pairs = lambda tree, shard: list(zip(jax.tree.leaves(tree), jax.tree.leaves(shard)))
  params_b = _bytes_of(pairs(abstract.params, shardings.params))
  opt_b = _bytes_of(pairs(abstract.opt_state, shardings.opt_state))
  epi_b = floor_b = 0
  if ts.method.is_epi:
    es, esh = epi_state(abstract.opt_state), epi_state(shardings.opt_state)
    epi_b = _bytes_of(pairs(es, esh))
    # A plain step must read and write the importance and read the mask.
    floor_b = (2 * _bytes_of(pairs(es.importance, esh.importance))
               + _bytes_of(pairs(es.mask, esh.mask)))
  step_b = _bytes_of(pairs(abstract.step, shardings.step))
  batch = abstract_batch(config, mesh)
  batch_b = _bytes_of([(a, a.sharding) for a in batch.values()])

  step = step_lib.make_train_step(config, ts.spec, ts.method, mesh, shardings)
  t0 = time.perf_counter()
  with no_persistent_cache():
    compiled = step.lower(ts.target, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  cost = _cost(compiled)
  temp_b = int(mem.temp_size_in_bytes)
  parts = {"params": params_b, "optimizer": opt_b - epi_b + step_b, "epi": epi_b,
           "batch": batch_b}
  # The device's layouts pad small dimensions to its tiles (TPU: 8 x 128).
  parts["padding"] = max(0, int(mem.argument_size_in_bytes) - sum(parts.values()))
  parts["temp"] = temp_b
  total = sum(parts.values())

  chips = int(mesh.size)
  tokens = config.data.batch_size * config.data.seq_len
  flops = train_flops_per_token(ts.spec.config, config.data.seq_len) * tokens / chips
  counted = float(cost.get("bytes accessed", 0.0))
  extras, trips = loop_extra_bytes(hlo, (None, refresh_branch(REFRESH_SCOPE, False),
                                         refresh_branch(REFRESH_SCOPE, True)))
  both_b, plain_b, refresh_b = (counted + e for e in extras)
  refreshes = _refresh_share(config, ts.method)
  bytes_step = plain_b + refreshes * (refresh_b - plain_b)
  impl = attention_lib.resolve(config.model.attention, attention_lib.platform(mesh))
  record = {
      "chips": chips, "method": config.method,
      "hbm_gib": {**{k: v / GIB for k, v in parts.items()}, "total": total / GIB,
                  "capacity": chip.hbm_gib if chip else None},
      "fits": (total <= chip.hbm_gib * GIB) if chip else None,
      "flops_per_step": flops,
      "compiler_flops": float(cost.get("flops", 0.0)),
      "bytes_per_step": bytes_step,
      "bytes_per_plain_step": plain_b,
      "bytes_per_refresh_step": refresh_b,
      "bytes_both_branches": both_b,
      "refresh_share": refreshes,
      "bytes_epi_floor": floor_b,
      "loop_trip_counts": trips,
      "est_step_s": None, "est_mfu": None,
      "collectives": count_collectives(hlo),
      "attention_kernel": attention_kernel(hlo, impl),
      "compile_s": round(compile_s, 1),
  }
  if chip:
    # Executed FLOPs: with remat the backward recomputes the forward (+1/3).
    executed = flops * (4 / 3 if config.model.remat else 1.0)
    step_s = max(executed / chip.peak_bf16_flops, bytes_step / chip.hbm_bytes_per_s)
    record["est_step_s"] = step_s
    record["est_mfu"] = flops / (step_s * chip.peak_bf16_flops) if step_s else None
  if update:
    temp_u, coll_u = _update_alone(ts)
    record["epi_update"] = {"temp_gib": temp_u / GIB, "collectives": coll_u}
    record["epi_update_all_gathers"] = coll_u["all-gather"]
  record.update(
      model=config.model.name, scan_layers=bool(config.model.scan_layers),
      remat=config.model.remat,
      mesh=dict(zip(sharding.MESH_AXES, (int(mesh.shape[a]) for a in sharding.MESH_AXES))),
      batch_size=config.data.batch_size, seq_len=config.data.seq_len,
      grad_accum_steps=config.optimizer.grad_accum_steps,
      num_params=sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params)),
      bytes={**parts, "step": step_b, "total": total,
             "compiled_arguments": int(mem.argument_size_in_bytes),
             "compiled_outputs": int(mem.output_size_in_bytes),
             "compiled_alias": int(mem.alias_size_in_bytes)})
  return record


# ----------------------------------------------------------------------------- configs, CLI


def split_overrides(rest, parser) -> list[tuple[str, object]]:
  """``--FIELD=VALUE`` / ``--config.FIELD=VALUE`` arguments as ``(field, value)``."""
  from epi_jax.training import config as cfg_lib  # pylint: disable=g-import-not-at-top
  out = []
  for arg in rest:
    if not arg.startswith("--") or "=" not in arg:
      parser.error(f"unrecognized argument {arg!r} (overrides are --config.FIELD=VALUE)")
    key, value = arg[2:].split("=", 1)
    out.append((key.removeprefix("config."), cfg_lib.literal(value)))
  return out


def _row(r) -> str:
  g = r["hbm_gib"]
  c = r["collectives"]
  coll = ", ".join(f"{k} {v}" for k, v in c.items() if v) or "none"
  upd = r.get("epi_update") or {}
  return (f"| {r['method_name']} | {g['params']:.3g} | {g['optimizer']:.3g} | {g['epi']:.3g} | "
          f"{g['batch']:.3g} | {g['padding']:.3g} | {g['temp']:.3g} | "
          f"{g['total']:.3g} / {g['capacity']:.3g} | "
          f"{'yes' if r['fits'] else 'NO'} | {r['flops_per_step']:.3g} | "
          f"{r['bytes_per_plain_step']:.3g} / {r['bytes_per_refresh_step']:.3g} | "
          f"{r['est_step_s']:.3g} | {r['est_mfu']:.0%} | {coll} | "
          f"{upd.get('temp_gib', 0):.3g} | {r['attention_kernel']} | {r['compile_s']} |")


def plan_main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = ArgumentParser(prog=PROG, description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="a trainer config file (configs/*.py)")
  p.add_argument("--topology", required=True,
                 help="a TPU slice (v5e-4, v5e-256, v5p-8, v5p-64, v4-8, v6e-8, or v5e:2x2) "
                      "or NVIDIA H100 GPUs (h100-8: one host of 8)")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated subset of {list(METHODS)}")
  p.add_argument("--json", default=None, help="also write the records to this file")
  args, rest = p.parse_known_args(argv)
  overrides = split_overrides(rest, p)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    return fail(PROG, f"--methods {args.methods!r}: choose from {list(METHODS)}")
  try:
    topo = topology(args.topology)
  except ValueError as e:
    return fail(PROG, e)
  missing = missing_compiler(topo)
  if missing:
    return fail(PROG, missing)
  if not os.path.isfile(args.config):
    return fail(PROG, f"--config {args.config}: no such file")
  plugin = "libtpu" if topo.platform == "tpu" else "the CUDA plugin"
  try:
    devices = topology_devices(topo)
  except Exception as e:  # pylint: disable=broad-except
    return fail(PROG, f"{plugin} cannot make topology {topo.compiler_name} ({e})")

  from epi_jax.training import config as cfg_lib  # pylint: disable=g-import-not-at-top
  records = []
  capacity = f"{topo.chip.hbm_gib:.3g} GiB HBM each"
  if topo.platform == "cuda":
    capacity = (f"{CHIPS[topo.generation].hbm_gib:.3g} GiB HBM each, {topo.chip.hbm_gib:.3g} of "
                "it JAX's (XLA_PYTHON_CLIENT_MEM_FRACTION)")
  print(f"{PROG}: {topo.name} = {plugin} {topo.compiler_name}, {len(devices)} {topo.chip.name} "
        f"chips, {capacity}; per chip; est_* are a roofline estimate (peak bf16 FLOP/s, HBM "
        "bandwidth), not a measurement", file=sys.stderr)
  print("| method | params GiB | optimizer GiB | EPI GiB | batch GiB | padding GiB | temp GiB | "
        "total / HBM GiB | fits | FLOPs/step | bytes/step plain / refresh | est. step s | est. MFU | "
        "collectives | update-alone temp GiB | attention | compile s |")
  print("|---" * 17 + "|")
  for name in methods:
    try:
      config = cfg_lib.load_config_file(args.config)
      for key, value in [*overrides, *METHODS[name].items()]:
        try:
          cfg_lib.set_field(config, key, value)
        except (KeyError, AttributeError):
          return fail(PROG, f"unknown config field {key!r}")
        except TypeError as e:  # ml_collections keeps a field's type (e.g. false for False)
          return fail(PROG, f"--config.{key}={value!r}: {e}")
      record = compile_plan(config, devices, chip=topo.chip)
    except (ValueError, FileNotFoundError) as e:
      return fail(PROG, e)
    except RuntimeError as e:
      if "cuDNN not found" not in str(e):
        raise
      return fail(PROG, "cuDNN attention needs cuDNN to compile (pip install 'nvidia-cudnn-cu12>=9.8'), "
                  "or plan --config.model.attention=xla")
    record = {"topology": topo.name, f"{'libtpu' if topo.platform == 'tpu' else 'cuda'}_topology": topo.compiler_name,
              "method_name": name, **record}
    records.append(record)
    print(_row(record), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(plan_main())
