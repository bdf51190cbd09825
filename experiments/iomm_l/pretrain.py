"""IOMM-L stage 1: image-only pre-training at 512 px of the 2.7 B MM-DiT (paper Tab. 4).

Frozen InternVL3-2B (bf16), FLUX.1 VAE, 256-query RQA; generator "L" (11 double + 16 single
FLUX blocks, width 2048, 2.69 B); AdamW 1e-4, no EMA (App. B.1), r = 0.85, global batch 512,
5 epochs ("half the epochs of IOMM-B"). The recipe and its choices: iomm_jax/configs/paper.py.

  iomm-train --config experiments/iomm_l/pretrain.py:mllm=MLLM_DIR,vae=VAE_DIR,data=DATA_DIR \
      --workdir runs/iomm_l/pretrain
  ...,steps=N sets the length.
"""

from iomm_jax.configs.paper import paper_config


def get_config(arg=None):
  """The IOMM-L stage-1 config; ``arg`` as in ``iomm_jax.configs.paper``."""
  return paper_config("iomm_l", "pretrain", arg)
