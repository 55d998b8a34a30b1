"""Downloading the raw task files when no manual dir has them.

Every file of :data:`epi_jax.data.sources.RAW_FILES` has a pinned upstream URL,
size and sha256 (:data:`RAW_FILE_PINS`, computed from the files the project was
built with). They are fetched through TFDS's download manager, which verifies
the pins, caches each file under the data dir's ``downloads/`` (a second call
downloads nothing) and moves a file into the cache only once it is complete
and verified, so nothing partial or corrupt is ever read.

A mirror (``epi-jax data prepare --mirror URL``, ``config.data.mirror``, or
``$EPI_DATA_MIRROR``) replaces every upstream URL by ``URL/<relative path>``,
the layout of the raw dir (``gsm8k/train.jsonl``, ``logiqa2/dev.txt``, ...).
The chat task's ShareGPT file comes from its PyPI package as before.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Sequence

from epi_jax.data import sources

MIRROR_ENV = "EPI_DATA_MIRROR"
_GITHUB = "https://raw.githubusercontent.com"

# relative path -> (upstream URL, size in bytes, sha256); licenses in the README.
RAW_FILE_PINS = {
    "gsm8k/train.jsonl": (
        f"{_GITHUB}/openai/grade-school-math/master/grade_school_math/data/train.jsonl",
        4166206, "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "gsm8k/test.jsonl": (
        f"{_GITHUB}/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
        749738, "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    "codealpaca/code_alpaca_2k.json": (
        f"{_GITHUB}/sahil280114/codealpaca/master/data/code_alpaca_2k.json",
        796189, "9cb7352683bd2f530ce81eff7f8d58ccbe1a4bdf28afebbe9f80ec687256066d"),
    "codealpaca/new_codealpaca.json": (
        f"{_GITHUB}/sahil280114/codealpaca/master/data/new_codealpaca.json",
        3549564, "2c8f4bb2dbce75ecc2020ded30f0fa935b7aa89d7be0c271f4ac208062f1bcb6"),
    "logiqa2/dev.txt": (
        f"{_GITHUB}/csitfun/LogiQA2.0/main/logiqa/DATA/LOGIQA/dev.txt",
        1770764, "bbefb563b7ddc02640ccdc314c1315d5727dba48539d0ecdd126fa351e511b09"),
    "logiqa2/test.txt": (
        f"{_GITHUB}/csitfun/LogiQA2.0/main/logiqa/DATA/LOGIQA/test.txt",
        1740565, "71940b37ae0184b677c253a148d57ad4e75d6113447b1563c2ca82483e4e4f8d"),
    "alpaca/alpaca_5000.json": (
        f"{_GITHUB}/tatsu-lab/stanford_alpaca/main/data/alpaca_5000.json",
        2044701, "fc1add24c93c9fbbe585a64a6c9bf6165eb110225f4470efbff382a913558ec0"),
    "lima/lima.json": (
        f"{_GITHUB}/hiyouga/LLaMA-Factory/main/data/lima.json",
        2989075, "1d447bd5d4750e651a6e28660e452c24d18d18e10e1d334b3c8277c2aa956322"),
}


class DownloadError(RuntimeError):
  """A raw file could not be downloaded or failed its checksum (names the file)."""


def has_raw_files(raw_dir, task: str) -> bool:
  """Whether ``raw_dir`` holds every raw file of ``task``."""
  return raw_dir is not None and all(
      (pathlib.Path(raw_dir) / rel).is_file() for rel in sources.RAW_FILES.get(task, ()))


def resolve_mirror(mirror: str | None = None) -> str | None:
  """``mirror``, else ``$EPI_DATA_MIRROR``, else None (the upstream URLs)."""
  return (mirror or os.environ.get(MIRROR_ENV) or "").rstrip("/") or None


def url_of(relpath: str, mirror: str | None = None) -> str:
  mirror = resolve_mirror(mirror)
  return f"{mirror}/{relpath}" if mirror else RAW_FILE_PINS[relpath][0]


def download_raw_files(tasks: Sequence[str], data_dir, *, mirror: str | None = None
                       ) -> pathlib.Path:
  """Downloads (or finds cached) the raw files of ``tasks``.

  Returns a raw dir laid out like the manual dir (links into the download
  cache ``data_dir/downloads``), to pass as the builder's manual dir.

  Raises:
    DownloadError: naming the file and its URL, on an HTTP/network error or
      a size/sha256 mismatch; no verified file is replaced and nothing is built.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import checksums  # pylint: disable=g-import-not-at-top
  rels = [rel for t in tasks for rel in sources.RAW_FILES.get(t, ())]
  data_dir = pathlib.Path(data_dir)
  download_dir = data_dir / "downloads"
  urls = {rel: url_of(rel, mirror) for rel in rels}
  infos = {urls[rel]: checksums.UrlInfo(size=RAW_FILE_PINS[rel][1],
                                        checksum=RAW_FILE_PINS[rel][2],
                                        filename=pathlib.Path(rel).name) for rel in rels}
  manager = tfds.download.DownloadManager(download_dir=download_dir, url_infos=infos,
                                          force_checksums_validation=True)
  raw_dir = download_dir / "epi_raw"
  for rel in rels:  # one at a time: the error names the file
    try:
      path = manager.download(urls[rel])
    except Exception as e:  # pylint: disable=broad-except
      _clean_partial(download_dir)
      what = ("failed its size/sha256 check" if "wrong checksum" in str(e)
              else "could not be downloaded")
      raise DownloadError(
          f"Raw data file {rel!r} {what} (from {urls[rel]}): "
          f"{str(e).splitlines()[0][:300]}. Expected {RAW_FILE_PINS[rel][1]} bytes, "
          f"sha256 {RAW_FILE_PINS[rel][2]}. Nothing was built. Point --mirror / "
          f"${MIRROR_ENV} at a server holding the files under the same relative paths, "
          "or --raw_dir at a folder holding them.") from None
    link = raw_dir / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
      link.unlink()
    link.symlink_to(pathlib.Path(path).absolute())
  return raw_dir


def _clean_partial(download_dir: pathlib.Path) -> None:
  """Removes the download manager's temporary dirs left by a failed download."""
  if download_dir.is_dir():
    for tmp in download_dir.glob("*.tmp.*"):
      shutil.rmtree(tmp, ignore_errors=True)
