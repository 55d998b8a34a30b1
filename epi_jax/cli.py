"""The ``epi-jax`` command: one entry point, one subcommand per job.

  epi-jax generate --model smollm2-135m-instruct --prompt "..."
  epi-jax data prepare [--raw_dir DIR] [--data_dir DIR]
  epi-jax data stats
  epi-jax train --config configs/tiny.py --workdir DIR [--config.FIELD=VALUE ...]
  epi-jax compare --config configs/NAME.py --workdir DIR --methods ... --seeds N
  epi-jax compare --protocol sequential --tasks A,B --config configs/NAME.py --workdir DIR
  epi-jax verdicts DIR [DIR ...]
  epi-jax export --workdir RUN [--snapshot N] --format hf|gguf --out PATH
  epi-jax plan --config configs/NAME.py --topology v5p-8 [--methods full,epi] [--json PATH]

Subcommands import their module lazily so that ``epi-jax --help`` is fast.
"""

from __future__ import annotations

import importlib
import sys

from epi_jax.utils.usage import fail

# subcommand -> (module, function, help)
_COMMANDS = {
    "generate": ("epi_jax.model.cli", "generate_main", "generate text with a model"),
    "data": ("epi_jax.data.cli", "main", "prepare the TFDS datasets / print stats"),
    "train": ("epi_jax.training.cli", "train_main", "train one run from a config"),
    "compare": ("epi_jax.experiments.cli", "compare_main", "compare methods end to end"),
    "evaluate": ("epi_jax.experiments.cli", "evaluate_main", "evaluate a checkpoint"),
    "verdicts": ("epi_jax.experiments.cli", "verdicts_main", "print a comparison's verdicts"),
    "export": ("epi_jax.training.export", "export_main",
               "export a run as a Hugging Face checkpoint or a GGUF"),
    "plan": ("epi_jax.training.plan", "plan_main",
             "compile the train step for a TPU topology: HBM, cost, collectives"),
}


def _usage() -> str:
  lines = ["usage: epi-jax COMMAND [ARGS...]", "", "commands:"]
  lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in _COMMANDS.items()]
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in _COMMANDS:
    return fail("epi-jax", f"unknown command {name!r}; commands: {', '.join(_COMMANDS)} "
                "(see epi-jax --help)")
  module, func, _ = _COMMANDS[name]
  try:
    fn = getattr(importlib.import_module(module), func)
  except (ImportError, AttributeError) as e:
    return fail(f"epi-jax {name}", f"not available in this build ({e})")
  result = fn(rest)
  return int(result or 0)


if __name__ == "__main__":
  sys.exit(main())
