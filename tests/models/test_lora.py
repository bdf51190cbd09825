"""LoRA on the MM-DiT's block projections (``mmdit.LoRAConfig``, ``layers.Dense.lora_rank``).

* a fresh LoRA (B = 0) computes the base model's velocity bit for bit;
* the export folds the adapters in (``mmdit.merge_lora`` / ``flux.lora_merged``): the plain
  diffusers transformer it writes, re-imported or run by diffusers, gives the LoRA model's
  velocity in float32;
* the targets name exactly the documented layers, and carry logical axis names;
* ``iomm.split_generator`` / ``generator_params`` move the base weights to the frozen tree and
  back.

Measured parities are printed (``pytest -s``).
"""

from __future__ import annotations

import dataclasses

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from iomm_jax.configs import specs
from iomm_jax.configs.base import get_base_config
from iomm_jax.convert import flux, tensors
from iomm_jax.models import iomm, layers, mmdit
from tests.convert import tiny_flux

TOL_MERGED = 1e-5  # ours, re-imported: only the merge's rounding differs
TOL_DIFFUSERS = 1e-4  # as the export parity test

CFG = tiny_flux.TINY
LORA = mmdit.LoRAConfig(rank=4, alpha=8.0)  # scale 2

torch.set_num_threads(2)


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
  """Random ``MMDiT`` inputs for CFG (numpy), batch 2."""
  return tiny_flux.inputs(CFG, seed)


def _abstract() -> dict:
  """The boxed abstract variables of ``MMDiT(CFG, lora=LORA)``."""
  inputs = _inputs()  # numpy, made outside the trace
  return jax.eval_shape(lambda: mmdit.MMDiT(CFG, lora=LORA).init(jax.random.key(0), **inputs))


def _params(lora_b: float, seed: int = 0) -> dict:
  """Random numpy parameters of ``MMDiT(CFG, lora=LORA)``: kernels ~ N(0, 1/fan_in), other
  leaves ~ N(0, 0.1) (+1 for norm scales), ``lora_b`` ~ N(0, lora_b) (0: a fresh LoRA)."""
  return tiny_flux.random_params(_abstract()["params"], seed, lora_b=lora_b)


def _strip(params: dict) -> dict:
  """``params`` without the LoRA leaves: the base model's tree."""
  flat = tensors.flatten(params)
  return tensors.unflatten({k: v for k, v in flat.items() if "lora" not in k})


def test_zero_lora_is_the_base_model_bitwise():
  params = _params(lora_b=0.0)
  inputs = _inputs()
  ours = np.asarray(jax.jit(mmdit.MMDiT(CFG, lora=LORA).apply)({"params": params}, **inputs))
  base = np.asarray(jax.jit(mmdit.MMDiT(CFG).apply)({"params": _strip(params)}, **inputs))
  assert ours.tobytes() == base.tobytes()  # bit for bit
  assert np.abs(base).max() > 0.1


def test_merged_export_matches_the_lora_model(tmp_path):
  params = _params(lora_b=0.3, seed=1)
  inputs = _inputs(2)
  lora_v = np.asarray(jax.jit(mmdit.MMDiT(CFG, lora=LORA).apply)({"params": params}, **inputs))
  plain = jax.jit(mmdit.MMDiT(CFG).apply)
  effect = float(np.abs(lora_v - np.asarray(plain({"params": _strip(params)}, **inputs))).max())
  merged = mmdit.merge_lora(params, LORA)
  assert not any("lora" in k for k in tensors.flatten(merged))
  flux.export_transformer(merged, CFG, str(tmp_path))
  _, back = flux.import_transformer(str(tmp_path))
  err = float(np.abs(np.asarray(plain({"params": back}, **inputs)) - lora_v).max())
  model = diffusers.FluxTransformer2DModel.from_pretrained(str(tmp_path))
  theirs = tiny_flux.diffusers_velocity(model, inputs)
  err_d = float(np.abs(theirs - lora_v).max())
  print(
    f"\n[lora] merged export: max |ours re-imported - LoRA| = {err:.3g}, |diffusers - LoRA| = "
    f"{err_d:.3g} (LoRA's effect {effect:.3g}, scale {np.abs(lora_v).max():.3g})"
  )
  assert effect > 0.1  # the adapters matter
  assert err <= TOL_MERGED and err_d <= TOL_DIFFUSERS


