"""Docs that the code points at exist in the repository."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
# A document named in code: an upper-case name (METHOD.md) or a path under docs/.
# Lower-case names such as results.md are files that runs write.
_DOC = re.compile(r"\b((?:docs/)?[A-Z][A-Z_]*\.md|docs/[\w/-]+\.md)\b")


def test_every_document_named_in_the_code_exists():
  missing = []
  for path in sorted((REPO / "epi_jax").rglob("*.py")) + sorted((REPO / "benchmarks").glob("*.py")):
    for name in set(_DOC.findall(path.read_text())):
      if not any((REPO / d / name).is_file() for d in ("", "docs")):
        missing.append(f"{path.relative_to(REPO)}: {name}")
  assert not missing, missing


def test_architecture_page_names_existing_folders():
  text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
  folders = set(re.findall(r"`(epi_jax/[\w/]+/)`", text))
  assert {"epi_jax/method/", "epi_jax/model/", "epi_jax/data/", "epi_jax/training/",
          "epi_jax/scoring/", "epi_jax/experiments/"} <= folders
  for f in folders:
    assert (REPO / f).is_dir(), f
  for module in re.findall(r"`(epi_jax/[\w/]+\.py)`", text):
    assert (REPO / module).is_file(), module
