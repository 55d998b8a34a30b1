"""The experiment driver: ``epi-jax compare``, ``epi-jax evaluate`` and ``epi-jax verdicts``.

It trains (``epi_jax.training``) and scores (``epi_jax.scoring``):

* :mod:`~epi_jax.experiments.compare`: ``epi-jax compare`` (mixture and
  sequential), which trains, evaluates and caches;
* :mod:`~epi_jax.experiments.report`: its aggregate over seeds, tables and
  verdict text; :mod:`~epi_jax.experiments.plots`: its plots;
* :mod:`~epi_jax.experiments.claims`: the papers' claims tested with the
  paired bootstrap;
* :mod:`~epi_jax.experiments.cli`: the subcommands.
"""
