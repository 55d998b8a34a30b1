"""Lock-in statistics (epi_jax.method.lock_in) on constructed mask sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from epi_jax.method import lock_in
from epi_jax.method import inspection
from epi_jax.method import transforms
from epi_jax.method.options import EPIOptions


def _b(*bits):
  return np.array(bits, bool)


def _f(*xs):
  return np.array(xs, np.float32)


def test_known_answers_of_a_moving_mask():
  # Entry 0: isolated at every refresh (one ongoing spell of 3); entry 1: one
  # completed spell of 1; entry 2: an ongoing spell of 2. Spells 3, lengths 6.
  masks = [_b(1, 1, 0, 0), _b(1, 0, 1, 0), _b(1, 0, 1, 0)]
  imps = [_f(1, 1, 1, 1), _f(4, 2, 1, 1), _f(2, 2, 2, 2)]
  s = lock_in.lock_in_stats(masks, imps)
  assert s["num_refreshes"] == 3
  assert s["release_fraction"] == [None, 0.5, 0.0]
  # Refresh 2 ranks I=[4,2,1,1]: M_1={0,1} mean 3 vs trainable mean 1.
  assert s["importance_ratio"] == [None, 3.0, 1.0]
  assert s["isolated_fraction"] == [0.5, 0.5, 0.5]
  assert s["mean_release_fraction"] == 0.25 and s["mean_importance_ratio"] == 2.0
  assert s["mean_spell_refreshes"] == 2.0
  assert s["ongoing_spell_share"] == pytest.approx(2 / 3)


def test_a_locked_in_mask_never_releases():
  masks = [_b(1, 0, 0, 0)] * 4
  imps = [_f(5, 1, 1, 1)] * 4
  s = lock_in.lock_in_stats(masks, imps, jaccard_vs_full=[1.0, 0.5, None, 0.0])
  assert s["release_fraction"] == [None, 0.0, 0.0, 0.0]
  assert s["mean_spell_refreshes"] == 4.0 and s["ongoing_spell_share"] == 1.0
  assert s["importance_ratio"][1:] == [5.0, 5.0, 5.0]
  assert s["mean_jaccard_vs_full"] == 0.5


def test_a_mask_replaced_at_every_refresh_has_spells_of_one():
  masks = [_b(1, 1, 0, 0), _b(0, 0, 1, 1), _b(1, 1, 0, 0)]
  s = lock_in.lock_in_stats(masks, [_f(1, 1, 1, 1)] * 3)
  assert s["release_fraction"] == [None, 1.0, 1.0]
  assert s["mean_spell_refreshes"] == 1.0 and s["ongoing_spell_share"] == pytest.approx(1 / 3)


def test_pytrees_and_an_initial_mask():
  """Leaves are summed together; spells already ongoing at M_0 count once."""
  m0 = {"a": _b(1, 0), "b": _b(0, 0, 0)}
  masks = [{"a": _b(1, 0), "b": _b(0, 1, 0)}, {"a": _b(0, 0), "b": _b(0, 1, 1)}]
  imps = [{"a": _f(3, 1), "b": _f(1, 1, 1)}, {"a": _f(1, 1), "b": _f(1, 1, 1)}]
  s = lock_in.lock_in_stats(masks, imps, initial_mask=m0)
  assert s["release_fraction"] == [0.0, 0.5]
  assert s["importance_ratio"][0] == 3.0  # M_0={a0}: 3 vs mean(1,1,1,1) = 1
  # Spells: a0 (M_0..M_1, 1 refresh), b1 (2), b2 (1): 4 / 3.
  assert s["mean_spell_refreshes"] == pytest.approx(4 / 3)


def test_ineligible_entries_count_nowhere():
  """Entry 3 is ineligible (a norm scale, say): huge importance, never trainable."""
  masks = [_b(1, 0, 0, 0), _b(0, 1, 0, 0)]
  imps = [_f(1, 1, 1, 100), _f(4, 1, 1, 100)]
  c = jax.device_get(lock_in.transition_counts(masks[0], masks[1], imps[1],
                                               eligible=[_b(1, 1, 1, 0)]))
  assert int(c["entries"]) == 3 and int(c["released"]) == 1 and int(c["entered"]) == 1
  assert lock_in.refresh_stats(c)["importance_ratio"] == 4.0  # 4 vs mean(1, 1)


def test_bad_input_is_a_one_line_error():
  with pytest.raises(ValueError, match="2 masks but 1 importances"):
    lock_in.lock_in_stats([_b(1), _b(0)], [_f(1)])
  with pytest.raises(ValueError, match="no refresh records"):
    lock_in.lock_in_summary([])
  with pytest.raises(ValueError, match="differ in structure"):
    lock_in.transition_counts({"a": _b(1)}, {"a": _b(1), "b": _b(0)}, {"a": _f(1)})
  with pytest.raises(ValueError, match="jaccard_vs_full has 1 values for 2"):
    lock_in.lock_in_stats([_b(1), _b(1)], [_f(1), _f(1)], jaccard_vs_full=[1.0])


@pytest.mark.parametrize("packed", [False, True])
def test_state_counts_read_an_optimizer_state(packed):
  """From a real EPI state (packed bits or bools): the counts of the mask's change
  across a refresh equal those of its unpacked masks."""
  params = {"w": jnp.zeros((4, 16)), "v": jnp.zeros((16,))}
  tx = transforms.epi_adamw(1e-2, isolation_ratio=0.25, update_interval=2, ema_decay=0.5,
                            warmup_steps=2, packed_mask=packed)
  state = tx.init(params)
  key = jax.random.PRNGKey(0)
  prev = None
  for step in range(1, 5):
    key, sub = jax.random.split(key)
    grads = jax.tree.map(lambda p: jax.random.normal(sub, p.shape), params)
    if step == 4:
      prev = lock_in.stored_mask_copy(state)
      prev_bool = inspection.unpacked_mask(state)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  got = jax.device_get(jax.jit(lock_in.state_counts)(prev, state))
  options = EPIOptions(isolation_ratio=0.25, update_interval=2)
  assert int(jax.device_get(lock_in.state_counts(prev, state, options))["entries"]) == 80
  want = jax.device_get(lock_in.transition_counts(
      prev_bool, inspection.unpacked_mask(state), inspection.epi_importance(state)))
  assert {k: float(v) for k, v in got.items()} == pytest.approx(
      {k: float(v) for k, v in want.items()}, rel=1e-5)
  assert int(got["isolated"]) == int(got["prev_isolated"]) == 20  # 25% of 80
  assert int(got["released"]) == int(got["entered"])
  # The copy is bits whether the state's mask is packed or not.
  assert all(x.dtype == jnp.uint8 for x in jax.tree.leaves(prev))
