"""EPI inside other training libraries. Each module imports its library;
nothing else in ``epi_jax`` imports them."""
