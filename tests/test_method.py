"""EPI core: semantics against a numpy reference, both forms, optax/nnx interop."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import epi_jax
from epi_jax.method import selection

SHAPES = {"a": (64,), "b": (16, 24), "c": {"w": (8, 8, 4), "norm": (32,)}}


def make_params(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def grad_stream(num_steps, seed=1, shift_at=None):
  """Random gradients; after `shift_at` the scale moves from leaf 'a' to 'b'."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(num_steps):
    shifted = shift_at is not None and t >= shift_at
    scales = {"a": 0.1 if shifted else 3.0, "b": 3.0 if shifted else 0.1,
              "c": {"w": 1.0, "norm": 0.5}}
    g = jax.tree.map(lambda s, sc: (sc * rng.standard_normal(s) *
                                    rng.uniform(0.1, 2.0, size=s)).astype(np.float32),
                     SHAPES, scales, is_leaf=lambda x: isinstance(x, tuple))
    out.append(g)
  return out


def reference_masks(grads, params, *, p, T, beta, W=None, importance="grad_sq",
                    normalization="layer_mean", selection_="global", mode="evolving",
                    eligible=None, release_after=1):
  """Plain numpy EPI: the mask after every step."""
  W = T if W is None else W
  leaves_p = jax.tree.leaves(params)
  imp = [np.zeros(x.shape, np.float32) for x in leaves_p]
  mask = [np.zeros(x.shape, bool) for x in leaves_p]
  streak = [np.zeros(x.shape, int) for x in leaves_p]  # refreshes out of the top-k
  elig = eligible or [True] * len(imp)
  refreshes, out = 0, []
  for t, g in enumerate(grads):
    gl = [np.asarray(x, np.float32) for x in jax.tree.leaves(g)]
    if all(np.isfinite(x).all() for x in gl):
      for i, (x, th) in enumerate(zip(gl, leaves_p)):
        s = {"grad_sq": x * x, "grad_abs": np.abs(x),
             "taylor": np.abs(x * np.asarray(th, np.float32))}[importance]
        imp[i] = np.float32(beta) * imp[i] + np.float32(1 - beta) * s
    sched = (t + 1 >= W) and ((t + 1 - W) % T == 0)
    if mode == "static":
      sched = sched and refreshes == 0
    if mode != "none" and sched:
      refreshes += 1
      tiny = np.finfo(np.float32).tiny
      norm = []
      for x in imp:
        d = {"layer_mean": x.mean(), "layer_max": x.max(), "none": None}[normalization]
        norm.append(x if d is None else x * (np.float32(1) / (d + tiny)))
      if selection_ == "global":
        flat = np.concatenate([n.ravel() for n, e in zip(norm, elig) if e])
        k = int(np.floor(np.float32(p) * np.float32(flat.size)))
        thr = np.sort(flat)[::-1][k - 1] if k > 0 else np.inf
        mask = [(n >= thr) if e else np.zeros(n.shape, bool) for n, e in zip(norm, elig)]
      else:
        mask = []
        for n, e in zip(norm, elig):
          k = int(np.floor(np.float32(p) * np.float32(n.size)))
          thr = np.sort(n.ravel())[::-1][k - 1] if (k > 0 and e) else np.inf
          mask.append(n >= thr if e else np.zeros(n.shape, bool))
      if release_after > 1:  # hysteresis: isolated entries leave after R misses in a row
        old = out[-1] if out else [np.zeros(m.shape, bool) for m in mask]
        for i, (top, o) in enumerate(zip(mask, old)):
          streak[i] = np.where(top | ~o, 0, streak[i] + 1)
          mask[i] = top | (o & (streak[i] < release_after))
    out.append([m.copy() for m in mask])
  return out


