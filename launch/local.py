#!/usr/bin/env python3
r"""One host: checks the config, prints the iomm-train command, then becomes it.

  python launch/local.py --config experiments/shapes/pretrain.py --workdir runs/shapes/pretrain \
      --config.model.mllm_from=runs/shapes/mllm [--dry-run]

iomm-train uses every local device (JAX's default); re-running the command resumes from the
workdir. The config (experiment file, overrides, values) is checked first, so an unknown key is
an error naming it before anything starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make ``launch`` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # noqa: E402


def command(spec: str, workdir: str, flags: Sequence[str], exe: str | None = None) -> list[str]:
  """The iomm-train argv this launcher runs."""
  return common.train_argv(spec, workdir, flags=flags, exe=exe or common.local_train_bin())


def main(argv: Sequence[str] | None = None) -> int:
  """Parses the arguments, checks the config, prints the command, runs it (unless --dry-run)."""
  args = common.parse(common.parser(__doc__, "launch/local.py"), argv)
  common.check_config(args.config, {}, args.config_flags)
  cmd = command(args.config, args.workdir, args.flags)
  print(common.shell(cmd), flush=True)
  if args.dry_run:
    return 0
  os.execvp(cmd[0], cmd)  # signals (SIGTERM -> checkpoint and exit) reach iomm-train directly


if __name__ == "__main__":
  sys.exit(common.run_main(main))
