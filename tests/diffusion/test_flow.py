"""Flow-matching arithmetic against hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iomm_jax.diffusion import flow


def test_interpolate_and_target_by_hand():
  x = jnp.array([[1.0, 2.0], [0.0, -4.0]])
  z = jnp.array([[3.0, 0.0], [2.0, 4.0]])
  t = jnp.array([0.25, 0.5])
  # row 0: 0.75*[1,2] + 0.25*[3,0] = [1.5, 1.5]; row 1: 0.5*[0,-4] + 0.5*[2,4] = [1, 0]
  np.testing.assert_allclose(flow.interpolate(x, z, t), [[1.5, 1.5], [1.0, 0.0]])
  np.testing.assert_allclose(flow.velocity_target(x, z), [[2.0, -2.0], [2.0, 8.0]])


def test_endpoints_are_data_and_noise():
  x = jnp.ones((2, 4, 4, 3))
  z = -jnp.ones((2, 4, 4, 3))
  np.testing.assert_allclose(flow.interpolate(x, z, jnp.zeros(2)), x)
  np.testing.assert_allclose(flow.interpolate(x, z, jnp.ones(2)), z)


def test_training_pair_is_consistent():
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 4))
  t = jnp.array([0.1, 0.5, 0.9])
  p = flow.make_training_pair(jax.random.key(1), x, t)
  # x_t + (1 - t) * target == z   (since x_t = x + t (z - x))
  np.testing.assert_allclose(
    p["x_t"] + (1 - t)[:, None, None, None] * p["target"], p["z"], atol=1e-6
  )
  assert p["x_t"].dtype == jnp.float32


def test_loss_per_example_by_hand():
  pred = jnp.array([[1.0, 1.0], [0.0, 2.0]])
  target = jnp.array([[0.0, 1.0], [0.0, 0.0]])
  np.testing.assert_allclose(flow.flow_matching_loss(pred, target), [0.5, 2.0])


def test_timestep_samplers():
  t = flow.sample_timesteps(jax.random.key(0), 20000)
  assert float(t.min()) >= 0 and float(t.max()) < 1
  assert abs(float(t.mean()) - 0.5) < 0.01
  ln = flow.sample_timesteps(jax.random.key(0), 20000, "logit_normal", 0.0, 1.0)
  assert abs(float(jnp.median(ln)) - 0.5) < 0.02
  # shift s=3 maps 0.5 to 3*0.5/(1+2*0.5) = 0.75
  np.testing.assert_allclose(flow.shift_timesteps(jnp.array(0.5), 3.0), 0.75)
  shifted = flow.sample_timesteps(jax.random.key(0), 20000, "uniform", shift=3.0)
  assert float(jnp.median(shifted)) > 0.7
  with pytest.raises(ValueError, match="unknown timestep sampler"):
    flow.sample_timesteps(jax.random.key(0), 4, "beta")


def test_x_prediction_gives_the_velocity_by_hand():
  x = jnp.array([[1.0, 2.0], [0.0, -4.0]])
  z = jnp.array([[3.0, 0.0], [2.0, 4.0]])
  t = jnp.array([0.25, 0.5])
  x_t = flow.interpolate(x, z, t)
  # a perfect clean-sample prediction stands for the true velocity z - x
  v = flow.velocity_from_output(x, x_t, t, "x")
  np.testing.assert_allclose(v, z - x, rtol=1e-6)
  np.testing.assert_array_equal(flow.velocity_from_output(z - x, x_t, t), z - x)  # "velocity"
  # below t_min the division uses t_min: (x_t - out) / 0.05 at t = 0
  t0 = jnp.array([0.0, 0.01])
  v0 = flow.velocity_from_output(jnp.zeros_like(x), x, t0, "x", t_min=0.05)
  np.testing.assert_allclose(v0, x / 0.05, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown prediction 'eps'"):
    flow.velocity_from_output(x, x_t, t, "eps")
