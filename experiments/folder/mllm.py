"""Stage 0 on your own captioned images: the shapes world's tiny MLLM, trained to caption the
records of an ``iomm-prepare`` folder, with a sentencepiece tokenizer trained on its captions.

  iomm-train --config experiments/folder/mllm.py:data=runs/own/prepared --workdir runs/own/mllm
  ...:data=PATH,quick runs a seconds-long variant; ,steps=N ,holdout=N ,vocab=N change the
  length, the held-out records (the folder's last N) and the tokenizer's soft vocabulary.
"""

from iomm_jax.configs.own_data import load_shapes, own_data, parse


def get_config(arg=None):
  a = parse(arg, steps=300)
  return own_data(load_shapes("mllm", a), a)
