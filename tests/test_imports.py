"""No import cycle inside epi_jax: imports run one way (function-local ones count too)."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in (REPO / "epi_jax").rglob("*.py"):
    parts = path.relative_to(REPO).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(path: pathlib.Path, modules) -> set[str]:
  """The epi_jax modules ``path`` imports anywhere (``from pkg import mod`` names mod)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        found.add(sub if sub in modules else node.module)
  return {m for m in found if m in modules}


def test_no_import_cycles():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  cycles, state = [], {}  # state: 1 on the current path, 2 done

  def visit(m, path):
    state[m] = 1
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        cycles.append(path[path.index(n):] + [n])
      elif n not in state:
        visit(n, path + [n])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, [" -> ".join(c) for c in cycles]
