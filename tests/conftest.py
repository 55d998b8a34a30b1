"""Test setup, before jax is imported: 8 fake CPU devices for the sharding tests,
and one persistent XLA compilation cache for the whole run."""

import atexit
import os
import shutil
import tempfile

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The xdist workers and the CLI subprocesses the tests start inherit this
# environment, so a program that one of them compiled is loaded by the others
# instead of compiled again (the kill-and-resume tests restart the same run a
# dozen times). Entries are keyed by the optimized program, the flags and the
# versions: the cache changes how long a start takes, never what runs. A fresh
# directory per run, removed by the process that made it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="epi_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
