"""Settings of the own-data experiments (``experiments/folder/``): the shapes world's tiny
model and schedules on an ``iomm-prepare`` folder, with held-out records and a tokenizer trained
on the folder's captions."""

import os

import ml_collections

from iomm_jax.configs import loading


def own_data(
  c: ml_collections.ConfigDict, a: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """``c`` (a shapes experiment's config, unlocked) on the prepared folder ``a.data``."""
  if not a.data:
    raise ValueError(
      "experiments/folder/*.py need the prepared folder: --config experiments/folder/STAGE.py:"
      "data=PATH (an iomm-prepare --out folder)"
    )
  c.data.source = "array_record"
  c.data.path = a.data
  # the last records of the folder: never trained on; the grids, iomm-eval and the probes use them
  c.data.holdout_records = 8 if a.quick else a.holdout
  # real captions have more words than the shapes grammar: a larger soft vocabulary, so common
  # words become whole pieces (rare ones split into sub-word pieces, never <unk>)
  c.model.tokenizer_vocab = a.vocab
  return c


def load_shapes(name: str, a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The shapes experiment ``experiments/shapes/<name>.py`` at ``a.steps`` (or ``:quick``),
  unlocked for ``own_data``."""
  path = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "shapes", f"{name}.py")
  c = loading.load_config(f"{os.path.normpath(path)}:{'quick' if a.quick else f'steps={a.steps}'}")
  c.unlock()
  return c


def parse(arg: str | None, steps: int) -> ml_collections.ConfigDict:
  """The config arguments of ``experiments/folder/*.py``: ``data=PATH[,steps=N][,holdout=N]
  [,vocab=N][,quick]``."""
  return loading.parse_arg(arg, data="", quick=False, steps=steps, holdout=64, vocab=512)
