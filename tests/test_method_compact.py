"""Compact EPI state: bf16 importance (stochastic rounding) and packed masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import epi_jax
from epi_jax.method import compact, unpacked_mask

# Last axes that are and are not multiples of 8, and a scalar leaf.
SHAPES = {"a": (300,), "b": (40, 96), "c": {"w": (6, 10, 13), "s": ()}}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def _grads(num_steps, seed=1, shapes=SHAPES):
  """Noise times a per-parameter scale that persists across steps (log-normal).

  Persistent scales are what makes importance meaningful; with i.i.d. noise
  alone the top set is noise and any rounding reshuffles its boundary.
  """
  rng = np.random.default_rng(seed)
  scales = jax.tree.map(lambda s: np.exp(1.5 * rng.standard_normal(s)), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  return [jax.tree.map(lambda s, sc: jnp.asarray(rng.standard_normal(s) * sc, jnp.float32),
                       shapes, scales, is_leaf=lambda x: isinstance(x, tuple))
          for _ in range(num_steps)]


def _run(tx, grads, params):
  """Applies tx on the stream; returns the final state, params, and bool masks per step."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  masks = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    masks.append([np.asarray(m) for m in jax.tree.leaves(unpacked_mask(state))])
  return state, params, masks


def _jaccard(a, b):
  a = np.concatenate([x.ravel() for x in a])
  b = np.concatenate([x.ravel() for x in b])
  return epi_jax.method.jaccard(int(np.sum(a & b)), int(np.sum(a | b)))


@pytest.mark.parametrize("shape", [(), (1,), (7,), (8,), (3, 17), (2, 3, 64)])
def test_pack_unpack_roundtrip(shape):
  rng = np.random.default_rng(0)
  m = jnp.asarray(rng.random(shape) < 0.3)
  packed = compact.pack(m)
  assert packed.dtype == jnp.uint8 and packed.shape == compact.packed_shape(shape)
  np.testing.assert_array_equal(np.asarray(compact.unpack(packed, shape)), np.asarray(m))
  assert int(compact.popcount(packed)) == int(np.sum(np.asarray(m)))


def test_stochastic_rounding_is_unbiased_and_deterministic():
  x = jnp.full((4096,), 1.0 + 2.0**-10, jnp.float32)  # 1/4 of a bf16 ulp above 1
  r = compact.stochastic_round_bf16(x, jnp.int32(3), salt=0)
  assert r.dtype == jnp.bfloat16
  assert set(np.unique(np.asarray(r, np.float32))) == {1.0, 1.0 + 2.0**-7}
  assert abs(float(jnp.mean(r.astype(jnp.float32))) - (1.0 + 2.0**-10)) < 2e-4
  np.testing.assert_array_equal(r, compact.stochastic_round_bf16(x, jnp.int32(3), salt=0))
  assert not np.array_equal(r, compact.stochastic_round_bf16(x, jnp.int32(4), salt=0))


def test_bf16_ema_keeps_small_increments():
  # beta = 0.999 and a constant score 1: I_t = 1 - 0.999**t. Round-to-nearest
  # bf16 stalls near 0.25 (the increment falls under half an ulp).
  params = {"w": jnp.zeros((2048,), jnp.float32)}
  tx = epi_jax.epi_transform(0.0, 10**6, ema_decay=0.999, importance="grad_abs",
                             importance_dtype=jnp.bfloat16)
  state = tx.init(params)
  g = {"w": jnp.ones((2048,), jnp.float32)}
  step = jax.jit(lambda s: tx.update(g, s)[1])
  state = jax.lax.fori_loop(0, 1500, lambda _, s: step(s), state)
  imp = np.asarray(state.importance["w"], np.float32)
  assert state.importance["w"].dtype == jnp.bfloat16
  assert abs(imp.mean() - (1 - 0.999**1500)) < 0.01


