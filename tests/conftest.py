"""Test-session set-up: absl flags parsed (grain reads them), persistent compilation cache."""

import os
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

# grain reads absl flags; outside absl.app.run they must be marked parsed (ecosystem notes).
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

from iomm_jax import runtime  # noqa: E402

runtime.enable_compilation_cache()
sys.path.insert(0, ROOT)
