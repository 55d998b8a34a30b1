"""Reading EPI's state: find it, its metrics, its masks and what a refresh ranks.

Everything here takes an ``EPIState`` or any optimizer state holding one
(chains, ``isolate``, ``MultiSteps``, ``inject_hyperparams``, a
``flax.nnx.Optimizer``'s ``opt_state``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from epi_jax.method import refresh, walk
from epi_jax.method.layout import leaf_layout, path_str
from epi_jax.method.options import EPIOptions, LayerAxes
from epi_jax.method.transforms import EPIState


def epi_importance(opt_state) -> Any:
  """The importance a refresh ranks, shaped like the params: ``EPIState.importance``
  or, with ``importance="inner_nu"``, the inner optimizer's ``nu``
  (``opt_state`` must then be the whole state, not an ``EPIState``)."""
  s = opt_state if isinstance(opt_state, EPIState) else epi_state(opt_state)
  if jax.tree.leaves(s.importance) or not jax.tree.leaves(s.mask):
    return s.importance
  if isinstance(opt_state, EPIState):
    raise ValueError("This EPIState reads its importance from the inner optimizer's nu "
                     "(importance='inner_nu'): pass the whole optimizer state.")
  return walk.inner_nu(opt_state)


def epi_state(opt_state) -> EPIState:
  """The ``EPIState`` found anywhere inside a (nested) optimizer state.

  Works through chains, ``isolate``, ``MultiSteps``, ``inject_hyperparams``
  and the state of a ``flax.nnx.Optimizer`` (pass ``optimizer.opt_state``).
  Raises ``ValueError`` when there is none or more than one.
  """
  found = walk.find(opt_state, lambda x: isinstance(x, EPIState))
  if not found:
    raise ValueError("No EPIState in this optimizer state: was it built with "
                     "epi_transform / isolate / epi_adamw?")
  if len(found) > 1:
    raise ValueError(f"Found {len(found)} EPIStates; expected exactly one.")
  return found[0]


METRICS = refresh.RefreshStats._fields


def epi_metrics(opt_state) -> dict[str, jax.Array]:
  """EPI's scalar statistics (``RefreshStats``'s fields) as a dict of arrays.

  ``opt_state`` is an ``EPIState`` or any optimizer state ``epi_state`` accepts.
  """
  s = opt_state if isinstance(opt_state, EPIState) else epi_state(opt_state)
  return {k: getattr(s, k) for k in METRICS}


def unpacked_mask(state) -> Any:
  """The isolation mask as a bool pytree shaped like the params.

  ``state`` is an ``EPIState`` or any optimizer state that ``epi_state``
  accepts. Works with ``packed_mask`` on or off (the shapes come from the
  importance, which always has the params' shapes; with ``inner_nu`` and
  packed masks, pass the whole optimizer state).
  """
  s = state if isinstance(state, EPIState) else epi_state(state)
  if not any(m.dtype == jnp.uint8 for m in jax.tree.leaves(s.mask)):
    return jax.tree.map(jnp.asarray, s.mask)
  return jax.tree.map(lambda m, imp: refresh.as_bool(m, imp.shape, imp), s.mask, epi_importance(state))


def per_layer_isolated(state, layer_axes: LayerAxes = None) -> dict[str, jax.Array]:
  """``{name: isolated fraction}`` per layer: a leaf's path, or for a stacked
  leaf ``path[l]`` per slice ``l`` along its layer axis (see ``layer_axes``)."""
  mask = unpacked_mask(state)
  options = EPIOptions(isolation_ratio=0.0, update_interval=1, layer_axes=layer_axes)
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  for (path, m), leaf in zip(flat, leaf_layout(options, mask)):
    name = path_str(path)
    if leaf.axis is None:
      out[name] = jnp.mean(m.astype(jnp.float32))
    else:
      frac = jnp.mean(m.astype(jnp.float32), axis=leaf.reduce_axes)
      for l in range(leaf.shape[leaf.axis]):
        out[f"{name}[{l}]"] = frac[l]
  return out


def select_mask(importance, options: EPIOptions, params=None) -> tuple[Any, jax.Array]:
  """The bool mask a refresh would choose from ``importance`` (and the global
  threshold): the top-k of the normalized scores. For benchmarks and analysis."""
  layout = leaf_layout(options, importance)
  ranked = jax.tree.leaves(refresh.ranked_values(options, importance, params))
  cuts, threshold = refresh.find_cuts(options, layout, ranked)
  masks = refresh.top_masks(layout, ranked, *cuts)
  return jax.tree.unflatten(jax.tree.structure(importance), masks), threshold
