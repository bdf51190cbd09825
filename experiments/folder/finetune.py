"""Stage 2 on your own images: mixed fine-tuning (lambda = 0.5), the captioned records as pairs
and the uncaptioned ones image-only.

  iomm-train --config experiments/folder/finetune.py:data=runs/own/prepared \
      --workdir runs/own/finetune --config.model.mllm_from=runs/own/mllm \
      --config.train.init_from=runs/own/pretrain
"""

from iomm_jax.configs.own_data import load_shapes, own_data, parse


def get_config(arg=None):
  a = parse(arg, steps=3300)
  c = own_data(load_shapes("finetune", a), a)
  c.data.dense_captions = 0.0  # a shapes-world option: own captions are what they are
  return c
