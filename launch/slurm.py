#!/usr/bin/env python3
r"""Multi-node GPU training on SLURM: writes a batch script and submits it with sbatch.

  python launch/slurm.py --config experiments/shapes/pretrain.py --workdir /shared/runs/pretrain \
      --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \
      --config.model.mllm_from=/shared/runs/mllm [--dry-run]

The script runs one iomm-train process per node (``--per node``: each sees the node's GPUs) or
per GPU (``--per gpu``) through srun, exports the jax.distributed settings (``IOMM_COORDINATOR``
= first node, ``IOMM_NUM_PROCESSES``, per task ``IOMM_PROCESS_ID``; JAX also detects SLURM
itself), and is requeueable: SIGTERM (preemption, or ``--grace`` seconds before the time limit)
reaches iomm-train, which checkpoints and exits, and the job requeues itself and resumes from
the workdir. The workdir must be on storage every node shares. ``--dry-run`` prints the script.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make ``launch`` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # noqa: E402


@dataclasses.dataclass
class Job:
  """Resources and environment of one SLURM job (or of each task of a sweep's array)."""

  nodes: int = 1
  gpus_per_node: int = 8
  per: str = "node"  # one process per "node" (all its GPUs) or per "gpu"
  time: str = "24:00:00"
  partition: str = ""
  account: str = ""
  job_name: str = "iomm"
  cpus_per_task: int = 0  # 0: SLURM's default
  grace_s: int = 300  # SIGTERM this long before the time limit (time to save a checkpoint)
  repo: str = common.ROOT  # the repository on shared storage; the job runs from there
  setup: list[str] = dataclasses.field(default_factory=list)  # shell lines before srun
  sbatch: list[str] = dataclasses.field(default_factory=list)  # extra directives ("qos=hi")

  def __post_init__(self):
    if self.per not in ("node", "gpu"):
      raise common.LaunchError(f"--per={self.per!r}: one process per 'node' or per 'gpu'")
    if self.nodes < 1 or self.gpus_per_node < 1:
      raise common.LaunchError("--nodes and --gpus-per-node must be at least 1")

  @property
  def tasks_per_node(self) -> int:
    """Processes per node."""
    return 1 if self.per == "node" else self.gpus_per_node

  def setup_lines(self) -> list[str]:
    """The given set-up lines, else activating the repository's virtual environment."""
    venv = os.path.join(self.repo, ".venv", "bin", "activate")
    return self.setup or [f"source {shlex.quote(venv)}"]


def _directive(flag: str) -> str:
  if any(ch.isspace() for ch in flag):
    raise common.LaunchError(f"#SBATCH {flag!r}: SLURM directives cannot hold spaces")
  return f"#SBATCH {flag}"


def script(
  job: Job,
  spec: str,
  runs: Sequence[tuple[str, Sequence[str]]],
  flags: Sequence[str] = (),
  output: str | None = None,
  array: str | None = None,
) -> str:
  """The batch script: ``runs`` are (workdir, override flags); one run is a plain job, several
  are an array whose task ``SLURM_ARRAY_TASK_ID`` = i runs ``runs[i]`` (``array`` selects which
  indices, e.g. ``"0-3"`` or ``"1,3%2"``)."""
  if not runs:
    raise common.LaunchError("nothing to run")
  sweep = array is not None
  if output is None:
    output = os.path.join(runs[0][0], "slurm-%j.out")
  q = shlex.quote
  lines = [
    "#!/bin/bash",
    f"# iomm-train on SLURM: {job.nodes} node(s) x {job.gpus_per_node} GPU(s), one process per "
    f"{job.per}. Written by launch/slurm.py; submit with sbatch.",
    _directive(f"--job-name={job.job_name}"),
    _directive(f"--nodes={job.nodes}"),
    _directive(f"--ntasks-per-node={job.tasks_per_node}"),
    _directive(f"--gpus-per-node={job.gpus_per_node}"),
    _directive(f"--time={job.time}"),
  ]
  if job.cpus_per_task:
    lines.append(_directive(f"--cpus-per-task={job.cpus_per_task}"))
  if job.partition:
    lines.append(_directive(f"--partition={job.partition}"))
  if job.account:
    lines.append(_directive(f"--account={job.account}"))
  lines += [
    _directive(f"--output={output}"),
    _directive("--open-mode=append"),  # a requeued job appends to its log
    _directive("--requeue"),  # preempted -> back in the queue; it resumes from the workdir
    # SIGTERM to this script grace_s before the time limit; it forwards it to iomm-train
    _directive(f"--signal=B:TERM@{job.grace_s}"),
  ]
  if sweep:
    lines.append(_directive(f"--array={array}"))
  lines += [_directive(f if f.startswith("-") else f"--{f}") for f in job.sbatch]
  lines += ["", "set -uo pipefail", f"cd {q(job.repo)}", *job.setup_lines(), ""]
  if sweep:
    lines.append('case "$SLURM_ARRAY_TASK_ID" in')
    for i, (wd, over) in enumerate(runs):
      lines.append(f"  {i}) workdir={q(wd)}; overrides=({' '.join(map(q, over))}) ;;")
    lines += ['  *) echo "no sweep point $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac"]
  else:
    ((wd, over),) = runs
    lines += [f"workdir={q(wd)}", f"overrides=({' '.join(map(q, over))})"]
  gpu = " CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" if job.per == "gpu" else ""
  train = common.shell(["iomm-train", "--config", common.repo_spec(spec, job.repo), "--workdir"])
  lines += [
    'mkdir -p "$workdir"',
    "",
    "# jax.distributed: the first node coordinates; iomm-train reads IOMM_* (JAX also detects",
    "# SLURM itself)",
    'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    'export IOMM_COORDINATOR="$head:$((20000 + SLURM_JOB_ID % 20000))"',
    'export IOMM_NUM_PROCESSES="$SLURM_NTASKS"',
    f"task='export IOMM_PROCESS_ID=$SLURM_PROCID{gpu}; exec \"$@\"'  # per task, in the task",
    "",
    "# SIGTERM (preemption, or the notice before the time limit): iomm-train saves a checkpoint",
    "# and exits 75; the job goes back in the queue and resumes from the workdir.",
    "requeue() {",
    '  echo "SIGTERM: checkpointing, then requeueing job $SLURM_JOB_ID" >&2',
    '  if [ -n "${train:-}" ]; then kill -TERM "$train" 2>/dev/null; wait "$train"; fi',
    '  scontrol requeue "$SLURM_JOB_ID"',
    "  exit 0",
    "}",
    "trap requeue TERM",
    "",
    'srun --kill-on-bad-exit=1 bash -c "$task" iomm-task \\',
    f'  {train} "$workdir" "${{overrides[@]}}"'
    + (" \\\n  " + common.shell(flags) if flags else "")
    + " &",
    "train=$!",
    'wait "$train"',
    "",
  ]
  return "\n".join(lines)


def add_job_args(p) -> None:
  """The SLURM resource arguments (shared with launch/sweep.py)."""
  g = p.add_argument_group("SLURM")
  g.add_argument("--nodes", type=int, default=1)
  g.add_argument("--gpus-per-node", type=int, default=8)
  g.add_argument("--per", choices=("node", "gpu"), default="node", help="one process per ...")
  g.add_argument("--time", default="24:00:00", help="time limit (the job requeues itself)")
  g.add_argument("--partition", default="")
  g.add_argument("--account", default="")
  g.add_argument("--job-name", default="iomm")
  g.add_argument("--cpus-per-task", type=int, default=0)
  g.add_argument("--grace", type=int, default=300, help="SIGTERM this many s before the limit")
  g.add_argument("--repo", default=common.ROOT, help="the repository, on shared storage")
  g.add_argument("--setup", action="append", default=[], help="shell line before srun (repeat)")
  g.add_argument("--sbatch", action="append", default=[], help="extra directive: qos=hi (repeat)")


def job_from_args(args) -> Job:
  """A :class:`Job` from :func:`add_job_args`' arguments."""
  return Job(
    nodes=args.nodes,
    gpus_per_node=args.gpus_per_node,
    per=args.per,
    time=args.time,
    partition=args.partition,
    account=args.account,
    job_name=args.job_name,
    cpus_per_task=args.cpus_per_task,
    grace_s=args.grace,
    repo=os.path.abspath(args.repo),
    setup=args.setup,
    sbatch=args.sbatch,
  )


def submit(text: str, path: str, log_dir: str) -> int:
  """Writes the script to ``path`` and runs ``sbatch path``; returns sbatch's exit status."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  os.makedirs(log_dir, exist_ok=True)  # SLURM does not create the --output folder
  with open(path, "w") as f:
    f.write(text)
  print(f"wrote {path}", flush=True)
  if shutil.which("sbatch") is None:
    raise common.LaunchError(f"sbatch not found; the script is at {path}")
  return subprocess.call(["sbatch", path])


def main(argv: Sequence[str] | None = None) -> int:
  """Parses the arguments, checks the config, prints the script (--dry-run) or submits it."""
  p = common.parser(__doc__, "launch/slurm.py")
  add_job_args(p)
  p.add_argument("--script", default="", help="where to write it (default WORKDIR/iomm.sbatch)")
  args = common.parse(p, argv)
  common.check_config(args.config, {}, args.config_flags)
  workdir = os.path.abspath(args.workdir)  # the job runs from the repository
  text = script(job_from_args(args), args.config, [(workdir, [])], args.flags)
  if args.dry_run:
    print(text, end="")
    return 0
  return submit(text, args.script or os.path.join(workdir, "iomm.sbatch"), workdir)


if __name__ == "__main__":
  sys.exit(common.run_main(main))
