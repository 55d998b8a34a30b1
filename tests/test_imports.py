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


def _all_imports(path: pathlib.Path) -> set[str]:
  """Every module name ``path`` imports (``from a.b import c`` gives a.b and a.b.c)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      found |= {f"{node.module}.{a.name}" for a in node.names}
  return found


def test_method_imports_no_framework_and_nothing_above_it():
  """optax transformations stay framework-free: method/ imports neither flax
  nor any other part of epi_jax (training, model, data, evaluation)."""
  bad = {}
  for path in (REPO / "epi_jax" / "method").glob("*.py"):
    names = _all_imports(path)
    wrong = sorted(n for n in names if n.split(".")[0] == "flax"
                   or (n.startswith("epi_jax.") and not n.startswith("epi_jax.method")))
    if wrong:
      bad[path.name] = wrong
  assert not bad, bad


def test_no_private_name_of_method_used_outside_its_module():
  """``mod._name`` or ``from epi_jax.method.mod import _name``, for a module of
  method/, only inside that module: in the package, the benchmarks and the tests."""
  method_modules = {p.stem for p in (REPO / "epi_jax" / "method").glob("*.py")} - {"__init__"}
  uses = []
  for path in [*(REPO / "epi_jax").rglob("*.py"), *(REPO / "benchmarks").glob("*.py"),
               *(REPO / "tests").glob("*.py")]:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("epi_jax.method."):
        owner = node.module.rsplit(".", 1)[1]
        uses += [(path.name, f"{owner}.{a.name}") for a in node.names
                 if a.name.startswith("_") and path.stem != owner]
      elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
            and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
            and node.value.id in method_modules and path.stem != node.value.id):
        uses.append((path.name, f"{node.value.id}.{node.attr}"))
  assert not uses, sorted(set(uses))
