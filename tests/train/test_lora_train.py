"""Training with LoRA (``config.model.lora``): what trains, what the optimiser holds, what
``iomm-plan`` reports, the config checks, and (slow) a stage-2 run from a FLUX-format directory
exported back to diffusers.

The base generator weights are moved to the frozen tree (``iomm.split_generator``), the way the
MLLM is frozen: they are an argument of the step that is never differentiated, so they have no
gradient, no optimiser state and no EMA.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from iomm_jax.configs import specs
from iomm_jax.configs.base import get_base_config
from iomm_jax.configs.loading import ConfigError, load_config, validate
from iomm_jax.convert import tensors
from iomm_jax.models import iomm, mmdit
from iomm_jax.train import loop as loop_lib
from iomm_jax.train import plan, steps
from tests.conftest import perturbed
from tests.convert import tiny_flux

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES_FT = os.path.join(ROOT, "experiments", "shapes", "finetune.py")

CFG = tiny_flux.tiny(pooled_projection_dim=24)  # the pooled vector is the mean of the context


def _model(rank: int, trainable: tuple[str, ...] = ()) -> iomm.IOMM:
  """An IOMM whose only part the test uses is its generator (CFG, with LoRA of ``rank``)."""
  c = get_base_config()
  c.model.num_queries, c.model.adapter_heads, c.model.connector_heads = 3, 4, 4
  model = iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6)
  lora = mmdit.LoRAConfig(rank=rank, alpha=float(rank), trainable=trainable) if rank else None
  return model.__class__(**{**model.__dict__, "generator": mmdit.MMDiT(CFG, lora=lora)})


def _generator_loss(model: iomm.IOMM):
  """The rectified-flow loss of the generator alone on a fixed random condition, written as the
  stage loss is: ``iomm.velocity`` of ``iomm.generator_params(trainable, frozen)``."""

  def loss_fn(trainable, frozen, batch, rng):
    del rng
    gen = iomm.generator_params(trainable, frozen)
    x_t = batch["x_t"]
    b, h, w, c = x_t.shape
    tokens = mmdit.pack_latents(x_t, 2)
    out = model.generator.apply(
      {"params": gen}, tokens, mmdit.image_ids(b, h // 2, w // 2), batch["ctx"],
      mmdit.text_ids(b, batch["ctx"].shape[1]), batch["ctx"].mean(1), batch["t"],
    )  # fmt: skip
    pred = mmdit.unpack_latents(out, h, w, 2)
    return jnp.mean(jnp.square(pred - batch["target"])), {}

  return loss_fn


def _optim_config() -> ml_collections.ConfigDict:
  """The base config (AdamW, clip 1, EMA 0.999) with a learning rate that moves tiny weights."""
  c = get_base_config()
  c.optim.lr = 1e-2
  return c


def _batch():
  """A fixed random batch for ``_generator_loss``."""
  rng = np.random.default_rng(0)
  n = lambda *s: rng.standard_normal(s, np.float32)
  return {"x_t": n(2, 4, 4, 4), "ctx": n(2, 3, 24), "t": np.array([0.2, 0.7], np.float32),
          "target": n(2, 4, 4, 4)}  # fmt: skip


def _state_and_frozen(model: iomm.IOMM, seed: int = 0):
  """(optimizer, step, state, frozen) with perturbed (non-zero) base weights."""
  tokens = jnp.zeros((1, 4, 16))
  abstract = jax.eval_shape(
    lambda: model.generator.init(
      jax.random.key(0),
      tokens,
      mmdit.image_ids(1, 2, 2),
      jnp.zeros((1, 3, 24)),
      mmdit.text_ids(1, 3),
      jnp.zeros((1, 24)),
      jnp.zeros((1,)),
    )  # fmt: skip
  )
  base = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nn.meta.unbox(abstract["params"]))
  gen = perturbed(base, 0.2, seed)  # a random existing generator; LoRA's B starts at zero
  gen = jax.tree_util.tree_map_with_path(
    lambda p, x: jnp.zeros_like(x) if p[-1].key == "lora_b" else x, gen
  )
  trainable, frozen_gen = iomm.split_generator(model, {"generator": gen})
  c = _optim_config()
  optimizer, step = loop_lib.make_train_step(_generator_loss(model), specs.from_config(c), 10)
  state = steps.create_state(trainable, optimizer, ema=True)
  frozen = {} if frozen_gen is None else {"generator": frozen_gen}
  return optimizer, jax.jit(step), state, frozen


def _bytes(tree) -> int:
  """Bytes of a tree's arrays."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_lora_steps_change_only_the_adapters_and_named_base_params():
  model = _model(4, trainable=("context_embedder",))
  _, step, state, frozen = _state_and_frozen(model)
  before = tensors.flatten(jax.device_get(state.params["generator"]))
  frozen_before = jax.device_get(frozen)
  assert all(k.endswith(("lora_a", "lora_b")) or k.startswith("context_embedder/") for k in before)
  s = state
  for _ in range(3):
    s, m = step(s, _batch(), frozen, jax.random.key(0))
  after = tensors.flatten(jax.device_get(s.params["generator"]))
  assert sorted(after) == sorted(before)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert {k for k in before if k.endswith("lora_b")} <= changed  # B leaves zero
  assert "context_embedder/kernel" in changed
  # the base weights: an input of the step, never updated (bit-identical afterwards)
  for k, v in tensors.flatten(frozen_before).items():
    assert np.array_equal(v, np.asarray(tensors.flatten(frozen)[k])), k
  # the EMA and both Adam moments cover exactly the trainable leaves
  assert jax.tree.structure(s.ema) == jax.tree.structure(s.params)
  assert _bytes(s.ema) == _bytes(s.params)
  assert float(m["loss"]) > 0 and np.isfinite(float(m["grad_norm"]))


