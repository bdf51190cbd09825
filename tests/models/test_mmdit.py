"""Tests of the MM-DiT generator: shapes, logical axes, latent packing, parameter counts of the
B / L variants, joint attention and config validation (its diffusers names:
``tests/convert/test_names.py``)."""

from __future__ import annotations

import dataclasses
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iomm_jax.models import layers, mmdit


def _inputs(
  cfg: mmdit.MMDiTConfig, batch: int = 2, hp: int = 2, wp: int = 3, lt: int = 4, seed: int = 0
) -> tuple[np.ndarray, ...]:
  """(img, img_ids, txt, txt_ids, pooled, timestep) for ``MMDiT.__call__`` (numpy: no RNG
  kernels to compile)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  return (
    normal(batch, hp * wp, cfg.in_channels),
    np.asarray(mmdit.image_ids(batch, hp, wp)),
    normal(batch, lt, cfg.joint_attention_dim),
    np.asarray(mmdit.text_ids(batch, lt)),
    normal(batch, cfg.pooled_projection_dim),
    rng.uniform(size=batch).astype(np.float32),
  )


def _random_params(abstract: dict, seed: int = 0) -> dict:
  """Numpy parameters of the abstract (``eval_shape``) init: kernels ~ N(0, 1/fan_in), other
  vectors ~ N(0, 0.1), norm scales ~ 1 + N(0, 0.1). Compiling ``init`` (one RNG kernel per
  parameter) costs several times a forward pass on CPU, so the tests skip it."""
  rng = np.random.default_rng(seed)

  def make(path, x):
    name = path[-1].key
    if name == "kernel":
      return rng.standard_normal(x.shape, np.float32) / np.sqrt(x.shape[0])
    return (name == "scale") + 0.1 * rng.standard_normal(x.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(make, nn.meta.unbox(abstract))


@pytest.fixture(scope="module")
def tiny():
  """The tiny variant: abstract (boxed) init, random parameters and one jitted forward."""
  cfg = mmdit.get_mmdit_config("tiny")
  model = mmdit.MMDiT(cfg)
  args = _inputs(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *args)
  variables = _random_params(abstract)
  apply = jax.jit(model.apply)
  return dict(
    cfg=cfg,
    abstract=abstract,
    variables=variables,
    args=args,
    out=apply(variables, *args),
    apply=apply,
  )


def test_tiny_forward_shape_finite_and_logical_axes(tiny):
  cfg, out = tiny["cfg"], tiny["out"]
  img = tiny["args"][0]
  assert out.shape == (img.shape[0], img.shape[1], cfg.out_features) == (2, 6, 48)
  assert out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  boxed = tiny["abstract"]["params"]
  names = layers.logical_axes_tree(boxed)
  is_names = lambda x: x is None or isinstance(x, tuple)
  for name, value in zip(
    jax.tree_util.tree_leaves(names, is_leaf=is_names),
    jax.tree_util.tree_leaves(nn.meta.unbox(boxed)),
  ):
    assert name is not None and len(name) == value.ndim
    assert all(a in layers.LOGICAL_AXES for a in name)


def _expected_diffusers_shapes(cfg: mmdit.MMDiTConfig) -> dict[str, tuple[int, ...]]:
  """diffusers FluxTransformer2DModel state-dict keys and torch shapes, written from its modules."""
  d, f, h = cfg.inner_dim, cfg.mlp_dim, cfg.attention_head_dim
  shapes = {}

  def linear(key, n_in, n_out):
    shapes[f"{key}.weight"], shapes[f"{key}.bias"] = (n_out, n_in), (n_out,)

  linear("time_text_embed.timestep_embedder.linear_1", 256, d)
  linear("time_text_embed.timestep_embedder.linear_2", d, d)
  linear("time_text_embed.text_embedder.linear_1", cfg.pooled_projection_dim, d)
  linear("time_text_embed.text_embedder.linear_2", d, d)
  linear("context_embedder", cfg.joint_attention_dim, d)
  linear("x_embedder", cfg.in_channels, d)
  for i in range(cfg.num_layers):
    b = f"transformer_blocks.{i}"
    linear(f"{b}.norm1.linear", d, 6 * d)
    linear(f"{b}.norm1_context.linear", d, 6 * d)
    for name in (
      "to_q",
      "to_k",
      "to_v",
      "add_q_proj",
      "add_k_proj",
      "add_v_proj",
      "to_out.0",
      "to_add_out",
    ):
      linear(f"{b}.attn.{name}", d, d)
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
      shapes[f"{b}.attn.{name}.weight"] = (h,)
    for ff in ("ff", "ff_context"):
      linear(f"{b}.{ff}.net.0.proj", d, f)
      linear(f"{b}.{ff}.net.2", f, d)
  for i in range(cfg.num_single_layers):
    b = f"single_transformer_blocks.{i}"
    linear(f"{b}.norm.linear", d, 3 * d)
    for name in ("to_q", "to_k", "to_v"):
      linear(f"{b}.attn.{name}", d, d)
    shapes[f"{b}.attn.norm_q.weight"] = shapes[f"{b}.attn.norm_k.weight"] = (h,)
    linear(f"{b}.proj_mlp", d, f)
    linear(f"{b}.proj_out", d + f, d)
  linear("norm_out.linear", d, 2 * d)
  linear("proj_out", d, cfg.out_features)
  return shapes


def test_pack_latents_order_matches_flux_pipeline():
  # latents[b, y, x, c] = 1000 c + 10 y + x; FluxPipeline._pack_latents orders each token's
  # features (c, py, px) and the tokens row-major over 2x2 patches.
  y, x, c = np.meshgrid(np.arange(4), np.arange(4), np.arange(2), indexing="ij")
  latents = jnp.asarray((1000 * c + 10 * y + x)[None], jnp.float32)  # [1, 4, 4, 2]
  tokens = mmdit.pack_latents(latents)
  assert tokens.shape == (1, 4, 8)
  np.testing.assert_array_equal(tokens[0, 0], [0, 1, 10, 11, 1000, 1001, 1010, 1011])
  np.testing.assert_array_equal(tokens[0, 2], [20, 21, 30, 31, 1020, 1021, 1030, 1031])
  np.testing.assert_array_equal(tokens[0, 1], [2, 3, 12, 13, 1002, 1003, 1012, 1013])


def test_pack_unpack_round_trip():
  latents = np.random.default_rng(1).standard_normal((2, 6, 8, 3), np.float32)
  tokens = mmdit.pack_latents(latents, p=2)
  assert tokens.shape == (2, 12, 12)
  np.testing.assert_array_equal(mmdit.unpack_latents(tokens, 6, 8, p=2), latents)


def test_image_and_text_ids():
  ids = mmdit.image_ids(2, 2, 3)
  assert ids.shape == (2, 6, 3) and ids.dtype == jnp.float32
  np.testing.assert_array_equal(
    ids[1], [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
  )
  np.testing.assert_array_equal(mmdit.text_ids(2, 5), np.zeros((2, 5, 3)))


def _diffusers_param_count(cfg: mmdit.MMDiTConfig) -> int:
  """Analytic parameter count of diffusers' FluxTransformer2DModel (no guidance embedder).

  For B (D = 1536, F = 6144, head dim 128, joint = pooled = 1536, in = out = 64):
    embedders: timestep 256D+D + D^2+D = 2,755,584; text 2 x (D^2+D) = 4,721,664;
      context D^2+D = 2,360,832; x 64D+D = 99,840                  ->     9,937,920
    double block: 2 adaLN (6D^2+6D) = 28,329,984; 8 attention linears (D^2+D) = 18,886,656;
      4 QK-norms 512; 2 MLPs (DF+F + FD+D) = 37,764,096             ->    84,981,248 (x 12)
    single block: adaLN 3D^2+3D = 7,082,496; q,k,v 7,082,496; 2 norms 256;
      proj_mlp DF+F = 9,443,328; proj_out (D+F)D+D = 11,798,016      ->    35,406,592 (x 16)
    norm_out 2D^2+2D = 4,721,664; proj_out 64D+64 = 98,368           ->     4,820,032
    total 9,937,920 + 1,019,774,976 + 566,505,472 + 4,820,032        = 1,601,038,400
  """
  return sum(math.prod(s) for s in _expected_diffusers_shapes(cfg).values())


def _abstract_count(cfg: mmdit.MMDiTConfig) -> int:
  abstract = jax.eval_shape(
    mmdit.MMDiT(cfg).init, jax.random.key(0), *_inputs(cfg, batch=1, hp=1, wp=2, lt=1)
  )
  return layers.count_params(abstract["params"])


def test_b_and_l_parameter_counts():
  b = mmdit.get_mmdit_config("B")
  assert _diffusers_param_count(b) == 1_601_038_400  # the bench's diffusers "1601.0 M"
  assert _abstract_count(b) == 1_601_038_400
  large = mmdit.get_mmdit_config("L")
  n_large = _abstract_count(large)
  assert n_large == _diffusers_param_count(large) == 2_692_494_912
  assert abs(n_large - 2.7e9) <= 0.05e9


def test_permuting_condition_tokens_leaves_image_output_unchanged(tiny):
  img, img_ids, txt, txt_ids, pooled, t = tiny["args"]
  perm = jnp.array([2, 0, 3, 1])
  out = tiny["apply"](tiny["variables"], img, img_ids, txt[:, perm], txt_ids[:, perm], pooled, t)
  np.testing.assert_allclose(out, tiny["out"], atol=1e-5, rtol=1e-5)
  # ... while the condition does reach the image tokens through joint attention.
  out = tiny["apply"](tiny["variables"], img, img_ids, -txt, txt_ids, pooled, t)
  assert float(jnp.max(jnp.abs(out - tiny["out"]))) > 1e-3


def test_timestep_and_pooled_condition_change_the_output(tiny):
  img, img_ids, txt, txt_ids, pooled, t = tiny["args"]
  out_t = tiny["apply"](tiny["variables"], img, img_ids, txt, txt_ids, pooled, 1.0 - t)
  out_p = tiny["apply"](tiny["variables"], img, img_ids, txt, txt_ids, -pooled, t)
  assert float(jnp.max(jnp.abs(out_t - tiny["out"]))) > 1e-3
  assert float(jnp.max(jnp.abs(out_p - tiny["out"]))) > 1e-3


def test_adaptive_norm_chunk_orders():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 3, 4), np.float32)
  temb = rng.standard_normal((1, 4), np.float32)
  ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)

  def params(chunks):  # zero kernel; bias chunk j is filled with the value j + 1
    bias = jnp.repeat(jnp.arange(1.0, chunks + 1), 4)
    return {"params": {"linear": {"kernel": jnp.zeros((4, 4 * chunks)), "bias": bias}}}

  # AdaLayerNormContinuous: (scale, shift) = (1, 2).
  out = jax.jit(mmdit.AdaLayerNormContinuous().apply)(params(2), x, temb)
  np.testing.assert_allclose(out, ln * 2.0 + 2.0, rtol=1e-5, atol=1e-5)
  # AdaLayerNormZero: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = 1..6.
  out, gates = jax.jit(mmdit.AdaLayerNormZero().apply)(params(6), x, temb)
  np.testing.assert_allclose(out, ln * 3.0 + 1.0, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.stack(gates)[:, 0, 0], [3.0, 4.0, 5.0, 6.0])
  # AdaLayerNormZeroSingle: shift, scale, gate = 1, 2, 3.
  out, gate = jax.jit(mmdit.AdaLayerNormZeroSingle().apply)(params(3), x, temb)
  np.testing.assert_allclose(out, ln * 3.0 + 1.0, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(gate, jnp.full((1, 4), 3.0))


def test_timestep_embedding_matches_hand_computed_values():
  # dim 4 -> frequencies exp(-ln(1e4) * [0, 1] / 2) = [1, 0.01]; [cos, sin] order (FLUX).
  emb = layers.timestep_embedding(jnp.array([0.0, 1.0]), 4)
  np.testing.assert_allclose(
    emb,
    [[1, 1, 0, 0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]],
    rtol=1e-6,
    atol=1e-7,
  )


def test_guidance_embeds_and_bf16_compute():
  cfg = mmdit.get_mmdit_config("tiny", num_layers=1, num_single_layers=1, guidance_embeds=True)
  model = mmdit.MMDiT(cfg, dtype=jnp.bfloat16)
  args = _inputs(cfg)
  guidance = jnp.full((2,), 3.5)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *args, guidance)
  params = nn.meta.unbox(abstract["params"])
  assert "guidance_embedder" in params["time_text_embed"]
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  out = jax.eval_shape(model.apply, abstract, *args, guidance)
  assert out.shape == (2, 6, 48) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="guidance"):
    jax.eval_shape(model.init, jax.random.key(0), *args)


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="axes_dims_rope"):
    mmdit.MMDiTConfig(attention_head_dim=128, axes_dims_rope=(16, 56, 48))
  with pytest.raises(ValueError, match="axes_dims_rope"):
    mmdit.MMDiTConfig(attention_head_dim=32, axes_dims_rope=(7, 13, 12))
  with pytest.raises(ValueError, match="num_attention_heads"):
    mmdit.get_mmdit_config("tiny", num_attention_heads=0)
  with pytest.raises(ValueError, match="'B', 'L', 'XL', 'flux1', 'shapes', 'tiny'"):
    mmdit.get_mmdit_config("XXL")
  assert mmdit.get_mmdit_config("B", num_layers=2).num_layers == 2
  assert mmdit.get_mmdit_config("tiny", axes_dims_rope=[8, 12, 12]).axes_dims_rope == (8, 12, 12)


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_starts_as_identity_blocks_predicting_zero(zero_init):
  cfg = mmdit.get_mmdit_config("tiny", num_layers=1, num_single_layers=1, zero_init=zero_init)
  model = mmdit.MMDiT(cfg)
  args = _inputs(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *args))["params"]
  flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
  zeroed = [k for k in flat if k.endswith("linear/kernel") or k == "proj_out/kernel"]
  assert len(zeroed) == 5  # norm1, norm1_context, single norm, norm_out, proj_out
  assert all((np.asarray(flat[k]) == 0).all() == zero_init for k in zeroed)
  out = np.asarray(model.apply({"params": params}, *args))
  assert (out == 0).all() == zero_init
  # every other kernel is random either way
  assert all(
    np.abs(np.asarray(v)).max() > 0
    for k, v in flat.items()
    if k.endswith("kernel") and k not in zeroed
  )


def test_attention_implementation_is_validated():
  with pytest.raises(ValueError, match="MMDiTConfig.attention"):
    mmdit.get_mmdit_config("tiny", attention="flash")
  q = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="'splash'"):
    layers.dot_product_attention(q, q, q, implementation="splash")


@pytest.mark.skipif(
  jax.default_backend() != "gpu",
  reason="cuDNN attention needs an NVIDIA GPU (benchmarks/gpu_check.sh)",
)
def test_cudnn_attention_matches_xla_attention_on_gpu(tiny):
  """The fused kernel is a speed choice only: same parameters, same velocity up to bf16."""
  outs = {}
  for impl in ("xla", "cudnn"):
    cfg = dataclasses.replace(tiny["cfg"], attention=impl)
    model = mmdit.MMDiT(cfg, dtype=jnp.bfloat16)
    outs[impl] = np.asarray(jax.jit(model.apply)(tiny["variables"], *tiny["args"]))
  scale = np.abs(outs["xla"]).max()
  np.testing.assert_allclose(outs["cudnn"], outs["xla"], atol=0.03 * scale)
