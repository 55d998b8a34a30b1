"""Multi-task SFT data: the task registry, the ``epi_sft`` TFDS datasets, the pipeline.

A face over the modules that do the work (importing it registers the TFDS
builder ``epi_sft``, one config per task):

* :mod:`~epi_jax.data.tasks`: the task registry; :data:`TASKS` (the five
  benchmark tasks, the default mixture) and :data:`ALL_CONFIGS` (every task; a
  token's task id is its index here) are live views of it.
* :mod:`~epi_jax.data.datasets`: :func:`prepare` builds the datasets,
  :func:`load_examples` reads a split as plain Python example dicts.
* :mod:`~epi_jax.data.sources` / :mod:`~epi_jax.data.sharegpt`: the readers of
  the raw files; :mod:`~epi_jax.data.builder`: the TFDS builder;
  :mod:`~epi_jax.data.download`: pinned downloads of the raw files.
* :mod:`~epi_jax.data.pipeline`: the training input pipeline.
"""

from epi_jax.data.builder import MANUAL_DOWNLOAD_INSTRUCTIONS, EpiSft
from epi_jax.data.datasets import (DATASET_NAME, SPLITS, ExampleSource, decode_example,
                                   default_data_dir, get_builder, load_examples, prepare)
from epi_jax.data.tasks import (ALL_CONFIGS, TASKS, RawFile, TaskSpec, register_task,
                                unregister_task)

__all__ = [
    "TASKS", "ALL_CONFIGS", "SPLITS", "DATASET_NAME", "EpiSft", "MANUAL_DOWNLOAD_INSTRUCTIONS",
    "RawFile", "TaskSpec", "default_data_dir", "prepare", "load_examples", "decode_example",
    "ExampleSource", "get_builder", "register_task", "unregister_task",
]
