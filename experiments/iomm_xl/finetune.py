"""IOMM-XL stage 2: mixed fine-tuning (lambda = 0.5) of a 6 B single-stream DiT (Tab. 5).

As stage 1 (Muon 1e-4, no EMA, r = 0.45) at global batch 256, 10 epochs of 210 K images; the
paper has no 1024 px XL setting (``res=1024`` is an error). The recipe: iomm_jax/configs/paper.py.

The paper's IOMM-XL "follows the 6B parameter Z-Image framework", a single-stream DiT whose
sizes it does not give. Our MM-DiT approximates it with single-stream blocks only: generator
"XL" is 0 double + 27 single FLUX blocks at Z-Image's width 3840 = 30 x 128 (6.05 B), not
Z-Image's SwiGLU blocks, refiner layers, RoPE or weights.

  iomm-train --config experiments/iomm_xl/finetune.py:mllm=MLLM_DIR,vae=VAE_DIR,data=DATA_DIR,\
init=runs/iomm_xl/pretrain --workdir runs/iomm_xl/finetune
"""

from iomm_jax.configs.paper import paper_config


def get_config(arg=None):
  """The IOMM-XL stage-2 config; ``arg`` as in ``iomm_jax.configs.paper``."""
  return paper_config("iomm_xl", "finetune", arg)
