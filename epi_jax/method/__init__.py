"""The method: EPI as optax transformations."""

from epi_jax.method.isolation import (METRICS, EPIState, IsolateState, RefreshStats, epi_adamw,
                                      epi_importance, epi_metrics, epi_state, epi_transform,
                                      isolate, per_layer_isolated, select_mask, unpacked_mask)
from epi_jax.method.layout import path_str
from epi_jax.method.options import EPIOptions, OptionError, is_refresh_step

__all__ = ["METRICS", "EPIOptions", "EPIState", "IsolateState", "RefreshStats", "epi_adamw",
           "epi_importance", "epi_metrics", "epi_state", "epi_transform", "is_refresh_step", "isolate",
           "OptionError", "path_str", "per_layer_isolated", "select_mask", "unpacked_mask"]
