"""The ``epi_sft`` TFDS builder: one config per task, ``train`` and ``test`` splits.

Its configs, features, descriptions and readers come from the task registry
(:mod:`epi_jax.data.tasks`): the built-in tasks are the class's
``BUILDER_CONFIGS``; a task registered at run time gets a config of the same
form (:func:`builder_config`). Built in the ``array_record`` file format, so
neither building nor reading needs TensorFlow (read with
``builder.as_data_source``). The raw files come from the manual dir:
``download_config.manual_dir`` when it exists and is not empty, else
``$EPI_RAW_DATA_DIR``, else ``../shared/data`` beside the checkout; the chat
config needs none (see :func:`usable_manual_dir`). Records dropped by the documented
filters (see :mod:`epi_jax.data.sources`) are counted per reason in the
dataset's metadata (``metadata.json``, key ``drops``).
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from epi_jax.data import tasks as tasks_lib
from epi_jax.utils import assets

MANUAL_DOWNLOAD_INSTRUCTIONS = tasks_lib.manual_download_instructions()

_TEXT = tfds.features.Text
_MESSAGES = tfds.features.Sequence({"role": _TEXT(), "content": _TEXT()})
# The TFDS feature of each registry field kind (tasks.FIELD_KINDS).
_FEATURE_OF_KIND = {
    "text": _TEXT,
    "texts": lambda: tfds.features.Sequence(_TEXT()),
    "int": lambda: tfds.features.Scalar(np.int32),
}


def features(task: str) -> tfds.features.FeaturesDict:
  """The features of a task's examples: the common ones, then the spec's ``fields``."""
  fields = {name: _FEATURE_OF_KIND[kind]() for name, kind in tasks_lib.get(task).fields.items()}
  return tfds.features.FeaturesDict(
      {"task": _TEXT(), "id": _TEXT(), "messages": _MESSAGES, **fields})


def builder_config(task: str) -> tfds.core.BuilderConfig:
  return tfds.core.BuilderConfig(name=task, description=tasks_lib.get(task).description)


def resolve_raw_dir(raw_dir=None) -> pathlib.Path:
  """The raw dir: ``raw_dir``, else ``$EPI_RAW_DATA_DIR`` / ``../shared/data``."""
  if raw_dir is not None:
    return pathlib.Path(raw_dir)
  found = assets.default_raw_data_dir()
  if found is None:
    raise FileNotFoundError(
        "No raw data dir: pass --raw_dir or set $EPI_RAW_DATA_DIR.\n"
        + tasks_lib.manual_download_instructions())
  return found


def usable_manual_dir(dl_manager) -> pathlib.Path | None:
  """The download config's manual dir if it exists and holds something, else None.

  Never TFDS's ``dl_manager.manual_dir`` unguarded: it raises an AssertionError
  (a traceback) for a missing or empty dir, and with no manual dir configured
  it stands for ``DATA_DIR/downloads/manual``, which a fresh machine lacks. The
  chat task needs no manual dir at all (ShareGPT comes from its package), and
  the tasks with raw files name what is missing themselves
  (:func:`resolve_raw_dir`, :func:`epi_jax.data.sources.raw_path`).
  """
  try:
    manual = dl_manager.manual_dir
  except AssertionError:  # missing or empty (TFDS's check), or no manual dir enabled
    return None
  return pathlib.Path(manual) if manual is not None and pathlib.Path(manual).is_dir() else None


class EpiSft(tfds.core.GeneratorBasedBuilder):
  """Multi-task SFT conversations: one config per task."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [builder_config(name) for name in tasks_lib.names()]

  def _info(self) -> tfds.core.DatasetInfo:
    task = self.builder_config.name
    # DatasetInfo directly: dataset_info_from_configs wants a checksums/metadata
    # folder beside the module, which this package does not ship.
    return tfds.core.DatasetInfo(
        builder=self,
        description=tasks_lib.get(task).description,
        features=features(task),
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/",
    )

  def _split_generators(self, dl_manager):
    spec = tasks_lib.get(self.builder_config.name)
    manual = usable_manual_dir(dl_manager)
    # A task without raw files finds its data itself (chat: its PyPI package,
    # unless the manual dir holds a copy), so it builds without any manual dir.
    # A task with raw files falls back to $EPI_RAW_DATA_DIR / ../shared/data;
    # a missing dir or file is a FileNotFoundError naming it.
    raw_dir = resolve_raw_dir(manual) if spec.raw_files else manual
    splits, drops = spec.read(raw_dir)
    self.info.metadata["drops"] = {k: int(v) for k, v in sorted(drops.items())}
    return {split: self._generate_examples(items) for split, items in splits.items()}

  def _generate_examples(self, items):
    yield from items
