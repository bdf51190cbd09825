"""IOMM-XL stage 1: image-only pre-training at 512 px of a 6 B single-stream DiT (Tab. 4).

Frozen InternVL3-2B (bf16), FLUX.1 VAE, 256-query RQA; Muon 1e-4, no EMA (App. B.1), r = 0.45,
global batch 4096. The paper states neither XL's data nor its epochs: 5 epochs of the 11 M
images of B/L are our guess. The recipe and its choices: iomm_jax/configs/paper.py.

The paper's IOMM-XL "follows the 6B parameter Z-Image framework", a single-stream DiT whose
sizes it does not give. Our MM-DiT approximates it with single-stream blocks only: generator
"XL" is 0 double + 27 single FLUX blocks at Z-Image's width 3840 = 30 x 128 (6.05 B), not
Z-Image's SwiGLU blocks, refiner layers, RoPE or weights.

  iomm-train --config experiments/iomm_xl/pretrain.py:mllm=MLLM_DIR,vae=VAE_DIR,data=DATA_DIR \
      --workdir runs/iomm_xl/pretrain
  ...,steps=N sets the length.
"""

from iomm_jax.configs.paper import paper_config


def get_config(arg=None):
  """The IOMM-XL stage-1 config; ``arg`` as in ``iomm_jax.configs.paper``."""
  return paper_config("iomm_xl", "pretrain", arg)