def test_targets_name_the_documented_layers_with_logical_axes():
  params = _params(lora_b=0.0)
  flat = tensors.flatten(params)
  wrapped = {k.rsplit("/", 1)[0] for k in flat if k.endswith("lora_a")}
  blocks = {"double": "transformer_blocks_0/", "single": "single_transformer_blocks_0/"}
  for kind, prefix in blocks.items():
    got = {k[len(prefix) :] for k in wrapped if k.startswith(prefix)}
    assert got == set(mmdit.LORA_LAYERS[kind]), kind  # attn + mlp: every block projection
  assert not any(k.startswith(("x_embedder", "context_embedder", "proj_out", "norm_out"))
                 for k in wrapped)  # fmt: skip
  a, b = (
    flat["transformer_blocks_0/attn/to_q/lora_a"],
    flat["transformer_blocks_0/attn/to_q/lora_b"],
  )
  assert a.shape == (32, 4) and b.shape == (4, 32)
  abstract = _abstract()
  names = tensors.flatten(layers.logical_axes_tree(abstract["params"]))
  assert names["transformer_blocks_0/ff/net_2/lora_a"] == ("mlp", "lora")
  assert names["transformer_blocks_0/ff/net_2/lora_b"] == ("lora", "embed")
  assert all(n is not None and set(n) <= set(layers.LOGICAL_AXES) for n in names.values())
  # groups and patterns
  attn_only = mmdit.LoRAConfig(rank=2, targets=("attn",))
  assert attn_only.wraps("attn/add_v_proj") and attn_only.wraps("proj_out")
  assert not attn_only.wraps("ff/net_2") and not attn_only.wraps("proj_mlp")
  ctx_ff = mmdit.LoRAConfig(rank=2, targets=("ff_context/*",))
  assert ctx_ff.wraps("ff_context/net_2") and not ctx_ff.wraps("ff/net_2")
  assert mmdit.LoRAConfig(rank=2).scale == 1.0 and LORA.scale == 2.0
  with pytest.raises(ValueError, match="'atn' names no block layer"):
    mmdit.LoRAConfig(rank=2, targets=("atn",))
  with pytest.raises(ValueError, match="lora.rank=0 must be a positive"):
    mmdit.LoRAConfig(rank=0)


def test_split_and_join_the_generator():
  c = get_base_config()
  m = c.model
  m.num_queries, m.adapter_heads, m.connector_heads, m.codec_factor = 3, 4, 4, 4
  m.lora.rank, m.lora.trainable = 2, ("time_text_embed/text_embedder",)
  model = iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6)
  assert model.generator.lora == mmdit.LoRAConfig(
    rank=2, targets=("attn", "mlp"), trainable=("time_text_embed/text_embedder",)
  )
  full = nn.meta.unbox(jax.eval_shape(lambda: iomm.init_trainable(model, 0, 4)))
  trainable, frozen = iomm.split_generator(model, full)
  train_keys = set(tensors.flatten(trainable["generator"]))
  frozen_keys = set(tensors.flatten(frozen))
  assert all(k.endswith(mmdit.LORA_LEAVES) or k.startswith("time_text_embed/text_embedder/")
             for k in train_keys)  # fmt: skip
  assert "time_text_embed/text_embedder/linear_2/kernel" in train_keys
  assert not any("lora" in k for k in frozen_keys) and "x_embedder/kernel" in frozen_keys
  joined = iomm.generator_params(trainable, {"generator": frozen})
  assert set(tensors.flatten(joined)) == set(tensors.flatten(full["generator"]))
  assert iomm.generator_params(full, {"mllm": {}}) is full["generator"]  # no LoRA: as it is
  assert trainable["adapter"] is full["adapter"]
  # without LoRA nothing moves; a prefix naming nothing is refused
  plain = dataclasses.replace(model, generator=mmdit.MMDiT(model.generator.config))
  assert iomm.split_generator(plain, full) == (full, None)
  bad = dataclasses.replace(
    model,
    generator=mmdit.MMDiT(
      model.generator.config, lora=mmdit.LoRAConfig(rank=2, trainable=("ctx_embedder",))
    ),  # fmt: skip
  )
  with pytest.raises(ValueError, match="'ctx_embedder' names no generator parameter"):
    iomm.split_generator(bad, full)


def test_lora_merged_needs_the_frozen_base():
  c = get_base_config()
  c.model.lora.rank = 2
  c.model.num_queries, c.model.adapter_heads, c.model.connector_heads = 3, 4, 4
  model = iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6)
  with pytest.raises(flux.ConversionError, match="exports with its frozen base weights"):
    flux.lora_merged(model, {"generator": {}}, None)
  # merge arithmetic on one layer: W + (alpha / r) A @ B
  k, a, b = (jnp.asarray(np.random.default_rng(i).standard_normal(s), jnp.float32)
             for i, s in enumerate([(5, 3), (5, 2), (2, 3)]))  # fmt: skip
  lora = mmdit.LoRAConfig(rank=2, alpha=6.0)
  out = mmdit.merge_lora({"l": {"kernel": k, "bias": k[0], "lora_a": a, "lora_b": b}}, lora)
  np.testing.assert_allclose(out["l"]["kernel"], k + 3.0 * a @ b, rtol=1e-6, atol=1e-6)
  assert set(out["l"]) == {"kernel", "bias"}
