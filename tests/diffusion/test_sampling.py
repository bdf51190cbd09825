"""Samplers on analytic velocity fields."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iomm_jax.diffusion import sampling


def test_euler_is_exact_for_a_point_mass():
  # Data = a single point x0: the exact velocity is v(x, t) = (x - x0) / t, which is linear
  # along straight paths, so Euler reaches x0 exactly from any noise.
  x0 = jnp.array([[0.5, -1.0, 2.0]])
  v = lambda x, t: (x - x0) / t[:, None]
  z = jax.random.normal(jax.random.key(0), (4, 3))
  out = sampling.sample(v, z, num_steps=7)
  np.testing.assert_allclose(out, jnp.broadcast_to(x0, (4, 3)), atol=1e-5)


def _gaussian_velocity(mu, s):
  # x ~ N(mu, s^2): x_t ~ N((1-t) mu, var), var = (1-t)^2 s^2 + t^2 and
  # v = E[z - x | x_t] = (t - (1-t) s^2) (x_t - (1-t) mu) / var - mu.
  def v(x, t):
    t = t[:, None]
    var = (1 - t) ** 2 * s**2 + t**2
    return (t - (1 - t) * s**2) * (x - (1 - t) * mu) / var - mu

  return v


@pytest.mark.parametrize("solver,steps,tol", [("euler", 200, 2e-2), ("heun", 30, 1e-3)])
def test_gaussian_flow_maps_noise_to_data(solver, steps, tol):
  mu, s = 1.5, 0.5
  z = jax.random.normal(jax.random.key(0), (256, 2))
  out = sampling.sample(_gaussian_velocity(mu, s), z, steps, solver=solver)
  # the probability-flow ODE of a Gaussian is linear: it maps z to mu + s z exactly
  np.testing.assert_allclose(out, mu + s * z, atol=tol)


def test_heun_beats_euler_at_equal_steps():
  mu, s = -1.0, 2.0
  z = jax.random.normal(jax.random.key(1), (64, 2))
  exact = mu + s * z
  err = lambda solver: float(
    jnp.abs(sampling.sample(_gaussian_velocity(mu, s), z, 10, solver=solver) - exact).max()
  )
  assert err("heun") < err("euler") / 5


def test_guidance_combination():
  vc = lambda x, t: jnp.ones_like(x) * 3.0
  vu = lambda x, t: jnp.ones_like(x) * 1.0
  x = jnp.zeros((2, 2))
  np.testing.assert_allclose(sampling.guided(vc, vu, 2.0)(x, jnp.ones(2)), 5.0)  # 1 + 2*(3-1)
  assert sampling.guided(vc, vu, 1.0) is vc


def test_time_grid_and_errors():
  np.testing.assert_allclose(sampling.time_grid(4), [1.0, 0.75, 0.5, 0.25, 0.0])
  g = sampling.time_grid(4, shift=3.0)
  assert float(g[0]) == 1.0 and float(g[-1]) == 0.0 and float(g[2]) == pytest.approx(0.75)
  with pytest.raises(ValueError, match="unknown solver"):
    sampling.sample(lambda x, t: x, jnp.zeros((1, 1)), 2, solver="rk4")
  with pytest.raises(ValueError, match="num_steps"):
    sampling.time_grid(0)