def run_tx(tx, grads, params, jit=True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  masks = []
  for g in grads:
    _, state = update(jax.tree.map(jnp.asarray, g), state, params)
    masks.append([np.asarray(m) for m in jax.tree.leaves(epi_jax.unpacked_mask(state))])
  return state, masks


@pytest.mark.parametrize("options", [
    dict(),
    dict(normalization="layer_max"),
    dict(normalization="none", importance="grad_abs"),
    dict(importance="taylor"),
    dict(selection_="layer"),
    dict(mode="static"),
    dict(W=2),
    dict(release_after=2),
    dict(release_after=3, packed_mask=True),
])
def test_masks_match_numpy_reference(options):
  params = make_params()
  grads = grad_stream(14, shift_at=6)
  p, T, beta = 0.05, 4, 0.8
  opts = dict(options)
  W = opts.pop("W", None)
  sel = opts.pop("selection_", "global")
  packed = opts.pop("packed_mask", False)
  tx = epi_jax.epi_transform(p, T, beta, warmup_steps=W, selection=sel, packed_mask=packed,
                             **opts)
  _, got = run_tx(tx, grads, params)
  want = reference_masks(grads, params, p=p, T=T, beta=beta, W=W, selection_=sel, **opts)
  for t, (g_t, w_t) in enumerate(zip(got, want)):
    for g_leaf, w_leaf in zip(g_t, w_t):
      np.testing.assert_array_equal(g_leaf, w_leaf, err_msg=f"step {t} {options}")
  if "release_after" in options:  # the hysteresis kept some entries isolated for longer
    plain = reference_masks(grads, params, p=p, T=T, beta=beta, W=W, selection_=sel)
    assert any(int(a.sum()) > int(b.sum()) for g_t, w_t in zip(got, plain)
               for a, b in zip(g_t, w_t))
  # Importance actually drifted: the evolving masks change after the shift.
  if options == {}:
    assert not all(np.array_equal(a, b) for a, b in zip(got[3], got[-1]))


def test_exact_isolated_count_and_stats():
  params = make_params()
  n = sum(x.size for x in jax.tree.leaves(params))
  for p in (0.0, 0.013, 0.25, 1.0):
    tx = epi_jax.epi_transform(p, 2, 0.9)
    state, masks = run_tx(tx, grad_stream(2), params)
    assert sum(int(m.sum()) for m in masks[-1]) == int(np.floor(np.float32(p) * np.float32(n)))
    s = epi_jax.epi_state(state)
    np.testing.assert_allclose(float(s.isolated_fraction), np.floor(p * n) / n, rtol=1e-6)
    assert int(s.num_refreshes) == 1 and int(s.count) == 2


def test_nothing_isolated_before_first_refresh_and_same_step_mask():
  params = make_params()
  grads = grad_stream(3)
  tx = epi_jax.epi_transform(0.1, 3, 0.9)
  state = tx.init(params)
  for t, g in enumerate(grads):
    upd, state = tx.update(g, state, params)
    mask = epi_jax.epi_state(state).mask
    n_iso = sum(int(m.sum()) for m in jax.tree.leaves(mask))
    assert (n_iso > 0) == (t == 2)
    # The new mask already applies to this step's update.
    for u, m in zip(jax.tree.leaves(upd), jax.tree.leaves(mask)):
      assert np.all(np.asarray(u)[np.asarray(m)] == 0)


@pytest.fixture(scope="module")
def adamw_runs():
  """isolate(adamw) and chain(epi, adamw) over 4 refreshes with weight decay."""
  params0 = make_params()
  grads = grad_stream(20, shift_at=9)
  runs = {}
  for name, tx in {
      "wrapper": epi_jax.isolate(optax.adamw(0.05, weight_decay=0.1), 0.1, 4, 0.5),
      "chain": optax.chain(epi_jax.epi_transform(0.1, 4, 0.5),
                           optax.adamw(0.05, weight_decay=0.1)),
  }.items():
    state = tx.init(params0)
    update = jax.jit(tx.update)
    params, history = params0, []
    for g in grads:
      before = params
      u, state = update(g, state, params)
      params = optax.apply_updates(params, u)
      mask = epi_jax.epi_state(state).mask
      history.append((before, params, mask))
    runs[name] = history
  return runs


def test_wrapper_freezes_isolated_weights_bitwise(adamw_runs):
  history = adamw_runs["wrapper"]
  assert sum(float(np.sum(m)) > 0 for m in jax.tree.leaves(history[-1][2])) > 0
  for before, after, mask in history:
    for b, a, m in zip(jax.tree.leaves(before), jax.tree.leaves(after),
                       jax.tree.leaves(mask)):
      m = np.asarray(m)
      np.testing.assert_array_equal(np.asarray(a)[m], np.asarray(b)[m])
      assert np.all(np.asarray(a)[~m] != np.asarray(b)[~m])  # the rest moves
  # At least three refreshes happened, with different masks.
  masks = [np.concatenate([np.ravel(m) for m in jax.tree.leaves(h[2])]) for h in history]
  assert len({m.tobytes() for m in masks[3:]}) >= 3


def test_released_weights_move_again(adamw_runs):
  history = adamw_runs["wrapper"]
  released_moved = 0
  for t in range(1, len(history)):
    prev_mask = jax.tree.leaves(history[t - 1][2])
    before, after, mask = history[t]
    for pm, m, b, a in zip(prev_mask, jax.tree.leaves(mask), jax.tree.leaves(before),
                           jax.tree.leaves(after)):
      released = np.asarray(pm) & ~np.asarray(m)
      if released.any():
        assert np.all(np.asarray(a)[released] != np.asarray(b)[released])
        released_moved += int(released.sum())
  assert released_moved > 0


def test_chain_form_leaks_through_adamw(adamw_runs):
  """Documented behaviour: momentum and weight decay still move isolated weights."""
  leaked = 0
  for before, after, mask in adamw_runs["chain"]:
    for b, a, m in zip(jax.tree.leaves(before), jax.tree.leaves(after),
                       jax.tree.leaves(mask)):
      m = np.asarray(m)
      leaked += int(np.sum(np.asarray(a)[m] != np.asarray(b)[m]))
  assert leaked > 0


def test_static_and_evolving_differ_after_shift():
  params = make_params()
  grads = grad_stream(16, shift_at=6)
  masks = {}
  for mode in ("static", "evolving"):
    state, m = run_tx(epi_jax.epi_transform(0.05, 4, 0.5, mode=mode), grads, params)
    masks[mode] = m
    if mode == "static":
      assert int(epi_jax.epi_state(state).num_refreshes) == 1
  assert all(np.array_equal(a, b) for a, b in zip(masks["static"][3], masks["static"][-1]))
  assert all(np.array_equal(a, b) for a, b in zip(masks["static"][3], masks["evolving"][3]))
  assert not all(np.array_equal(a, b) for a, b in zip(masks["static"][-1],
                                                      masks["evolving"][-1]))


def test_mode_none_isolates_nothing_but_tracks_importance():
  params = make_params()
  state, masks = run_tx(epi_jax.epi_transform(0.5, 2, 0.9, mode="none"),
                        grad_stream(6), params)
  assert all(m.sum() == 0 for m in masks[-1])
  assert all(float(jnp.sum(i)) > 0 for i in jax.tree.leaves(epi_jax.epi_state(state).importance))


def test_non_finite_gradient_leaves_importance_unchanged():
  params = make_params()
  tx = epi_jax.epi_transform(0.1, 2, 0.9)
  grads = grad_stream(2)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(grads[0], state, params)
  bad = jax.tree.map(jnp.asarray, grads[1])
  bad["a"] = bad["a"].at[3].set(jnp.nan)
  _, state2 = jax.jit(tx.update)(bad, state, params)
  chex.assert_trees_all_equal(state2.importance, state.importance)
  assert int(state2.count) == 2
  assert all(bool(jnp.all(jnp.isfinite(i))) for i in jax.tree.leaves(state2.importance))


def test_finite_check_inf_and_huge_values():
  """inf skips the step like NaN; huge finite gradients (whose sum overflows) do not."""
  params = {"a": jnp.zeros((4, 8))}
  tx = epi_jax.epi_transform(0.1, 2, 0.5, importance="grad_abs")
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update({"a": jnp.ones((4, 8))}, state, params)
  _, skipped = update({"a": jnp.ones((4, 8)).at[1, 2].set(-jnp.inf)}, state, params)
  chex.assert_trees_all_equal(skipped.importance, state.importance)
  _, kept = update({"a": jnp.full((4, 8), 3e38)}, state, params)
  np.testing.assert_allclose(kept.importance["a"], 0.5 + 0.5 * 3e38, rtol=1e-6)


@pytest.mark.parametrize("shape", [(), (5,), (3, 64), (2, 3, 96), (7, 32)])
def test_count_true_matches_numpy(shape):
  """Bool counts, as 32-bit-word popcounts where the last axis allows it."""
  from epi_jax.method import compact, selection  # pylint: disable=g-import-not-at-top
  m = np.random.default_rng(0).random(shape) < 0.3
  assert int(jax.jit(selection.count_true)(jnp.asarray(m))) == int(m.sum())
  assert int(jax.jit(compact.popcount)(compact.pack(jnp.asarray(m)))) == int(m.sum())


def test_no_retracing_across_steps():
  params = make_params()
  tx = epi_jax.epi_adamw(1e-3, isolation_ratio=0.1, update_interval=2)
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for g in grad_stream(5):
    params, state = step(params, state, g)
  assert int(epi_jax.epi_state(state).num_refreshes) == 2


def test_multisteps():
  params = make_params()
  ms = optax.MultiSteps(epi_jax.epi_adamw(1e-2, isolation_ratio=0.1, update_interval=2),
                        every_k_schedule=3)
  state = ms.init(params)
  update = jax.jit(ms.update)
  for g in grad_stream(12):
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  s = epi_jax.epi_state(state)
  assert int(s.count) == 4 and int(s.num_refreshes) == 2
  assert float(s.isolated_fraction) > 0


def test_inject_hyperparams_traced_ratio_and_decay():
  params = make_params()
  grads = grad_stream(4)
  tx = optax.inject_hyperparams(epi_jax.epi_transform, static_args=("update_interval",))(
      isolation_ratio=0.05, update_interval=2, ema_decay=0.8)
  state, masks = run_tx(tx, grads, params)
  want = reference_masks(grads, params, p=0.05, T=2, beta=0.8)
  for g, w in zip(masks[-1], want[-1]):
    np.testing.assert_array_equal(g, w)
  # Changing the injected ratio changes k on the next refresh.
  state.hyperparams["isolation_ratio"] = jnp.asarray(0.2)
  for g in grad_stream(2, seed=5):
    _, state = jax.jit(tx.update)(g, state, params)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert sum(int(m.sum()) for m in jax.tree.leaves(epi_jax.epi_state(state).mask)) == int(0.2 * n)


def test_apply_if_finite_and_bf16_params():
  params = make_params(jnp.bfloat16)
  tx = optax.apply_if_finite(epi_jax.epi_adamw(1e-2, isolation_ratio=0.1,
                                               update_interval=2), 3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grad_stream(4):
    before = params
    u, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g), state, params)
    params = optax.apply_updates(params, u)
  s = epi_jax.epi_state(state)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert all(i.dtype == jnp.float32 for i in jax.tree.leaves(s.importance))
  for b, a, m in zip(jax.tree.leaves(before), jax.tree.leaves(params),
                     jax.tree.leaves(s.mask)):
    np.testing.assert_array_equal(np.asarray(a)[np.asarray(m)], np.asarray(b)[np.asarray(m)])


