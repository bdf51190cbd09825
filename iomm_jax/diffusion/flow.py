"""Rectified-flow (flow-matching) arithmetic, all in float32.

Convention (paper §2.7): ``x_t = (1 - t) x + t z`` with data x at t = 0 and noise z ~ N(0, I)
at t = 1; the network predicts the velocity ``z - x``; the loss is its mean squared error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

T_SAMPLERS = ("uniform", "logit_normal")
PREDICTIONS = ("velocity", "x")
"""What the generator's output is: the velocity itself (FLUX, the paper) or the clean sample
x, turned into a velocity by ``velocity_from_output`` (JiT's "x-prediction, v-loss")."""


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
  """SD3/FLUX time shift ``s t / (1 + (s - 1) t)``; shift > 1 moves mass towards noise."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(
  rng: jax.Array,
  batch: int,
  kind: str = "uniform",
  logit_mean: float = 0.0,
  logit_std: float = 1.0,
  shift: float = 1.0,
) -> jax.Array:
  """Training times t in (0, 1), shape [B], float32.

  ``uniform`` is the paper's ``t ~ U(0, 1)``; ``logit_normal`` draws
  ``sigmoid(N(logit_mean, logit_std^2))``; either is then shifted when ``shift != 1``.
  """
  if kind == "uniform":
    t = jax.random.uniform(rng, (batch,), jnp.float32)
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,), jnp.float32))
  else:
    raise ValueError(f"unknown timestep sampler {kind!r}; choose from {T_SAMPLERS}")
  return shift_timesteps(t, shift) if shift != 1.0 else t


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  return t.astype(jnp.float32).reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
  """``x_t = (1 - t) x + t z``; x, z [B, ...], t [B]."""
  tb = _bcast(t, x)
  return (1.0 - tb) * x.astype(jnp.float32) + tb * z.astype(jnp.float32)


def velocity_target(x: jax.Array, z: jax.Array) -> jax.Array:
  """The regression target ``z - x`` (float32)."""
  return z.astype(jnp.float32) - x.astype(jnp.float32)


def make_training_pair(rng: jax.Array, x: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
  """Everything the loss needs: noise z, noisy input x_t and target z - x."""
  return training_pair(x, jax.random.normal(rng, x.shape, jnp.float32), t)


def training_pair(x: jax.Array, z: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
  """``make_training_pair`` for noise ``z`` drawn beforehand."""
  return {"z": z, "x_t": interpolate(x, z, t), "target": velocity_target(x, z)}


def flow_matching_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-example mean squared error over all non-batch axes, [B] float32."""
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(err.reshape(err.shape[0], -1), axis=-1)


def velocity_from_output(
  out: jax.Array, x_t: jax.Array, t: jax.Array, prediction: str = "velocity", t_min: float = 0.05
) -> jax.Array:
  """The velocity a generator output stands for, float32.

  ``"velocity"``: ``out`` itself. ``"x"``: ``out`` is the predicted clean sample x, and since
  ``x_t = (1 - t) x + t z`` the velocity ``z - x`` is ``(x_t - x) / t``, with t clipped below at
  ``t_min`` (the division is ill-posed at t = 0). The loss stays the velocity loss, so with x
  prediction it weighs the x error by 1 / max(t, t_min)^2 (Li & He 2025, "Back to Basics: Let
  Denoising Generative Models Denoise": a network that outputs clean images, a low-dimensional
  manifold, instead of noise-laden velocities needs less capacity; measured on the shapes demo in
  docs/RESULTS.md).
  """
  out = out.astype(jnp.float32)
  if prediction == "velocity":
    return out
  if prediction != "x":
    raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")
  tb = jnp.maximum(_bcast(t, out), t_min)
  return (x_t.astype(jnp.float32) - out) / tb
