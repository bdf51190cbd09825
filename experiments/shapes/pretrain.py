"""Stage 1 on the shapes world: image-only pre-training with masked self-conditioning (r = 0.85).

  iomm-train --config experiments/shapes/pretrain.py --workdir runs/shapes/pretrain \
      --config.model.mllm_from=runs/shapes/mllm
  ...:quick runs a seconds-long variant.
"""

from iomm_jax.configs.base import get_base_config
from iomm_jax.configs.loading import parse_arg
from iomm_jax.configs.shapes import shapes_generator


def get_config(arg=None):
  a = parse_arg(arg, quick=False, steps=1800)
  c = get_base_config()
  c.stage = "pretrain"
  c.diffusion.mask_ratio = 0.85
  return shapes_generator(c, a)


def get_sweep():
  """``launch/sweep.py``: the learning rate (the shapes default 1e-3 and a lower 3e-4)."""
  return [{"optim.lr": lr} for lr in (1e-3, 3e-4)]
