"""Test-session set-up: absl flags parsed (grain reads them), persistent compilation cache."""

import os
import sys

import pytest

from iomm_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

runtime.outside_absl()  # grain reads absl flags; the persistent compilation cache
sys.path.insert(0, ROOT)


def perturbed(params, scale: float, seed: int = 1):
  """``params`` plus ``scale`` x standard normal noise: nonzero adaLN-Zero gates and output
  weights, so that a freshly initialised generator's output (and gradients) depend on its input."""
  import jax

  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
    tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  )


@pytest.fixture(scope="session")
def quick_mllm(tmp_path_factory):
  """(workdir, last metrics) of a stage-0 MLLM on the quick shapes config, trained once per test
  session and shared read-only by the tests that need a frozen MLLM to condition on."""
  from iomm_jax.configs.loading import load_config
  from iomm_jax.train import mllm

  wd = str(tmp_path_factory.mktemp("quick_mllm") / "mllm")
  last = mllm.train_and_evaluate(
    load_config(os.path.join(ROOT, "experiments", "shapes", "mllm.py:quick")), wd
  )
  return wd, last
