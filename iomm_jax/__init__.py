"""iomm_jax: image-only masked modeling for unified multimodal generation (IOMM) in JAX/Flax."""

__version__ = "0.1.0"

# Exit status of a run that SIGTERM stopped after saving a checkpoint (sysexits.h EX_TEMPFAIL):
# not finished, not failed; the same command resumes it (iomm-train, iomm-demo, launch/sweep.py).
PREEMPTED_EXIT_CODE = 75
