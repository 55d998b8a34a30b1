"""The multi-task SFT trainer (see the README's Training section).

  result = train(config, workdir)            # resumes from workdir/checkpoints
  model, tokenizer, config = load_run(workdir, snapshot=None)
"""

from epi_jax.training.config import default_config, validate
from epi_jax.training.trainer import (NonFiniteError, TrainResult, is_finished, list_snapshots,
                                      load_config, load_run, train)
from epi_jax.training.workdir import ConfigChanged, RunRefused, WorkdirLocked

__all__ = ["ConfigChanged", "NonFiniteError", "RunRefused", "TrainResult", "WorkdirLocked",
           "default_config", "is_finished", "list_snapshots", "load_config", "load_run",
           "train", "validate"]
