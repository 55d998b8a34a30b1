"""Finding nodes in nested optimizer states (chains, wrappers, NNX states),
without importing a framework: optax transformations stay framework-free."""

from __future__ import annotations

from collections.abc import Mapping


def _is_variable(x) -> bool:
  """A ``flax.nnx.Variable`` (or alike): a box whose value ``get_value()`` returns."""
  return (callable(getattr(x, "get_value", None))
          and type(x).__module__.split(".")[0] == "flax")


def find(opt_state, match) -> list:
  """The nodes of a (nested) optimizer state for which ``match`` is true,
  not looking inside them: through chains, wrappers (``isolate``,
  ``MultiSteps``, ``inject_hyperparams``) and ``flax.nnx.Optimizer`` states."""
  found = []

  def visit(x):
    if match(x):
      found.append(x)
      return
    if _is_variable(x):
      return visit(x.get_value())
    if isinstance(x, Mapping):  # dicts, flax.nnx.State
      for v in x.values():
        visit(v)
    elif isinstance(x, (tuple, list)):
      for v in x:
        visit(v)

  visit(opt_state)
  return found


def inner_nu(inner_state):
  """The second moment ``nu`` of ``isolate``'s inner optimizer (a NamedTuple
  field named ``nu``, as ``optax.scale_by_adam``'s and its wrappers' keep)."""
  found = find(inner_state, lambda x: isinstance(x, tuple) and "nu" in getattr(x, "_fields", ()))
  if len(found) != 1:
    raise ValueError(
        "importance='inner_nu' ranks the second moment `nu` of the optimizer that isolate "
        f"wraps (optax.adam, adamw, ...), and its state has {len(found) or 'no'} "
        f"{'such field' if len(found) < 2 else 'of them: wrap the one to read'}.")
  return found[0].nu
