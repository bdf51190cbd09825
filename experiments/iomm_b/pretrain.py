"""IOMM-B stage 1: image-only pre-training at 512 px of the 1.6 B MM-DiT (paper Tab. 4).

Frozen InternVL3-2B (bf16), FLUX.1 VAE, 256-query RQA; generator "B" (12 double + 16 single
FLUX blocks, width 1536); AdamW 1e-4, EMA 0.999, r = 0.85, global batch 1024, 10 epochs of
11 M images. The recipe and its choices: iomm_jax/configs/paper.py.

  iomm-train --config experiments/iomm_b/pretrain.py:mllm=MLLM_DIR,vae=VAE_DIR,data=DATA_DIR \
      --workdir runs/iomm_b/pretrain
  ...,steps=N sets the length.
"""

from iomm_jax.configs.paper import paper_config


def get_config(arg=None):
  """The IOMM-B stage-1 config; ``arg`` as in ``iomm_jax.configs.paper``."""
  return paper_config("iomm_b", "pretrain", arg)
