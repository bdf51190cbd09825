"""The paper-size recipes IOMM-B / IOMM-L / IOMM-XL (paper.md §2.6, §3.1-3.2, App. B Tab. 4-5).

Experiment files under ``experiments/iomm_{b,l,xl}/`` call ``paper_config(name, stage, arg)``.
All three share: a frozen InternVL3-2B (``model.mllm='internvl3_2b'``, bfloat16, imported with
``iomm-convert import-internvl``), the FLUX.1 VAE (16 latent channels, 8x down, 2x2 packing;
imported with ``iomm-convert import-vae``), a 1-block RQA with 256 queries at width 1536
(28.7 M), a linear connector, AdamW or Muon (0.9, 0.95) at a constant 1e-4 with gradient clip
1.0 and no weight decay, 512 px, lambda = 0.5 in stage 2. Per model (Tab. 4 / Tab. 5):

  model  generator                   optim  r     EMA    stage-1 batch  stage-2 batch (512/1024)
  B      "B": 1.60 B MM-DiT          AdamW  0.85  0.999  1024           256 / 96
  L      "L": 2.69 B MM-DiT          AdamW  0.85  -      512            256 / 96
  XL     "XL": 6.05 B single-stream  Muon   0.45  -      4096           256 / (none)

``arg`` (``"mllm=DIR,vae=DIR,data=DIR,init=DIR,res=1024,steps=N"``, all optional):
  mllm   ``config.model.mllm_from``: an imported InternVL3-2B directory.
  vae    ``config.model.vae_checkpoint``: an imported FLUX.1 VAE directory.
  data   ``config.data.path``: the prepared training data (``data.source='array_record'``).
  init   stage 2 only: ``config.train.init_from``, the stage-1 workdir.
  res    stage 2 only: 512 (default) or 1024 (B and L; the paper fine-tunes 1024 from 512).
  steps  ``config.train.num_steps``; the default is the epochs below at the global batch.
Paths may not hold ``,`` (the argument separator); pass those as ``--config.<key>=`` overrides.

Not given by the paper and chosen here: a constant LR with no warmup, bfloat16 compute with
float32 trainable parameters, a plain EMA (no warmup), the prompt limit, the epochs of IOMM-XL
(its data are not stated either), condition dropout and sampling settings (base defaults).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from iomm_jax.configs.base import get_base_config
from iomm_jax.configs.loading import parse_arg

PRETRAIN_IMAGES = 11_000_000  # Megalith-10M + text-to-image-2M (paper.md §3.1)
FINETUNE_IMAGES = 210_000  # BLIP3o-60K + Echo-4o-Image + ShareGPT-4o-Image (§3.2)
FINETUNE_EPOCHS = 10  # App. C.3's recipe study (~8.2K steps at batch 256)
DATA_SOURCE = "array_record"  # shards written by iomm-prepare (iomm_jax/data/sources.py)
MAX_TEXT_LEN = 256  # prompt token limit (not in the paper; long GPT-4o-style captions fit)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What differs between IOMM-B, -L and -XL (paper.md Tab. 4 / Tab. 5)."""

  generator: str  # mmdit.MMDIT_VARIANTS name
  optimizer: str  # "adamw" or "muon"
  mask_ratio: float  # r, both stages
  ema_decay: float  # 0 = no EMA: no copy is kept, the parameters stand for it (steps.ema_params)
  pretrain_batch: int  # stage-1 global batch
  pretrain_epochs: float  # stage-1 passes over PRETRAIN_IMAGES
  finetune_batch: dict[int, int]  # stage-2 global batch per resolution (px)


