"""EPI on params sharded over a mesh of 8 fake CPU devices (see conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import epi_jax

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

SPECS = {"emb": P("fsdp", "tensor"), "w": P(None, "tensor"), "b": P("fsdp"), "n": P()}
SHAPES = {"emb": (64, 32), "w": (16, 48), "b": (40,), "n": (24,)}


def _grads(seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s) * rng.uniform(0.1, 3.0, size=s), jnp.float32)
          for k, s in SHAPES.items()}


@pytest.mark.parametrize("selection, axis_type", [
    ("global", jax.sharding.AxisType.Auto),
    ("layer", jax.sharding.AxisType.Auto),
    ("global", jax.sharding.AxisType.Explicit),
])
def test_sharded_masks_equal_unsharded_and_no_all_gather(selection, axis_type):
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(axis_type,) * 2)
  with jax.set_mesh(mesh):
    _check(mesh, selection, jit_init=axis_type == jax.sharding.AxisType.Explicit)


def _check(mesh, selection, jit_init):
  shardings = {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}
  tx = epi_jax.epi_adamw(1e-2, isolation_ratio=0.1, update_interval=2,
                         selection=selection, track_first_mask=True)
  params = {k: jnp.zeros(s, jnp.float32) + 0.5 for k, s in SHAPES.items()}
  sparams = jax.device_put(params, shardings)

  state = tx.init(params)
  # Eager init inherits each param's sharding; so does jit in Explicit mode.
  sstate = jax.jit(tx.init)(sparams) if jit_init else tx.init(sparams)
  epi = epi_jax.epi_state(sstate)
  for field in (epi.importance, epi.mask, epi.first_mask):
    for k in SHAPES:
      assert field[k].sharding.is_equivalent_to(shardings[k], len(SHAPES[k])), k

  update = jax.jit(tx.update)
  supdate = jax.jit(tx.update, donate_argnums=1)
  hlo = supdate.lower(jax.device_put(_grads(0), shardings), sstate, sparams).compile().as_text()
  assert "all-gather" not in hlo
  assert "all-reduce" in hlo  # the counts are reduced across devices

  for t in range(6):
    g = _grads(t)
    _, state = update(g, state, params)
    _, sstate = supdate(jax.device_put(g, shardings), sstate, sparams)
  a, b = epi_jax.epi_state(state), epi_jax.epi_state(sstate)
  assert int(a.num_refreshes) == 3
  for k in SHAPES:
    np.testing.assert_array_equal(np.asarray(a.mask[k]), np.asarray(b.mask[k]))
    assert b.mask[k].sharding.is_equivalent_to(shardings[k], len(SHAPES[k]))
  assert float(a.jaccard_prev) == float(b.jaccard_prev)


# Stacked leaves (``layer_axes``) whose layer axis is sharded or replicated, on
# Explicit meshes (``jax.make_mesh``'s default): the refresh's per-slice values
# meet fresh constants inside its cond and while loop, where Explicit sharding
# types must match (they failed at trace time before ``_update_epi`` ran on
# Auto axes).
STACKED = {"w": (4, 16, 32), "o": (4, 32, 16), "b": (64,)}  # b: 32 entries per shard pack locally
LAYER_AXES = {"w": 0, "o": 0, "b": None}
STACKED_SPECS = {
    "sharded": {"w": P("fsdp", None, "tensor"), "o": P("fsdp", "tensor", None), "b": P()},
    "replicated": {"w": P(None, "fsdp", "tensor"), "o": P(None, "tensor", "fsdp"),
                   "b": P("fsdp")},
}


@pytest.mark.parametrize("selection, normalization, packed, also_auto", [
    ("global", "layer_mean", False, True),
    ("layer", "layer_max", True, False),
    ("global", "none", True, False),
])
def test_explicit_mesh_stacked_masks_equal_unsharded(selection, normalization, packed, also_auto):
  rng = np.random.default_rng(0)
  grads = [{k: jnp.asarray(rng.standard_normal(s) * rng.uniform(0.1, 3.0, size=s), jnp.float32)
            for k, s in STACKED.items()} for _ in range(4)]
  params = {k: jnp.full(s, 0.5, jnp.float32) for k, s in STACKED.items()}
  tx = epi_jax.epi_adamw(1e-2, isolation_ratio=0.2, update_interval=2, selection=selection,
                         normalization=normalization, packed_mask=packed,
                         layer_axes=LAYER_AXES, track_first_mask=True)

  def run(shardings):
    p = params if shardings is None else jax.device_put(params, shardings)
    state = jax.jit(tx.init)(p)
    update = jax.jit(tx.update)
    gs = [g if shardings is None else jax.device_put(g, shardings) for g in grads]
    hlo = update.lower(gs[0], state, p).compile().as_text()
    for g in gs:
      _, state = update(g, state, p)
    return epi_jax.epi_state(state), hlo

  ref, _ = run(None)
  assert int(ref.num_refreshes) == 2 and float(ref.isolated_fraction) > 0
  axis_types = [jax.sharding.AxisType.Explicit] + [jax.sharding.AxisType.Auto] * also_auto
  for axis_type in axis_types:
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(axis_type,) * 2)
    for layout, specs in STACKED_SPECS.items():
      shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
      with jax.set_mesh(mesh):
        got, hlo = run(shardings)
      where = f"{axis_type}, layer axis {layout}"
      for bad in ("all-gather", "all-to-all", "collective-permute"):
        assert bad not in hlo, (where, bad)
      for k in STACKED:
        np.testing.assert_array_equal(np.asarray(ref.mask[k]), np.asarray(got.mask[k]),
                                      err_msg=f"{where}: {k}")
        np.testing.assert_array_equal(np.asarray(ref.first_mask[k]),
                                      np.asarray(got.first_mask[k]), err_msg=where)
      for f in epi_jax.epi_metrics(ref):
        # The threshold is a normalized score: a sharded mean sums in another order.
        np.testing.assert_allclose(getattr(ref, f), getattr(got, f),
                                   rtol=1e-5 if f == "threshold" else 0, err_msg=f"{where}: {f}")
