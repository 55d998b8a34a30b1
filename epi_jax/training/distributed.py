"""Multi-process (multi-host) start-up, and failing fast when one process fails.

JAX runs one process per host (TPU pod slice, multi-node GPU cluster) or,
for trying it out, several processes on one machine with CPU collectives
(gloo). :func:`initialize` starts ``jax.distributed`` from explicit flags or
from what the cluster environment says (SLURM, Open MPI, Cloud TPU pods,
``JAX_COORDINATOR_ADDRESS``); a lone process with neither stays single-process.

Failure handling: the coordination service aborts every process whose peer
stopped sending heartbeats for ``heartbeat_timeout_s`` (the abort message
lists the unhealthy process ids). A process that raises instead of dying
would keep its heartbeat alive while the others wait in a collective
forever, so :func:`fail_fast` turns an exception in a multi-process run into
a message naming the process and an immediate ``os._exit(1)``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

from absl import flags

# Environment variables that mark a multi-process launch (and where the size is).
_SIZE_VARS = (
    ("SLURM_NTASKS", "SLURM"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI"),
    ("JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
)


def cluster_env() -> str | None:
  """Names the multi-process environment this process runs in, or None.

  Only environments that ``jax.distributed.initialize()`` can configure by
  itself count: SLURM (``SLURM_NTASKS`` > 1 under ``srun``), Open MPI
  (``mpirun``), a multi-host Cloud TPU slice, or ``JAX_COORDINATOR_ADDRESS``.
  """
  for var, name in _SIZE_VARS:
    try:
      if int(os.environ.get(var, "1")) > 1:
        if name != "SLURM" or "SLURM_STEP_ID" in os.environ:  # sbatch shell: not yet srun
          return f"{name} ({var}={os.environ[var]})"
    except ValueError:
      continue
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return f"JAX_COORDINATOR_ADDRESS={os.environ['JAX_COORDINATOR_ADDRESS']}"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return f"Cloud TPU slice (TPU_WORKER_HOSTNAMES: {hosts.count(',') + 1} hosts)"
  try:  # a TPU VM of a multi-host slice (asks the metadata server; TPU VMs only)
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
    if cloud_tpu_cluster.running_in_cloud_tpu_vm:
      env = cloud_tpu_cluster.GceTpuCluster
      if env.is_env_present() and len(env._get_worker_list_in_slice()) > 1:  # pylint: disable=protected-access
        return "Cloud TPU slice (metadata server)"
  except Exception:  # pylint: disable=broad-except
    pass
  return None


def define_flags(fv: flags.FlagValues) -> None:
  """Adds the multi-host flags to ``fv`` (``epi-jax train`` and ``compare``)."""
  flags.DEFINE_string("coordinator_address", None,
                      "jax.distributed coordinator host:port (the host of process 0).",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "jax.distributed: number of processes.",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "jax.distributed: this process's id.",
                       flag_values=fv)
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the "
                    "cluster environment's settings even where none is detected.",
                    flag_values=fv)
  flags.DEFINE_integer("heartbeat_timeout_s", 100, "Multi-process: abort every process this "
                       "long after one stopped responding.", flag_values=fv)
  flags.DEFINE_integer("initialization_timeout_s", 300, "Multi-process: how long to wait "
                       "for all processes to connect to the coordinator.", flag_values=fv)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, force: bool = False,
               heartbeat_timeout_s: int = 100, initialization_timeout_s: int = 300) -> bool:
  """Starts ``jax.distributed`` when asked to or when the environment is multi-process.

  Call before anything touches a JAX device. CPU collectives (gloo) are
  switched on, so several CPU processes form one mesh.

  Args:
    coordinator_address, num_processes, process_id: explicit settings; any
      left None are auto-detected by ``jax.distributed.initialize``.
    force: initialize even when neither flags nor a cluster are seen.
    heartbeat_timeout_s: every process aborts this long after one stops.
    initialization_timeout_s: how long to wait for all processes to connect.

  Returns:
    Whether ``jax.distributed`` was initialized.

  Raises:
    ValueError: for inconsistent flags.
  """
  import jax  # pylint: disable=g-import-not-at-top
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit):
    if num_processes is not None and num_processes < 1:
      raise ValueError(f"--num_processes={num_processes} must be >= 1")
    if (process_id is not None and num_processes is not None
        and not 0 <= process_id < num_processes):
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    if num_processes is not None and num_processes > 1 and coordinator_address is None \
        and cluster_env() is None:
      raise ValueError("--num_processes > 1 needs --coordinator_address HOST:PORT")
    if num_processes == 1 and coordinator_address is None:
      return False  # a single process: nothing to coordinate
  elif not force and cluster_env() is None:
    return False
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s,
                             initialization_timeout=initialization_timeout_s)
  return True


def initialize_from_flags(fv: flags.FlagValues) -> bool:
  """:func:`initialize` with the flags of :func:`define_flags`."""
  return initialize(fv.coordinator_address, fv.num_processes, fv.process_id,
                    force=fv.distributed, heartbeat_timeout_s=fv.heartbeat_timeout_s,
                    initialization_timeout_s=fv.initialization_timeout_s)


@contextlib.contextmanager
def fail_fast():
  """In a multi-process run, an exception prints its traceback and exits at once.

  Without this the failed process would wait in ``jax.distributed``'s
  shutdown barrier while the others wait for it in a collective: a hang. Once
  it has exited, the coordination service aborts the other processes after
  the heartbeat timeout, naming this one. Single-process runs re-raise.
  """
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    import jax  # pylint: disable=g-import-not-at-top
    if isinstance(e, SystemExit) or jax.process_count() == 1:
      raise
    traceback.print_exc()
    print(f"[epi_jax] process {jax.process_index()} of {jax.process_count()} failed "
          f"({type(e).__name__}: {e}); exiting so the other processes stop too",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access
