"""Stage 1 on your own images: image-only pre-training (masked self-conditioning, r = 0.85)
with the shapes world's tiny generator, frozen MLLM from ``experiments/folder/mllm.py``.

  iomm-train --config experiments/folder/pretrain.py:data=runs/own/prepared \
      --workdir runs/own/pretrain --config.model.mllm_from=runs/own/mllm
"""

from iomm_jax.configs.own_data import load_shapes, own_data, parse


def get_config(arg=None):
  a = parse(arg, steps=1800)
  return own_data(load_shapes("pretrain", a), a)