@pytest.fixture(scope="module")
def streams():
  """fp32/bool, bf16/bool, fp32/packed, bf16/packed runs of isolate(adamw)."""
  params = _params()
  grads = _grads(12)
  out = {}
  for dtype in (None, jnp.bfloat16):
    for packed in (False, True):
      tx = epi_jax.epi_adamw(1e-2, isolation_ratio=0.05, update_interval=3,
                             importance_dtype=dtype, packed_mask=packed,
                             track_first_mask=True)
      out[(dtype, packed)] = _run(tx, grads, params)
  return params, grads, out


def test_bf16_masks_overlap_fp32(streams):
  _, _, out = streams
  for step, (a, b) in enumerate(zip(out[(None, False)][2], out[(jnp.bfloat16, False)][2])):
    if (step + 1) % 3 == 0:
      assert _jaccard(a, b) >= 0.99, step
  imp32 = epi_jax.epi_state(out[(None, False)][0]).importance
  imp16 = epi_jax.epi_state(out[(jnp.bfloat16, False)][0]).importance
  for x, y in zip(jax.tree.leaves(imp32), jax.tree.leaves(imp16)):
    assert y.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(y, np.float32) - np.asarray(x)) / np.maximum(np.asarray(x), 1e-12)
    assert np.median(rel) < 1e-2 and np.max(rel) < 0.1  # stochastic rounding noise


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_packed_masks_equal_unpacked(streams, dtype):
  _, _, out = streams
  s_bool, p_bool, m_bool = out[(dtype, False)]
  s_pack, p_pack, m_pack = out[(dtype, True)]
  for a, b in zip(m_bool, m_pack):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  e_bool, e_pack = epi_jax.epi_state(s_bool), epi_jax.epi_state(s_pack)
  assert all(m.dtype == jnp.uint8 for m in jax.tree.leaves(e_pack.mask))
  assert all(m.dtype == jnp.uint8 for m in jax.tree.leaves(e_pack.first_mask))
  for field in ("num_refreshes", "isolated_fraction", "num_flipped", "jaccard_prev",
                "jaccard_first", "threshold"):
    assert float(getattr(e_bool, field)) == float(getattr(e_pack, field)), field
  assert 0 < float(e_pack.jaccard_first) < 1
  # Same masks, same updates: the params agree bit for bit.
  for x, y in zip(jax.tree.leaves(p_bool), jax.tree.leaves(p_pack)):
    np.testing.assert_array_equal(x, y)


def test_wrapper_freezes_isolated_weights_with_compact_state():
  params = _params()
  tx = epi_jax.epi_adamw(1e-2, isolation_ratio=0.05, update_interval=2, weight_decay=0.1,
                         importance_dtype="bfloat16", packed_mask=True)
  state = tx.init(params)
  update = jax.jit(tx.update)
  frozen_checked = 0
  for g in _grads(7, seed=3):
    before = params
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    for b, a, m in zip(jax.tree.leaves(before), jax.tree.leaves(params),
                       jax.tree.leaves(unpacked_mask(state))):
      m = np.asarray(m)
      np.testing.assert_array_equal(np.asarray(a)[m], np.asarray(b)[m])
      assert np.all(np.asarray(a)[~m] != np.asarray(b)[~m])
      frozen_checked += int(m.sum())
  assert frozen_checked > 0


def test_state_bytes_per_param():
  params = {"w": jnp.zeros((256, 64)), "v": jnp.zeros((1024,))}
  n = 256 * 64 + 1024

  def per_param(**kw):
    s = epi_jax.epi_transform(0.01, 10, **kw).init(params)
    return compact.num_bytes((s.importance, s.mask)) / n

  assert per_param() == 5.0
  assert per_param(importance_dtype=jnp.bfloat16) == 3.0
  assert per_param(packed_mask=True) == 4.125
  assert per_param(importance_dtype=jnp.bfloat16, packed_mask=True) == 2.125


