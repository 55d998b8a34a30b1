"""The one place that decides how things are laid out over the device mesh.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with the
params' ``embed`` dimension sharded, ZeRO-3 style) and ``tensor`` (Megatron
style: vocab, heads and MLP dimensions split). The batch is sharded over
``('data', 'fsdp')``.

Every parameter is placed by its logical axis names (the model's
``out_sharding`` metadata) through :data:`LOGICAL_AXIS_RULES`; every optimizer
state leaf shaped like a parameter (Adam moments, EPI importance and masks)
gets exactly that parameter's sharding; scalars are replicated.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from epi_jax.method import compact

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical axis name of the model -> mesh axis (None: not sharded).
LOGICAL_AXIS_RULES = (
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("embed", "fsdp"),
    ("norm", None),
    ("layers", None),                # scan_layers: the stacked blocks' leading axis
)
LAYERS_AXIS = "layers"



def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with a -1 resolved to the remaining devices.

  Raises:
    ValueError: when the axes do not fit ``num_devices``.
  """
  shape = [int(mesh_config[a]) for a in MESH_AXES]
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if num_devices % rest:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices "
                       f"are not divisible by {rest}")
    shape[shape.index(-1)] = num_devices // rest
  if math.prod(shape) > num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} "
                     f"devices, only {num_devices} available")
  return tuple(shape)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ``jax.make_mesh`` over the first ``data*fsdp*tensor`` devices.

  Using fewer devices than available is allowed on one process (e.g. a
  1-device reference run); multi-process runs must use all of them.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  n = math.prod(shape)
  if n < len(devices) and jax.process_count() > 1:
    raise ValueError(f"config.mesh uses {n} of {len(devices)} devices; multi-process "
                     "runs must use all devices")
  kind = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}[
      mesh_config.get("axis_types", "auto")]
  return jax.make_mesh(shape, MESH_AXES, devices=devices[:n], axis_types=(kind,) * 3)


def has_explicit_axes(mesh) -> bool:
  """Whether ``mesh`` has an axis of type Explicit."""
  return jax.sharding.AxisType.Explicit in tuple(getattr(mesh, "axis_types", ()))


def constrain(x, specs, mesh):
  """``with_sharding_constraint`` of ``x`` to ``specs`` (a PartitionSpec or a
  pytree of them) on ``mesh``, or inside ``jax.sharding.auto_axes`` on the
  context's Auto view of it (constraints may name Auto axes only)."""
  context = jax.sharding.get_abstract_mesh()
  on = mesh if context.empty else context
  shardings = jax.tree.map(lambda s: NamedSharding(on, s), specs,
                           is_leaf=lambda s: isinstance(s, P))
  return jax.lax.with_sharding_constraint(x, shardings)


def axis_sizes(mesh) -> dict[str, int]:
  """``{axis: size}`` of ``mesh``, or inside ``jax.sharding.auto_axes`` of the
  context's Auto view of it."""
  context = jax.sharding.get_abstract_mesh()
  on = mesh if context.empty else context
  return dict(zip(on.axis_names, on.axis_sizes))


def batch_axes_dividing(rows: int, sizes: Mapping[str, int]) -> tuple[str, ...] | None:
  """The batch axes (of size > 1) that ``rows`` can be split over, or None."""
  batch = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
  return batch if batch and rows % math.prod(sizes[a] for a in batch) == 0 else None


def constrain_activation(x, mesh, last: str | None = None):
  """``x`` (``[batch, ...]``) kept with its batch over the batch axes (those of
  size > 1 that divide it) and, with ``last``, its last dimension over that
  mesh axis where it divides; ``x`` unchanged without a multi-device ``mesh``.

  Why: the model's params are FSDP-sharded over ``fsdp``, the batch too. Left
  to propagation, XLA may keep a matmul's weight sharded and gather the
  activations instead (each device then computes every row of the batch on a
  slice of the contraction and all-reduces the result: found compiling
  Qwen2-7B for 8 H100s). Constrained activations make it gather the weights."""
  if mesh is None or mesh.size == 1:
    return x
  sizes = axis_sizes(mesh)
  batch = batch_axes_dividing(x.shape[0], sizes)
  minor = last if last and sizes.get(last, 1) > 1 and x.shape[-1] % sizes[last] == 0 else None
  if batch is None and minor is None:
    return x
  return constrain(x, P(batch, *[None] * (x.ndim - 2), minor), mesh)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> P:
  """The PartitionSpec of an array with logical ``axes`` and ``shape``.

  A dimension not divisible by its mesh axis size is left unsharded (e.g. 9
  heads of SmolLM2-135M on tensor=2), and a mesh axis is used at most once.
  """
  if not axes:
    return P()
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(axes, shape):
    mesh_axis = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise ValueError(f"Logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
    if (mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1
        or dim % mesh.shape[mesh_axis]):
      spec.append(None)
    else:
      spec.append(mesh_axis)
      used.add(mesh_axis)
  return P(*spec)


def param_shardings(mesh, shapes: Mapping[str, Any], axes: Mapping[str, Any]
                    ) -> dict[str, NamedSharding]:
  """``{path: NamedSharding}`` for the flat params ``{path: array-like}``."""
  return {k: NamedSharding(mesh, logical_to_spec(axes.get(k), v.shape, mesh))
          for k, v in shapes.items()}


def state_shardings(abstract_state, param_shapes: Mapping[str, Any],
                    params_sharding: Mapping[str, NamedSharding], mesh):
  """Shardings for a train-state pytree whose per-param leaves sit under params' keys.

  A leaf is per-parameter when the last dict key on its path names a
  parameter and its shape equals that parameter's; it then gets the
  parameter's sharding. A leaf of the parameter's rank but another shape
  (EPI's bit-packed masks: the second-to-last axis 8x shorter) keeps the parameter's
  spec on every dimension it still divides. Everything else (counters,
  scalars) is replicated.
  """
  rep = NamedSharding(mesh, P())

  def pick(path, leaf):
    for key in reversed(path):
      name = getattr(key, "key", None)
      if isinstance(name, str) and name in params_sharding:
        shape = tuple(param_shapes[name].shape)
        if tuple(leaf.shape) == shape:
          return params_sharding[name]
        if len(leaf.shape) == len(shape):
          return NamedSharding(mesh, compact.fit_spec(params_sharding[name].spec,
                                                      leaf.shape, mesh))
        return rep
    return rep

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def layer_axes(axes: Mapping[str, Sequence[str | None]]) -> dict[str, int | None]:
  """EPI's ``layer_axes`` for params with logical ``axes`` ``{path: names}``.

  The index of the ``layers`` axis (``scan_layers``: slice ``i`` is layer
  ``i``'s param) or None (the leaf is one layer's param), so EPI normalizes
  and selects per layer whichever the layout.
  """
  return {k: (list(a).index(LAYERS_AXIS) if LAYERS_AXIS in (a or ()) else None)
          for k, a in axes.items()}


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
