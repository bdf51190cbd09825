"""Residual Query Adapter and connector: shapes, parameter count, key padding mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iomm_jax.models import adapter, layers


def _rqa(width=32, q=8, heads=4):
  return adapter.ResidualQueryAdapter(
    adapter.AdapterConfig(width=width, num_queries=q, num_heads=heads)
  )


def test_rqa_shapes_and_logical_names():
  m = _rqa()
  x = jax.random.normal(jax.random.key(0), (2, 10, 32))
  valid = jnp.ones((2, 10), bool)
  boxed = m.init(jax.random.key(1), x, valid)
  names = jax.tree_util.tree_leaves(
    layers.logical_axes_tree(boxed), is_leaf=lambda n: isinstance(n, tuple)
  )
  shapes = jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.shape, boxed["params"]))
  assert all(n is not None for n in names)
  out = m.apply(boxed, x, valid)
  assert out.shape == (2, 8, 32)
  assert len(names) > 0 and len(shapes) > 0


def test_rqa_param_count_at_paper_width():
  # 256 x 1536 queries + q/k/v/o (1536^2 + 1536 each) + fc1/fc2 (4x MLP) = 28.7 M, the paper's
  # "~29 M" (paper.md §2.4).
  m = adapter.ResidualQueryAdapter(adapter.AdapterConfig(width=1536, num_queries=256, num_heads=12))
  shapes = jax.eval_shape(
    m.init, jax.random.key(0), jnp.zeros((1, 300, 1536)), jnp.ones((1, 300), bool)
  )
  n = layers.count_params(shapes)
  expected = 256 * 1536 + 4 * (1536 * 1536 + 1536) + (1536 * 6144 + 6144) + (6144 * 1536 + 1536)
  assert n == expected == 28_718_592


def test_key_padding_mask_hides_padded_tokens():
  m = _rqa()
  x = jax.random.normal(jax.random.key(0), (1, 10, 32))
  valid = jnp.arange(10)[None] < 6
  params = m.init(jax.random.key(1), x, valid)
  junk = x.at[:, 6:].set(100.0)
  np.testing.assert_allclose(m.apply(params, x, valid), m.apply(params, junk, valid), atol=1e-5)
  # ... while a real token does matter
  other = x.at[:, 2].set(5.0)
  assert float(jnp.abs(m.apply(params, x, valid) - m.apply(params, other, valid)).max()) > 1e-3


def test_queries_depend_on_input():
  m = _rqa()
  valid = jnp.ones((2, 10), bool)
  x = jax.random.normal(jax.random.key(0), (2, 10, 32))
  params = m.init(jax.random.key(1), x, valid)
  out = m.apply(params, x, valid)
  assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3


@pytest.mark.parametrize("kind", adapter.CONNECTOR_KINDS)
def test_connector_kinds(kind):
  c = adapter.Connector(adapter.ConnectorConfig(kind=kind, width_out=24, num_layers=1, num_heads=4))
  h = jnp.ones((2, 5, 32))
  params = c.init(jax.random.key(0), h)
  assert c.apply(params, h).shape == (2, 5, 24)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="width=30 is not divisible by num_heads=4"):
    adapter.AdapterConfig(width=30, num_heads=4)
  with pytest.raises(ValueError, match="num_queries"):
    adapter.AdapterConfig(width=32, num_queries=0, num_heads=4)
  with pytest.raises(ValueError, match="kind='conv' unknown"):
    adapter.ConnectorConfig(kind="conv", width_out=8)
