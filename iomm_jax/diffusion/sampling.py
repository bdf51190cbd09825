"""ODE samplers for the rectified flow: integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0.

``velocity_fn(x, t) -> v`` is any pure function; classifier-free guidance is a wrapper that
combines a conditional and an unconditional velocity: ``v_u + s (v_c - v_u)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from iomm_jax.diffusion.flow import shift_timesteps

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
SOLVERS = ("euler", "heun")


def time_grid(num_steps: int, shift: float = 1.0) -> jax.Array:
  """Decreasing times [num_steps + 1] from 1 to 0, optionally shifted."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  t = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
  return shift_timesteps(t, shift) if shift != 1.0 else t


def cfg(v_cond: jax.Array, v_uncond: jax.Array, scale: float) -> jax.Array:
  """Classifier-free guidance of two velocities: ``v_u + scale * (v_c - v_u)`` (the one formula;
  ``generate`` and ``guided`` use it, ``torch_port.sample_latents`` mirrors it)."""
  return v_uncond + scale * (v_cond - v_uncond)


def guided(cond_fn: VelocityFn, uncond_fn: VelocityFn, scale: float) -> VelocityFn:
  """Classifier-free guidance of two velocity functions (``cfg``); scale 1 is the conditional."""
  if scale == 1.0:
    return cond_fn
  return lambda x, t: cfg(cond_fn(x, t), uncond_fn(x, t), scale)


def sample(
  velocity_fn: VelocityFn,
  noise: jax.Array,
  num_steps: int,
  solver: str = "euler",
  shift: float = 1.0,
) -> jax.Array:
  """Integrates from ``noise`` (t = 1) to data (t = 0).

  Args:
    velocity_fn: v(x [B, ...], t [B]) -> [B, ...].
    noise: [B, ...] starting point.
    num_steps: number of steps; Heun uses 2 velocity evaluations per step.
    solver: "euler" or "heun" (2nd-order trapezoidal corrector; the velocity of a rectified
      flow is finite at t = 0, so every step is corrected).
    shift: time-grid shift (1 = uniform).
  Returns:
    x at t = 0, float32.
  """
  if solver not in SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
  ts = time_grid(num_steps, shift)
  b = noise.shape[0]

  def step(i, x):
    t, t_next = ts[i], ts[i + 1]
    v = velocity_fn(x, jnp.full((b,), t))
    x_euler = x + (t_next - t) * v
    if solver == "euler":
      return x_euler
    v_next = velocity_fn(x_euler, jnp.full((b,), t_next))
    return x + (t_next - t) * 0.5 * (v + v_next)

  return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))
