"""The model as training, scoring and experiments see it: built or loaded from ``config.model``
as a flat dict of params (``build``; ``spec_and_tokenizer`` without the weights)
plus a way back to a Llama (``ModelSpec.bind``).

Params are kept as ``{'layers/0/attn/q/kernel': array, ...}`` (paths joined
with '/'), which is what EPI's ``eligible`` predicates, the per-layer
statistics and the checkpoints use as names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from epi_jax import sharding
from epi_jax.model.config import ModelConfig, config_names, get_config
from epi_jax.model.llama import Llama
from epi_jax.model.loading import load_pretrained, pretrained_config
from epi_jax.model.tokenizer import ByteTokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _key(path) -> str:
  return "/".join(str(p) for p in path)


@dataclasses.dataclass
class ModelSpec:
  """What is needed to rebuild a Llama from flat params.

  Attributes:
    config: the model's ``ModelConfig``.
    graphdef: the nnx graph definition.
    paths: flat key -> nnx path tuple.
    axes: flat key -> logical axis names.
    shapes: flat key -> ``jax.ShapeDtypeStruct``.
  """
  config: ModelConfig
  graphdef: Any
  paths: dict[str, tuple]
  axes: dict[str, tuple]
  shapes: dict[str, jax.ShapeDtypeStruct]

  def bind(self, params: dict[str, jax.Array]) -> Llama:
    """A Llama whose params are ``params`` (works inside jit)."""
    return nnx.merge(self.graphdef, nnx.from_flat_state(
        [(self.paths[k], v) for k, v in params.items()]))


def spec_for(config: ModelConfig) -> ModelSpec:
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  paths, axes, shapes = {}, {}, {}
  for path, var in nnx.to_flat_state(state):
    k = _key(path)
    paths[k] = tuple(path)
    axes[k] = tuple(var.get_metadata().get("out_sharding") or ())
    v = var.get_value()
    shapes[k] = jax.ShapeDtypeStruct(v.shape, v.dtype)
  return ModelSpec(config, graphdef, paths, axes, shapes)


def flat_params(model: Llama) -> dict[str, jax.Array]:
  _, state = nnx.split(model)
  return {_key(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def _is_random(mc) -> bool:
  return mc.init == "random"


def model_config(mc) -> ModelConfig | None:
  """The ModelConfig of a random-init model (None for pretrained ones)."""
  if not _is_random(mc):
    return None
  if mc.name.lower() not in config_names():
    raise ValueError(f"config.model.name={mc.name!r} with init='random' must be one of "
                     f"{config_names()}")
  return get_config(mc.name, param_dtype=_DTYPES[mc.param_dtype],
                    dtype=_DTYPES[mc.compute_dtype], remat=mc.remat,
                    scan_layers=mc.scan_layers, attention=mc.attention)


def build(mc, seed: int, mesh=None):
  """Builds the model from ``config.model``, placed on ``mesh`` when given.

  Params are created directly with their shardings (random init under jit
  with ``out_shardings``; pretrained tensors placed one at a time), so no
  device ever holds a full copy of a sharded parameter.

  Returns:
    ``(spec, params, tokenizer)``.
  """
  if _is_random(mc):
    cfg = model_config(mc)
    spec = spec_for(cfg)
    shardings = (sharding.param_shardings(mesh, spec.shapes, spec.axes)
                 if mesh is not None else None)

    def init():
      return flat_params(Llama(cfg, rngs=nnx.Rngs(seed)))

    params = jax.jit(init, out_shardings=shardings)()
    return spec, params, ByteTokenizer()

  def per_var(slot, var):
    del slot
    axes = tuple(var.get_metadata().get("out_sharding") or ())
    shape = var.get_value().shape
    return NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh))

  model, tokenizer, cfg = load_pretrained(
      mc.name, param_dtype=_DTYPES[mc.param_dtype], dtype=_DTYPES[mc.compute_dtype],
      shardings=per_var if mesh is not None else None, scan_layers=mc.scan_layers)
  # remat and the attention kernel do not change the params: set them on the spec.
  cfg = dataclasses.replace(cfg, remat=mc.remat, attention=mc.attention)
  return spec_for(cfg), flat_params(model), tokenizer


def spec_and_tokenizer(mc):
  """``(spec, tokenizer)`` of ``config.model`` without loading any weights
  (for params that come from a snapshot)."""
  if _is_random(mc):
    return spec_for(model_config(mc)), ByteTokenizer()
  cfg, tokenizer = pretrained_config(mc.name, param_dtype=_DTYPES[mc.param_dtype],
                                     dtype=_DTYPES[mc.compute_dtype],
                                     scan_layers=mc.scan_layers)
  return spec_for(dataclasses.replace(cfg, remat=mc.remat, attention=mc.attention)), tokenizer


_LAYER_KEY = re.compile(r"layers/(\d+)/(.+)")


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Unscanned flat params (``layers/<i>/...``) -> the ``scan_layers`` layout (``layers/...``).

  Raises:
    ValueError: when the params are not in the unscanned layout.
  """
  out, per_layer = {}, {}
  for k, v in params.items():
    m = _LAYER_KEY.fullmatch(k)
    if m:
      per_layer.setdefault(m.group(2), {})[int(m.group(1))] = v
    elif k.startswith("layers/"):
      raise ValueError(f"param {k!r} is already in the scan_layers layout")
    else:
      out[k] = v
  for rest, by_layer in per_layer.items():
    out[f"layers/{rest}"] = jnp.stack([by_layer[i] for i in range(len(by_layer))])
  return out


_SLICE_NAME = re.compile(r"layers/(.+)\[(\d+)\]")


def layer_name(name: str) -> str:
  """A per-layer name in the unscanned layout's form: slice ``i`` of a stacked
  leaf (``layers/<rest>[i]``, as ``epi_jax.per_layer_isolated`` names it) is
  ``layers/<i>/<rest>``; any other name is returned as it is. Per-layer records
  of scanned and unscanned runs then name the same layer alike."""
  m = _SLICE_NAME.fullmatch(name)
  return f"layers/{m.group(2)}/{m.group(1)}" if m else name


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`stack_layers`."""
  out = {}
  for k, v in params.items():
    if _LAYER_KEY.fullmatch(k):
      raise ValueError(f"param {k!r} is already in the unscanned layout")
    if k.startswith("layers/"):
      rest = k[len("layers/"):]
      out.update({f"layers/{i}/{rest}": v[i] for i in range(v.shape[0])})
    else:
      out[k] = v
  return out