class _MLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.l2 = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.norm(self.l1(x))))


def test_nnx_optimizer_and_eligible_predicate():
  model = _MLP(nnx.Rngs(0))
  tx = epi_jax.epi_adamw(1e-2, isolation_ratio=0.2, update_interval=2,
                         eligible=lambda path: "norm" not in path)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), jnp.float32)
  y = jnp.sum(x, axis=1, keepdims=True)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(6)]
  assert losses[-1] < losses[0]
  s = epi_jax.epi_state(opt.opt_state)
  assert int(s.num_refreshes) == 3
  masks = nnx.to_pure_dict(s.mask) if hasattr(s.mask, "items") else s.mask
  norm_masks = [np.asarray(m) for m in jax.tree.leaves(masks["norm"])]
  assert all(m.sum() == 0 for m in norm_masks)
  assert sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(masks)) > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(isolation_ratio=1.5), "isolation_ratio"),
    (dict(isolation_ratio=-0.1), "isolation_ratio"),
    (dict(update_interval=0), "update_interval"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(importance="fisher"), "importance"),
    (dict(normalization="l2"), "normalization"),
    (dict(selection="local"), "selection"),
    (dict(mode="dynamic"), "mode"),
])
def test_bad_options_raise(kwargs, match):
  args = dict(isolation_ratio=0.1, update_interval=10)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    epi_jax.epi_transform(**args)


