"""EPI on stacked (scanned) layers: ``layer_axes`` gives the masks of the unstacked model."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import epi_jax
from test_method import reference_masks

L = 3
EMB, W, B = (16, 8), (8, 12), (12,)


def unstacked_grads(num_steps, seed=0):
  """Per-layer gradients whose scale moves from layer 0 to layer 2 halfway."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(num_steps):
    g = {"emb": rng.standard_normal(EMB).astype(np.float32)}
    for l in range(L):
      s = (3.0 if l == 0 else 0.3) if t < num_steps // 2 else (3.0 if l == 2 else 0.3)
      g[f"layers_{l}"] = {
          "w": (s * rng.standard_normal(W) * rng.uniform(0.1, 2, W)).astype(np.float32),
          "b": (s * rng.standard_normal(B)).astype(np.float32)}
    out.append(g)
  return out


def stack(tree, w_axis, b_axis):
  """The same values with the layers stacked: ``w`` on ``w_axis``, ``b`` on ``b_axis``."""
  return {"emb": tree["emb"], "layers": {
      "w": np.stack([tree[f"layers_{l}"]["w"] for l in range(L)], axis=w_axis),
      "b": np.stack([tree[f"layers_{l}"]["b"] for l in range(L)], axis=b_axis)}}


def unstack(tree, w_axis, b_axis):
  out = {"emb": np.asarray(tree["emb"])}
  for l in range(L):
    out[f"layers_{l}"] = {"w": np.take(np.asarray(tree["layers"]["w"]), l, axis=w_axis),
                          "b": np.take(np.asarray(tree["layers"]["b"]), l, axis=b_axis)}
  return out


def run_masks(tx, grads, params):
  state = tx.init(params)
  update = jax.jit(tx.update)
  masks = []
  for g in grads:
    _, state = update(jax.tree.map(jnp.asarray, g), state, params)
    masks.append(jax.device_get(epi_jax.unpacked_mask(state)))
  return state, masks


LAYOUTS = {
    "axis0_pytree": (0, 0, lambda: {"emb": None, "layers": {"w": 0, "b": 0}}),
    "axis1_maxtext": (1, 1, lambda: {"emb": None, "layers": {"w": 1, "b": -1}}),
    "axis0_callable": (0, 0, lambda: (lambda path, shape: 0 if path.startswith("layers/")
                                      else None)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("options", [
    dict(),
    dict(selection="layer"),
    dict(normalization="layer_max", packed_mask=True),
    dict(importance_dtype="bfloat16", release_after=2),
    dict(selection="layer", importance_dtype="bfloat16", packed_mask=True, release_after=3),
])
def test_stacked_masks_equal_unstacked(layout, options):
  w_axis, b_axis, make_axes = LAYOUTS[layout]
  grads = unstacked_grads(10)
  params = jax.tree.map(lambda g: np.zeros_like(g), grads[0])
  kw = dict(isolation_ratio=0.1, update_interval=3, ema_decay=0.7, track_first_mask=True,
            **options)
  _, flat = run_masks(epi_jax.epi_transform(**kw), grads, params)
  s_state, stacked = run_masks(
      epi_jax.epi_transform(layer_axes=make_axes(), **kw),
      [stack(g, w_axis, b_axis) for g in grads], stack(params, w_axis, b_axis))
  assert int(s_state.num_refreshes) == 3
  for t, (a, b) in enumerate(zip(flat, stacked)):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, err_msg=f"step {t}"),
                 a, unstack(b, w_axis, b_axis))
  # The masks evolved between refreshes (the comparison saw real selections).
  assert any(not np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(flat[3]), jax.tree.leaves(flat[-1])))
  assert all(m.any() for m in jax.tree.leaves(flat[-1])) or options.get("selection") != "layer"
  if "importance_dtype" not in options and "release_after" not in options:
    want = reference_masks(grads, params, p=0.1, T=3, beta=0.7,
                           normalization=options.get("normalization", "layer_mean"),
                           selection_=options.get("selection", "global"))
    for got_t, want_t in zip(flat, want):
      for x, y in zip(jax.tree.leaves(got_t), want_t):
        np.testing.assert_array_equal(x, y)


def test_layer_selection_is_per_slice_and_stats():
  """selection='layer' takes the top-p of every layer of a stacked leaf."""
  grads = unstacked_grads(3)
  params = stack(jax.tree.map(np.zeros_like, grads[0]), 0, 0)
  tx = epi_jax.epi_transform(0.25, 3, 0.5, selection="layer",
                             layer_axes={"emb": None, "layers": {"w": 0, "b": 0}})
  state, masks = run_masks(tx, [stack(g, 0, 0) for g in grads], params)
  w = masks[-1]["layers"]["w"]
  assert [int(w[l].sum()) for l in range(L)] == [int(0.25 * 8 * 12)] * L
  per_layer = epi_jax.per_layer_isolated(state, {"emb": None, "layers": {"w": 0, "b": 0}})
  assert set(per_layer) == {"emb"} | {f"layers/{n}[{l}]" for n in "wb" for l in range(L)}
  assert float(per_layer["layers/w[1]"]) == pytest.approx(0.25)


