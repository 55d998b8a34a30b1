"""EPI with optax's utilities, the options object and the public helpers."""

import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import epi_jax
from test_method import grad_stream, make_params

KW = dict(isolation_ratio=0.1, update_interval=2, ema_decay=0.8)
FACTORIES = {
    "epi_transform": (epi_jax.epi_transform, (), {}),
    "isolate": (epi_jax.isolate, (optax.adam(1e-2),), {}),
    "epi_adamw": (epi_jax.epi_adamw, (), dict(learning_rate=1e-2, weight_decay=0.1)),
}


def _run(tx, grads, params):
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates = []
  for g in grads:
    u, state = update(g, state, params)
    updates.append(u)
  return state, updates


@pytest.mark.parametrize("name", list(FACTORIES))
def test_inject_hyperparams_equals_plain(name):
  factory, args, extra = FACTORIES[name]
  params, grads = make_params(), grad_stream(5, shift_at=2)
  plain = factory(*args, **KW, **extra)
  # Every number injected, update_interval included (no static_args).
  injected = optax.inject_hyperparams(factory)(*args, **KW, **extra)
  s_plain, u_plain = _run(plain, grads, params)
  s_inj, u_inj = _run(injected, grads, params)
  assert {"isolation_ratio", "update_interval", "ema_decay"} <= set(s_inj.hyperparams)
  chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-6, atol=1e-7)
  a, b = epi_jax.epi_state(s_plain), epi_jax.epi_state(s_inj)
  assert int(a.num_refreshes) == int(b.num_refreshes) == 2
  chex.assert_trees_all_equal(a.mask, b.mask)
  chex.assert_trees_all_close(a.importance, b.importance, rtol=1e-6)
  assert epi_jax.epi_metrics(s_inj).keys() == epi_jax.epi_metrics(s_plain).keys()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_tree_map_params(name):
  """optax.tree.map_params reaches every per-parameter field of EPI's state."""
  factory, args, extra = FACTORIES[name]
  params = make_params()
  tx = factory(*args, **KW, **extra, track_first_mask=True)
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state,
                                 transform_non_params=lambda v: "other")
  e = epi_jax.epi_state(mapped)
  for field in (e.importance, e.mask, e.first_mask):
    for got, want in zip(jax.tree.leaves(field), jax.tree.leaves(params)):
      assert isinstance(got, jax.ShapeDtypeStruct) and got.shape == want.shape
  assert e.count == "other" and e.num_refreshes == "other"


def test_complex_params_score_by_modulus():
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((8, 16), jnp.complex64), "v": jnp.zeros((32,), jnp.complex64)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)
                                              + 1j * rng.standard_normal(p.shape), p.dtype),
                        params) for _ in range(2)]
  for importance, score in (("grad_sq", lambda g: np.abs(g) ** 2), ("grad_abs", np.abs)):
    tx = epi_jax.epi_adamw(1e-2, isolation_ratio=0.1, update_interval=2, ema_decay=0.5,
                           importance=importance)
    state = tx.init(params)
    u, state = jax.jit(tx.update)(grads[0], state, params)
    imp = epi_jax.epi_state(state).importance
    for k in params:
      assert imp[k].dtype == jnp.float32 and u[k].dtype == jnp.complex64
      np.testing.assert_allclose(np.asarray(imp[k]), 0.5 * score(np.asarray(grads[0][k])),
                                 rtol=1e-5)
    u, state = jax.jit(tx.update)(grads[1], state, params)
    mask = epi_jax.unpacked_mask(state)
    n = sum(p.size for p in jax.tree.leaves(params))
    assert sum(int(m.sum()) for m in jax.tree.leaves(mask)) == int(0.1 * n)
    for k in params:  # isolated entries get no update, real or imaginary
      assert np.all(np.asarray(u[k])[np.asarray(mask[k])] == 0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_params_keep_dtype(dtype):
  params = make_params(dtype)
  tx = epi_jax.epi_adamw(1e-2, **KW)
  state, updates = _run(tx, [jax.tree.map(lambda g: jnp.asarray(g, dtype), g)
                             for g in grad_stream(3)], params)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates[-1]))
  assert int(epi_jax.epi_state(state).num_refreshes) == 1


