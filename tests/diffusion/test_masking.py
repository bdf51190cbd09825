"""Masked self-conditioning: per-token Bernoulli masks, zeroed tokens, statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iomm_jax.diffusion import masking


def test_mask_tokens_zeroes_whole_tokens():
  tokens = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) + 1
  keep = jnp.array([[True, False, True], [False, False, True]])
  out = masking.mask_tokens(tokens, keep)
  np.testing.assert_array_equal(out[0, 1], 0)
  np.testing.assert_array_equal(out[1, :2], 0)
  np.testing.assert_array_equal(out[0, 0], tokens[0, 0])
  np.testing.assert_array_equal(out[1, 2], tokens[1, 2])


@pytest.mark.parametrize("ratio", [0.0, 0.45, 0.85])
def test_keep_fraction_matches_ratio(ratio):
  keep = masking.token_keep_mask(jax.random.key(0), (256, 256), ratio)
  n = keep.size
  frac = float(keep.mean())
  # binomial std of the kept fraction: sqrt(p (1 - p) / n)
  std = np.sqrt(ratio * (1 - ratio) / n)
  assert abs(frac - (1 - ratio)) <= 5 * std + 1e-9


def test_masks_are_independent_per_token():
  keep = np.asarray(masking.token_keep_mask(jax.random.key(1), (4000, 64), 0.5))
  # per-example kept counts ~ Binomial(64, 0.5): variance 16
  counts = keep.sum(axis=1)
  assert 12 < counts.var() < 20
  # neighbouring tokens uncorrelated
  corr = np.corrcoef(keep[:, :-1].ravel(), keep[:, 1:].ravel())[0, 1]
  assert abs(corr) < 0.03


def test_per_example_ratio():
  keep = masking.token_keep_mask(jax.random.key(2), (2, 20000), jnp.array([0.0, 0.9]))
  assert bool(keep[0].all())
  assert abs(float(keep[1].mean()) - 0.1) < 0.01


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_ratio_validation(bad):
  with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\)"):
    masking.check_mask_ratio(bad)
