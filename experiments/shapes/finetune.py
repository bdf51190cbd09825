"""Stage 2 on the shapes world: mixed fine-tuning, lambda = 0.5 image-only / text-image pairs.

  iomm-train --config experiments/shapes/finetune.py --workdir runs/shapes/finetune \
      --config.model.mllm_from=runs/shapes/mllm --config.train.init_from=runs/shapes/pretrain
  ...:quick runs a seconds-long variant.
"""

from iomm_jax.configs.base import get_base_config
from iomm_jax.configs.loading import parse_arg
from iomm_jax.configs.shapes import shapes_generator


def get_config(arg=None):
  # 3300 stage-2 steps after 1800 of stage 1: 0.36 where 1800 + 1800 scored 0.27 and
  # 3000 + 2500 0.31 (docs/RESULTS.md): the text conditioning is what the demo's budget lacks
  a = parse_arg(arg, quick=False, steps=3300)
  c = get_base_config()
  c.stage = "finetune"
  c.diffusion.mask_ratio = 0.85
  c.diffusion.mix_ratio = 0.5
  c.data.num_pairs = 2000
  # Half the pairs carry a dense caption (every object's colour and shape), like the detailed
  # captions of the paper's curated set: with category prompts alone (a third of which name a
  # colour) the demo's generator did not learn colour in its budget (docs/RESULTS.md).
  c.data.dense_captions = 0.5
  shapes_generator(c, a)
  if not a.quick:
    # Batch 16 scored at least as well as batch 8 with twice the steps (same time)
    # (docs/RESULTS.md); the larger batch averages the sparse colour / count signal of the captions.
    c.train.batch_size = 16
  return c


def get_sweep():
  """``launch/sweep.py``: the mask ratio of the image-only half of the batches (paper: 0.85)."""
  return [{"diffusion.mask_ratio": r} for r in (0.75, 0.85, 0.95)]
