"""The command line's one rule for bad input: one line on stderr naming it, exit 2.

Every ``epi-jax`` subcommand reports a bad flag, value or path with
:func:`fail` (``return fail("epi-jax train", e)``), parses its flags with
:class:`ArgumentParser` (argparse's errors in the same one-line form) or,
for absl flags, answers ``-h``/``--help`` itself (:func:`wants_help`), so that
no bad input ends in a traceback or a multi-line usage dump.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

USAGE_EXIT = 2


def one_line(msg) -> str:
  """``msg`` (a string or an exception) as one line: its non-empty lines joined."""
  text = str(msg)
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if not lines:
    return type(msg).__name__ if isinstance(msg, BaseException) else "bad input"
  return " ".join(lines)


def fail(prog: str, msg) -> int:
  """Prints ``PROG: MSG`` as one line on stderr and returns the usage exit status (2)."""
  print(f"{prog}: {one_line(msg)}", file=sys.stderr, flush=True)
  return USAGE_EXIT


def wants_help(argv: Sequence[str]) -> bool:
  """Whether ``argv`` asks for help (``-h``/``--help``/``--helpfull`` before any ``--``)."""
  for arg in argv:
    if arg == "--":
      return False
    if arg in ("-h", "--help", "--helpfull"):
      return True
  return False


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors (unknown flag, bad or missing value) are one :func:`fail` line."""

  def error(self, message: str) -> NoReturn:
    sys.exit(fail(self.prog, f"{message} (see {self.prog} --help)"))