def test_bad_eligible_raises_at_init():
  params = make_params()
  with pytest.raises(ValueError, match="eligible does not match"):
    epi_jax.epi_transform(0.1, 2, eligible={"a": True}).init(params)
  none = jax.tree.map(lambda _: False, params)
  with pytest.raises(ValueError, match="No parameter is eligible"):
    epi_jax.isolate(optax.sgd(0.1), 0.1, 2, eligible=none).init(params)


def test_taylor_without_params_raises():
  params = make_params()
  tx = epi_jax.epi_transform(0.1, 2, importance="taylor")
  state = tx.init(params)
  with pytest.raises(ValueError, match="taylor"):
    tx.update(params, state)


def test_epi_state_not_found():
  with pytest.raises(ValueError, match="No EPIState"):
    epi_jax.epi_state(optax.adam(1e-3).init({"a": jnp.zeros(3)}))


@pytest.mark.parametrize("bits_per_pass", [1, 2, 4, 8])
def test_threshold_search_matches_sort_and_handles_ties(bits_per_pass):
  rng = np.random.default_rng(0)
  leaves = [rng.exponential(size=s).astype(np.float32) for s in (100, 37, 250)]
  leaves[1][:10] = 0.0  # exact zeros
  flat = np.concatenate(leaves)
  if bits_per_pass == 8:  # each pass unrolls 255 counts per leaf: one leaf, a third of the
    leaves = [flat]       # compile (the sums over leaves are checked at 1, 2 and 4 bits)
  bits = [selection.score_bits(jnp.asarray(x)) for x in leaves]
  # One compiled search for both checks (the leaves are arguments, of the same shapes).
  find = jax.jit(lambda bits, k: selection.kth_largest_bits(bits, k, bits_per_pass))
  for k in (0, 1, 7, 100, 386, 387):
    thr = find(bits, selection.count_from_int(k))
    got = sum(int(jnp.sum(b >= thr)) for b in bits)
    # 10 tied zeros: k in (377, 387) cannot be met exactly and takes fewer.
    assert got == (k if k <= 377 else (387 if k >= 387 else 377))
  # Ties at the threshold: a group of equal scores is taken whole or not at all.
  tied = [np.zeros_like(x) for x in leaves]
  tied[0][:5] = [3.0, 2.0, 2.0, 2.0, 1.0]
  tb = [selection.score_bits(jnp.asarray(t)) for t in tied]
  thr = find(tb, selection.count_from_int(2))
  assert sum(int(jnp.sum(b >= thr)) for b in tb) == 1


