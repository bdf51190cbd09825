"""Optimisers and schedules from config.optim."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iomm_jax import optim
from iomm_jax.configs import specs
from iomm_jax.configs.base import get_base_config


def _cfg(**kw):
  """The spec of the base config's ``optim`` with ``kw`` set."""
  c = get_base_config()
  for k, v in kw.items():
    c.optim[k] = v
  return specs.from_config(c).optim


def test_paper_defaults():
  c = _cfg()
  assert (c.name, c.lr, c.b1, c.b2, c.weight_decay, c.clip_norm) == (
    "adamw",
    1e-4,
    0.9,
    0.95,
    0.0,
    1.0,
  )


@pytest.mark.parametrize("schedule,at_end", [("constant", 1.0), ("cosine", 0.1), ("linear", 0.1)])
def test_schedules_with_warmup(schedule, at_end):
  s = optim.make_schedule(
    _cfg(lr=1.0, schedule=schedule, warmup_steps=10, final_lr_fraction=0.1), 110
  )
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(s(110), at_end, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizers_reduce_a_quadratic(name):
  opt, _ = optim.make_optimizer(_cfg(name=name, lr=0.05), 100)
  # a full-rank matrix: Muon's orthogonalised update of a rank-1 one is tiny per entry
  params = {"w": jax.random.normal(jax.random.key(0), (4, 4)) * 2.0, "b": jnp.ones((4,))}
  state = opt.init(params)
  loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
  start = float(loss(params))
  for _ in range(60):  # Muon moves each singular direction by ~lr per step
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.5 * start


def test_clipping_bounds_the_update():
  """The project's chain clips the gradient before the optimiser sees it: after one step with
  a gradient of norm ~1.7e6 the first moment holds (1 - b1) x a gradient of norm clip_norm, and
  without the clip (clip_norm 0) the whole gradient."""
  params = {"w": jnp.zeros((3, 3))}
  g = {"w": jnp.full((3, 3), 1e6)}
  seen = {}
  for clip in (1.0, 0.0):
    opt, _ = optim.make_optimizer(_cfg(name="adamw", lr=1.0, clip_norm=clip), 10)
    _, state = opt.update(g, opt.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")
    seen[clip] = float(optax.tree.norm(mu)) / (1 - _cfg().b1)
  assert seen[1.0] == pytest.approx(1.0, rel=1e-5)
  assert seen[0.0] == pytest.approx(3e6, rel=1e-5)


def test_unknown_names_are_errors():
  with pytest.raises(ValueError, match="config.optim.name='sgd' unknown"):
    optim.make_optimizer(_cfg(name="sgd"), 10)
  with pytest.raises(ValueError, match="config.optim.schedule='step' unknown"):
    optim.make_schedule(_cfg(schedule="step"), 10)
