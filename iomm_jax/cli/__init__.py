"""Command-line entry points (``iomm-train``, ``iomm-sample``, ``iomm-eval``, ``iomm-demo``,
``iomm-convert``, ``iomm-plan``)."""

from __future__ import annotations

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
