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
  nor any other part of epi_jax (sharding, model, data, training, scoring, experiments)."""
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


# The floors, lowest first: a module imports only floors below its own (and its own package).
# training and scoring share a floor and import neither each other nor anything above.
_FLOORS = (
    ("epi_jax.utils",),
    ("epi_jax.method",),
    ("epi_jax",),  # the package: re-exports method
    ("epi_jax.sharding",),
    ("epi_jax.model",),
    ("epi_jax.data",),
    ("epi_jax.training", "epi_jax.scoring"),
    ("epi_jax.experiments", "epi_jax.integrations"),
    ("epi_jax.cli",),
)


def _package(module: str) -> str:
  """The unit of a floor that ``module`` belongs to (``epi_jax.model.setup`` -> ``epi_jax.model``)."""
  parts = module.split(".")
  return ".".join(parts[:2])


def _floor(package: str) -> int:
  return next(i for i, names in enumerate(_FLOORS) if package in names)


def _is_entry_point(module: str) -> bool:
  """A subcommand's module (``epi_jax.<pkg>.cli``): only ``epi_jax.cli`` and other
  entry points import it, so it may import any floor (``epi-jax generate --workdir``
  reads a run)."""
  return module == "epi_jax.cli" or module.endswith(".cli")


def test_every_package_has_a_floor():
  assert {_package(m) for m in _modules()} == {p for names in _FLOORS for p in names}


def test_imports_run_down_the_floors_only():
  """Nothing imports a floor above its own or a sibling package on its floor: in
  particular scoring never imports training or experiments, and model never
  imports training."""
  modules = _modules()
  bad = []
  for m, path in modules.items():
    own = _package(m)
    for n in _imports(path, modules):
      other = _package(n)
      if _is_entry_point(n) and not _is_entry_point(m):
        bad.append(f"{m} -> {n} (an entry point)")
      elif other != own and not _is_entry_point(m) and _floor(other) >= _floor(own):
        bad.append(f"{m} -> {n}")
  assert not bad, bad


def test_scoring_never_imports_training_or_experiments():
  """Named on its own since the issue asked for it: scoring stands on model, data and method."""
  bad = {}
  for path in (REPO / "epi_jax" / "scoring").glob("*.py"):
    wrong = sorted(n for n in _all_imports(path)
                   if n.startswith(("epi_jax.training", "epi_jax.experiments")))
    if wrong:
      bad[path.name] = wrong
  assert not bad, bad
