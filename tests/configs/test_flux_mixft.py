"""experiments/flux_mixft/finetune.py: the LoRA mixed fine-tuning of FLUX.1-schnell (paper Tab.
2 / Tab. 6): recipe values, the "flux1" generator's shapes against diffusers' FLUX.1 config, and
(slow) its abstract memory plan with and without LoRA."""

from __future__ import annotations

import dataclasses
import inspect
import os

import diffusers
import pytest

from iomm_jax.configs.loading import ConfigError, load_config, validate
from iomm_jax.models import mmdit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXP = os.path.join(ROOT, "experiments", "flux_mixft", "finetune.py")


def test_recipe_values():
  c = load_config(EXP + ":flux=/ckpt/FLUX.1-schnell,mllm=/m,vae=/v,data=/d")
  assert c.stage == "finetune" and c.model.generator == "flux1"
  assert c.train.init_from == "/ckpt/FLUX.1-schnell"
  assert (c.model.mllm_from, c.model.vae_checkpoint, c.data.path) == ("/m", "/v", "/d")
  assert (c.diffusion.mix_ratio, c.diffusion.mask_ratio) == (0.5, 0.85)
  lo = c.model.lora
  assert (lo.rank, lo.alpha, tuple(lo.targets)) == (64, 64.0, ("attn", "mlp"))
  assert tuple(lo.trainable) == ("time_text_embed/text_embedder",)
  assert (c.train.batch_size, c.train.ema_decay, c.optim.lr) == (48, 0.0, 1e-4)
  assert c.train.num_steps == 21_875  # 5 epochs of 210 K at 48
  validate(c, 8)
  assert load_config(EXP + ":lora=0").model.lora.rank == 0
  with pytest.raises(ConfigError, match="init_from is empty"):
    validate(load_config(EXP), 8)


def test_flux1_variant_has_flux1_schnell_shapes():
  """diffusers' FluxTransformer2DModel defaults are FLUX.1's config; "flux1" differs only in
  the pooled width (the mean of our 4096-wide context)."""
  defaults = {
    k: p.default
    for k, p in inspect.signature(diffusers.FluxTransformer2DModel.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
  }
  ours = mmdit.get_mmdit_config("flux1")
  for f in ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "guidance_embeds"):  # fmt: skip
    assert getattr(ours, f) == defaults[f], f
  assert tuple(ours.axes_dims_rope) == tuple(defaults["axes_dims_rope"])
  assert (defaults["pooled_projection_dim"], ours.pooled_projection_dim) == (768, 4096)
  assert dataclasses.replace(ours, pooled_projection_dim=4096).inner_dim == 3072


@pytest.mark.slow
def test_plan_with_and_without_lora():
  """``plan`` of the experiment on one device (no compile): LoRA's optimiser state is a small
  fraction of full fine-tuning's."""
  from iomm_jax.train import plan

  reports = {
    r: plan.plan(load_config(EXP + f":lora={r}", {"sharding.mesh": (1, 1, 1)}), compile=False)
    for r in (64, 0)
  }
  lora, full = (reports[r]["bytes_per_device"] for r in (64, 0))
  print(f"\n[flux_mixft] opt_state per device: LoRA {lora['opt_state'] / 2**30:.2f} GiB, "
        f"full {full['opt_state'] / 2**30:.2f} GiB")  # fmt: skip
  assert reports[0]["params"]["trainable"]["generator"] == 11_901_402_176
  assert lora["opt_state"] < full["opt_state"] / 20
  assert reports[64]["params"]["lora"]["adapter_params"] > 0
