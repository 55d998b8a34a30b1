"""The prepared ``epi_sft`` datasets: where they live, building them, reading them.

:func:`prepare` builds a task's config of the TFDS builder ``epi_sft``
(array_record, no TensorFlow; downloading raw files no raw dir holds) and
:func:`load_examples` reads one split as a random-access sequence of plain
Python example dicts, decoded by the field kinds of the task registry
(:mod:`epi_jax.data.tasks`). Any registered task works, also one registered at
run time.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any, Sequence

import tensorflow_datasets as tfds
from absl import logging as absl_logging

from epi_jax.data import download
from epi_jax.data import tasks as tasks_lib
from epi_jax.data.builder import EpiSft, builder_config
from epi_jax.utils import assets

SPLITS = ("train", "test")
DATASET_NAME = "epi_sft"


def default_data_dir() -> pathlib.Path:
  """Where the built datasets live: ``$EPI_DATA_DIR``, else ``tensorflow_datasets`` in the
  cache home (``$EPI_JAX_CACHE`` or ``~/.cache/epi_jax``; :func:`epi_jax.utils.assets.cache_home`)."""
  env = os.environ.get("EPI_DATA_DIR")
  if env:
    return pathlib.Path(env)
  return assets.cache_home() / "tensorflow_datasets"


def get_builder(task: str, data_dir=None) -> EpiSft:
  """The builder of one config, writing to/reading from ``data_dir``."""
  tasks_lib.check([task])
  # A task registered at run time is no class config: TFDS takes its config object.
  config = task if task in EpiSft.builder_configs else builder_config(task)
  return EpiSft(config=config, data_dir=str(data_dir or default_data_dir()),
                file_format="array_record")


def prepare(raw_dir=None, data_dir=None, tasks: Sequence[str] | None = None,
            verbose: bool = False, mirror: str | None = None) -> dict[str, Any]:
  """Builds the datasets (skipping those already built) and returns their stats.

  A task whose raw files are not all in the manual dir has them downloaded
  first (pinned sizes and sha256, cached; see :mod:`epi_jax.data.download`);
  every download of the call completes and verifies before anything is built.

  Args:
    raw_dir: the manual dir with the raw task files; default
      ``$EPI_RAW_DATA_DIR`` or ``../shared/data`` beside the checkout.
    data_dir: where to write; default :func:`default_data_dir`.
    tasks: configs to build; default the benchmark tasks (``tasks.TASKS``; add
      ``"lima"`` for LIMA).
    verbose: show TFDS's progress bars and log lines.
    mirror: base URL serving the raw files under their relative paths
      (default ``$EPI_DATA_MIRROR``, else the upstream URLs).

  Returns:
    ``{task: {"train": n, "test": n, "drops": {reason: n}, "seconds": s,
    "built": bool}}`` where ``built`` says whether this call built it.

  Raises:
    epi_jax.data.download.DownloadError: a raw file could not be downloaded
      or failed its checksum (the message names it).
  """
  tasks = tasks_lib.check(tasks)
  data_dir = pathlib.Path(data_dir or default_data_dir())
  manual = pathlib.Path(raw_dir) if raw_dir is not None else assets.default_raw_data_dir()
  fetch = [t for t in tasks if not download.has_raw_files(manual, t)
           and not get_builder(t, data_dir).is_prepared()]
  fetched = None
  if fetch:
    print(f"[epi_jax] raw files of {fetch} not found in {manual or '(no raw dir)'}: "
          f"downloading them into {data_dir / 'downloads'} (once)", file=sys.stderr, flush=True)
    fetched = download.download_raw_files(fetch, data_dir, mirror=mirror)
  configs = {t: tfds.download.DownloadConfig(
      manual_dir=str(fetched if t in fetch else manual) if (t in fetch or manual) else None)
             for t in tasks}
  stats = {}
  verbosity = absl_logging.get_verbosity()
  if not verbose:
    tfds.display_progress_bar(False)
    absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    for task in tasks:
      start = time.perf_counter()
      b = get_builder(task, data_dir)
      built = not b.is_prepared()
      if built:
        b.download_and_prepare(download_config=configs[task])
      stats[task] = {
          **{s: int(b.info.splits[s].num_examples) for s in SPLITS},
          "drops": dict(b.info.metadata.get("drops", {})),
          "seconds": round(time.perf_counter() - start, 3),
          "built": built,
      }
  finally:
    if not verbose:
      tfds.display_progress_bar(True)
      absl_logging.set_verbosity(verbosity)
  return stats


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_example(raw: dict[str, Any]) -> dict[str, Any]:
  """A TFDS record as plain Python: ``messages`` as a list of dicts, the task's
  fields by their kind in the registry (text: str, texts: list of str, int)."""
  kinds = tasks_lib.get(_text(raw["task"])).fields if "task" in raw else {}
  out = {}
  for key, value in raw.items():
    kind = kinds.get(key, "text")
    if key == "messages":
      out[key] = [{"role": _text(r), "content": _text(c)}
                  for r, c in zip(value["role"], value["content"])]
    elif kind == "texts":
      out[key] = [_text(o) for o in value]
    elif kind == "int":
      out[key] = int(value)
    else:
      out[key] = _text(value)
  return out


class ExampleSource:
  """A random-access, read-only sequence of decoded examples of one task and split."""

  def __init__(self, data_source, task: str, split: str):
    self._source = data_source
    self.task, self.split = task, split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"{self.task}/{self.split}: index {index} out of range ({len(self)})")
    return decode_example(self._source[index % len(self)])

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return f"ExampleSource({DATASET_NAME}/{self.task}, split={self.split!r}, n={len(self)})"


def load_examples(task: str, split: str, data_dir=None) -> ExampleSource:
  """The prepared ``task``/``split`` as a random-access source of example dicts.

  Every example has ``task``, ``id`` and ``messages`` (list of ``{'role',
  'content'}``; the last one is the assistant's reference, ``messages[:-1]`` is
  the prompt). gsm8k adds ``question`` and ``final_answer`` (string); logiqa adds
  ``context``, ``question``, ``options`` (4 strings) and ``answer`` (int);
  code_alpaca/alpaca/lima add ``instruction``, ``input``, ``output`` (the
  ``fields`` of the task's registry entry).
  """
  tasks_lib.check([task])
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; known: {list(SPLITS)}")
  data_dir = pathlib.Path(data_dir or default_data_dir())
  b = get_builder(task, data_dir)
  if not b.is_prepared():
    raise FileNotFoundError(
        f"{DATASET_NAME}/{task} is not prepared in {data_dir}: run "
        f"`epi-jax data prepare --data_dir {data_dir}` first.")
  return ExampleSource(b.as_data_source(split=split), task, split)
