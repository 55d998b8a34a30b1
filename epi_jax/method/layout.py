"""The static layout EPI sees: per leaf, its layer axis and eligible slices.

A leaf is one layer, or with ``layer_axes`` a stack of layers along one axis
whose slices are each treated as a layer of their own.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from epi_jax.method.options import EPIOptions


def path_str(path) -> str:
  """'a/b/0/kernel' for a jax key path: what ``eligible`` predicates receive."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def can_isolate(dtype) -> bool:
  """Whether leaves of ``dtype`` can be isolated at all: float or complex.

  Int and bool leaves (step counters, flags that optax users keep in their
  trees) never are, and do not count in N_eligible.
  """
  return jnp.issubdtype(dtype, jnp.inexact)


class Leaf(NamedTuple):
  """Static facts of one leaf: its layer axis and per-slice eligibility."""
  axis: Optional[int]          # None: the whole leaf is one layer
  eligible: tuple[bool, ...]   # one per slice along `axis` (one if axis is None)
  shape: tuple[int, ...]

  @property
  def any_eligible(self) -> bool:
    return any(self.eligible)

  @property
  def slice_size(self) -> int:
    n = 1
    for i, d in enumerate(self.shape):
      if i != self.axis:
        n *= d
    return n

  @property
  def num_eligible(self) -> int:
    return sum(self.eligible) * self.slice_size

  def broadcast(self, values) -> jax.Array:
    """Per-slice values ``[L]`` shaped to broadcast against the leaf."""
    v = jnp.asarray(values)
    if self.axis is None:
      return v.reshape(())
    return jnp.expand_dims(v, [a for a in range(len(self.shape)) if a != self.axis])

  @property
  def reduce_axes(self) -> Optional[tuple[int, ...]]:
    """Axes a per-slice reduction runs over (None: all, keeping no axis)."""
    if self.axis is None:
      return None
    return tuple(a for a in range(len(self.shape)) if a != self.axis)


def _num_positional(fn) -> int:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return 1
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return 2
  return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _per_leaf(value, tree, what: str, callable_fn) -> list:
  """``value`` as a list over ``tree``'s leaves: a matching pytree or a callable."""
  if callable(value) and not isinstance(value, (dict, list, tuple)):
    return [callable_fn(path_str(p), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  treedef = jax.tree.structure(tree)
  try:
    # None is a leaf here (it is an empty subtree for jax.tree.structure).
    leaves = treedef.flatten_up_to(value)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{what} does not match the params: expected a pytree with structure "
        f"{treedef}, got {jax.tree.structure(value)}.") from e
  return leaves


def leaf_layout(options: EPIOptions, tree) -> list[Leaf]:
  """The static layout of ``tree`` (params, grads or importance): leaves of a
  dtype that ``can_isolate`` rejects are ineligible whatever ``eligible`` says."""
  shapes = [tuple(x.shape) for x in jax.tree.leaves(tree)]
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  if options.layer_axes is None:
    axes = [None] * len(shapes)
  else:
    axes = _per_leaf(options.layer_axes, tree, "layer_axes",
                     lambda path, x: options.layer_axes(path, tuple(x.shape)))
  norm_axes = []
  for path, shape, axis in zip(paths, shapes, axes):
    if axis is not None:
      if isinstance(axis, bool) or not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
        raise ValueError(f"layer_axes of {path!r} (shape {shape}) is {axis!r}: expected None "
                         f"or an int axis in [{-len(shape)}, {len(shape)}).")
      axis %= len(shape)
    norm_axes.append(axis)

  e = options.eligible
  if e is None:
    elig = [(True,) * (shape[a] if a is not None else 1) for shape, a in zip(shapes, norm_axes)]
  elif callable(e) and not isinstance(e, (dict, list, tuple)):
    two = _num_positional(e) >= 2
    elig = []
    for path, shape, a in zip(paths, shapes, norm_axes):
      layers = range(shape[a]) if a is not None else [None]
      elig.append(tuple(bool(e(path, l)) if two else bool(e(path)) for l in layers))
  else:
    leaves = _per_leaf(e, tree, "eligible", None)
    for leaf in leaves:
      if not isinstance(leaf, (bool, jnp.bool_)) and not (
          hasattr(leaf, "dtype") and leaf.shape == () and leaf.dtype == bool):
        raise ValueError(f"eligible leaves must be Python bools, got {leaf!r}.")
    elig = [(bool(b),) * (shape[a] if a is not None else 1)
            for b, shape, a in zip(leaves, shapes, norm_axes)]
  elig = [el if can_isolate(x.dtype) else (False,) * len(el)
          for el, x in zip(elig, jax.tree.leaves(tree))]
  return [Leaf(a, el, s) for a, el, s in zip(norm_axes, elig, shapes)]


def eligible_mask(leaf: Leaf) -> Any:
  """True (all slices eligible) or a bool array broadcasting over the leaf."""
  if all(leaf.eligible):
    return True
  return leaf.broadcast(jnp.asarray(leaf.eligible))
