"""Stage 0 on the shapes world: pre-train the tiny MLLM by captioning (stands in for InternVL3).

iomm-train --config experiments/shapes/mllm.py --workdir runs/shapes/mllm
iomm-train --config experiments/shapes/mllm.py:quick --workdir /tmp/mllm   # seconds
"""

from iomm_jax.configs.base import get_base_config
from iomm_jax.configs.loading import parse_arg
from iomm_jax.configs.shapes import shapes_model


def get_config(arg=None):
  a = parse_arg(arg, quick=False, steps=300)
  c = shapes_model(get_base_config())
  c.stage = "mllm"
  c.train.batch_size = 32
  c.train.num_steps = a.steps
  c.train.ema_decay = 0.0  # the frozen MLLM is the raw final weights
  c.train.log_every = 50
  c.train.ckpt_every = 300
  c.optim.lr = 2e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  if a.quick:
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.ckpt_every = 3
    c.train.batch_size = 8
    c.optim.warmup_steps = 2
  return c
