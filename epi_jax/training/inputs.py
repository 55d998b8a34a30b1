"""Training batches: makes sure the data exists, builds the iterator, shards batches.

The ``epi_sft`` datasets are prepared on first use (idempotent; seconds), from
the raw dir, or from files downloaded (pinned checksums, cached; from
``config.data.mirror`` when set) where no raw dir holds them. Where the raw
files are not local and ``config.data.allow_standin`` is set, a small built-in
stand-in (synthetic chat examples per task) is used instead of downloading.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from epi_jax import data as epi_data
from epi_jax.data import tasks as tasks_lib
from epi_jax.data.download import has_raw_files
from epi_jax.data.pipeline import make_train_iterator
from epi_jax.training import config as cfg_lib
from epi_jax import sharding
from epi_jax.utils.assets import default_raw_data_dir


def used_tasks(config) -> list[str]:
  mixes = ([st["mixture"] for st in config.data.stages] if cfg_lib.uses_stages(config)
           else [config.data.mixture])
  return sorted({t for m in mixes for t, w in m.items() if w > 0},
                key=tasks_lib.task_id)


def standin_sources(tasks, n: int = 64) -> dict[str, list[dict[str, Any]]]:
  """Deterministic synthetic examples: tiny arithmetic/echo dialogues per task."""
  out = {}
  for t, task in enumerate(tasks):
    rng = np.random.default_rng([7, t])
    items = []
    for i in range(n):
      a, b = (int(x) for x in rng.integers(0, 100, size=2))
      items.append({"task": task, "id": f"standin-{task}-{i}", "messages": [
          {"role": "user", "content": f"[{task}] What is {a} + {b}?"},
          {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]})
    out[task] = items
  return out


def _prepare(tasks, raw_dir, data_dir, mirror=None) -> None:
  """Prepares ``tasks``; with several processes, process 0 first (others wait, then
  prepare only what their file system still lacks, e.g. per-host local disks)."""
  multi = jax.process_count() > 1
  if jax.process_index() == 0:
    print(f"[epi_jax] preparing {tasks} in {data_dir}", file=sys.stderr)
    epi_data.prepare(raw_dir=raw_dir, data_dir=data_dir, tasks=tasks, mirror=mirror)
  if multi:
    multihost_utils.sync_global_devices("epi_jax:prepare_data")
    if jax.process_index() != 0:
      left = [t for t in tasks if not epi_data.get_builder(t, data_dir).is_prepared()]
      if left:
        epi_data.prepare(raw_dir=raw_dir, data_dir=data_dir, tasks=left, mirror=mirror)


def ensure_data(config) -> dict[str, Any]:
  """Prepares missing datasets; returns the iterator's data kwargs.

  Raises:
    epi_jax.data.download.DownloadError: when raw files had to be downloaded
      and could not be (the stand-in not allowed).
  """
  tasks = used_tasks(config)
  data_dir = config.data.data_dir or epi_data.default_data_dir()
  missing = [t for t in tasks if not epi_data.get_builder(t, data_dir).is_prepared()]
  if not missing:
    return {"data_dir": data_dir}
  raw_dir = config.data.raw_dir or default_raw_data_dir()
  local = all(has_raw_files(raw_dir, t) for t in missing)
  if not local and config.data.allow_standin:
    print(f"[epi_jax] raw data missing for {missing}: using the built-in stand-in",
          file=sys.stderr)
    return {"sources": standin_sources(tasks)}
  _prepare(missing, raw_dir, data_dir, config.data.mirror)  # downloads what is not local
  return {"data_dir": data_dir}


def process_rows(mesh, batch_size: int) -> tuple[int, int]:
  """``(shard_index, shard_count)``: which block of the global batch this process feeds.

  Read off the batch sharding, so the rows a process loads are exactly the
  rows its devices hold, whatever the order of devices in the mesh; one
  process (or a batch replicated over all processes) gives ``(0, 1)``.

  Raises:
    ValueError: when this process's rows are not one contiguous block.
  """
  idx = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  rows = sorted({s[0].indices(batch_size)[:2] for s in idx.values()})
  start, stop = rows[0][0], rows[-1][1]
  if any(a[1] != b[0] for a, b in zip(rows, rows[1:])) or batch_size % (stop - start):
    raise ValueError(f"process {jax.process_index()} holds batch rows {rows} of "
                     f"{batch_size}: not one contiguous block (put config.mesh.data/fsdp "
                     "across hosts, tensor within a host)")
  return start // (stop - start), batch_size // (stop - start)


def make_iterator(config, tokenizer, data_kwargs, mesh=None):
  """This process's checkpointable iterator of its rows of the global batch.

  ``mesh``: rows follow the batch sharding (:func:`process_rows`); without
  it process ``i`` of ``n`` takes the ``i``-th of ``n`` equal blocks.
  """
  d = config.data
  stages = d.stages if cfg_lib.uses_stages(config) else None
  index, count = (process_rows(mesh, d.batch_size) if mesh is not None
                  else (jax.process_index(), jax.process_count()))
  return make_train_iterator(
      tokenizer, mixture=dict(d.mixture), stages=stages, batch_size=d.batch_size,
      seq_len=d.seq_len, packing=d.packing, seed=config.seed,
      shard_index=index, shard_count=count,
      max_examples_per_task=d.max_examples_per_task, **data_kwargs)


def to_global(batch: dict[str, np.ndarray], mesh, batch_size: int | None = None
              ) -> dict[str, jax.Array]:
  """Assembles the processes' local rows into global arrays sharded over the batch axes.

  ``batch_size``: the global number of rows (default: local rows x processes).
  """
  s = sharding.batch_sharding(mesh)
  n = jax.process_count()
  return {k: jax.make_array_from_process_local_data(
      s, v, (batch_size or v.shape[0] * n,) + v.shape[1:]) for k, v in batch.items()}
