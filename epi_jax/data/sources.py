"""Readers that turn the raw task files into conversation examples.

A reader ``read_x(raw_dir, files, task)`` takes the raw dir, the task's raw
file paths relative to it (in the order of its entry in
:mod:`epi_jax.data.tasks`) and the task name, and returns ``(splits, drops)``:
``splits`` maps ``'train'``/``'test'`` to lists of ``(key, example)`` and
``drops`` counts the records left out, by reason. Every example holds ``task``, ``id`` and
``messages`` (a list of ``{'role', 'content'}`` dicts ending with the
assistant's reference answer, so ``messages[:-1]`` is the prompt) plus the
task's evaluation fields. Pure Python: no TFDS, no tokenizer.

Documented filters (counted in ``drops``):

* ``missing_field``: a required field is absent or not a string/list.
* ``empty``: the prompt or the answer is empty after stripping whitespace.
* ``broken_utf8``: the text holds bytes that are not valid UTF-8 (read with
  ``surrogateescape``, so one bad record does not sink the file) or lone
  surrogate escapes.
* ``duplicate``: an exact duplicate (same prompt fields) of an earlier record.
* ``bad_answer`` (gsm8k): no ``#### <number>`` final answer.
* ``test_passage_in_train`` (logiqa): a dev (train) record whose passage also
  occurs in test.
* chat only: see :mod:`epi_jax.data.sharegpt`.

Held-out splits of code_alpaca and alpaca are chosen by a stable hash of the
prompt (instruction + input), so exact duplicates always fall on one side.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import re
from typing import Any, Sequence

Example = dict[str, Any]
Splits = dict[str, list[tuple[str, Example]]]

# Percent of unique prompts held out as test for the tasks without an official split.
HELD_OUT_PERCENT = 5

_CALC = re.compile(r"<<[^<>]*>>")
_SURROGATE = re.compile("[\ud800-\udfff]")
LOGIQA_LETTERS = "ABCD"


class Drops(collections.Counter):
  """Counts of dropped records by reason."""


def stable_hash(text: str) -> int:
  """A process-independent 64-bit hash (Python's ``hash`` is salted)."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def is_held_out(text: str, percent: int = HELD_OUT_PERCENT) -> bool:
  return stable_hash(text) % 100 < percent


def raw_path(raw_dir: os.PathLike | str, relpath: str) -> pathlib.Path:
  """The raw file, or a FileNotFoundError that names it and where it is expected."""
  path = pathlib.Path(raw_dir) / relpath
  if not path.is_file():
    raise FileNotFoundError(
        f"Raw data file {relpath!r} not found: expected at {path}. Point --raw_dir "
        "(or $EPI_RAW_DATA_DIR) at the folder holding the raw task files; see "
        "epi_jax.data.builder.MANUAL_DOWNLOAD_INSTRUCTIONS for the upstream sources.")
  return path


def read_text(path: pathlib.Path) -> str:
  # surrogateescape keeps invalid bytes as lone surrogates: the records holding
  # them are dropped as broken_utf8 instead of failing the whole file.
  return path.read_bytes().decode("utf-8", errors="surrogateescape")


def has_broken_text(*texts: str) -> bool:
  return any(_SURROGATE.search(t) for t in texts)


def _load_json_list(path: pathlib.Path) -> list[Any]:
  """The records of a JSON list file; a file that does not parse is an error naming it."""
  text = read_text(path)
  if not text.strip():
    raise ValueError(f"{path}: the file is empty (expected a JSON list of records)")
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}; "
                     "truncated or damaged?): re-download it") from None
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
  return data


