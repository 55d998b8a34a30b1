"""The training input pipeline: a checkpointable grain iterator over task mixtures.

:func:`make_train_iterator` returns a ``grain.DatasetIterator`` yielding numpy
batches (``B`` rows of length ``L``):

* ``inputs``/``targets`` int32: the tokens and the next tokens.
* ``loss_mask`` float32: 1 only where the *target* is an assistant token (the
  tokenizer's chat template marks them), so the loss is completion-only.
* ``segment_ids`` int32: 0 for padding, 1, 2, ... for the examples packed in
  a row; attention must not cross segments.
* ``positions`` int32: restart at 0 for every example.
* ``task_ids`` int32: the example's task id (its index in the task registry,
  :mod:`epi_jax.data.tasks`) per token, -1 for padding.

How a global batch is made, deterministically from the seed:

* Each task's train examples are visited in a fresh seeded permutation per
  epoch (``seed``, task, epoch), endlessly.
* The task of the next example follows the mixture weights by smooth
  weighted round robin: the task whose count lags its share the most goes
  next (ties to the lower task id). Proportions of examples are exact up to
  one example at every point (dropped examples do not count); the seed
  changes the order within tasks only.
* Examples are tokenized with ``tokenizer.apply_chat_template`` and truncated
  to ``seq_len + 1`` tokens (``seq_len`` input/target pairs). A truncated
  example is kept when an assistant target remains in the window; otherwise it
  is dropped and counted (``no_assistant_target``; see :attr:`SFTIterator.drops`).
* Packing (``packing=True``): examples are placed in order, each in the first
  row of the batch with room for it (first fit); the batch is complete when the
  next example fits in no row, and that example opens the next batch. Without
  packing each row holds one example, padded.
* ``stages``: a list of ``{'mixture': {...}, 'steps': N}``; after ``N`` batches
  the next stage's mixture takes over (a stage's batches never mix stages).
  ``steps`` of the last stage may be None (endless); when every stage has run
  out the iterator stops. Each task's position in its epoch carries across
  stages, so a later stage does not replay what an earlier one saw.
* Sharding: every process builds the same global batch and keeps rows
  ``[shard_index * B / shard_count, (shard_index + 1) * B / shard_count)``,
  so the global batch at a step does not depend on ``shard_count`` (at the cost
  of tokenizing the whole global batch on every host, cheap for SFT).

The iterator's state (``get_state``/``set_state``) is a small dict of
integers; a restored iterator yields exactly the batches the original would.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from epi_jax.data import datasets
from epi_jax.data import tasks as tasks_lib

# Guard against a task whose examples are all dropped (would loop forever): a
# task raises after a full epoch (or this many) of consecutive drops.
_MAX_CONSECUTIVE_DROPS = 100_000


def _normalize_stages(mixture, stages) -> list[dict[str, Any]]:
  if stages is None:
    if mixture is None:
      raise ValueError("Give a `mixture` or a list of `stages`.")
    stages = [{"mixture": mixture, "steps": None}]
  if not stages:
    raise ValueError("`stages` is empty.")
  out = []
  for i, stage in enumerate(stages):
    mix = stage.get("mixture", mixture)
    if not isinstance(mix, Mapping) or not mix:
      raise ValueError(f"stages[{i}]['mixture'] must be a non-empty dict task -> weight")
    names = tasks_lib.names()
    unknown = [t for t in mix if t not in names]
    if unknown:
      raise ValueError(f"stages[{i}] mixture: unknown task(s) {unknown}; known: {list(names)}")
    weights = np.zeros(len(names))
    for task, w in mix.items():
      if not np.isfinite(w) or w < 0:
        raise ValueError(f"stages[{i}] mixture weight of {task!r} must be >= 0, got {w}")
      weights[names.index(task)] = w
    if weights.sum() <= 0:
      raise ValueError(f"stages[{i}] mixture has no positive weight: {dict(mix)}")
    steps = stage.get("steps")
    if steps is None and i != len(stages) - 1:
      raise ValueError(f"stages[{i}]['steps'] is required (only the last stage may be endless)")
    if steps is not None and int(steps) < 0:
      raise ValueError(f"stages[{i}]['steps'] must be >= 0, got {steps}")
    out.append({"weights": weights / weights.sum(),
                "steps": None if steps is None else int(steps)})
  return out


class SFTIterator(grain.DatasetIterator):
  """Yields packed (or padded) SFT batches; see the module docstring."""

  def __init__(self, sources: Mapping[int, Sequence], tokenizer, stages, *, batch_size: int,
               seq_len: int, packing: bool, seed: int, shard_index: int, shard_count: int,
               cache_tokenized: bool = True):
    super().__init__()
    self._sources = dict(sources)
    self._tokenizer = tokenizer
    self._stages = stages
    self._batch_size, self._seq_len, self._packing = batch_size, seq_len, packing
    self._seed = seed
    rows = batch_size // shard_count
    self._rows = slice(shard_index * rows, (shard_index + 1) * rows)
    self._cache: dict[tuple[int, int], Any] | None = {} if cache_tokenized else None
    self._last: tuple[tuple[int, int], Any] | None = None
    self._perms: dict[tuple[int, int], np.ndarray] = {}
    self._pad = int(getattr(tokenizer, "pad_id", 0) or 0)
    n = len(stages[0]["weights"])  # one cursor per registered task
    self._state = {"stage": 0, "step": 0, "cursor": [0] * n, "stage_counts": [0] * n,
                   "drops": {"no_assistant_target": 0}}

  # -- state ------------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    s = self._state
    return {"stage": s["stage"], "step": s["step"], "cursor": list(s["cursor"]),
            "stage_counts": list(s["stage_counts"]), "drops": dict(s["drops"])}

  def set_state(self, state: dict[str, Any]) -> None:
    n = len(self._state["cursor"])
    if len(state["cursor"]) != n or len(state["stage_counts"]) != n:
      raise ValueError(f"iterator state has {len(state['cursor'])} task cursors, expected {n}")
    self._state = {"stage": int(state["stage"]), "step": int(state["step"]),
                   "cursor": [int(c) for c in state["cursor"]],
                   "stage_counts": [int(c) for c in state["stage_counts"]],
                   "drops": {k: int(v) for k, v in dict(state["drops"]).items()}}

  @property
  def drops(self) -> dict[str, int]:
    """Examples dropped so far by reason (they still advance the data order)."""
    return dict(self._state["drops"])

  # -- example order ----------------------------------------------------------

  def _peek(self, weights) -> tuple[int, int]:
    """(task id, source index) of the next example, without consuming it."""
    counts = self._state["stage_counts"]
    total = sum(counts) + 1
    deficit = [w * total - c if w > 0 else -np.inf for w, c in zip(weights, counts)]
    task = int(np.argmax(deficit))
    n = len(self._sources[task])
    epoch, offset = divmod(self._state["cursor"][task], n)
    perm = self._perms.get((task, epoch))
    if perm is None:
      # Only the current epoch per task is kept.
      self._perms = {k: v for k, v in self._perms.items() if k[0] != task}
      perm = np.random.default_rng([self._seed, task, epoch]).permutation(n)
      self._perms[(task, epoch)] = perm
    return task, int(perm[offset])

  def _consume(self, task: int, kept: bool = True) -> None:
    self._state["cursor"][task] += 1
    if kept:  # the mixture counts kept examples only
      self._state["stage_counts"][task] += 1

  def _tokenized(self, task: int, index: int):
    key = (task, index)
    if self._cache is not None and key in self._cache:
      return self._cache[key]
    if self._last is not None and self._last[0] == key:
      return self._last[1]
    item = tokenize_example(self._tokenizer, self._sources[task][index], self._seq_len)
    if self._cache is not None:
      self._cache[key] = item
    self._last = (key, item)
    return item

  # -- batches ----------------------------------------------------------------

  def _global_rows(self, weights) -> list[list[tuple[int, np.ndarray, np.ndarray]]]:
    rows = [[] for _ in range(self._batch_size)]
    used = [0] * self._batch_size
    filled, runs = 0, {}  # runs: consecutive drops per task
    while True:
      task, index = self._peek(weights)
      item = self._tokenized(task, index)
      if isinstance(item, str):
        self._consume(task, kept=False)
        self._state["drops"][item] = self._state["drops"].get(item, 0) + 1
        runs[task] = runs.get(task, 0) + 1
        if runs[task] > min(len(self._sources[task]), _MAX_CONSECUTIVE_DROPS):
          raise ValueError(
              f"task {tasks_lib.names()[task]!r}: {runs[task]} examples in a row were "
              f"dropped ({self.drops}); is seq_len={self._seq_len} too short for it?")
        continue
      runs[task] = 0
      ids, mask = item
      n = len(ids) - 1
      if self._packing:
        row = next((r for r in range(self._batch_size) if used[r] + n <= self._seq_len), None)
      else:
        row = filled if filled < self._batch_size else None
      if row is None:
        return rows
      rows[row].append((task, ids, mask))
      used[row] += n
      filled += 1
      self._consume(task)

  def __next__(self) -> dict[str, np.ndarray]:
    s = self._state
    while s["stage"] < len(self._stages) and self._stages[s["stage"]]["steps"] is not None \
        and s["step"] >= self._stages[s["stage"]]["steps"]:
      s["stage"] += 1
      s["step"] = 0
      s["stage_counts"] = [0] * len(s["stage_counts"])
    if s["stage"] >= len(self._stages):
      raise StopIteration
    rows = self._global_rows(self._stages[s["stage"]]["weights"])
    s["step"] += 1
    return pack_rows(rows[self._rows], self._seq_len, self._pad)


def tokenize_example(tokenizer, example: Mapping[str, Any], seq_len: int):
  """``(ids, assistant_mask)`` cut to ``seq_len + 1`` tokens, or a drop reason."""
  ids, mask = tokenizer.apply_chat_template(example["messages"], add_generation_prompt=False)
  if len(ids) != len(mask):
    raise ValueError(f"tokenizer returned {len(ids)} ids but {len(mask)} assistant_mask entries")
  ids = np.asarray(ids, np.int32)[:seq_len + 1]
  mask = np.asarray(mask, bool)[:seq_len + 1]
  if len(ids) < 2 or not mask[1:].any():
    return "no_assistant_target"
  return ids, mask


def pack_rows(rows, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Batch arrays from rows of ``(task id, ids, assistant_mask)`` segments."""
  b = len(rows)
  out = {
      "inputs": np.full((b, seq_len), pad_id, np.int32),
      "targets": np.full((b, seq_len), pad_id, np.int32),
      "loss_mask": np.zeros((b, seq_len), np.float32),
      "segment_ids": np.zeros((b, seq_len), np.int32),
      "positions": np.zeros((b, seq_len), np.int32),
      "task_ids": np.full((b, seq_len), -1, np.int32),
  }
  for r, segments in enumerate(rows):
    start = 0
    for seg, (task, ids, mask) in enumerate(segments, start=1):
      n = len(ids) - 1
      end = start + n
      out["inputs"][r, start:end] = ids[:-1]
      out["targets"][r, start:end] = ids[1:]
      out["loss_mask"][r, start:end] = mask[1:]
      out["segment_ids"][r, start:end] = seg
      out["positions"][r, start:end] = np.arange(n)
      out["task_ids"][r, start:end] = task
      start = end
  return out


