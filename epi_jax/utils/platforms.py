"""Which JAX platforms to start, decided once at ``import epi_jax`` (before any backend).

Why: with ``libtpu`` installed (``pip install 'epi_jax[tpu]'``, which ``make test``
installs for ``epi-jax plan``), every JAX start on a machine *without* TPU chips
tries the TPU backend first: libtpu prints errors about missing TPU metadata
and worker hostnames to stderr, then JAX falls back to CPU about a second
later. The CUDA plugin (``pip install 'epi_jax[gpu-plan]'``, also in ``make
test``) does the same without a GPU: its version check fails on ``cuInit`` and
prints a traceback. So when ``JAX_PLATFORMS`` is unset, one of them is
installed and its hardware is absent, we tell JAX to start only the platforms
this machine has: ``cpu``, plus ``cuda`` where a CUDA plugin is installed and
an NVIDIA GPU is visible. An explicit ``JAX_PLATFORMS`` (or ``jax_platforms``
config) always wins, and nothing changes on a TPU VM, on a GPU machine without
libtpu, or where neither plugin is installed.

Compiling for a TPU or GPU topology still works afterwards:
``jax.experimental.topologies.get_topology_desc(platform="tpu" or "cuda", ...)``
loads the plugin itself, for compile-only devices (``epi-jax plan``).
"""

from __future__ import annotations

import importlib.util
import os

_CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13",
                 "jax_plugins.xla_cuda12")


def _importable(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def libtpu_available() -> bool:
  """Whether the TPU runtime (``libtpu``) can be loaded, without loading it."""
  path = os.environ.get("TPU_LIBRARY_PATH")
  return bool(path and os.path.exists(path)) or _importable("libtpu")


def cuda_plugin_available() -> bool:
  """Whether a JAX CUDA plugin is installed (without loading it)."""
  return any(_importable(m) for m in _CUDA_PLUGINS)


def ptxas_available() -> bool:
  """Whether the CUDA compiler's ``ptxas`` is at hand: the ``nvidia-cuda-nvcc``
  wheel (where the CUDA plugin looks first) or a CUDA toolkit on ``PATH``."""
  import shutil  # pylint: disable=g-import-not-at-top
  return _importable("nvidia.cuda_nvcc") or shutil.which("ptxas") is not None


def tpu_chips() -> int:
  """TPU chips attached to this machine (PCI), 0 off TPU VMs."""
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  try:
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except OSError:
    return 0


def non_tpu_platforms() -> str:
  """``jax_platforms`` for a machine without TPUs: ``cpu``, or ``cuda,cpu`` with a GPU."""
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if cuda_plugin_available() and hardware_utils.has_visible_nvidia_gpu():
    return "cuda,cpu"
  return "cpu"


def skip_absent_accelerators() -> str | None:
  """Sets ``jax_platforms`` to the platforms this machine has where libtpu or a
  CUDA plugin is installed without its hardware and the user chose nothing;
  returns what it set (or None)."""
  if os.environ.get("JAX_PLATFORMS") is not None:
    return None
  tpu, cuda = libtpu_available(), cuda_plugin_available()
  if not (tpu or cuda):
    return None
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if jax.config.jax_platforms or xla_bridge.backends_are_initialized() or tpu_chips():
    return None
  platforms = non_tpu_platforms()
  if not tpu and platforms != "cpu":
    return None  # a GPU machine without libtpu: JAX's own choice is this one
  jax.config.update("jax_platforms", platforms)
  return platforms
