"""``importance="inner_nu"``: EPI ranks the inner optimizer's second moment.

Adam's ``nu`` is ``b2 nu + (1 - b2) g^2``, EPI's ``grad_sq`` EMA with
``beta = b2`` over the same raw gradients. With ``b2 = 0.875`` (exact in binary,
so ``1 - b2`` rounds the same in both) the two are equal bit for bit, and so
are the masks at every refresh.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import epi_jax
from epi_jax.method.options import OptionError

B2 = 0.875
SHAPES = {"emb": (16, 8), "layers": {"w": (3, 8, 16), "b": (3, 16)}, "norm": (16,)}
LAYER_AXES = {"emb": None, "layers": {"w": 0, "b": 0}, "norm": None}
SPECS = {"emb": P("fsdp", None), "layers": {"w": P(None, "fsdp", "tensor"),
                                            "b": P(None, "tensor")}, "norm": P()}


def _params():
  leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  return jax.tree.unflatten(treedef, [jnp.full(s, 0.5, jnp.float32) for s in leaves])


def _grads(t, params):
  """Gradients whose per-leaf scale moves over time (the top set drifts)."""
  rng = np.random.default_rng(t)
  return jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal(p.shape) * rng.uniform(0.1, 3.0, p.shape) * (1 + t % 3), p.dtype),
      params)


def _run(tx, num_steps, params, shardings=None):
  """Masks after every step, and the final state and params."""
  if shardings is not None:
    params = jax.device_put(params, shardings)
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  masks = []
  for t in range(num_steps):
    g = _grads(t, params)
    if shardings is not None:
      g = jax.device_put(g, shardings)
    params, state = step(params, state, g)
    masks.append(jax.tree.map(np.asarray, epi_jax.unpacked_mask(state)))
  return masks, state, params


@pytest.mark.parametrize("selection, normalization, stacked, sharded, packed", [
    ("global", "layer_mean", False, False, False),
    ("layer", "layer_max", True, False, True),
    ("global", "none", True, True, False),
    ("layer", "layer_mean", True, True, True),
])
def test_masks_equal_the_ema_with_beta_b2(selection, normalization, stacked, sharded, packed):
  kw = dict(isolation_ratio=0.2, update_interval=2, selection=selection,
            normalization=normalization, track_first_mask=True, packed_mask=packed,
            eligible=lambda path: "norm" not in path,
            layer_axes=LAYER_AXES if stacked else None)
  ema = epi_jax.epi_adamw(1e-2, b2=B2, ema_decay=B2, **kw)
  nu = epi_jax.epi_adamw(1e-2, b2=B2, importance="inner_nu", **kw)
  shardings = None
  if sharded:
    if jax.device_count() < 8:
      pytest.fail("needs 8 (fake) devices: see conftest.py")
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
  masks_a, state_a, params_a = _run(ema, 7, _params(), shardings)
  masks_b, state_b, params_b = _run(nu, 7, _params(), shardings)

  a, b = epi_jax.epi_state(state_a), epi_jax.epi_state(state_b)
  assert int(b.num_refreshes) == 3
  assert 0 < float(b.isolated_fraction) and float(b.jaccard_prev) < 1  # the set drifted
  for ma, mb in zip(masks_a, masks_b):
    chex.assert_trees_all_equal(ma, mb)
  chex.assert_trees_all_equal(epi_jax.epi_metrics(a), epi_jax.epi_metrics(b))
  chex.assert_trees_all_equal(params_a, params_b)
  # The importance EPI ranked is Adam's nu, bit for bit its own EMA's.
  chex.assert_trees_all_equal(epi_jax.epi_importance(state_a), epi_jax.epi_importance(state_b))
  if sharded:  # nu is read where it lives: the masks are laid out as the EMA version's
    for ma, mb in zip(jax.tree.leaves(a.mask), jax.tree.leaves(b.mask)):
      assert mb.sharding.is_equivalent_to(ma.sharding, mb.ndim)
    g = jax.device_put(_grads(0, params_b), shardings)
    hlos = [jax.jit(tx.update).lower(g, s, params_b).compile().as_text()
            for tx, s in ((ema, state_a), (nu, state_b))]
    for op in ("all-gather(", "all-to-all(", "collective-permute("):
      assert hlos[1].count(op) <= hlos[0].count(op), op
    if not packed:  # (packing 4 entries per shard along a sharded axis gathers bytes)
      assert "all-gather(" not in hlos[1]


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if x.ndim > 0)


def test_state_has_no_importance_and_packed_is_one_bit_per_parameter():
  # (Packed masks hold 8 rows per byte: exactly 1 bit per entry where rows are a
  # multiple of 8, as in a model's weights.)
  params = {"w": jnp.zeros((8, 64)), "b": jnp.zeros((16, 32))}
  n = 8 * 64 + 16 * 32
  kw = dict(b2=B2, isolation_ratio=0.1, update_interval=2)
  per_param = {}
  for name, extra in [("default", {}),
                      ("compact", dict(importance_dtype="bfloat16", packed_mask=True)),
                      ("inner_nu", dict(importance="inner_nu")),
                      ("inner_nu_packed", dict(importance="inner_nu", packed_mask=True))]:
    state = epi_jax.epi_state(epi_jax.epi_adamw(1e-2, **kw, **extra).init(params))
    per_param[name] = _nbytes(state) / n
  assert per_param == {"default": 5.0, "compact": 2.125, "inner_nu": 1.0,
                       "inner_nu_packed": 0.125}
  state = epi_jax.epi_state(epi_jax.epi_adamw(1e-2, importance="inner_nu", **kw).init(params))
  assert jax.tree.leaves(state.importance) == []


def test_errors_name_the_problem():
  params = {"w": jnp.zeros((4, 8))}
  with pytest.raises(ValueError, match="second moment `nu`.*has no such field"):
    epi_jax.isolate(optax.sgd(0.1), 0.1, 2, importance="inner_nu").init(params)
  with pytest.raises(ValueError, match="has 2 of them"):
    epi_jax.isolate(optax.chain(optax.adam(0.1), optax.adam(0.1)), 0.1, 2,
                    importance="inner_nu").init(params)
  with pytest.raises(ValueError, match="not shaped like the params"):
    epi_jax.isolate(optax.masked(optax.adam(0.1), {"w": False}), 0.1, 2,
                    importance="inner_nu").init(params)
  with pytest.raises(OptionError, match="wrapper form"):
    epi_jax.epi_transform(0.1, 2, importance="inner_nu")
  with pytest.raises(OptionError, match=r"b2=0.999: ema_decay=0.99 differs"):
    epi_jax.epi_adamw(1e-2, importance="inner_nu", ema_decay=0.99)
  with pytest.raises(OptionError, match="leave ema_decay unset"):
    epi_jax.isolate(optax.adam(0.1), 0.1, 2, 0.999, importance="inner_nu")
  with pytest.raises(OptionError, match="importance_dtype does not apply"):
    epi_jax.epi_adamw(1e-2, importance="inner_nu", importance_dtype="bfloat16")
  with pytest.raises(ValueError, match="pass the whole optimizer state"):
    state = epi_jax.epi_adamw(1e-2, importance="inner_nu", packed_mask=True).init(params)
    epi_jax.unpacked_mask(epi_jax.epi_state(state))
  # Equal to b2 is accepted, and changes nothing.
  epi_jax.epi_adamw(1e-2, b2=0.9, importance="inner_nu", ema_decay=0.9)


def test_inject_hyperparams_multisteps_and_orbax_restore(tmp_path):
  kw = dict(b2=B2, isolation_ratio=0.2, update_interval=2, importance="inner_nu",
            track_first_mask=True)
  plain = epi_jax.epi_adamw(1e-2, **kw)
  injected = optax.inject_hyperparams(epi_jax.epi_adamw)(learning_rate=1e-2, **kw)
  masks_plain, _, params_plain = _run(plain, 5, _params())
  masks_inj, _, params_inj = _run(injected, 5, _params())
  for a, b in zip(masks_plain, masks_inj):
    chex.assert_trees_all_equal(a, b)
  # (AdamW's own arithmetic on injected float32 hyperparameters differs in the last bits.)
  chex.assert_trees_all_close(params_plain, params_inj, rtol=1e-6)

  # MultiSteps outside: EPI sees the averaged gradient every 2 micro-steps,
  # as the EMA version does.
  multi = [optax.MultiSteps(epi_jax.epi_adamw(1e-2, b2=B2, isolation_ratio=0.2,
                                             update_interval=2, **src), 2)
           for src in (dict(ema_decay=B2), dict(importance="inner_nu"))]
  runs = [_run(tx, 8, _params()) for tx in multi]
  for a, b in zip(runs[0][0], runs[1][0]):
    chex.assert_trees_all_equal(a, b)
  assert int(epi_jax.epi_state(runs[1][1]).num_refreshes) == 2

  # Orbax: save after 3 steps, restore, continue: the same as uninterrupted.
  params, state = _params(), plain.init(_params())
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *plain.update(g, s, p)))
  for t in range(3):
    params, state = step(params, state, _grads(t, params))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(
      ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state}))
  params, state = restored["params"], restored["opt_state"]
  for t in range(3, 5):
    params, state = step(params, state, _grads(t, params))
  chex.assert_trees_all_equal(params, params_plain)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, epi_jax.unpacked_mask(state)),
                              masks_plain[-1])


def test_reset_on_release_zeroes_the_released_importance():
  """Released entries restart Adam's moments, nu included, so their importance
  restarts from 0 too (with the own EMA it is kept): a released weight is
  fresh for both, and is not re-isolated before its nu has grown back."""
  params = {"w": jnp.zeros((8, 16))}
  tx = epi_jax.epi_adamw(1e-2, b2=B2, isolation_ratio=0.25, update_interval=2,
                         importance="inner_nu", reset_on_release=True)
  state = tx.init(params)
  update = jax.jit(tx.update)
  released_any = False
  for t in range(8):
    old = np.asarray(epi_jax.unpacked_mask(state)["w"])
    _, state = update(_grads(t, params), state, params)
    new = np.asarray(epi_jax.unpacked_mask(state)["w"])
    released = old & ~new
    nu = np.asarray(epi_jax.epi_importance(state)["w"])
    np.testing.assert_array_equal(nu[released], 0.0)
    assert np.all(nu[~released] > 0)
    released_any |= bool(released.any())
  assert released_any


@pytest.mark.slow
def test_trainer_inner_nu_equals_the_ema_with_beta_b2(tmp_path):
  """``config.epi.importance="inner_nu"`` in the trainer: with no clipping (the
  inner AdamW then sees the raw gradients) and ``epi.ema_decay = optimizer.b2``
  for the EMA run, the same losses, masks and params bit for bit."""
  from test_training import losses, small_config
  from epi_jax.training import train

  def config(**epi):
    c = small_config()
    c.total_steps = 4
    c.checkpoint_every = 4
    c.snapshot_steps = ()
    c.optimizer.clip_norm = 0.0
    c.optimizer.b2 = B2
    c.epi.packed_mask = True
    c.epi.update(epi)
    return c

  runs = {name: train(config(**epi), tmp_path / name) for name, epi in
          [("ema", {"ema_decay": B2}), ("nu", {"importance": "inner_nu", "ema_decay": None})]}
  assert losses(tmp_path / "ema") == losses(tmp_path / "nu")
  states = {k: epi_jax.epi_state(r.state.opt_state) for k, r in runs.items()}
  assert int(states["nu"].num_refreshes) == 2
  assert jax.tree.leaves(states["nu"].importance) == []
  masks = [epi_jax.unpacked_mask(r.state.opt_state) for r in runs.values()]
  chex.assert_trees_all_equal(*masks)
  chex.assert_trees_all_equal(*(r.params for r in runs.values()))

  with pytest.raises(ValueError, match=r"config.epi.ema_decay.*optimizer.b2=0.875"):
    from epi_jax.training import config as cfg_lib
    cfg_lib.validate(config(importance="inner_nu", ema_decay=0.9))


def test_compare_knows_the_epi_nu_variant():
  from test_training import small_config
  from epi_jax.experiments import compare
  cfg = compare.method_config(small_config(), "epi_nu", seed=3)
  assert (cfg.method, cfg.seed, cfg.epi.importance, cfg.epi.ema_decay) == (
      "epi", 3, "inner_nu", None)
  assert cfg.optimizer.clip_scope == "all"
  compare._check_methods(["full", "epi", "epi_nu"], 1)
