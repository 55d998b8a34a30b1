"""The method: EPI as optax transformations.

``transforms`` (the states and factories), ``refresh`` (importance, cuts,
masks), ``inspection`` (reading a state), ``options`` (validated options),
``layout``/``selection``/``compact`` (per-leaf layout, exact top-k counting,
packed masks and bf16 importance), ``walk`` (finding nodes in nested states).
"""

from epi_jax.method.inspection import (METRICS, epi_importance, epi_metrics, epi_state,
                                       per_layer_isolated, select_mask, unpacked_mask)
from epi_jax.method.layout import path_str
from epi_jax.method.options import EPIOptions, OptionError, is_refresh_step
from epi_jax.method.refresh import RefreshStats, all_finite
from epi_jax.method.selection import jaccard
from epi_jax.method.transforms import (EPIState, IsolateState, epi_adamw, epi_transform,
                                       epi_transform_from_options, isolate,
                                       isolate_from_options)

__all__ = ["METRICS", "EPIOptions", "EPIState", "IsolateState", "RefreshStats", "all_finite",
           "epi_adamw", "epi_importance", "epi_metrics", "epi_state", "epi_transform",
           "epi_transform_from_options", "is_refresh_step", "isolate", "isolate_from_options",
           "jaccard", "OptionError", "path_str", "per_layer_isolated", "select_mask",
           "unpacked_mask"]
