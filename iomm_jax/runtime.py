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