def test_counts_beyond_int32():
  a = selection.count_from_int(3 * 2**31 + 5)
  b = selection.add_counts(a, selection.split_count(jnp.int32(2**31 - 1)))
  total = 3 * 2**31 + 5 + 2**31 - 1
  assert int(b.hi) * 2**16 + int(b.lo) == total and 0 <= int(b.lo) < 2**16
  assert bool(selection.count_leq(a, b)) and not bool(selection.count_leq(b, a))
  k = selection.topk_count(jnp.float32(0.5), 2**40)
  assert float(selection.count_to_float(k)) == 2.0**39


def test_reset_on_release_zeroes_released_moments_only():
  params = make_params()
  grads = [jax.tree.map(jnp.asarray, g) for g in grad_stream(8, shift_at=4)]
  kw = dict(isolation_ratio=0.1, update_interval=2, ema_decay=0.5)
  tx_reset = epi_jax.isolate(optax.adam(1e-2), **kw, reset_on_release=True)
  tx_plain = epi_jax.isolate(optax.adam(1e-2), **kw)
  s_reset, s_plain = tx_reset.init(params), tx_plain.init(params)
  update_reset, update_plain = jax.jit(tx_reset.update), jax.jit(tx_plain.update)
  released_total = 0
  for g in grads:
    old_mask = s_plain.epi.mask
    _, s_reset = update_reset(g, s_reset, params)
    _, s_plain = update_plain(g, s_plain, params)
    released = jax.tree.map(lambda o, n: np.asarray(o & ~n), old_mask, s_plain.epi.mask)
    n_released = sum(int(r.sum()) for r in jax.tree.leaves(released))
    if n_released:
      # Up to the first release both runs are identical; at it, only the released
      # entries' moments differ, and they are zero.
      for moment in ("mu", "nu"):
        got = getattr(s_reset.inner[0], moment)
        want = getattr(s_plain.inner[0], moment)
        for gl, wl, rl in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                              jax.tree.leaves(released)):
          np.testing.assert_array_equal(np.asarray(gl)[rl], 0.0)
          np.testing.assert_array_equal(np.asarray(gl)[~rl], np.asarray(wl)[~rl])
      released_total = n_released
      break
  assert released_total > 0, "no refresh released anything: the check did not run"


