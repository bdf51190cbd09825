#!/usr/bin/env python3
r"""TPU pods: copies this repository to every worker, installs it, runs iomm-train on all of them.

  python launch/tpu.py --name my-v5e-32 --zone us-west4-a --config experiments/shapes/pretrain.py \
      --workdir /mnt/shared/runs/pretrain --config.model.mllm_from=/mnt/shared/runs/mllm [--dry-run]

The commands: ``tar`` this checkout (without .venv, .git, runs), ``gcloud compute tpus tpu-vm
scp`` it to ``--worker=all``, ``... ssh --worker=all`` to unpack it and ``pip install -e .
jax[tpu]`` (the local jax version) into ``~/iomm_jax/.venv``, then ``... ssh --worker=all``
running iomm-train on every worker at once (JAX detects the pod; each worker is one process).
The workdir must be storage every worker shares (Filestore/NFS, or a gcsfuse-mounted bucket).
``--no-setup`` skips the copy and install; ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make ``launch`` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # noqa: E402

TARBALL = "iomm_jax_src.tar.gz"
EXCLUDES = (".venv", ".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache")


def _jax_tpu() -> str:
  try:
    return f"jax[tpu]=={importlib.metadata.version('jax')}"
  except importlib.metadata.PackageNotFoundError:
    return "jax[tpu]"


@dataclasses.dataclass
class Pod:
  """A TPU VM (pod slice) and where the repository goes on its workers."""

  name: str
  zone: str
  project: str = ""
  remote_dir: str = "iomm_jax"  # relative to the workers' home directory
  python: str = "python3"
  jax_tpu: str = dataclasses.field(default_factory=_jax_tpu)

  def gcloud(self, verb: str, *args: str) -> list[str]:
    """``gcloud compute tpus tpu-vm VERB ARGS --zone=Z [--project=P] --worker=all``."""
    out = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={self.zone}"]
    return out + ([f"--project={self.project}"] if self.project else []) + ["--worker=all"]

  def ssh(self, command: str) -> list[str]:
    """Runs the shell ``command`` on every worker (one ``--command`` string)."""
    return self.gcloud("ssh", self.name) + [f"--command={command}"]


def setup_commands(pod: Pod, repo: str = common.ROOT) -> list[list[str]]:
  """Pack this checkout, copy it to every worker, unpack it there and install it."""
  local = os.path.join("/tmp", f"{pod.name}-{TARBALL}")
  d = shlex.quote(pod.remote_dir)
  install = (
    f"mkdir -p {d} && tar -xzf {TARBALL} -C {d} && cd {d} && "
    f"(test -d .venv || {pod.python} -m venv .venv) && "
    f".venv/bin/pip install -q -e . {shlex.quote(pod.jax_tpu)}"
  )
  return [
    ["tar", "-czf", local, *(f"--exclude={e}" for e in EXCLUDES), "-C", repo, "."],
    pod.gcloud("scp", local, f"{pod.name}:{TARBALL}"),
    pod.ssh(install),
  ]


def run_command(pod: Pod, train: Sequence[str]) -> list[str]:
  """``train`` (an iomm-train argv) on every worker, from the installed repository."""
  argv = [".venv/bin/iomm-train", *train[1:]]
  return pod.ssh(f"cd {shlex.quote(pod.remote_dir)} && {common.shell(argv)}")


def execute(commands: Sequence[Sequence[str]]) -> int:
  """Runs the commands in order; stops at the first failure and returns its exit status."""
  for cmd in commands:
    print(common.shell(cmd), flush=True)
    if shutil.which(cmd[0]) is None:
      raise common.LaunchError(f"{cmd[0]} not found (install the Google Cloud SDK)")
    rc = subprocess.call(list(cmd))
    if rc:
      return rc
  return 0


def add_pod_args(p) -> None:
  """The TPU arguments (shared with launch/sweep.py)."""
  g = p.add_argument_group("TPU")
  g.add_argument("--name", default="", help="TPU VM name (sweeps: comma-separated, round-robin)")
  g.add_argument("--zone", default="")
  g.add_argument("--project", default="")
  g.add_argument("--remote-dir", default="iomm_jax", help="repository on the workers (home-rel.)")
  g.add_argument("--no-setup", action="store_true", help="skip copying and installing the repo")


def pods_from_args(args) -> list[Pod]:
  """One :class:`Pod` per name in ``--name``."""
  names = [n for n in args.name.split(",") if n]
  if not names or not args.zone:
    raise common.LaunchError("TPU launches need --name and --zone")
  return [Pod(n, args.zone, args.project, args.remote_dir) for n in names]


def main(argv: Sequence[str] | None = None) -> int:
  """Parses the arguments, checks the config, prints (--dry-run) or runs the commands."""
  p = common.parser(__doc__, "launch/tpu.py")
  add_pod_args(p)
  args = common.parse(p, argv)
  pods = pods_from_args(args)
  if len(pods) != 1:
    raise common.LaunchError("launch/tpu.py runs on one pod: give one --name")
  (pod,) = pods
  common.check_config(args.config, {}, args.config_flags)
  train = common.train_argv(common.repo_spec(args.config), args.workdir, flags=args.flags)
  commands = ([] if args.no_setup else setup_commands(pod)) + [run_command(pod, train)]
  if args.dry_run:
    print("\n".join(common.shell(c) for c in commands))
    return 0
  return execute(commands)


if __name__ == "__main__":
  sys.exit(common.run_main(main))
