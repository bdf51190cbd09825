"""Typed, frozen specs of a run, built once at a stage's entry from its ConfigDict.

The ConfigDict (``configs/base.py``) is what a user edits, overrides and sweeps; the specs are
what the library reads. ``from_config`` turns a config into a ``RunSpec`` whose sections
(``model``, ``data``, ``diffusion``, ``sample``, ``optim``, ``train``) are frozen dataclasses
with the config's key names, so ``spec.model.num_queries`` reads as ``config.model.num_queries``
did, but nothing downstream can change it, and every value has its type (tuples, not lists).

Old workdirs: a ``config.json`` written before a key existed lacks it. ``upgrade`` is the one
place such a config gains its missing keys: the value that reproduces what the run did before the
key existed where that differs from today's default (``LEGACY``), today's default otherwise.
Nothing else in the library falls back on ``.get(key, default)``.

Imports no JAX (``tests/configs/test_no_jax.py``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from iomm_jax.configs.base import get_base_config

# keys whose absence from an old workdir's config.json meant something other than today's
# default: the shapes world before data.shapes / data.holdout had three shapes and hold-out v1
LEGACY: dict[str, Any] = {
  "data.shapes": ("circle", "square", "triangle"),
  "data.holdout": "v1",
}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """``config.model.lora``: LoRA on the generator's block projections (rank 0 = off)."""

  rank: int = 0
  alpha: float = 0.0
  targets: tuple[str, ...] = ("attn", "mlp")
  trainable: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """``config.model``: the frozen MLLM, the adapter and connector, the generator and codec."""

  mllm: str
  generator: str
  generator_overrides: str
  pooled: str
  condition: str
  num_queries: int
  adapter_heads: int
  adapter_layers: int
  adapter_mlp_ratio: float
  connector: str
  connector_layers: int
  connector_heads: int
  codec: str
  codec_factor: int
  vae: str
  vae_checkpoint: str
  image_size: int
  prediction: str
  x_pred_t_min: float
  max_text_len: int
  aux_prompt: str
  attention: str
  remat: str
  dtype: str
  param_dtype: str
  mllm_dtype: str
  mllm_from: str
  mllm_init: str
  tokenizer_from: str
  tokenizer_vocab: int
  lora: LoRASpec


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """``config.data``: where images and captions come from and how they are read."""

  source: str
  path: str
  tfds_name: str
  tfds_split: str
  image_key: str
  caption_key: str
  holdout_records: int
  features: str
  vae_latent: str
  canvas: int
  grid: int
  shapes: tuple[str, ...]
  holdout: str
  num_pairs: int
  dense_captions: float
  image_only_source: str
  num_workers: int
  read_threads: int
  prefetch: int


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
  """``config.diffusion``: masking, the stage-2 mix, CFG dropout and training times."""

  mask_ratio: float
  mix_ratio: float
  cond_dropout: float
  t_sampler: str
  logit_mean: float
  logit_std: float
  t_shift: float


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """``config.sample``: the ODE sampler's settings and the training-time sample grid."""

  num_steps: int
  solver: str
  cfg_scale: float
  shift: float
  use_ema: bool
  num_grid: int
  per_prompt: int


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """``config.optim``: the optimiser and its learning-rate schedule."""

  name: str
  lr: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  clip_norm: float
  schedule: str
  warmup_steps: int
  final_lr_fraction: float


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """``config.train``: batch, length, EMA, checkpoints and logging of a stage."""

  batch_size: int
  num_steps: int
  ema_decay: float
  ema_warmup: bool
  grad_accum: int
  peak_tflops: float
  init_from: str
  log_every: int
  ckpt_every: int
  keep_checkpoints: int
  sample_every: int
  max_nonfinite: int


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One stage's run: its stage and seed and one spec per config section."""

  stage: str
  seed: int
  model: ModelSpec
  data: DataSpec
  diffusion: DiffusionSpec
  sample: SampleSpec
  optim: OptimSpec
  train: TrainSpec


def _typed(value: Any, annotation: str, key: str) -> Any:
  """``value`` as the field's type (JSON gives lists for tuples, ints for floats)."""
  if annotation.startswith("tuple"):
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
      raise ValueError(f"config.{key}={value!r} must be a tuple")
    return tuple(value)
  if annotation == "float":
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"config.{key}={value!r} must be a number")
    return float(value)
  if annotation == "int":
    if isinstance(value, bool) or not isinstance(value, int):
      if isinstance(value, float) and value.is_integer():
        return int(value)
      raise ValueError(f"config.{key}={value!r} must be an integer")
    return int(value)
  if annotation == "bool":
    if not isinstance(value, bool):
      raise ValueError(f"config.{key}={value!r} must be True or False")
    return value
  if annotation == "str":
    if not isinstance(value, str):
      raise ValueError(f"config.{key}={value!r} must be a string")
    return value
  return value


def _section(cls: type, node: Any, prefix: str) -> Any:
  """``cls`` from the ConfigDict (or dict) ``node`` at ``prefix``, nested specs included."""
  kwargs = {}
  for f in dataclasses.fields(cls):
    key = f"{prefix}.{f.name}"
    if f.name not in node:
      raise KeyError(f"config.{key} is missing (an old workdir config: load it through upgrade)")
    if f.type == "LoRASpec":
      kwargs[f.name] = _section(LoRASpec, node[f.name], key)
    else:
      kwargs[f.name] = _typed(node[f.name], f.type, key)
  return cls(**kwargs)


SECTIONS = {
  "model": ModelSpec,
  "data": DataSpec,
  "diffusion": DiffusionSpec,
  "sample": SampleSpec,
  "optim": OptimSpec,
  "train": TrainSpec,
}


def from_config(config: ml_collections.ConfigDict | dict) -> RunSpec:
  """The typed, frozen specs of ``config`` (every key present: a fresh experiment config, or a
  workdir config after ``upgrade``). A value of the wrong type is a ValueError naming its key."""
  sections = {name: _section(cls, config[name], name) for name, cls in SECTIONS.items()}
  return RunSpec(
    stage=_typed(config["stage"], "str", "stage"),
    seed=_typed(config["seed"], "int", "seed"),
    **sections,
  )


def _missing(node: Any, base: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted keys of ``base`` that ``node`` lacks (sections and leaves)."""
  out = []
  for k, v in base.items():
    key = prefix + k
    if k not in node:
      out.append(key)
    elif isinstance(v, ml_collections.ConfigDict) and isinstance(
      node[k], (dict, ml_collections.ConfigDict)
    ):
      out += _missing(node[k], v, key + ".")
  return out


def upgrade(config: ml_collections.ConfigDict) -> list[str]:
  """Adds to ``config`` (in place, unlocked) every key of the base config it lacks: the
  ``LEGACY`` value where one is listed, today's default otherwise. Returns the keys added.

  This is the one place where a workdir config written by an earlier version is brought up to
  date; the library reads every key without a fallback after it."""
  base = get_base_config()
  added = _missing(config, base)
  for key in added:
    *parents, leaf = key.split(".")
    node, default = config, base
    for p in parents:
      node, default = node[p], default[p]
    value = LEGACY.get(key, default[leaf])
    if isinstance(value, ml_collections.ConfigDict):  # a whole new section: a plain copy
      value = ml_collections.ConfigDict(json.loads(value.to_json()))
    with node.unlocked():
      node[leaf] = value
  return added