def test_float64_params_with_x64():
  code = textwrap.dedent("""
      import jax
      jax.config.update("jax_enable_x64", True)
      import jax.numpy as jnp, numpy as np, optax, epi_jax
      params = {"w": jnp.zeros((8, 16), jnp.float64), "b": jnp.zeros((16,), jnp.float64)}
      rng = np.random.default_rng(0)
      for tx in (epi_jax.epi_adamw(1e-2, isolation_ratio=0.1, update_interval=2),
                 optax.inject_hyperparams(epi_jax.epi_adamw)(
                     learning_rate=1e-2, isolation_ratio=0.1, update_interval=2),
                 optax.chain(epi_jax.epi_transform(0.1, 2), optax.sgd(0.1))):
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(2):
          g = {k: jnp.asarray(rng.standard_normal(p.shape)) for k, p in params.items()}
          u, state = update(g, state, params)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(u)), u
        e = epi_jax.epi_state(state)
        assert int(e.num_refreshes) == 1
        assert sum(int(m.sum()) for m in jax.tree.leaves(e.mask)) == int(0.1 * 144)
      print("OK")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_no_recompilation_with_layer_axes():
  params = {"w": jnp.zeros((3, 8, 16)), "b": jnp.zeros((16,))}
  tx = epi_jax.epi_adamw(1e-2, isolation_ratio=0.1, update_interval=2, selection="layer",
                         layer_axes={"w": 0, "b": None})
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  rng = np.random.default_rng(0)
  for _ in range(5):
    params, state = step(params, state, jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params))
  assert int(epi_jax.epi_state(state).num_refreshes) == 2


@pytest.mark.parametrize("mode, warmup, interval", [
    ("evolving", None, 3), ("evolving", 2, 3), ("evolving", 0, 2), ("static", None, 2),
    ("static", 0, 3), ("static", 4, 2), ("none", None, 2)])
def test_is_refresh_step_matches_the_state(mode, warmup, interval):
  options = epi_jax.EPIOptions(isolation_ratio=0.1, update_interval=interval,
                               warmup_steps=warmup, mode=mode)
  tx = epi_jax.epi_transform(0.1, interval, warmup_steps=warmup, mode=mode)
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step, g in enumerate(grad_stream(9), start=1):
    before = int(state.num_refreshes)
    _, state = update(g, state, params)
    refreshed = int(state.num_refreshes) > before
    assert refreshed == bool(epi_jax.is_refresh_step(step, options)), step
    assert refreshed == bool(epi_jax.is_refresh_step(jnp.int32(step), options)), step
  steps = np.arange(1, 10)
  assert np.asarray(epi_jax.is_refresh_step(steps, options)).shape == steps.shape


@pytest.mark.parametrize("kwargs, match", [
    (dict(isolation_ratio=jnp.float32(1.5)), "isolation_ratio"),
    (dict(track_first_mask=1), "track_first_mask"),
    (dict(release_after=True), "release_after"),
    (dict(selection="local"), "selection"),
])
def test_options_validated_in_one_place(kwargs, match):
  args = dict(isolation_ratio=0.1, update_interval=10)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    epi_jax.EPIOptions(**args)
  with pytest.raises(ValueError, match=match):
    epi_jax.epi_adamw(1e-3, **args)


def test_select_mask_is_the_refresh_mask():
  params = make_params()
  grads = grad_stream(2)
  tx = epi_jax.epi_transform(**KW)
  state, _ = _run(tx, grads, params)
  mask, threshold = epi_jax.select_mask(state.importance, epi_jax.EPIOptions(**KW))
  chex.assert_trees_all_equal(mask, epi_jax.unpacked_mask(state))
  assert float(threshold) == float(state.threshold) > 0


def test_options_are_the_one_currency():
  """Every EPIOptions field is a keyword of the three factories (what
  inject_hyperparams sees), and the *_from_options forms build the same
  transformation from one EPIOptions."""
  import dataclasses
  import inspect
  fields = {f.name for f in dataclasses.fields(epi_jax.EPIOptions)}
  for factory in (epi_jax.epi_transform, epi_jax.isolate, epi_jax.epi_adamw):
    assert fields <= set(inspect.signature(factory).parameters), factory.__name__
  params, grads = make_params(), grad_stream(5, shift_at=2)
  options = epi_jax.EPIOptions(**KW)
  pairs = [(epi_jax.isolate(optax.adamw(1e-2), **KW),
            epi_jax.isolate_from_options(optax.adamw(1e-2), options)),
           (epi_jax.epi_transform(**KW), epi_jax.epi_transform_from_options(options))]
  for a, b in pairs:
    (sa, ua), (sb, ub) = _run(a, grads, params), _run(b, grads, params)
    chex.assert_trees_all_equal(ua, ub)
    chex.assert_trees_all_equal(epi_jax.epi_state(sa), epi_jax.epi_state(sb))
