"""iomm_jax: image-only masked modeling for unified multimodal generation (IOMM) in JAX/Flax."""

__version__ = "0.1.0"
