"""The method: EPI as optax transformations."""

from epi_jax.method.isolation import (EPIState, IsolateState, epi_adamw,
                                      epi_state, epi_transform, isolate,
                                      path_str, unpacked_mask)

__all__ = ["EPIState", "IsolateState", "epi_adamw", "epi_state",
           "epi_transform", "isolate", "path_str", "unpacked_mask"]