def test_eligible_names_layers():
  """``eligible(path, layer)`` excludes one layer of a stacked leaf, as excluding
  that layer's own leaf does on the unstacked model."""
  grads = unstacked_grads(6)
  params = jax.tree.map(np.zeros_like, grads[0])
  kw = dict(isolation_ratio=0.1, update_interval=3, ema_decay=0.7)
  _, flat = run_masks(epi_jax.epi_transform(
      eligible=lambda path: not path.startswith("layers_1/"), **kw), grads, params)
  _, stacked = run_masks(epi_jax.epi_transform(
      eligible=lambda path, layer: layer != 1, layer_axes=LAYOUTS["axis0_callable"][2](),
      **kw), [stack(g, 0, 0) for g in grads], stack(params, 0, 0))
  jax.tree.map(np.testing.assert_array_equal, flat[-1], unstack(stacked[-1], 0, 0))
  assert not stacked[-1]["layers"]["w"][1].any() and stacked[-1]["layers"]["w"][0].any()


@pytest.mark.parametrize("bad, match", [
    ({"emb": None, "layers": {"w": 3, "b": 0}}, "layer_axes of 'layers/w'"),
    ({"emb": None, "layers": {"w": 0}}, "layer_axes does not match"),
    ({"emb": None, "layers": {"w": 0.5, "b": 0}}, "expected None or an int"),
])
def test_bad_layer_axes_raise(bad, match):
  params = stack(jax.tree.map(np.zeros_like, unstacked_grads(1)[0]), 0, 0)
  with pytest.raises(ValueError, match=match):
    epi_jax.epi_transform(0.1, 2, layer_axes=bad).init(params)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("layer_spec", ["sharded", "replicated"])
@pytest.mark.parametrize("selection", ["global", "layer"])
def test_sharded_stacked_masks_and_no_all_gather(layer_spec, selection):
  n_layers = 4  # divisible by the mesh axis that shards it
  shapes = {"emb": (32, 16), "w": (n_layers, 16, 64), "b": (n_layers, 64)}
  lay = "fsdp" if layer_spec == "sharded" else None
  specs = {"emb": P("fsdp", "tensor"), "w": P(lay, None, "tensor"), "b": P(lay, "tensor")}
  axes = {"emb": None, "w": 0, "b": 0}
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(3)
  grads = [{k: (rng.standard_normal(s) * rng.uniform(0.1, 3, s)).astype(np.float32)
            for k, s in shapes.items()} for _ in range(4)]
  tx = epi_jax.epi_adamw(1e-2, isolation_ratio=0.1, update_interval=2, selection=selection,
                         layer_axes=axes, track_first_mask=True)
  params = {k: jnp.full(s, 0.5, jnp.float32) for k, s in shapes.items()}
  with jax.set_mesh(mesh):
    sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    sparams = jax.device_put(params, sh)
    state, sstate = tx.init(params), tx.init(sparams)
    e = epi_jax.epi_state(sstate)
    for field in (e.importance, e.mask, e.first_mask):
      for k in shapes:
        assert field[k].sharding.is_equivalent_to(sh[k], len(shapes[k])), k
    supdate = jax.jit(tx.update, donate_argnums=1)
    hlo = supdate.lower(jax.device_put(grads[0], sh), sstate, sparams).compile().as_text()
    assert "all-gather" not in hlo
    for g in grads:
      _, state = jax.jit(tx.update)(g, state, params)
      _, sstate = supdate(jax.device_put(g, sh), sstate, sparams)
  a, b = epi_jax.epi_state(state), epi_jax.epi_state(sstate)
  assert int(b.num_refreshes) == 2
  for k in shapes:
    np.testing.assert_array_equal(np.asarray(a.mask[k]), np.asarray(b.mask[k]))
    assert b.mask[k].sharding.is_equivalent_to(sh[k], len(shapes[k]))


def test_readme_stacked_layers_snippet_runs():
  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  section = text[text.index("### Stacked (scanned) layers"):]
  block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  state = namespace["state"]
  g = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(0).random(p.shape), p.dtype),
                   namespace["params"])
  tx = namespace["tx"]
  for _ in range(100):
    _, state = jax.jit(tx.update)(g, state, namespace["params"])
  mask = epi_jax.unpacked_mask(state)
  assert not mask["layers"]["norm"].any() and mask["layers"]["mlp"].any()
