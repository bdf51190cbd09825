"""Process-level JAX set-up shared by the entry points and the tests."""

from __future__ import annotations

import os

import jax

CACHE_ENV = "IOMM_COMPILATION_CACHE"


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache.

  The stages of one recipe (and re-runs of a command) compile the same train and sampling
  steps; on a 2-core CPU each compile costs tens of seconds. The directory is
  ``$IOMM_COMPILATION_CACHE``, else ``~/.cache/iomm_jax/xla``; set the variable to an empty
  string to disable it.
  """
  path = os.environ.get(CACHE_ENV, path or os.path.expanduser("~/.cache/iomm_jax/xla"))
  if not path:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


def outside_absl(quiet: bool = False, cache: bool = True) -> str | None:
  """Sets up a program that uses iomm_jax without ``absl.app.run`` (a benchmark, a study or
  launch script, the tests): absl flags marked parsed (grain reads them; the ecosystem notes'
  trap), absl logging at WARNING when ``quiet``, and, unless ``cache`` is False, the persistent
  compilation cache (``enable_compilation_cache``; returns its path)."""
  from absl import flags, logging

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  if quiet:
    logging.set_verbosity(logging.WARNING)
  return enable_compilation_cache() if cache else None


# ----------------------------------------------------------------------------- multi-process

COORDINATOR_ENV = "IOMM_COORDINATOR"  # host:port of process 0's coordination service
NUM_PROCESSES_ENV = "IOMM_NUM_PROCESSES"
PROCESS_ID_ENV = "IOMM_PROCESS_ID"
AUTO_ENV = "IOMM_DISTRIBUTED"  # "auto": let jax.distributed.initialize() detect the cluster


def _slurm_multi_task() -> bool:
  """Inside an ``srun`` step of more than one task (jax reads SLURM_* itself)."""
  tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or "1"
  return "SLURM_STEP_NODELIST" in os.environ and int(tasks) > 1


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Joins a multi-process run before anything touches a JAX backend; True if it did.

  In order: explicit arguments (``iomm-train --coordinator_address/--num_processes/
  --process_id``), else ``$IOMM_COORDINATOR`` / ``$IOMM_NUM_PROCESSES`` / ``$IOMM_PROCESS_ID``
  (all three, for one process per host or several on one machine); else a SLURM step of more
  than one task, or ``$IOMM_DISTRIBUTED=auto`` (TPU pods, other clusters jax detects), which
  call ``jax.distributed.initialize()`` without arguments; else nothing (one process).
  """
  env = os.environ
  addr = coordinator_address or env.get(COORDINATOR_ENV) or None
  n = num_processes if num_processes is not None else env.get(NUM_PROCESSES_ENV)
  pid = process_id if process_id is not None else env.get(PROCESS_ID_ENV)
  given = {"coordinator address": addr, "number of processes": n, "process id": pid}
  if any(v not in (None, "") for v in given.values()):
    missing = [k for k, v in given.items() if v in (None, "")]
    if missing:
      raise ValueError(
        f"multi-process run needs the coordinator address, the number of processes and the "
        f"process id (flags --coordinator_address/--num_processes/--process_id or "
        f"${COORDINATOR_ENV}/${NUM_PROCESSES_ENV}/${PROCESS_ID_ENV}); missing: {missing}"
      )
    n, pid = int(n), int(pid)
    if n == 1:
      return False
    if not 0 <= pid < n:
      raise ValueError(f"process id {pid} is not in [0, {n}) (number of processes {n})")
    jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
    return True
  if env.get(AUTO_ENV, "").lower() == "auto" or _slurm_multi_task():
    jax.distributed.initialize()
    return True
  return False


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
