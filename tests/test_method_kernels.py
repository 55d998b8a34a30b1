"""XLA:CPU compiles each distinct fusion body once: the EPI update's per-leaf
fusions must not differ between leaves of one shape, or its compile time grows
with the number of layers."""

import jax
import jax.numpy as jnp

import epi_jax
from epi_jax.training import plan


def _distinct_kernels(n_blocks: int) -> int:
  """Distinct fused computations in the compiled ``epi_adamw`` update of
  ``n_blocks`` blocks of equal-shape leaves (names and metadata left out)."""
  params = {f"b{i}": {"w": jnp.ones((16, 8)), "v": jnp.ones((8, 16)), "s": jnp.ones((8,))}
            for i in range(n_blocks)}
  tx = epi_jax.epi_adamw(1e-3, isolation_ratio=0.1, update_interval=2)
  state = tx.init(params)
  text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  return plan.distinct_fusions(text)


def test_equal_shape_leaves_share_their_kernels():
  # XLA:CPU compiles each distinct fusion once: the per-leaf fusions of the
  # EPI step (mask rebuild, EMA, masked update) must not differ between leaves
  # of one shape (e.g. by a slice offset baked in), or compile time grows
  # with the number of layers.
  assert _distinct_kernels(8) == _distinct_kernels(3)


def _fusion(name: str, op: str) -> str:
  return (f"%{name} (p: f32[8]) -> f32[8] {{\n"
          f"  %p.{name} = f32[8]{{0}} parameter(0), metadata={{op_name=\"{name}\"}}\n"
          f"  ROOT %r.{name} = f32[8]{{0}} {op}(%p.{name})\n}}\n")


def test_distinct_fusions_ignores_names_and_metadata():
  same = "".join(_fusion(f"fused_computation.{i}", "negate") for i in range(3))
  assert plan.distinct_fusions(same) == 1
  assert plan.distinct_fusions(same + _fusion("fused_computation.9", "exponential")) == 2
