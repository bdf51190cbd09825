"""Masked self-conditioning (paper §2.3): zero a random subset of the condition's image tokens.

Each image token is kept with probability ``1 - r`` independently (Bernoulli), and a masked token
becomes the zero vector: no mask token, no dropping, the sequence length is unchanged. The paper
defines the mask per element but describes masking tokens; we mask per token, broadcast over the
feature axis (paper.md §2.3, open question 7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_mask_ratio(ratio: float) -> float:
  """Validates a mask ratio r in [0, 1); returns it as a float."""
  if not 0.0 <= float(ratio) < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
  return float(ratio)


def token_keep_mask(rng: jax.Array, shape: tuple[int, int], ratio: float | jax.Array) -> jax.Array:
  """Boolean keep mask [B, P]; each entry True with probability 1 - ratio.

  ``ratio`` may be a scalar or a per-example array [B].
  """
  r = jnp.asarray(ratio, jnp.float32)
  r = r.reshape(r.shape + (1,) * (len(shape) - r.ndim))
  return jax.random.uniform(rng, shape, jnp.float32) >= r


def mask_tokens(tokens: jax.Array, keep: jax.Array) -> jax.Array:
  """Zeroes masked tokens: tokens [B, P, D] * keep [B, P, 1]."""
  return tokens * keep[..., None].astype(tokens.dtype)
