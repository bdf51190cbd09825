"""Dtype names: the one table from the names configs, files and flags use to numpy dtypes.

numpy and ml_dtypes only (no JAX), so every layer may import it. ``np.dtype(ml_dtypes.bfloat16)``
is ``jnp.bfloat16``'s dtype, so the values serve numpy arrays, safetensors and Flax modules alike.
Each user names the subset it accepts (``STORAGE`` for what converted weights are stored in).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np

DTYPES = {
  "float32": np.dtype(np.float32),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "float16": np.dtype(np.float16),
}
STORAGE = ("float32", "bfloat16")  # storage dtypes of imported / exported weights


def dtype(
  name: str,
  choices: Sequence[str] = tuple(DTYPES),
  what: str = "dtype",
  error: type[Exception] = ValueError,
) -> np.dtype:
  """The dtype called ``name``; raises ``error("<what> 'name' unknown; choose from <choices>")``
  when ``name`` is not one of ``choices``."""
  if name not in choices:
    raise error(f"{what} {name!r} unknown; choose from {tuple(choices)}")
  return DTYPES[name]


def name_of(dt: object) -> str | None:
  """The table's name of the dtype ``dt`` (a numpy / JAX dtype or scalar type); None if absent."""
  dt = np.dtype(dt)
  return next((n for n, d in DTYPES.items() if d == dt), None)
