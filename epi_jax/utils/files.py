"""Small file I/O shared by training and evaluation: atomic writes, JSON lines.

An atomic write goes to ``PATH.tmp`` and is renamed over ``PATH``, so a
reader (or a run killed mid-write) never sees a half-written file.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any


def write_text_atomic(path, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (creating its folder)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def write_json_atomic(path, obj: Any, *, indent: int | None = 2) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (sorted keys; sequences as lists)."""
  write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True, default=list))


def read_jsonl(path) -> list[dict[str, Any]]:
  """The objects of a JSON-lines file; ``[]`` when it does not exist.

  Raises:
    ValueError: a line is not JSON (names the file and the line number).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return []
  rows = []
  for i, line in enumerate(path.read_text().splitlines()):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from e
  return rows
