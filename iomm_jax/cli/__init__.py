"""Command-line entry points (``iomm-train``, ``iomm-sample``, ``iomm-eval``, ``iomm-demo``,
``iomm-convert``, ``iomm-plan``)."""

from __future__ import annotations

import contextlib
import sys


def absl_argv(argv: list[str] | None = None) -> list[str]:
  """``argv`` with dashes in flag names turned into absl's underscores (``--num-per-prompt=4``
  -> ``--num_per_prompt=4``, ``--no-ema`` -> ``--noema``); values and ``--config...`` overrides
  are left alone."""
  out = []
  for i, arg in enumerate(sys.argv if argv is None else argv):
    if i and arg.startswith("--") and len(arg) > 2:
      name, eq, value = arg[2:].partition("=")
      if not name.startswith("config"):
        if name.startswith("no-"):  # absl negates booleans as --noflag
          name = "no" + name[3:]
        arg = "--" + name.replace("-", "_") + eq + value
    out.append(arg)
  return out


@contextlib.contextmanager
def exit_on_preemption():
  """Inside: a run stopped by SIGTERM (``loop.Preempted``, raised once its checkpoint is saved)
  ends the process with its one-line message and exit status 75 (EX_TEMPFAIL), so a shell
  chain (``set -e``), a sweep or a scheduler never takes it for a finished run."""
  from iomm_jax.train import loop

  try:
    yield
  except loop.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
