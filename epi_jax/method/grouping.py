"""Leaves with slices of one shape, stacked into groups for the refresh's search.

The refresh's bisection (``selection``) counts every score in each of its 31
passes; with one array per leaf its loop body holds one count per leaf, and
XLA's compile time grows with that (SmolLM2-135M unscanned: 272 leaves). Its
leaves have only a few distinct shapes (every block's q kernel, k kernel, ...),
so the search runs on one stacked array per group instead: one count per group
in the loop body. Results are unchanged: the search counts exactly (integers),
and per-slice thresholds are split back per leaf.

A group stacks its leaves' slices along one layer axis: an unstacked leaf is
one slice, a stacked leaf (``layer_axes``) contributes all of its slices, so a
group is itself a stacked leaf (``Leaf``), searched as one. Stacks are built
inside the refresh branch only (once every T steps), and each group stays below
``MAX_GROUP`` entries, so every count fits int32 (``selection.count_true``).

Sharding: leaves are grouped only with leaves whose sharding matches where the
tracer shows it (explicit mesh axes). Under automatic sharding it does not, and
two equal-shape leaves sharded differently (e.g. a q kernel ``(embed, heads)``
and an o kernel ``(heads, embed)``) are resharded into their stack at each
refresh (a collective, no gather of the whole model).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from epi_jax.method.layout import Leaf

MAX_GROUP = 2**31 - 1  # entries per stacked group: its counts stay int32


class Group(NamedTuple):
  """Leaves ``members`` (indices into the layout) stacked along ``leaf.axis``."""
  members: tuple[int, ...]
  leaf: Leaf


def _slices(leaf: Leaf) -> int:
  return 1 if leaf.axis is None else leaf.shape[leaf.axis]


def _spec(x: jax.Array):
  """The PartitionSpec the tracer shows (explicit mesh axes), else None."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return None if spec is None else tuple(spec)


def _buckets(items) -> list[tuple[int, ...]]:
  """Indices with equal keys, ``items`` being ``(index, key, entries)``: buckets
  of at most ``MAX_GROUP`` entries (read at call time: 1 puts every index in a
  bucket of its own, which the tests compare against), ordered by first index."""
  open_, out = {}, []
  for i, key, n in items:
    members, total = open_.get(key, ((), 0))
    if members and total + n > MAX_GROUP:
      out.append(members)
      members, total = (), 0
    open_[key] = (members + (i,), total + n)
  out.extend(m for m, _ in open_.values())
  return sorted(out)


def make_groups(layout: list[Leaf], arrays: dict[int, jax.Array]) -> list[Group]:
  """Groups of the leaves ``arrays`` (``{layout index: array}``): equal slice
  shape, layer axis position, dtype and visible sharding."""
  def key(i, x):
    leaf = layout[i]
    slice_shape = tuple(d for a, d in enumerate(leaf.shape) if a != leaf.axis)
    spec = _spec(x)
    if spec is not None:  # (the layer axis's, the slice's): unstacked leaves have None
      spec = list(spec) + [None] * (len(leaf.shape) - len(spec))
      spec = (None, tuple(spec)) if leaf.axis is None else (
          spec.pop(leaf.axis), tuple(spec))
    return (0 if leaf.axis is None else leaf.axis, slice_shape, jnp.dtype(x.dtype), spec)
  out = _buckets((i, key(i, x), x.size) for i, x in arrays.items())
  groups = []
  for members in out:
    first = layout[members[0]]
    axis = 0 if first.axis is None else first.axis
    shape = list(first.shape) if first.axis is not None else [1] + list(first.shape)
    shape[axis] = sum(_slices(layout[i]) for i in members)
    eligible = sum((layout[i].eligible for i in members), ())
    groups.append(Group(members, Leaf(axis, eligible, tuple(shape))))
  return groups


def stack(group: Group, layout: list[Leaf], arrays: dict[int, jax.Array]) -> jax.Array:
  """The group's leaves as one array, slices along ``group.leaf.axis``."""
  axis = group.leaf.axis
  parts = [arrays[i] if layout[i].axis is not None else jnp.expand_dims(arrays[i], axis)
           for i in group.members]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def split(group: Group, layout: list[Leaf], per_slice: jax.Array) -> list[jax.Array]:
  """Per-slice values ``[slices of the group]`` back per member: shape ``[L]``
  for a stacked member, a scalar for an unstacked one."""
  out, start = [], 0
  for i in group.members:
    n = _slices(layout[i])
    part = per_slice[start:start + n]
    out.append(part if layout[i].axis is not None else part.reshape(()))
    start += n
  return out


def _entries(x: jax.Array) -> int:
  """Entries a count over ``x`` adds up: bits for a packed (uint8) mask."""
  return x.size * (8 if x.dtype == jnp.uint8 else 1)


def stack_alike(*lists: list[jax.Array]) -> list[list[jax.Array]]:
  """Parallel lists of arrays (leaf ``i`` of each alike in shape and dtype),
  each stacked by equal shape, dtype and visible sharding along a new axis 0,
  at most ``MAX_GROUP`` entries per stack, the same grouping for every list.

  For totals over many leaves (the refresh's mask counts): one reduction per
  group instead of one per leaf.
  """
  out = _buckets((i, (tuple(x.shape), jnp.dtype(x.dtype), _spec(x)), _entries(x))
                 for i, x in enumerate(lists[0]))
  return [[xs[m[0]] if len(m) == 1 else jnp.stack([xs[i] for i in m]) for m in out]
          for xs in lists]