def test_variant_options_validated_and_off_by_default():
  state = epi_jax.epi_transform(0.1, 2).init(make_params())
  assert state.out_streak == ()
  with pytest.raises(ValueError, match="release_after"):
    epi_jax.epi_transform(0.1, 2, release_after=0)
  with pytest.raises(ValueError, match="reset_on_release"):
    epi_jax.isolate(optax.adam(1e-3), 0.1, 2, reset_on_release=1)


def test_displacement_importance_is_cpi_ft_probe_mask():
  """importance='displacement', mode='static': top-k of |theta - theta_0| (layer-mean
  normalized) of the params the refresh step sees, then frozen."""
  params = make_params()
  grads = [jax.tree.map(jnp.asarray, g) for g in grad_stream(6, shift_at=3)]
  p, W = 0.1, 3
  tx = epi_jax.isolate(optax.sgd(0.1), p, 100, warmup_steps=W, importance="displacement",
                       mode="static")
  state = tx.init(params)
  update = jax.jit(tx.update)
  theta, seen = params, []
  for g in grads:
    seen.append(theta)
    u, state = update(g, state, theta)
    theta = optax.apply_updates(theta, u)
  # Reference: the refresh at step W used the params passed to that update.
  theta0 = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
  at = [np.asarray(x, np.float32) for x in jax.tree.leaves(seen[W - 1])]
  tiny = np.finfo(np.float32).tiny
  norm = [np.abs(a - b) * (np.float32(1) / (np.abs(a - b).mean() + tiny))
          for a, b in zip(at, theta0)]
  flat = np.concatenate([n.ravel() for n in norm])
  k = int(np.floor(np.float32(p) * np.float32(flat.size)))
  thr = np.sort(flat)[::-1][k - 1]
  want = [n >= thr for n in norm]
  got = [np.asarray(m) for m in jax.tree.leaves(epi_jax.unpacked_mask(state))]
  for g_leaf, w_leaf in zip(got, want):
    np.testing.assert_array_equal(g_leaf, w_leaf)
  assert sum(int(m.sum()) for m in got) == k and int(state.epi.num_refreshes) == 1
  # theta_0 is kept unchanged (a copy, not the donated params).
  chex.assert_trees_all_equal(state.epi.importance, params)
  with pytest.raises(ValueError, match="displacement"):
    epi_jax.isolate(optax.sgd(0.1), p, 2, importance="displacement",
                    importance_dtype="bfloat16")


