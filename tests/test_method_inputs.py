"""EPI on the inputs a demanding user gives it: int and bool leaves, gradients
whose squares overflow, every way of passing the ratio, options of the wrong type."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import epi_jax
from epi_jax.method import selection
from epi_jax.method.options import OptionError


def _float_grads(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).permutation(np.prod(shape)).reshape(shape)
                     + 1.0, jnp.float32)


@pytest.mark.parametrize("importance", ["grad_sq", "displacement"])
def test_int_and_bool_leaves_are_never_eligible(importance):
  params = {"w": jnp.ones((10, 10)), "step": jnp.arange(100, dtype=jnp.int32),
            "flag": jnp.array(True)}
  grads = {"w": _float_grads((10, 10)), "step": jnp.arange(100, dtype=jnp.int32),
           "flag": jnp.array(False)}
  tx = epi_jax.epi_transform(0.1, 1, importance=importance)
  state = tx.init(params)
  if importance == "displacement":  # |theta - theta_0| ranks: move w unevenly
    params = dict(params, w=params["w"] + grads["w"])
  updates, state = jax.jit(tx.update)(grads, state, params)
  mask = epi_jax.unpacked_mask(state)
  # k = floor(0.1 * 100) over w's 100 float entries only: the int leaf's 100
  # entries do not count.
  assert int(mask["w"].sum()) == 10
  assert not mask["step"].any() and not mask["flag"].any()
  assert float(state.isolated_fraction) == pytest.approx(0.1)
  np.testing.assert_array_equal(updates["step"], grads["step"])
  assert updates["flag"].dtype == jnp.bool_
  with pytest.raises(ValueError, match="No parameter is eligible"):
    epi_jax.epi_transform(0.1, 1).init({"step": jnp.zeros((3,), jnp.int32)})


def test_overflowing_square_leaves_importance_finite_and_layer_selectable():
  params = {"a": jnp.zeros((4, 8)), "b": jnp.zeros((4, 8))}
  tx = epi_jax.epi_transform(0.25, 1, 0.5)
  update = jax.jit(tx.update)
  state = tx.init(params)
  # 1e20 is finite, its square (1e40) is not a float32.
  huge = {"a": jnp.ones((4, 8)).at[0, 0].set(1e20), "b": jnp.ones((4, 8))}
  _, state = update(huge, state, params)
  for leaf in jax.tree.leaves(state.importance):
    assert np.isfinite(np.asarray(leaf)).all()
    np.testing.assert_array_equal(leaf, 0.0)  # the step is skipped, as for inf/NaN
  # Then a's entries matter most: they are isolated (a NaN-normalized layer never is).
  _, state = update({"a": _float_grads((4, 8)), "b": jnp.ones((4, 8))}, state, params)
  assert int(epi_jax.unpacked_mask(state)["a"].sum()) > 0


def test_overflowing_taylor_score_is_skipped():
  params = {"a": jnp.full((4, 8), 1e20)}
  tx = epi_jax.epi_transform(0.25, 1, 0.5, importance="taylor")
  state = tx.init(params)
  _, state = jax.jit(tx.update)({"a": jnp.full((4, 8), 1e20)}, state, params)
  np.testing.assert_array_equal(state.importance["a"], 0.0)


def test_k_is_the_same_however_the_ratio_arrives():
  rng = np.random.default_rng(0)
  ratios = np.concatenate([np.arange(101) / 100, np.arange(0, 1000, 7) / 1000,
                           rng.uniform(0, 1, 200), [1e-7, 0.999999, 1.0]])
  for n in [1, 7, 100, 1000, 12345, 999_983, 2**24 + 3, 7 * 10**9]:
    traced = jax.jit(lambda r, n=n: selection.topk_count(r, n))(jnp.asarray(ratios, jnp.float32))
    traced = np.asarray(traced.hi, np.int64) * 2**16 + np.asarray(traced.lo, np.int64)
    for r, t in zip(ratios, traced):
      py = selection.topk_count(float(r), n)
      f32 = selection.topk_count(np.float32(r), n)
      assert int(py.hi) * 2**16 + int(py.lo) == int(f32.hi) * 2**16 + int(f32.lo) == t, (r, n)
      assert abs(t - r * n) <= max(1, r * n * 2**-22), (r, n)
  # The decimal ratio the issue reported: 29 of 100 in every form.
  assert selection.num_selected(0.29, 100) == 29


def test_injected_ratio_isolates_as_many_as_a_float():
  params = {"w": jnp.zeros((10, 10))}
  grads = {"w": _float_grads((10, 10))}

  def isolated(tx):
    state = tx.init(params)
    _, state = jax.jit(tx.update)(grads, state, params)
    return int(epi_jax.unpacked_mask(state)["w"].sum())

  plain = isolated(epi_jax.epi_transform(0.29, 1))
  injected = isolated(optax.inject_hyperparams(epi_jax.epi_transform)(0.29, 1))
  assert plain == injected == isolated(epi_jax.epi_transform(np.float32(0.29), 1)) == 29


@pytest.mark.parametrize("field, value, message", [
    ("isolation_ratio", "0.1", "must be a number"),
    ("isolation_ratio", None, "must be a number"),
    ("isolation_ratio", True, "not a bool"),
    ("isolation_ratio", jnp.array([0.1, 0.2]), "must be a scalar"),
    ("isolation_ratio", optax.constant_schedule(0.1), "inject_hyperparams"),
    ("update_interval", "10", "must be a number"),
    ("update_interval", None, "must be a number"),
    ("update_interval", 2.5, "must be an int"),
    ("update_interval", True, "not a bool"),
    ("ema_decay", True, "not a bool"),
    ("ema_decay", "0.9", "must be a number"),
    ("ema_decay", lambda step: 0.9, "inject_hyperparams"),
    ("warmup_steps", "5", "must be a number"),
    ("warmup_steps", 1.5, "must be an int"),
    ("warmup_steps", np.zeros(3, np.int32), "must be a scalar"),
])
def test_bad_option_types_fail_at_construction(field, value, message):
  kwargs = {"isolation_ratio": 0.1, "update_interval": 10, field: value}
  with pytest.raises(OptionError, match=message) as e:
    epi_jax.epi_adamw(1e-3, **kwargs)
  assert e.value.field == field and "\n" not in str(e.value)


def test_injected_options_are_accepted():
  params = {"w": jnp.zeros((10, 10))}
  tx = optax.inject_hyperparams(epi_jax.epi_adamw)(
      1e-2, isolation_ratio=0.2, update_interval=2, ema_decay=0.9, warmup_steps=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(4):
    _, state = step({"w": _float_grads((10, 10), t)}, state, params)
  s = epi_jax.epi_state(state)
  assert int(s.num_refreshes) == 2 and float(s.isolated_fraction) == pytest.approx(0.2)
