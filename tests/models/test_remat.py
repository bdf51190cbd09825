"""Rematerialisation (``config.model.remat``): the same parameters, loss and gradients as without.

The whole stage-1 loss of the shapes model (frozen MLLM decoder, RQA, connector, MM-DiT) in
float32, differentiated with respect to the trainable tree, once per policy.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iomm_jax.assembly import context
from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config
from iomm_jax.models import adapter, iomm, layers, mmdit
from iomm_jax.train import steps
from tests.conftest import perturbed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICIES = tuple(layers.REMAT_POLICIES)


@functools.cache
def _setup(remat: str):
  config = load_config(
    os.path.join(ROOT, "experiments/shapes/pretrain.py:quick"),
    {"model.mllm_init": "random", "model.remat": remat},
  )
  ctx = context.build(config)
  null_ids, null_valid = ctx.conditioner.null_condition()
  null = jnp.asarray(null_ids), jnp.asarray(null_valid)
  loss_fn = steps.generator_loss_fn(ctx.model, specs.from_config(config), *null)
  boxed = jax.jit(lambda: iomm.init_trainable(ctx.model, 0, ctx.conditioner.cond_len))()
  return ctx, loss_fn, boxed


def _batch(ctx, b: int = 4):
  rng = np.random.default_rng(0)
  size = ctx.model.image_size
  ids, valid = ctx.conditioner.image_condition()
  return {
    "image": jnp.asarray(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)),
    "cond_ids": jnp.asarray(np.tile(ids, (b, 1))),
    "cond_valid": jnp.asarray(np.tile(valid, (b, 1))),
    "is_image_only": jnp.ones((b,), bool),
  }


def _loss_and_grads(remat: str):
  ctx, loss_fn, boxed = _setup(remat)
  params = nn.meta.unbox(boxed)
  # nonzero modulation/output weights, so that every block's gradient is nonzero (zero-init
  # adaLN would leave most of the generator's gradients exactly 0 at step 0)
  params = perturbed(params, 0.02)
  batch = _batch(ctx)
  fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, ctx.frozen, batch, jax.random.key(3))[0]))
  return fn(params)


@pytest.mark.parametrize("remat", [p for p in POLICIES if p != "none"])
def test_remat_keeps_parameter_names_and_shapes(remat):
  want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), nn.meta.unbox(_setup("none")[2]))
  got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), nn.meta.unbox(_setup(remat)[2]))
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  assert got == want
  # the logical axis names (what sharding reads) are the same too
  names = lambda t: nn.get_partition_spec(t)
  assert names(_setup(remat)[2]) == names(_setup("none")[2])
  # and the values of a seeded init
  for a, b in zip(
    jax.tree_util.tree_leaves(nn.meta.unbox(_setup("none")[2])),
    jax.tree_util.tree_leaves(nn.meta.unbox(_setup(remat)[2])),
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  "remat", [pytest.param(p, marks=pytest.mark.slow) if p == "dots" else p for p in POLICIES[1:]]
)
def test_remat_gives_the_same_loss_and_gradients(remat):
  loss0, g0 = _loss_and_grads("none")
  loss1, g1 = _loss_and_grads(remat)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  flat0 = jax.tree_util.tree_leaves_with_path(g0)
  flat1 = dict(jax.tree_util.tree_leaves_with_path(g1))
  nonzero = 0
  for path, a in flat0:
    b = flat1[path]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    nonzero += bool(np.any(a != 0))
  assert nonzero > 0.9 * len(flat0)


def test_unknown_policy_is_an_error():
  with pytest.raises(ValueError, match="remat policy 'all' unknown"):
    layers.remat(mmdit.DoubleStreamBlock, "all")
  with pytest.raises(ValueError, match="MMDiTConfig.remat must be one of"):
    mmdit.get_mmdit_config("tiny", remat="full")
  with pytest.raises(ValueError, match="AdapterConfig.remat must be one of"):
    adapter.AdapterConfig(width=128, remat="x")


PROBE = """
import json, sys
import flax.linen as nn, jax, jax.numpy as jnp
from iomm_jax.models import mmdit
out = {}
for remat in sys.argv[1:]:
  m = mmdit.MMDiT(mmdit.get_mmdit_config("tiny", remat=remat))
  b, side, lt = 8, 16, 16
  args = (jnp.zeros((b, side * side, 48)), mmdit.image_ids(b, side, side),
          jnp.zeros((b, lt, 128)), mmdit.text_ids(b, lt), jnp.zeros((b, 128)), jnp.zeros((b,)))
  p = jax.eval_shape(lambda: nn.meta.unbox(m.init(jax.random.key(0), *args)["params"]))
  grad = jax.grad(lambda p, *a: m.apply({"params": p}, *a).sum())
  out[remat] = jax.jit(grad).lower(p, *args).compile().memory_analysis().temp_size_in_bytes
print(json.dumps(out))
"""


def test_remat_reduces_compiled_temporaries():
  """The tiny MM-DiT's gradient (256 image tokens, batch 8) compiled by XLA's CPU backend with
  iomm-plan's flags (which keep remat's optimisation barriers): less temporary memory."""
  import json
  import subprocess
  import sys

  from iomm_jax.cli import plan as plan_cli

  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"{plan_cli.KEEP_REMAT_FLAGS} {plan_cli.FAST_COMPILE_FLAGS}"
  out = subprocess.run(
    [sys.executable, "-c", PROBE, "none", "block", "dots"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  temp = json.loads(out.stdout.strip().splitlines()[-1])
  assert temp["block"] < 0.5 * temp["none"]
  assert temp["dots"] < 0.8 * temp["none"]
