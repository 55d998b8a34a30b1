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