def test_multisteps_and_inject_hyperparams():
  params = _params()
  grads = _grads(8, seed=4)
  ms = optax.MultiSteps(epi_jax.epi_adamw(1e-2, isolation_ratio=0.05, update_interval=2,
                                          importance_dtype="bfloat16", packed_mask=True),
                        every_k_schedule=2)
  state, _, masks = _run(ms, grads, params)
  s = epi_jax.epi_state(state)
  assert int(s.count) == 4 and int(s.num_refreshes) == 2
  assert sum(int(m.sum()) for m in masks[-1]) > 0

  inj = optax.inject_hyperparams(epi_jax.epi_transform, static_args=("update_interval",))(
      isolation_ratio=0.05, update_interval=2, ema_decay=0.99, importance_dtype="bfloat16",
      packed_mask=True)
  plain = epi_jax.epi_transform(0.05, 2, importance_dtype=jnp.bfloat16, packed_mask=True)
  s_inj, _, m_inj = _run(inj, grads, params)
  _, _, m_plain = _run(plain, grads, params)
  assert set(s_inj.hyperparams) == {"isolation_ratio", "ema_decay"}
  e = epi_jax.epi_state(s_inj)
  assert all(i.dtype == jnp.bfloat16 for i in jax.tree.leaves(e.importance))
  assert all(m.dtype == jnp.uint8 for m in jax.tree.leaves(e.mask))
  for a, b in zip(m_inj[-1], m_plain[-1]):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(importance_dtype=jnp.int8), "importance_dtype"),
    (dict(importance_dtype="float64x"), "importance_dtype"),
    (dict(importance_dtype=jnp.zeros([], jnp.bfloat16)), "string"),
    (dict(packed_mask=1), "packed_mask"),
])
def test_bad_compact_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    epi_jax.epi_transform(0.1, 10, **kwargs)


SHARD_SPECS = {"emb": P("fsdp", "tensor"), "w": P(None, "tensor"), "b": P("fsdp"), "n": P()}
# Sharded last axes split into multiples of 8 entries: the packed mask shards alike.
SHARD_SHAPES = {"emb": (64, 64), "w": (16, 96), "b": (48,), "n": (24,)}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_compact_state_no_all_gather():
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shardings = {k: NamedSharding(mesh, s) for k, s in SHARD_SPECS.items()}
  params = {k: jnp.full(s, 0.5, jnp.float32) for k, s in SHARD_SHAPES.items()}
  tx = epi_jax.epi_adamw(1e-2, isolation_ratio=0.1, update_interval=2,
                         importance_dtype=jnp.bfloat16, packed_mask=True)
  with jax.set_mesh(mesh):
    sparams = jax.device_put(params, shardings)
    state, sstate = tx.init(params), tx.init(sparams)  # eager: inherits sharding
    for k in SHARD_SHAPES:
      e = epi_jax.epi_state(sstate)
      assert e.importance[k].sharding.is_equivalent_to(shardings[k], len(SHARD_SHAPES[k]))
      assert e.mask[k].sharding.is_equivalent_to(shardings[k], len(SHARD_SHAPES[k])), k
    supdate = jax.jit(tx.update, donate_argnums=1)
    grads = _grads(6, seed=7, shapes=SHARD_SHAPES)
    hlo = supdate.lower(jax.device_put(grads[0], shardings), sstate,
                        sparams).compile().as_text()
    assert "all-gather" not in hlo
    assert "all-reduce" in hlo
    for g in grads:
      _, state = jax.jit(tx.update)(g, state, params)
      _, sstate = supdate(jax.device_put(g, shardings), sstate, sparams)
  a, b = unpacked_mask(state), unpacked_mask(sstate)
  assert int(epi_jax.epi_state(sstate).num_refreshes) == 3
  for k in SHARD_SHAPES:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    np.testing.assert_array_equal(np.asarray(epi_jax.epi_state(state).importance[k]),
                                  np.asarray(epi_jax.epi_state(sstate).importance[k]))
