"""The refresh's grouped search and counts equal the per-leaf ones, bit for bit.

``grouping.MAX_GROUP = 1`` puts every leaf in a group of its own: the per-leaf
path. Many small leaves of few shapes (equal shapes, stacked and unstacked
leaves of one slice shape, bf16 importance, packed masks, partial eligibility)
run a few refreshes both ways; state and updates must be identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import epi_jax
from epi_jax.method import grouping, path_str

L = 3
SHAPES = {  # 4 blocks of equal shapes, a stacked copy on axis 0 and on axis 1, odd ones
    **{f"block_{i}": {"q": (8, 8), "o": (8, 8), "k": (8, 4), "norm": (8,)} for i in range(4)},
    "stacked": {"q": (L, 8, 8), "k": (8, L, 4), "norm": (L, 8)},
    "emb": (24, 8),
    "scalar": (),
}
AXES = jax.tree.map(lambda s: None, SHAPES, is_leaf=lambda x: isinstance(x, tuple))
AXES["stacked"] = {"q": 0, "k": 1, "norm": 0}


def _tree(fn):
  return jax.tree_util.tree_map_with_path(lambda p, s: fn(path_str(p), s), SHAPES,
                                          is_leaf=lambda x: isinstance(x, tuple))


def _run(options, num_steps=7):
  rng = np.random.default_rng(0)
  params = _tree(lambda p, s: jnp.asarray(rng.normal(size=s), jnp.float32))
  tx = epi_jax.epi_adamw(1e-2, isolation_ratio=0.2, update_interval=2, ema_decay=0.6,
                         layer_axes=AXES, track_first_mask=True, **options)
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for t in range(num_steps):
    # Leaf scales vary (so the global top-k spans leaves); values repeat (ties).
    g = _tree(lambda p, s: jnp.asarray(np.round(rng.standard_normal(s) * 4) / 4
                                       * rng.uniform(0.1, 3.0), jnp.float32))
    updates, state = update(g, state, params)
    outs.append(jax.device_get((updates, epi_jax.epi_state(state))))
  return outs


def _no_norm_slice(path, layer):
  return "norm" not in path and not (path == "stacked/q" and layer == 1)


@pytest.mark.parametrize("options", [
    dict(),
    dict(selection="layer"),
    dict(importance_dtype="bfloat16", packed_mask=True),
    dict(selection="layer", importance_dtype="bfloat16", eligible=_no_norm_slice),
    dict(normalization="layer_max", eligible=_no_norm_slice, release_after=2, packed_mask=True),
])
@pytest.mark.parametrize("max_group", [1, 100])
def test_grouped_equals_per_leaf(monkeypatch, options, max_group):
  grouped = _run(options)
  monkeypatch.setattr(grouping, "MAX_GROUP", max_group)  # 100: groups split into chunks
  per_leaf = _run(options)
  assert int(grouped[-1][1].num_refreshes) == 3
  assert float(grouped[-1][1].isolated_fraction) > 0
  for a, b in zip(grouped, per_leaf):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_groups_of_smollm_like_layout():
  """Unstacked blocks: one group per slice shape; stacked leaves join by slice shape."""
  options = epi_jax.EPIOptions(isolation_ratio=0.1, update_interval=1, layer_axes=AXES)
  from epi_jax.method.layout import leaf_layout  # pylint: disable=import-outside-toplevel
  params = _tree(lambda p, s: jnp.zeros(s, jnp.float32))
  layout = leaf_layout(options, params)
  leaves = jax.tree.leaves(params)
  groups = grouping.make_groups(layout, dict(enumerate(leaves)))
  shapes = sorted(g.leaf.shape for g in groups)
  # q and o blocks with the stacked q (axis 0); k blocks alone (the stacked k has
  # its layers on axis 1); norms with the stacked norms; emb; the scalar.
  assert shapes == sorted([(8 + L, 8, 8), (4, 8, 4), (8, L, 4), (4 + L, 8), (1, 24, 8), (1,)])
  assert sum(len(g.members) for g in groups) == len(leaves)


def _distinct_kernels(n_blocks: int) -> int:
  """Distinct fused computations in the compiled ``epi_adamw`` update of
  ``n_blocks`` blocks of equal-shape leaves (names and metadata left out)."""
  import re  # pylint: disable=import-outside-toplevel
  params = {f"b{i}": {"w": jnp.ones((16, 8)), "v": jnp.ones((8, 16)), "s": jnp.ones((8,))}
            for i in range(n_blocks)}
  tx = epi_jax.epi_adamw(1e-3, isolation_ratio=0.1, update_interval=2)
  state = tx.init(params)
  text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  bodies = set()
  for comp in re.split(r"\n(?=\S)", text):
    if comp.startswith("%fused") or comp.startswith("fused"):
      body = comp[comp.index("{") + 1:]
      body = re.sub(r"metadata=\{[^}]*\}", "", re.sub(r"%[\w.\-]+", "%x", body))
      bodies.add(re.sub(r", backend_config=\S+", "", body))
  return len(bodies)


def test_equal_shape_leaves_share_their_kernels():
  # XLA:CPU compiles each distinct fusion once: the per-leaf fusions of the
  # EPI step (mask rebuild, EMA, masked update) must not differ between leaves
  # of one shape (e.g. by a slice offset baked in), or compile time grows
  # with the number of layers. (Only the groups' stacks see the number of
  # members, a kernel per group either way.)
  assert _distinct_kernels(8) == _distinct_kernels(3)
