"""epi_jax: Evolving Parameter Isolation (EPI) for multi-task fine-tuning in JAX.

The method lives in ``epi_jax.method`` and is re-exported here::

  tx = optax.chain(epi_jax.epi_transform(0.01, 100), optax.adamw(1e-4))
  tx = epi_jax.isolate(optax.adamw(1e-4), 0.01, 100)   # truly frozen
  tx = epi_jax.epi_adamw(1e-4, isolation_ratio=0.01, update_interval=100)
"""

from epi_jax.utils import platforms as _platforms

_platforms.skip_absent_accelerators()  # before any backend starts: see utils/platforms.py

from epi_jax.method import (EPIOptions, EPIState, IsolateState, RefreshStats,  # noqa: E402
                            epi_adamw, epi_importance, epi_metrics, epi_state, epi_transform,
                            epi_transform_from_options, is_refresh_step, isolate,
                            isolate_from_options, per_layer_isolated, select_mask,
                            unpacked_mask)

__version__ = "0.1.0"
__all__ = ["EPIOptions", "EPIState", "IsolateState", "RefreshStats", "epi_adamw",
           "epi_importance", "epi_metrics", "epi_state", "epi_transform",
           "epi_transform_from_options", "is_refresh_step", "isolate", "isolate_from_options",
           "per_layer_isolated", "select_mask", "unpacked_mask"]
