"""``iomm-train``: run one stage from an experiment file.

  iomm-train --config experiments/shapes/pretrain.py[:arg] --workdir W [--config.optim.lr=3e-4]

The stage is ``config.stage``; re-running the same command resumes from the workdir. Exit
status: 0 when the run is finished, 75 when SIGTERM stopped it (after saving a checkpoint), 2
when ``config.data.features`` cannot serve the run (the message names the key and both values)
or a flag or ``--config.KEY`` is bad (one line naming it, with the nearest valid key).
Multi-process (one process per host, or several on one machine): add
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` to each process's command
(or set ``$IOMM_COORDINATOR``, ``$IOMM_NUM_PROCESSES``, ``$IOMM_PROCESS_ID``); under SLURM
``srun`` the processes find each other themselves. ``config.sharding.mesh`` spans all devices.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from iomm_jax import runtime
from iomm_jax.cli import exit_on_preemption, run
from iomm_jax.train import cache, finetune, mllm, pretrain

LOOPS = {
  "mllm": mllm.train_and_evaluate,
  "pretrain": pretrain.train_and_evaluate,
  "finetune": finetune.train_and_evaluate,
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, samples")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, f"multi-process: host:port of process 0 (${runtime.COORDINATOR_ENV})"
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, f"multi-process: number of processes (or ${runtime.NUM_PROCESSES_ENV})"
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, f"multi-process: this process's index (or ${runtime.PROCESS_ID_ENV})"
)


def _main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before anything touches a backend: explicit flags / $IOMM_* / SLURM / $IOMM_DISTRIBUTED=auto.
  runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  runtime.enable_compilation_cache()
  config = _CONFIG.value
  if config.stage not in LOOPS:
    raise app.UsageError(f"config.stage={config.stage!r} unknown; choose from {sorted(LOOPS)}")
  with exit_on_preemption():
    try:
      LOOPS[config.stage](config, _WORKDIR.value)
    except cache.FeaturesError as e:  # config.data.features unusable: one line, no traceback
      print(f"iomm-train: {e}", file=sys.stderr, flush=True)
      sys.exit(2)


def main():
  """Entry point of ``iomm-train``."""
  run(_main, "iomm-train", __name__, required=["config", "workdir"])


if __name__ == "__main__":
  main()
