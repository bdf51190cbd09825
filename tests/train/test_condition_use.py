"""``benchmarks/condition_use.py`` and the ``cond_image`` batch key it relies on: the stage-1
loss of a quick random model under its own image, another image and the null condition."""

import importlib.util
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from iomm_jax.assembly import context
from iomm_jax.configs.loading import load_config
from iomm_jax.models import iomm
from tests.conftest import ROOT, perturbed


def _module():
  path = os.path.join(ROOT, "benchmarks", "condition_use.py")
  spec = importlib.util.spec_from_file_location("condition_use", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def model():
  config = load_config(
    os.path.join(ROOT, "experiments/shapes/pretrain.py:quick"), {"model.mllm_init": "random"}
  )
  ctx = context.build(config)
  params = nn.meta.unbox(iomm.init_trainable(ctx.model, 0, ctx.conditioner.cond_len))
  return config, ctx, params


@pytest.fixture(scope="module")
def cu(model):
  config, ctx, _ = model
  mod = _module()
  return mod, mod.loss_fns(config, ctx)


def test_cond_image_defaults_to_the_target_and_changes_the_loss(model, cu):
  config, ctx, params = model
  params, fn = perturbed(params, 0.05), cu[1][0.85]
  rng = np.random.default_rng(0)
  s = ctx.model.image_size
  images = rng.integers(0, 256, (4, s, s, 3), dtype=np.uint8)
  ids, valid = ctx.conditioner.image_condition()
  batch = {"image": images, "cond_ids": np.tile(ids, (4, 1)), "cond_valid": np.tile(valid, (4, 1)),
           "is_image_only": np.ones(4, bool)}  # fmt: skip
  key = jax.random.key(2)
  plain = float(fn(params, ctx.frozen, batch, key)[0])
  assert float(fn(params, ctx.frozen, {**batch, "cond_image": images}, key)[0]) == plain
  other = {**batch, "cond_image": np.roll(images, 1, axis=0)}
  assert float(fn(params, ctx.frozen, other, key)[0]) != plain


def test_condition_use_losses(model, cu):
  config, ctx, params = model
  mod, fns = cu
  zero = mod.losses(config, ctx, params, num_images=4, draws=2, fns=fns)
  assert list(zero) == [
    "own image, r = 0", "own image, r = 0.85", "another image, r = 0", "null condition"
  ]  # fmt: skip
  # adaLN-Zero init: the generator's output is 0 for every condition, so every loss is the same
  assert len(set(zero.values())) == 1
  live = mod.losses(config, ctx, perturbed(params, 0.05), num_images=4, draws=2, fns=fns)
  assert len(set(live.values())) == 4 and all(np.isfinite(v) for v in live.values())
