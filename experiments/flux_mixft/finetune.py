"""Mixed fine-tuning of an existing FLUX-format generator (paper Tab. 2 / Tab. 6, LoRA column).

The paper's recipe for fine-tuning an open-source UMM's generator with LoRA (Qwen-Image in Tab.
6), applied to FLUX.1-schnell's transformer under IOMM's frozen InternVL3-2B + RQA + connector:
stage 2 with lambda = 0.5 image-only samples (``diffusion.mix_ratio``), r = 0.85 of their
condition tokens masked (``diffusion.mask_ratio``), LoRA rank 64, alpha 64 (no dropout: we have
none) on the attention and MLP projections of every block, AdamW (0.9, 0.95) at 1e-4, clip 1.0,
no weight decay, no EMA, global batch 48, 5 epochs of the 210 K fine-tuning images, 512 px.

The generator is "flux1" (models/mmdit.py: FLUX.1-schnell's 19 double + 38 single blocks, width
3072 = 24 x 128, condition width 4096), initialised from the FLUX checkpoint
(``train.init_from``; its pipeline folder or its ``transformer/``). The connector maps the
MLLM's 1536 to FLUX's 4096, so FLUX's ``context_embedder`` carries over; our pooled vector is the
mean of the context (4096 wide, FLUX's: CLIP's 768), so ``time_text_embed.text_embedder``'s
first kernel is re-initialised and the whole text embedder trains in full
(``model.lora.trainable``) beside the adapters. The RQA and connector start from their init.
Everything else (InternVL3-2B in bf16, FLUX VAE, 256-query RQA, bf16 compute with float32
trainable parameters) is IOMM-B's (iomm_jax/configs/paper.py).

``arg``: ``flux=DIR,mllm=DIR,vae=DIR,data=DIR,lora=64,steps=N`` (all optional):
  flux   ``config.train.init_from``: a diffusers FLUX pipeline or FluxTransformer2DModel folder.
  mllm   ``config.model.mllm_from``: an imported InternVL3-2B (``iomm-convert import-internvl``).
  vae    ``config.model.vae_checkpoint``: the imported FLUX.1 VAE (``iomm-convert import-vae``).
  data   ``config.data.path``: the prepared fine-tuning data (``iomm-prepare``).
  lora   the LoRA rank (``config.model.lora.rank``); 0 fine-tunes the whole generator instead.
  steps  ``config.train.num_steps`` (default: 5 epochs of 210 K images at batch 48).

  iomm-convert import-internvl --hf-dir InternVL3-2B-hf --out ckpt/internvl3_2b
  iomm-convert import-vae --diffusers-dir FLUX.1-schnell --out ckpt/flux_vae
  iomm-train --config experiments/flux_mixft/finetune.py:flux=FLUX.1-schnell,\
mllm=ckpt/internvl3_2b,vae=ckpt/flux_vae,data=DATA_DIR --workdir runs/flux_mixft/finetune

Memory per device, without weights (``--no-compile``: the exact bytes of the shardings):

  iomm-plan --config experiments/flux_mixft/finetune.py --mesh fsdp=8 --no-compile
  iomm-plan --config experiments/flux_mixft/finetune.py:lora=0 --mesh fsdp=8 --no-compile
"""

import math

from iomm_jax.configs.loading import parse_arg
from iomm_jax.configs.paper import FINETUNE_IMAGES, paper_config

EPOCHS = 5  # Tab. 6, Qwen-Image (LoRA)
BATCH = 48  # Tab. 6, Qwen-Image (LoRA)


def get_config(arg=None):
  """The FLUX.1-schnell mixed fine-tuning config; ``arg`` as in the module docstring."""
  a = parse_arg(arg, flux="", mllm="", vae="", data="", lora=64, steps=0)
  c = paper_config("iomm_b", "finetune")  # IOMM-B's frozen parts, RQA, optimiser, 512 px
  m = c.model
  m.mllm_from, m.vae_checkpoint = a.mllm, a.vae
  m.generator = "flux1"
  m.lora.rank = a.lora
  m.lora.alpha = float(a.lora)  # Tab. 6: alpha 64 = rank (scale 1)
  m.lora.targets = ("attn", "mlp")
  m.lora.trainable = ("time_text_embed/text_embedder",)  # re-initialised from FLUX: see above
  c.data.path = a.data
  c.diffusion.mix_ratio = 0.5  # lambda
  c.diffusion.mask_ratio = 0.85  # r
  t = c.train
  t.init_from = a.flux
  t.batch_size = BATCH
  t.num_steps = a.steps or math.ceil(EPOCHS * FINETUNE_IMAGES / BATCH)
  t.ema_decay = 0.0  # Tab. 6: no EMA for the LoRA fine-tune
  t.ckpt_every = 1000
  return c