def _load_jsonl(path: pathlib.Path, drops: Drops) -> list[Any]:
  """The records of a JSON-lines file. Lines that do not parse are dropped as
  ``bad_json``; a file with no parseable line at all is an error naming it."""
  records, first_bad = [], None
  for lineno, line in enumerate(read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      drops["bad_json"] += 1
      first_bad = first_bad or (lineno, e.msg)
  if not records:
    where = (f"line {first_bad[0]} ({first_bad[1]}) is not JSON and no line is" if first_bad
             else "the file is empty")
    raise ValueError(f"{path}: {where} (expected one JSON record per line)")
  return records


def _strings(record: Any, fields: tuple[str, ...]) -> tuple[str, ...] | str:
  """The fields as strings, or the drop reason."""
  if not isinstance(record, dict) or any(not isinstance(record.get(f), str) for f in fields):
    return "missing_field"
  values = tuple(record[f] for f in fields)
  if has_broken_text(*values):
    return "broken_utf8"
  return values


def _chat(user: str, assistant: str) -> list[dict[str, str]]:
  return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def instruction_prompt(instruction: str, input_text: str) -> str:
  """The user turn of an Alpaca-style record: the instruction, then the input if any."""
  instruction, input_text = instruction.strip(), input_text.strip()
  return f"{instruction}\n\n{input_text}" if input_text else instruction


# ----------------------------------------------------------------------------- gsm8k


def gsm8k_final_answer(answer: str) -> str | None:
  """The number after ``####`` with thousands separators removed, or None."""
  if "####" not in answer:
    return None
  final = answer.rsplit("####", 1)[1].strip().replace(",", "")
  return final or None


def _train_test(files: Sequence[str], task: str) -> tuple[str, str]:
  if len(files) != 2:
    raise ValueError(f"task {task!r}: expected two raw files (train, test), got {list(files)}")
  return files[0], files[1]


def read_gsm8k(raw_dir, files: Sequence[str], task: str = "gsm8k") -> tuple[Splits, Drops]:
  """Official train/test (``files``: train, test). The reference answer keeps the
  reasoning and the final ``#### <number>`` line; the ``<<a*b=c>>`` calculator
  markup is removed."""
  drops = Drops()
  splits: Splits = {}
  for split, relpath in zip(("train", "test"), _train_test(files, task)):
    out = []
    for i, record in enumerate(_load_jsonl(raw_path(raw_dir, relpath), drops)):
      values = _strings(record, ("question", "answer"))
      if isinstance(values, str):
        drops[values] += 1
        continue
      question, answer = (v.strip() for v in values)
      if not question or not answer:
        drops["empty"] += 1
        continue
      final = gsm8k_final_answer(answer)
      if final is None:
        drops["bad_answer"] += 1
        continue
      reference = _CALC.sub("", answer)
      out.append((f"{split}-{i:05d}", {
          "task": task, "id": f"{task}-{split}-{i:05d}",
          "messages": _chat(question, reference),
          "question": question, "final_answer": final,
      }))
    splits[split] = out
  return splits, drops


# ----------------------------------------------------------------------------- logiqa


def normalize_passage(text: str) -> str:
  """Lower-case letters and digits only: passages equal up to spacing/punctuation match."""
  return re.sub(r"[^0-9a-z]", "", text.lower())


def logiqa_prompt(context: str, question: str, options: list[str]) -> str:
  lines = [f"Passage: {context}", f"Question: {question}"]
  lines += [f"{LOGIQA_LETTERS[i]}. {o}" for i, o in enumerate(options)]
  lines.append("Answer with the letter of the correct option.")
  return "\n".join(lines)


def logiqa_answer(answer: int, options: list[str]) -> str:
  return f"{LOGIQA_LETTERS[answer]}. {options[answer].strip()}"


def read_logiqa(raw_dir, files: Sequence[str], task: str = "logiqa") -> tuple[Splits, Drops]:
  """LogiQA 2.0 (``files``: dev, test): dev as train, test as test; train records whose passage
  (``text``) also occurs in test are dropped. The reference answer is
  ``"<letter>. <option text>"``. Passages are compared after
  :func:`normalize_passage`."""
  drops = Drops()
  parsed = {}
  for split, relpath in zip(("train", "test"), _train_test(files, task)):
    out = []
    for i, record in enumerate(_load_jsonl(raw_path(raw_dir, relpath), drops)):
      values = _strings(record, ("text", "question"))
      options = record.get("options") if isinstance(record, dict) else None
      answer = record.get("answer") if isinstance(record, dict) else None
      if (isinstance(values, str) or not isinstance(options, list) or len(options) != 4
          or not all(isinstance(o, str) for o in options) or isinstance(answer, bool)
          or not isinstance(answer, int)):
        drops[values if values == "broken_utf8" else "missing_field"] += 1
        continue
      if has_broken_text(*options):
        drops["broken_utf8"] += 1
        continue
      context, question = (v.strip() for v in values)
      if not context or not question or not all(o.strip() for o in options):
        drops["empty"] += 1
        continue
      if not 0 <= answer < 4:
        drops["bad_answer"] += 1
        continue
      out.append((f"{split}-{i:05d}", {
          "task": task, "id": f"{task}-{split}-{record.get('id', i)}",
          "messages": _chat(logiqa_prompt(context, question, options),
                            logiqa_answer(answer, options)),
          "context": context, "question": question,
          "options": [o.strip() for o in options], "answer": answer,
      }))
    parsed[split] = out
  test_passages = {normalize_passage(ex["context"]) for _, ex in parsed["test"]}
  train = []
  for key, ex in parsed["train"]:
    if normalize_passage(ex["context"]) in test_passages:
      drops["test_passage_in_train"] += 1
    else:
      train.append((key, ex))
  splits = {"train": _dedup(train, drops), "test": _dedup(parsed["test"], drops)}
  return splits, drops


def _dedup(items, drops: Drops):
  seen, out = set(), []
  for key, ex in items:
    sig = json.dumps(ex["messages"], sort_keys=True)
    if sig in seen:
      drops["duplicate"] += 1
      continue
    seen.add(sig)
    out.append((key, ex))
  return out


# ----------------------------------------------------------------------------- alpaca-style


def read_instructions(raw_dir, files: Sequence[str], task: str) -> tuple[Splits, Drops]:
  """Alpaca-format JSON lists (code_alpaca, alpaca), deduplicated by
  instruction+input (first kept), split by a stable hash of the prompt
  (``HELD_OUT_PERCENT`` percent test)."""
  drops = Drops()
  seen: set[str] = set()
  splits: Splits = {"train": [], "test": []}
  for relpath in files:
    stem = pathlib.Path(relpath).stem
    for i, record in enumerate(_load_json_list(raw_path(raw_dir, relpath))):
      values = _strings(record, ("instruction", "output"))
      if isinstance(values, str):
        drops[values] += 1
        continue
      input_text = record.get("input", "")
      if not isinstance(input_text, str):
        drops["missing_field"] += 1
        continue
      if has_broken_text(input_text):
        drops["broken_utf8"] += 1
        continue
      instruction, output = values[0].strip(), values[1].strip()
      if not instruction or not output:
        drops["empty"] += 1
        continue
      prompt = instruction_prompt(instruction, input_text)
      if prompt in seen:
        drops["duplicate"] += 1
        continue
      seen.add(prompt)
      split = "test" if is_held_out(prompt) else "train"
      key = f"{stem}-{i:05d}"
      splits[split].append((key, {
          "task": task, "id": f"{task}-{key}",
          "messages": _chat(prompt, output),
          "instruction": instruction, "input": input_text.strip(), "output": output,
      }))
  return splits, drops


def read_lima(raw_dir, files: Sequence[str], task: str = "lima") -> tuple[Splits, Drops]:
  """LIMA (one JSON list): ``history`` turns then the final instruction/output;
  hash-split like alpaca."""
  if len(files) != 1:
    raise ValueError(f"task {task!r}: expected one raw file, got {list(files)}")
  drops = Drops()
  seen: set[str] = set()
  splits: Splits = {"train": [], "test": []}
  for i, record in enumerate(_load_json_list(raw_path(raw_dir, files[0]))):
    values = _strings(record, ("instruction", "output"))
    history = record.get("history") or [] if isinstance(record, dict) else None
    if isinstance(values, str) or not isinstance(history, list) or not all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(t, str) for t in h)
        for h in history):
      drops[values if values == "broken_utf8" else "missing_field"] += 1
      continue
    turns = [t for h in history for t in h] + [
        instruction_prompt(values[0], record.get("input") or ""), values[1]]
    turns = [t.strip() for t in turns]
    if has_broken_text(*turns):
      drops["broken_utf8"] += 1
      continue
    if not all(turns):
      drops["empty"] += 1
      continue
    messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t}
                for j, t in enumerate(turns)]
    sig = json.dumps(turns[:-1])
    if sig in seen:
      drops["duplicate"] += 1
      continue
    seen.add(sig)
    split = "test" if is_held_out(sig) else "train"
    key = f"{task}-{i:05d}"
    splits[split].append((key, {
        "task": task, "id": key, "messages": messages,
        "instruction": turns[-2], "input": "", "output": turns[-1],
    }))
  return splits, drops