RECIPES: dict[str, Recipe] = {
  # README: "GenEval=0.89 at 10 epoch under 11 million data" (Tab. 9 suggests ~5; paper.md §3.1).
  "iomm_b": Recipe("B", "adamw", 0.85, 0.999, 1024, 10, {512: 256, 1024: 96}),
  # Sec. 4.2: "trained for half the epochs of IOMM-B". App. B.1: EMA "not applied" for L and XL
  # (Sec. 4.1 claims EMA weights for all results: the paper contradicts itself, paper.md §8);
  # restore it with --config.train.ema_decay=0.999.
  "iomm_l": Recipe("L", "adamw", 0.85, 0.0, 512, 5, {512: 256, 1024: 96}),
  # XL: Muon, r = 0.45 (the mask-ratio ablation's optimum), no EMA, no 1024 fine-tune row; its
  # data and epochs are not stated: L's 5 epochs over the same 11 M images is our guess.
  "iomm_xl": Recipe("XL", "muon", 0.45, 0.0, 4096, 5, {512: 256}),
}


def default_steps(recipe: Recipe, stage: str, res: int) -> int:
  """Steps of ``stage``: its epochs over its data at its global batch, rounded up."""
  if stage == "pretrain":
    return math.ceil(recipe.pretrain_epochs * PRETRAIN_IMAGES / recipe.pretrain_batch)
  return math.ceil(FINETUNE_EPOCHS * FINETUNE_IMAGES / recipe.finetune_batch[res])


def paper_config(name: str, stage: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The unlocked config of ``RECIPES[name]`` for ``stage`` ("pretrain" or "finetune")."""
  if name not in RECIPES:
    raise ValueError(f"unknown paper recipe {name!r}; known: {sorted(RECIPES)}")
  if stage not in ("pretrain", "finetune"):
    raise ValueError(f"paper recipes have stages 'pretrain' and 'finetune', not {stage!r}")
  r = RECIPES[name]
  known = dict(mllm="", vae="", data="", res=512, steps=0)
  if stage == "finetune":
    known["init"] = ""
  a = parse_arg(arg, **known)
  if stage == "pretrain" and a.res != 512:
    raise ValueError(
      f"{name} pretrain: res={a.res}, but the paper pre-trains at 512 px only (its stage-1 "
      "data have no 1024 px images); fine-tune at 1024 instead"
    )
  if stage == "finetune" and a.res not in r.finetune_batch:
    raise ValueError(
      f"{name} finetune: res={a.res} has no paper setting; choose from {sorted(r.finetune_batch)}"
    )

  c = get_base_config()
  c.stage = stage
  m = c.model
  m.mllm = "internvl3_2b"
  m.mllm_from = a.mllm
  m.mllm_dtype = "bfloat16"
  m.generator = r.generator
  m.condition = "rqa"
  m.num_queries = 256
  m.adapter_heads = 12  # 1536 = 12 x 128, Qwen2.5-1.5B's head width
  m.adapter_layers = 1
  m.adapter_mlp_ratio = 4.0  # 28.7 M with the queries: the paper's "29M" (paper.md §2.4)
  m.connector = "linear"  # 1536 -> the generator's condition width (the paper names none)
  m.codec = "vae"
  m.vae = "flux"
  m.vae_checkpoint = a.vae
  m.image_size = a.res
  m.max_text_len = MAX_TEXT_LEN
  m.dtype = "bfloat16"
  m.param_dtype = "float32"

  c.data.source = DATA_SOURCE
  c.data.path = a.data
  c.data.image_only_source = "pairs"  # stage 2's image-only half: the pair images, uncaptioned

  c.diffusion.mask_ratio = r.mask_ratio
  c.diffusion.mix_ratio = 0.5
  c.diffusion.t_sampler = "uniform"  # Algorithm 1: t ~ U(0, 1)

  o = c.optim
  o.name = r.optimizer
  o.lr = 1e-4
  o.b1, o.b2 = 0.9, 0.95
  o.weight_decay = 0.0
  o.clip_norm = 1.0
  o.schedule = "constant"
  o.warmup_steps = 0

  t = c.train
  t.batch_size = r.pretrain_batch if stage == "pretrain" else r.finetune_batch[a.res]
  t.num_steps = a.steps or default_steps(r, stage, a.res)
  t.ema_decay = r.ema_decay
  t.ema_warmup = False  # SiT/REPA-style plain EMA
  t.log_every = 100
  t.ckpt_every = 2000 if stage == "pretrain" else 1000
  t.sample_every = 0
  if stage == "finetune":
    t.init_from = a.init
  return c
