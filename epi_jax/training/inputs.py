"""Training batches: makes sure the data exists, builds the iterator, shards batches.

The ``epi_sft`` datasets are prepared on first use (idempotent; seconds). Where
the raw files are missing and ``config.data.allow_standin`` is set, a small
built-in stand-in (synthetic chat examples per task) is used instead.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

from epi_jax import data as epi_data
from epi_jax.data.pipeline import make_train_iterator
from epi_jax.training import sharding
from epi_jax.utils.assets import default_raw_data_dir


def used_tasks(config) -> list[str]:
  mixes = ([st["mixture"] for st in config.data.stages] if config.method == "multi_stage"
           else [config.data.mixture])
  return sorted({t for m in mixes for t, w in m.items() if w > 0},
                key=epi_data.ALL_CONFIGS.index)


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


def ensure_data(config) -> dict[str, Any]:
  """Prepares missing datasets; returns the iterator's data kwargs.

  Raises:
    FileNotFoundError: when the data is missing, cannot be prepared, and the
      stand-in is not allowed.
  """
  tasks = used_tasks(config)
  data_dir = config.data.data_dir or epi_data.default_data_dir()
  missing = [t for t in tasks if not epi_data.get_builder(t, data_dir).is_prepared()]
  if not missing:
    return {"data_dir": data_dir}
  raw_dir = config.data.raw_dir or default_raw_data_dir()
  if raw_dir is not None or missing == ["chat"]:
    if jax.process_index() == 0:
      print(f"[epi_jax] preparing {missing} in {data_dir}", file=sys.stderr)
    epi_data.prepare(raw_dir=raw_dir, data_dir=data_dir, tasks=missing)
    return {"data_dir": data_dir}
  if config.data.allow_standin:
    print(f"[epi_jax] raw data missing for {missing}: using the built-in stand-in",
          file=sys.stderr)
    return {"sources": standin_sources(tasks)}
  raise FileNotFoundError(
      f"Training data for {missing} is not prepared in {data_dir} and no raw data dir was "
      "found (set config.data.raw_dir or $EPI_RAW_DATA_DIR, or config.data.allow_standin)")


def make_iterator(config, tokenizer, data_kwargs):
  """This process's checkpointable iterator of local batch rows."""
  d = config.data
  stages = d.stages if config.method == "multi_stage" else None
  return make_train_iterator(
      tokenizer, mixture=dict(d.mixture), stages=stages, batch_size=d.batch_size,
      seq_len=d.seq_len, packing=d.packing, seed=config.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      max_examples_per_task=d.max_examples_per_task, **data_kwargs)


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles the processes' local rows into global arrays sharded over the batch axes."""
  s = sharding.batch_sharding(mesh)
  n = jax.process_count()
  return {k: jax.make_array_from_process_local_data(
      s, v, (v.shape[0] * n,) + v.shape[1:]) for k, v in batch.items()}