class SFTDataset(grain.IterDataset):
  """A grain ``IterDataset`` whose iterators are :class:`SFTIterator`."""

  def __init__(self, sources, tokenizer, stages, **kwargs):
    super().__init__()
    self._args = (sources, tokenizer, stages)
    self._kwargs = kwargs

  def __iter__(self) -> SFTIterator:
    return SFTIterator(*self._args, **self._kwargs)

  def __str__(self) -> str:
    return "SFTDataset"


def make_train_dataset(tokenizer, *, data_dir=None, mixture: Mapping[str, float] | None = None,
                       stages: Sequence[Mapping[str, Any]] | None = None, batch_size: int,
                       seq_len: int, packing: bool = True, seed: int = 0, shard_index: int = 0,
                       shard_count: int = 1, max_examples_per_task=None, split: str = "train",
                       sources: Mapping[str, Sequence] | None = None,
                       cache_tokenized: bool = True) -> SFTDataset:
  """The :class:`SFTDataset` behind :func:`make_train_iterator` (same arguments)."""
  stages = _normalize_stages(mixture, stages)
  if batch_size <= 0 or seq_len <= 0:
    raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
  if shard_count <= 0 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} out of range for shard_count {shard_count}")
  if batch_size % shard_count:
    raise ValueError(f"global batch_size {batch_size} is not divisible by "
                     f"shard_count {shard_count}")
  used = sorted({t for st in stages for t in np.flatnonzero(st["weights"] > 0)})
  task_sources = {}
  for t in used:
    name = tasks_lib.names()[t]
    source = (sources[name] if sources is not None and name in sources
              else datasets.load_examples(name, split, data_dir))
    limit = (max_examples_per_task.get(name) if isinstance(max_examples_per_task, Mapping)
             else max_examples_per_task)
    if limit is not None:
      source = _Head(source, int(limit))
    if len(source) == 0:
      raise ValueError(f"task {name!r} has no {split} examples but a positive mixture weight")
    task_sources[int(t)] = source
  return SFTDataset(task_sources, tokenizer, stages, batch_size=batch_size, seq_len=seq_len,
                    packing=packing, seed=seed, shard_index=shard_index,
                    shard_count=shard_count, cache_tokenized=cache_tokenized)


