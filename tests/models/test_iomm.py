"""The assembled IOMM: attention layout of the MLLM input, conditioning, real-size counts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iomm_jax.configs import specs
from iomm_jax.configs.base import get_base_config
from iomm_jax.models import iomm, layers


def test_query_attention_layout():
  valid = jnp.array([[True, True, True, False], [True, True, False, False]])
  mask, pos = iomm.query_attention(valid, 2)
  m = np.asarray(mask[:, 0])
  # prompt rows: causal over valid prompt tokens, never the queries
  assert m[0, 2].tolist() == [True, True, True, False, False, False]
  assert m[0, 1].tolist() == [True, True, False, False, False, False]
  # query rows: every valid prompt token and every query, not the padding
  assert m[0, 4].tolist() == [True, True, True, False, True, True]
  assert m[1, 5].tolist() == [True, True, False, False, True, True]
  # positions: prompt 0.., queries continue after the last valid prompt token
  assert np.asarray(pos).tolist() == [[0, 1, 2, 2, 3, 4], [0, 1, 1, 1, 2, 3]]


def _tiny_model(condition: str = "rqa"):
  c = get_base_config()
  c.model.condition = condition
  c.model.num_queries = 4
  c.model.adapter_heads = 4
  c.model.codec_factor = 4
  return iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6)


def test_condition_ignores_padding_and_uses_image_tokens():
  model = _tiny_model()
  mllm = nn.meta.unbox(iomm.init_mllm(model, 0))
  trainable = nn.meta.unbox(iomm.init_trainable(model, 0, 8))
  ids = jnp.array([[2, 7, 6, 6, 6, 6, 9, 0]] * 2, jnp.int32)  # 4 image-context slots
  valid = ids != 0
  vis = jax.random.normal(jax.random.key(0), (2, model.num_image_tokens, 128))[:, :4]
  vis = jnp.pad(vis, ((0, 0), (0, model.num_image_tokens - 4), (0, 0)))
  ctx, pooled = iomm.condition(model, trainable, mllm, ids, valid, vis)
  assert ctx.shape == (2, 4, 128) and pooled.shape == (2, 128)
  np.testing.assert_allclose(pooled, ctx.mean(axis=1), atol=1e-5)
  # the padded position's id does not matter
  ctx2, _ = iomm.condition(model, trainable, mllm, ids.at[:, 7].set(11), valid, vis)
  np.testing.assert_allclose(ctx, ctx2, atol=1e-5)
  # zeroing (masking) one image token changes the condition
  ctx3, _ = iomm.condition(model, trainable, mllm, ids, valid, vis.at[:, 1].set(0.0))
  assert float(jnp.abs(ctx - ctx3).max()) > 1e-4


def test_paper_size_counts():
  # IOMM-B: InternVL3-2B frozen MLLM, the 1.6 B MM-DiT, the 29 M RQA, FLUX VAE latents.
  c = get_base_config()
  c.model.mllm, c.model.generator, c.model.codec = "internvl3_2b", "B", "vae"
  c.model.image_size = 512
  model = iomm.build(specs.from_config(c).model, vocab_size=151674, image_token_id=151667)
  shapes = jax.eval_shape(lambda: iomm.init_trainable(model, 0, 300))
  counts = {k: layers.count_params(v) for k, v in shapes.items()}
  assert counts["generator"] == 1_601_038_400
  assert counts["adapter"] == 28_718_592
  assert counts["connector"] == 1536 * 1536 + 1536
  assert model.latent_shape == (64, 64, 16)
  assert model.num_image_tokens == 256


def test_image_tokens_stay_in_their_row_in_a_mixed_batch():
  # row 0 is text-only, row 1 holds two placeholders: they must take row 1's image tokens
  embeds = jnp.zeros((2, 4, 3))
  ids = jnp.array([[1, 2, 3, 0], [1, 6, 6, 0]])
  tokens = jnp.stack([jnp.full((2, 3), 10.0), jnp.full((2, 3), 20.0)]).at[1, 1].set(21.0)
  out = iomm.merge_image_tokens_per_row(embeds, ids, tokens, image_token_id=6)
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(out[1, 1], 20.0)
  np.testing.assert_array_equal(out[1, 2], 21.0)
  np.testing.assert_array_equal(out[1, [0, 3]], 0.0)


def test_generator_attention_kernel_from_the_config():
  c = get_base_config()
  c.model.adapter_heads = 4
  assert (
    iomm.build(
      specs.from_config(c).model, vocab_size=64, image_token_id=6
    ).generator.config.attention
    == "xla"
  )
  c.model.attention = "cudnn"
  with pytest.raises(ValueError, match="config.model.dtype bfloat16"):
    iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6)
  c.model.dtype = "bfloat16"
  assert (
    iomm.build(
      specs.from_config(c).model, vocab_size=64, image_token_id=6
    ).generator.config.attention
    == "cudnn"
  )
  c.model.attention = "flash"
  with pytest.raises(ValueError, match="MMDiTConfig.attention"):
    iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6)


def test_raw_condition_reads_the_input_positions():
  """Q5's "raw" path: no adapter parameters, one context token per input position."""
  model = _tiny_model("raw")
  assert model.adapter is None
  mllm = nn.meta.unbox(iomm.init_mllm(model, 0))
  trainable = nn.meta.unbox(iomm.init_trainable(model, 0, 8))
  assert set(trainable) == {"connector", "generator"}
  ids = jnp.array([[2, 7, 9, 5, 0, 0, 0, 0], [2, 7, 9, 5, 8, 3, 4, 0]], jnp.int32)
  valid = ids != 0
  ctx, pooled = iomm.condition(model, trainable, mllm, ids, valid, None)
  assert ctx.shape == (2, 8, 128)
  assert float(jnp.abs(ctx[0, 4:]).max()) == 0.0 and float(jnp.abs(ctx[0, :4]).max()) > 0
  np.testing.assert_allclose(pooled[0], ctx[0, :4].mean(axis=0), atol=1e-5)
  # causal: the shared prefix gives the same hidden states whatever follows it
  np.testing.assert_allclose(ctx[0, :4], ctx[1, :4], atol=1e-5)


