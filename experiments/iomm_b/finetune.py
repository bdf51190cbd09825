"""IOMM-B stage 2: mixed fine-tuning (lambda = 0.5) of the 1.6 B MM-DiT (paper Tab. 5).

As stage 1 (AdamW 1e-4, EMA 0.999, r = 0.85) at global batch 256, 10 epochs of 210 K images;
``res=1024`` fine-tunes at 1024 px with batch 96. The recipe: iomm_jax/configs/paper.py.

  iomm-train --config experiments/iomm_b/finetune.py:mllm=MLLM_DIR,vae=VAE_DIR,data=DATA_DIR,\
init=runs/iomm_b/pretrain --workdir runs/iomm_b/finetune
"""

from iomm_jax.configs.paper import paper_config


def get_config(arg=None):
  """The IOMM-B stage-2 config; ``arg`` as in ``iomm_jax.configs.paper``."""
  return paper_config("iomm_b", "finetune", arg)