def make_train_iterator(tokenizer, *, data_dir=None, mixture: Mapping[str, float] | None = None,
                        stages: Sequence[Mapping[str, Any]] | None = None, batch_size: int,
                        seq_len: int, packing: bool = True, seed: int = 0, shard_index: int = 0,
                        shard_count: int = 1, max_examples_per_task=None,
                        **kwargs) -> SFTIterator:
  """A checkpointable iterator of training batches (see the module docstring).

  Args:
    tokenizer: has ``apply_chat_template(messages, add_generation_prompt=False)
      -> (ids, assistant_mask)`` and ``pad_id``.
    data_dir: where ``epi_sft`` was prepared (default ``default_data_dir()``).
    mixture: task -> weight (normalized; zero weights allowed).
    stages: list of ``{'mixture': ..., 'steps': N}``; overrides ``mixture``
      (which then fills in stages without one).
    batch_size: the *global* batch size (rows), divisible by ``shard_count``.
    seq_len: tokens per row.
    packing: pack several examples per row (else one example per row).
    seed: data order seed.
    shard_index, shard_count: this process's slice of the global batch.
    max_examples_per_task: int, or dict task -> int: use only the first N
      train examples of a task.
    **kwargs: ``split`` (default ``'train'``), ``sources`` (task -> sequence of
      example dicts, instead of reading ``data_dir``; for tests),
      ``cache_tokenized`` (default True: keep tokenized examples in memory).
  """
  return iter(make_train_dataset(
      tokenizer, data_dir=data_dir, mixture=mixture, stages=stages, batch_size=batch_size,
      seq_len=seq_len, packing=packing, seed=seed, shard_index=shard_index,
      shard_count=shard_count, max_examples_per_task=max_examples_per_task, **kwargs))


class _Head:
  """The first ``n`` items of a random-access source."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(n, len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int):
    if not 0 <= index < self._n:
      raise IndexError(index)
    return self._source[index]