def test_generator_overrides_resize_the_variant_and_name_bad_items():
  c = get_base_config()
  c.model.adapter_heads = 4
  c.model.generator_overrides = "num_layers=3, num_single_layers=1,num_attention_heads=6"
  g = iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6).generator.config
  assert (g.num_layers, g.num_single_layers, g.num_attention_heads) == (3, 1, 6)
  assert g.in_channels == 48 and g.axes_dims_rope == (8, 12, 12)  # the rest: "tiny"'s
  for bad in ("depth=3", "num_layers"):
    c.model.generator_overrides = bad
    with pytest.raises(ValueError, match=rf"generator_overrides: '{bad}' is not FIELD=VALUE"):
      iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6)


@pytest.mark.parametrize("condition", ["rqa", "raw"])
def test_pooled_none_zeroes_only_the_pooled_vector(condition):
  model = _tiny_model(condition)
  mllm = nn.meta.unbox(iomm.init_mllm(model, 0))
  trainable = nn.meta.unbox(iomm.init_trainable(model, 0, 8))
  ids = jnp.array([[2, 7, 9, 0]], jnp.int32)
  ctx, pooled = iomm.condition(model, trainable, mllm, ids, ids != 0, None)
  off = dataclasses.replace(model, pooled="none")
  ctx0, pooled0 = iomm.condition(off, trainable, mllm, ids, ids != 0, None)
  np.testing.assert_array_equal(ctx0, ctx)
  assert float(jnp.abs(pooled).max()) > 0 and not np.asarray(pooled0).any()
  c = get_base_config()
  c.model.pooled = "max"
  with pytest.raises(ValueError, match="config.model.pooled='max' unknown"):
    iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6)
