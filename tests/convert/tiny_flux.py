"""Tiny FLUX-format MM-DiTs for tests: configs, random parameters and inputs, torch conversion.

Shared by the export / import parity tests (tests/convert/test_flux_export.py, test_flux_init.py)
and the LoRA tests (tests/models/test_lora.py, tests/train/test_lora_train.py).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import torch

from iomm_jax.convert import flux
from iomm_jax.models import mmdit

# 2 double + 1 single blocks, no guidance, width 32 = 2 heads x 16
TINY = mmdit.MMDiTConfig(
  in_channels=16,
  num_layers=2,
  num_single_layers=1,
  attention_head_dim=16,
  num_attention_heads=2,
  joint_attention_dim=24,
  pooled_projection_dim=20,
  axes_dims_rope=(4, 6, 6),
)


def tiny(**overrides) -> mmdit.MMDiTConfig:
  """``TINY`` with ``overrides`` (``MMDiTConfig`` fields)."""
  return dataclasses.replace(TINY, **overrides)


def random_params(abstract, seed: int = 0, small: float = 0.1, lora_b: float = 0.0) -> dict:
  """Numpy parameters for an abstract (boxed or not) tree: kernels and ``lora_a`` ~ N(0,
  1/fan_in), ``lora_b`` ~ N(0, lora_b) (0: a fresh LoRA), norm scales ~ 1 + N(0, small), every
  other leaf ~ N(0, small) (so adaLN modulation and biases are not zero)."""
  rng = np.random.default_rng(seed)

  def make(path, x):
    name = path[-1].key
    if name in ("kernel", "lora_a"):
      fan_in = int(np.prod(x.shape[:-1]))
      return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)
    if name == "lora_b":
      return (lora_b * rng.standard_normal(x.shape)).astype(np.float32)
    value = small * rng.standard_normal(x.shape)
    return (value + (name == "scale")).astype(np.float32)

  return jax.tree_util.tree_map_with_path(make, nn.meta.unbox(abstract))


def inputs(cfg: mmdit.MMDiTConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random ``MMDiT`` inputs for ``cfg`` (numpy): batch 2, a 3x2 latent grid, 5 text tokens."""
  rng = np.random.default_rng(seed)
  b, hp, wp, lt = 2, 3, 2, 5
  return dict(
    img=rng.standard_normal((b, hp * wp, cfg.in_channels), np.float32),
    img_ids=np.asarray(mmdit.image_ids(b, hp, wp)),
    txt=rng.standard_normal((b, lt, cfg.joint_attention_dim), np.float32),
    txt_ids=np.asarray(mmdit.text_ids(b, lt)),
    pooled=rng.standard_normal((b, cfg.pooled_projection_dim), np.float32),
    timestep=np.array([0.9, 0.3], np.float32),
  )


def to_torch(x) -> torch.Tensor:
  """A (JAX or numpy) array as a torch tensor (a copy)."""
  return torch.from_numpy(np.array(x))


def diffusers_kwargs(cfg: mmdit.MMDiTConfig) -> dict:
  """``FluxTransformer2DModel(**kw)`` arguments of ``cfg`` (no private keys)."""
  return {k: v for k, v in flux.diffusers_config(cfg).items() if not k.startswith("_")}


def export_random(cfg: mmdit.MMDiTConfig, out: str, seed: int) -> dict:
  """Random parameters of ``cfg`` exported as a diffusers transformer directory ``out``."""
  params = random_params(flux.transformer_template(cfg), seed)
  flux.export_transformer(params, cfg, out)
  return params


def diffusers_velocity(model, inputs: dict[str, np.ndarray], guidance=None) -> np.ndarray:
  """A diffusers ``FluxTransformer2DModel``'s output for ``MMDiT`` inputs (``inputs``'s layout;
  the position ids of the batch's first row, as diffusers takes them), as numpy."""
  with torch.no_grad():
    return model(
      hidden_states=to_torch(inputs["img"]),
      encoder_hidden_states=to_torch(inputs["txt"]),
      pooled_projections=to_torch(inputs["pooled"]),
      timestep=to_torch(inputs["timestep"]),
      img_ids=to_torch(inputs["img_ids"][0]),
      txt_ids=to_torch(inputs["txt_ids"][0]),
      guidance=None if guidance is None else to_torch(guidance),
      return_dict=False,
    )[0].numpy()
