"""Parsed GGUF files, kept per process (``gguf_reader``).

Parsing a GGUF's metadata (SmolLM2's 49k-token vocabulary) takes ~10 s on a
2-core CPU, and a comparison opens the same file for every run and every
evaluation: the reader is kept for the file's path, size and mtime.
"""

from __future__ import annotations

import functools
import pathlib


def gguf_reader(path):
  """A ``gguf.GGUFReader`` of ``path`` (a read-only memmap), parsed once per
  version of the file (a rewritten file is read again)."""
  path = pathlib.Path(path).resolve()
  st = path.stat()
  return _reader(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int):
  del size, mtime_ns  # part of the key only
  import gguf  # pylint: disable=g-import-not-at-top
  return gguf.GGUFReader(path)
