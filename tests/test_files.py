"""epi_jax.utils.files: atomic writes and JSON-lines reads."""

import json

import pytest

from epi_jax.utils import files


def test_atomic_json_write_replaces_and_leaves_no_tmp(tmp_path):
  path = tmp_path / "sub" / "a.json"
  files.write_json_atomic(path, {"b": (1, 2), "a": 1})
  files.write_json_atomic(path, {"c": 3})
  assert json.loads(path.read_text()) == {"c": 3}
  assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_read_jsonl_skips_blank_lines_and_names_a_bad_line(tmp_path):
  path = tmp_path / "m.jsonl"
  assert files.read_jsonl(path) == []
  path.write_text('{"step": 1}\n\n{"step": 2}\n')
  assert files.read_jsonl(path) == [{"step": 1}, {"step": 2}]
  path.write_text('{"step": 1}\n{"step": \n')
  with pytest.raises(ValueError, match=r"m\.jsonl:2: not JSON"):
    files.read_jsonl(path)