def test_jaccard_of_counts_on_host_and_traced():
  """The package's one Jaccard: Python counts give a float, traced ones an array; both
  empty sets overlap fully; the sets themselves (not their sizes) are refused."""
  jaccard = epi_jax.method.jaccard
  assert jaccard(3, 4) == 0.75 and jaccard(0, 0) == 1.0
  traced = jax.jit(jaccard)
  assert float(traced(jnp.float32(3), jnp.float32(4))) == 0.75
  assert float(traced(jnp.float32(0), jnp.float32(0))) == 1.0
  with pytest.raises(ValueError, match="sizes"):
    jaccard(jnp.ones(3), jnp.ones(3))


def _default_lowering(monkeypatch):
  """Programs traced from here on take the branch of ``lax.platform_dependent``
  that a platform other than CPU (TPU, GPU) compiles, and run on CPU."""
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default, **_: default(*args))


@pytest.mark.parametrize("kwargs", [
    dict(track_first_mask=True, packed_mask=True, release_after=3),
    dict(selection="layer", importance="taylor", importance_dtype=jnp.bfloat16,
         normalization="layer_max", track_first_mask=True),
    dict(mode="static", importance="grad_abs", release_after=2,
         layer_axes={"a": None, "b": 0, "c": {"w": 0, "norm": None}}),
    dict(importance="inner_nu", selection="layer", track_first_mask=True, packed_mask=True),
    dict(form="chain", normalization="none", release_after=2, track_first_mask=True),
], ids=["packed-hysteresis", "layer-taylor-bf16", "static-stacked", "inner_nu", "chain"])
def test_cpu_and_default_lowerings_agree_bitwise(kwargs, monkeypatch):
  """The CPU lowering rebuilds the masks every step outside the refresh's cond;
  the default one (TPU) builds them in it and passes them through on a plain
  step. Same state, bit for bit, at every step, refreshes included."""
  params = make_params()
  grads = [jax.tree.map(jnp.asarray, g) for g in grad_stream(10, shift_at=5)]
  kw = dict(kwargs)
  chain = kw.pop("form", None) == "chain"

  def run():  # a fresh transformation: traced again, under the lowering in force
    tx = (epi_jax.epi_transform(0.1, 2, 0.8, warmup_steps=3, **kw) if chain else
          epi_jax.isolate(optax.adam(1e-2, b2=0.875), 0.1, 2, warmup_steps=3, **kw))
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for g in grads:
      u, state = update(g, state, params)
      out.append((u, state))
    return out

  cpu = run()
  _default_lowering(monkeypatch)
  default = run()
  for t, (got, want) in enumerate(zip(default, cpu)):
    chex.assert_trees_all_equal(got, want, strict=True, custom_message=f"step {t + 1}")
  s = epi_jax.epi_state(cpu[-1][1])
  assert int(s.num_refreshes) == (1 if kw.get("mode") == "static" else 4)
  assert float(s.isolated_fraction) > 0


def test_cpu_plain_step_copies_no_mask(monkeypatch):
  """XLA:CPU copies each bool mask that a cond passes through (outside its fused
  loops: a slower plain step, BENCHMARKS.md); the CPU lowering selects the old
  masks back elementwise instead, which XLA fuses."""
  params = make_params()

  def mask_copies():
    tx = epi_jax.isolate(optax.adamw(1e-3), 0.1, 1000, track_first_mask=True)

    def step(p, s, g):  # traced afresh: jit caches the trace of a function it saw
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    text = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, tx.init(params), params).compile().as_text()
    return re.findall(r"pred\[[\d,]+\]\{[\d,]*\} copy\(", text)

  assert not mask_copies()
  _default_lowering(monkeypatch)  # what the CPU lowering avoids
  assert mask_copies()
