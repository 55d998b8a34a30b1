"""``epi-jax train --config configs/NAME.py --workdir DIR [--model M] [--config.FIELD=VALUE ...]``.

Flags follow ``ml_collections.config_flags``: ``--config`` names a Python file
with ``get_config()`` (``--config=configs/tiny.py:ARG`` passes ARG to it) and
``--config.optimizer.learning_rate=1e-4`` overrides one field. ``--model
org/name[@revision]`` (or any name ``load_pretrained`` accepts) starts from that
pretrained model. Multi-host:
``--coordinator_address/--num_processes/--process_id`` start
``jax.distributed`` first; without them it is started when the environment
is a multi-process launch (SLURM ``srun``, ``mpirun``, a multi-host Cloud TPU
slice) or ``--distributed`` is given (see ``distributed.py``). When one
process fails, every process exits non-zero (``--heartbeat_timeout_s``).

Exit status: 0 when training finished, 3 when it stopped early (signal) with
a checkpoint (run the same command again to resume), 2 when it did not start
(a bad config or config file, a mesh larger than the devices, a workdir in use
by another run or holding a run with a different config; nothing in the
workdir is changed), 4 when the loss or params became non-finite (the last
finite checkpoint is kept; see ``optimizer.skip_nonfinite``).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from epi_jax.training import distributed
from epi_jax.utils.usage import fail, wants_help

USAGE = ("usage: epi-jax train --config configs/NAME.py --workdir DIR [--model M] "
         "[--stop_after N] [--allow_config_change] [--config.FIELD=VALUE ...]")


def _flag_values() -> flags.FlagValues:
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Training config file.", flag_values=fv,
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (resumes from its checkpoints).",
                      flag_values=fv)
  flags.DEFINE_integer("stop_after", None, "Stop (with a checkpoint) at this step.",
                       flag_values=fv)
  flags.DEFINE_bool("allow_config_change", False, "Resume an existing workdir although "
                    "fields safe to change (total_steps, log_every, ...) differ from its "
                    "config.json.", flag_values=fv)
  flags.DEFINE_string("model", None, "Start from this pretrained model (a known name, a "
                      "Hugging Face Hub id org/name[@revision], a .gguf file or a checkpoint "
                      "dir): sets config.model.name and config.model.init='pretrained'.",
                      flag_values=fv)
  distributed.define_flags(fv)
  return fv


def unknown_overrides(argv) -> str | None:
  """A message naming the first ``--config.FIELD`` that the trainer does not know."""
  from epi_jax.data import ALL_CONFIGS  # pylint: disable=g-import-not-at-top
  from epi_jax.training.config import default_config  # pylint: disable=g-import-not-at-top
  defaults = default_config()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node = defaults
    for i, key in enumerate(path):
      if ".".join(path[:i]) == "data.mixture":
        if key not in ALL_CONFIGS:
          return f"Unknown task {key!r} in {arg!r}; known tasks: {list(ALL_CONFIGS)}"
        break
      if ".".join(path[:i]) == "eval":
        break  # eval fields are checked by compare
      if not hasattr(node, "keys") or key not in node:
        return (f"Unknown config field {'.'.join(path[:i + 1])!r} in {arg!r}; known here: "
                f"{sorted(node.keys()) if hasattr(node, 'keys') else '(not a group)'}")
      node = node[key]
  return None


def _last_line(e: BaseException) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  return lines[-1] if lines else type(e).__name__


def parse_config_flags(fv: flags.FlagValues, argv, prog: str) -> str | None:
  """Parses ``argv`` into ``fv`` (with a ``--config`` file flag) and loads the config.

  Returns None, or a one-line message for a missing or broken config file or
  an override the config does not take.
  """
  # config_flags finds the --config.FIELD overrides in sys.argv: make it match
  # argv when called from Python (tests, notebooks).
  saved, sys.argv = sys.argv, [prog] + list(argv)
  try:
    fv(sys.argv)
  except Exception as e:  # pylint: disable=broad-except
    # A config file runs arbitrary code: whatever it raises is a bad config.
    msg = _last_line(e)
    if isinstance(e, (AttributeError, KeyError)):
      msg = f"--config override names a field the config file does not have: {msg}"
    return msg
  finally:
    sys.argv = saved
  path = fv["config"].config_filename if fv["config"].present else None
  try:
    fv.config.keys()  # a file that failed to load raises here, not at parse time
  except AttributeError:
    pass  # no --config given (fv.config is None)
  except Exception as e:  # pylint: disable=broad-except
    return f"--config {path}: {_last_line(e)}"
  return None


def train_main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  prog = "epi-jax train"
  if wants_help(argv):
    print(f"{USAGE}\n{__doc__.split(chr(10), 1)[1]}\nflags:\n{_flag_values().get_help()}")
    return 0
  bad = unknown_overrides(argv)
  if bad:
    return fail(prog, bad)
  fv = _flag_values()
  bad = parse_config_flags(fv, argv, prog)
  if bad:
    return fail(prog, bad)
  if fv.config is None or not fv.workdir:
    return fail(prog, "--config and --workdir are required (see epi-jax train --help)")
  import jax  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize_from_flags(fv)
  except ValueError as e:
    return fail(prog, e)
  from epi_jax.training import config as cfg_lib  # pylint: disable=g-import-not-at-top
  from epi_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from epi_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if fv.model:
    fv.config.model.name, fv.config.model.init = fv.model, "pretrained"
  try:
    config = cfg_lib.validate(fv.config)
  except ValueError as e:
    return fail(prog, e)
  with distributed.fail_fast():
    try:
      result = trainer.train(config, fv.workdir, stop_after=fv.stop_after,
                             allow_config_change=fv.allow_config_change)
    except workdir_lib.RunRefused as e:
      return fail(prog, e)
    except trainer.NonFiniteError as e:
      print(f"{prog}: {e}", file=sys.stderr)
      return 4
  if jax.process_index() == 0:
    state = "stopped early (run again to resume)" if result.interrupted else "finished"
    print(f"[epi_jax] {state} at step {result.step}; run dir {fv.workdir}", file=sys.stderr)
  return 3 if result.interrupted else 0


if __name__ == "__main__":
  sys.exit(train_main())
