"""The README's usage snippet runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
  text = README.read_text()
  first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
  commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
  assert commands == ["make demo", "make test"]


def test_readme_python_snippet_runs(capsys):
  text = README.read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python snippet"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out.split()
  assert int(out[0]) >= 1 and 0 < float(out[1]) <= 0.011
