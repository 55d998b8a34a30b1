"""XLA:CPU compiles each distinct fusion body once: the EPI update's per-leaf
fusions must not differ between leaves of one shape, or its compile time grows
with the number of layers."""

import re

import jax
import jax.numpy as jnp

import epi_jax


def _distinct_kernels(n_blocks: int) -> int:
  """Distinct fused computations in the compiled ``epi_adamw`` update of
  ``n_blocks`` blocks of equal-shape leaves (names and metadata left out)."""
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
  # with the number of layers.
  assert _distinct_kernels(8) == _distinct_kernels(3)
