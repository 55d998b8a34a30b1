"""The method: EPI as optax transformations."""

from epi_jax.method.isolation import (METRICS, EPIOptions, EPIState, IsolateState, RefreshStats,
                                      epi_adamw, epi_metrics, epi_state, epi_transform,
                                      is_refresh_step, isolate, path_str, per_layer_isolated,
                                      select_mask, unpacked_mask)

__all__ = ["METRICS", "EPIOptions", "EPIState", "IsolateState", "RefreshStats", "epi_adamw",
           "epi_metrics", "epi_state", "epi_transform", "is_refresh_step", "isolate",
           "path_str", "per_layer_isolated", "select_mask", "unpacked_mask"]