def test_optimizer_state_is_much_smaller_with_lora():
  full = _state_and_frozen(_model(0))[2]
  lora = _state_and_frozen(_model(2))[2]
  b_full, b_lora = _bytes(full.opt_state), _bytes(lora.opt_state)
  print(f"\n[lora] AdamW state: {b_full:,} B full, {b_lora:,} B with LoRA rank 2")
  assert b_full >= 2 * 4 * 0.99 * sum(x.size for x in jax.tree.leaves(full.params))
  assert b_lora < b_full / 10
  assert _bytes(lora.params) < _bytes(full.params) / 10


def _plan(rank: int) -> dict:
  """``plan.plan`` (no compile, one device) of the shapes stage-2 config with LoRA ``rank``."""
  c = load_config(SHAPES_FT, {"sharding.mesh": (1, 1, 1), "model.lora.rank": rank})
  return plan.plan(c, compile=False)


def test_plan_shows_the_smaller_optimizer_state():
  full, lora = _plan(0), _plan(8)
  bf, bl = full["bytes_per_device"], lora["bytes_per_device"]
  pf, pl = full["params"], lora["params"]
  assert pf["lora"] is None and pl["lora"]["rank"] == 8
  n_full, n_lora = pf["trainable_total"], pl["trainable_total"]
  assert n_lora < n_full / 2
  assert pl["trainable"]["generator"] == pl["lora"]["adapter_params"]  # no lora.trainable
  # the base weights moved to the frozen side
  assert pl["frozen"]["generator"] == pf["trainable"]["generator"]
  assert bl["opt_state"] < bf["opt_state"] / 2 and bl["ema"] < bf["ema"] / 2
  assert abs(bl["opt_state"] - 2 * 4 * n_lora) <= 64 and abs(bf["opt_state"] - 2 * 4 * n_full) <= 64
  assert bl["frozen"] - bf["frozen"] == 4 * pl["frozen"]["generator"]
  text = plan.format_report(lora)
  gib = lambda b: f"{b / 2**30:9.3f}"
  assert f"optimizer state            {gib(bl['opt_state'])}" in text
  assert f"LoRA rank 8 (alpha 8) on attn, mlp: {pl['lora']['adapter_params']:,} adapter" in text
  assert "LoRA" not in plan.format_report(full)


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"stage": "pretrain"}, "needs config.stage='finetune'"),
    ({"train.init_from": "scratch"}, "init_from 'scratch'"),
    ({"model.lora.targets": ("attn", "mlpp")}, "'mlpp' names no block layer"),
    ({"model.lora.alpha": -1.0}, "lora.alpha=-1.0 must be >= 0"),
  ],
)
def test_bad_lora_configs_are_named(overrides, match):
  c = load_config(SHAPES_FT, {"model.lora.rank": 4, "model.mllm_init": "random", **overrides})
  if c.stage == "pretrain":
    c.data.num_pairs = 2000
  with pytest.raises(ConfigError, match=match):
    validate(c, 1, require_inputs=False)
  c = load_config(SHAPES_FT, {"model.lora.rank": -1})
  with pytest.raises(ConfigError, match="lora.rank=-1 must be an integer >= 0"):
    validate(c, 1, require_inputs=False)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_lora_finetune_from_a_flux_directory_and_export(tmp_path):
  """Stage 2 (quick shapes config, random MLLM) from an exported random generator with LoRA:
  2 steps, a resume, the base weights equal to the file's, the record of the source in the
  checkpoint metadata, and ``export-torch`` (adapters folded in) reproduced by diffusers."""
  import diffusers

  from iomm_jax import checkpointing, inference
  from iomm_jax.assembly import context
  from iomm_jax.cli import convert
  from iomm_jax.convert import flux
  from iomm_jax.train import finetune

  flux_dir, wd, out = (str(tmp_path / n) for n in ("flux", "wd", "export"))
  over = {"model.mllm_init": "random", "sample.num_grid": 0, "train.num_steps": 2,
          "train.ckpt_every": 1, "train.log_every": 1, "model.lora.rank": 4,
          "model.lora.trainable": ("context_embedder",), "train.init_from": flux_dir}  # fmt: skip
  c = load_config(SHAPES_FT + ":quick", over)
  model = context.build(c).model
  abstract = jax.eval_shape(lambda: iomm.init_trainable(model, 0, 4))["generator"]
  base = {k: v for k, v in tensors.flatten(nn.meta.unbox(abstract)).items() if "lora" not in k}
  rng = np.random.default_rng(0)
  gen = {k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
  flux.export_transformer(tensors.unflatten(gen), model.generator.config, flux_dir)
  run = finetune.setup(c, wd)
  frozen = tensors.flatten(jax.device_get(run.frozen["generator"]))
  assert all(np.array_equal(frozen[k], gen[k]) for k in frozen)
  assert set(frozen) | {k for k in gen if k.startswith("context_embedder/")} == set(gen)
  loop_lib.run(run)
  meta = checkpointing.Checkpointer(wd).read_meta(2)
  assert meta["init_from"]["format"] == "FluxTransformer2DModel"
  assert meta["model"]["lora"]["rank"] == 4
  trained = tensors.flatten(jax.device_get(run.state.params["generator"]))
  assert any(np.abs(v).max() > 0 for k, v in trained.items() if k.endswith("lora_b"))
  after = tensors.flatten(jax.device_get(run.frozen["generator"]))
  assert all(np.array_equal(after[k], gen[k]) for k in after)  # bit-identical base
  # a resume restores the adapters from the checkpoint and the base from the FLUX file again
  resumed = finetune.setup(load_config(SHAPES_FT + ":quick", {**over, "train.num_steps": 3}), wd)
  assert resumed.start_step == 2
  again = tensors.flatten(jax.device_get(resumed.state.params["generator"]))
  assert all(np.array_equal(again[k], trained[k]) for k in trained)
  base2 = tensors.flatten(jax.device_get(resumed.frozen["generator"]))
  assert all(np.array_equal(base2[k], gen[k]) for k in base2)
  resumed.checkpointer.close()
  # export-torch: a plain diffusers transformer equal to the LoRA model
  convert.export_torch(wd, out, ema=False)
  _, ctx, params = inference.load_generator(wd, use_ema=False)
  gp = iomm.generator_params(params, ctx.frozen)  # the trained adapters on the frozen base
  cfg, p = model.generator.config, model.generator.config.latent_patch
  h, w, _ = model.latent_shape
  args = dict(
    img=mmdit.pack_latents(rng.standard_normal((2, *model.latent_shape), np.float32), p),
    img_ids=mmdit.image_ids(2, h // p, w // p),
    txt=rng.standard_normal((2, 3, cfg.joint_attention_dim), np.float32),
    txt_ids=mmdit.text_ids(2, 3),
    pooled=rng.standard_normal((2, cfg.pooled_projection_dim), np.float32),
    timestep=np.array([0.3, 0.8], np.float32),
  )
  ours = np.asarray(model.generator.apply({"params": gp}, **args))
  no_lora = tensors.unflatten({k: v for k, v in tensors.flatten(gp).items() if "lora" not in k})
  plain = np.asarray(mmdit.MMDiT(cfg).apply({"params": no_lora}, **args))
  transformer = diffusers.FluxTransformer2DModel.from_pretrained(os.path.join(out, "transformer"))
  theirs = tiny_flux.diffusers_velocity(transformer, args)
  err = float(np.abs(theirs - ours).max())
  print(f"\n[lora] export-torch of a LoRA run: max |diffusers - ours| = {err:.3g}")
  assert ours.shape == theirs.shape and err <= 1e-4
  assert np.abs(plain - ours).max() > 10 * err  # the trained adapters are in the export
