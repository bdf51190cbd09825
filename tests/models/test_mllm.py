"""Tests for iomm_jax.models.mllm (InternVL3 in Flax): shapes, names, helpers, masking, sizes.

Speed: parameters come from ``jax.eval_shape(model.init)`` (the full init, traced, not compiled)
filled with random values (``_init``): compiling a real Flax init costs far more on a 2-core CPU
than the whole rest of the file, and random biases / norm scales exercise every parameter.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from iomm_jax.models import layers, mllm

TINY = mllm.get_mllm_config("tiny")
B, L = 2, 24
IMG = slice(2, 18)  # 16 image placeholders per row = TINY.num_image_tokens


def _ids(seed: int = 0) -> jax.Array:
  ids = jax.random.randint(jax.random.key(seed), (B, L), 0, TINY.image_token_id)
  return ids.at[:, IMG].set(TINY.image_token_id)


def _pixels(seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (B, TINY.image_size, TINY.image_size, 3))


def _arange(b: int, length: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(length), (b, length))


def _init(model: nn.Module, *args, seed: int = 0):
  """(boxed abstract variables from ``model.init``, random concrete unboxed variables)."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1].key == "scale":
      x = 1.0 + 0.1 * x
    elif path[-1].key == "kernel":
      x = x / np.sqrt(np.prod(leaf.shape[:-1]))
    else:  # biases, layer scales, cls / position / token embeddings
      x = 0.1 * x
    return jnp.asarray(x, leaf.dtype)

  return boxed, jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(boxed))


def _jit(model: nn.Module):
  """Jitted ``model.apply`` taking the method by name (eager Flax is slow on CPU)."""
  fn = jax.jit(model.apply, static_argnames="method")
  return lambda params, *args, method="__call__": fn(params, *args, method=method)


@pytest.fixture(scope="module")
def tiny():
  model = mllm.InternVLModel(TINY)
  boxed, params = _init(model, _ids(), _pixels())
  return _jit(model), boxed, params


def test_tiny_shapes(tiny):
  apply, _, params = tiny
  assert TINY.num_image_tokens == 16
  img = apply(params, _pixels(), method="encode_images")
  assert img.shape == (B, 16, TINY.text.width)
  emb = apply(params, _ids(), method="embed")
  assert emb.shape == (B, L, TINY.text.width)
  mask = mllm.causal_mask(jnp.ones((B, L), bool))
  hidden = apply(params, emb, _arange(B, L), mask, method="decode")
  assert hidden.shape == (B, L, TINY.text.width)
  logits = apply(params, hidden, method="logits")
  assert logits.shape == (B, L, TINY.text.vocab_size) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_init_creates_all_params_with_logical_names(tiny):
  _, boxed, params = tiny
  assert set(params["params"]) == {
    "vision_tower",
    "multi_modal_projector",
    "language_model",
    "lm_head",
  }
  axes = traverse_util.flatten_dict(layers.logical_axes_tree(boxed["params"]))
  values = traverse_util.flatten_dict(params["params"])
  assert axes.keys() == values.keys()
  for key, names in axes.items():
    assert names is not None, key
    assert len(names) == values[key].ndim, key
    assert set(names) <= set(layers.LOGICAL_AXES), key
  # Names mirror the transformers state dict.
  for key in [
    ("vision_tower", "embeddings", "patch_embeddings", "projection", "kernel"),
    ("vision_tower", "encoder", "layer_1", "attention", "q_proj", "kernel"),
    ("vision_tower", "encoder", "layer_0", "lambda_1"),
    ("multi_modal_projector", "linear_2", "bias"),
    ("language_model", "embed_tokens", "embedding"),
    ("language_model", "layers_1", "self_attn", "k_proj", "bias"),
    ("language_model", "norm", "scale"),
    ("lm_head", "kernel"),
  ]:
    assert key in values, key


def test_forward_matches_composition_and_uses_images(tiny):
  apply, _, params = tiny
  ids, px = _ids(), _pixels()
  logits = apply(params, ids, px)
  emb = mllm.merge_image_tokens(
    apply(params, ids, method="embed"),
    ids,
    apply(params, px, method="encode_images"),
    TINY.image_token_id,
  )
  mask = mllm.causal_mask(jnp.ones((B, L), bool))
  hidden = apply(params, emb, _arange(B, L), mask, method="decode")
  np.testing.assert_allclose(logits, apply(params, hidden, method="logits"), atol=1e-5)
  other = apply(params, ids, _pixels(seed=7))
  np.testing.assert_allclose(logits[:, : IMG.start], other[:, : IMG.start], atol=1e-6)
  assert not np.allclose(logits[:, IMG.start :], other[:, IMG.start :], atol=1e-3)


def test_pixel_shuffle_hand_example():
  # x[0, a, b, 0] = 10 a + b on a 2 x 4 grid; out[0, i, j, 2 m + n] = x[0, 2 i + m, 2 j + n].
  x = (10 * jnp.arange(2)[:, None] + jnp.arange(4)[None, :]).reshape(1, 2, 4, 1)
  out = mllm.pixel_shuffle(x, 0.5)
  np.testing.assert_array_equal(out, [[[[0, 1, 10, 11], [2, 3, 12, 13]]]])
  # Channels: x[0, a, b, c] = 100 a + 10 b + c on 2 x 2 x 2; blocks (m, n) in order, c fastest.
  x = (
    100 * jnp.arange(2)[:, None, None]
    + 10 * jnp.arange(2)[None, :, None]
    + jnp.arange(2)[None, None, :]
  )[None]
  np.testing.assert_array_equal(
    mllm.pixel_shuffle(x, 0.5), [[[[0, 1, 10, 11, 100, 101, 110, 111]]]]
  )
  assert mllm.pixel_shuffle(jnp.zeros((3, 8, 8, 5)), 0.5).shape == (3, 4, 4, 20)
  with pytest.raises(ValueError, match="divisible"):
    mllm.pixel_shuffle(jnp.zeros((1, 3, 4, 1)), 0.5)


def test_merge_image_tokens_placement():
  embeds = jnp.zeros((2, 6, 1))
  ids = jnp.array([[1, 9, 9, 2, 9, 3], [9, 9, 9, 4, 5, 6]])
  image_tokens = jnp.arange(1.0, 7.0).reshape(2, 3, 1) * 10  # image 0: 10,20,30; 1: 40,50,60
  out = mllm.merge_image_tokens(embeds, ids, image_tokens, 9)[..., 0]
  np.testing.assert_array_equal(out, [[0, 10, 20, 0, 30, 0], [40, 50, 60, 0, 0, 0]])
  # More placeholders than image tokens: the extra ones keep their embedding.
  out = mllm.merge_image_tokens(embeds + 1, ids, image_tokens[:1], 9)[..., 0]
  np.testing.assert_array_equal(out, [[1, 10, 20, 1, 30, 1], [1, 1, 1, 1, 1, 1]])


def _hidden(apply, params, ids, valid=None):
  valid = jnp.ones(ids.shape, bool) if valid is None else valid
  emb = apply(params, ids, method="embed")
  return apply(params, emb, _arange(*ids.shape), mllm.causal_mask(valid), method="decode")


def test_causal_and_key_mask(tiny):
  apply, _, params = tiny
  ids = _ids()
  base = _hidden(apply, params, ids)
  changed = _hidden(apply, params, ids.at[:, -1].set(5))
  np.testing.assert_allclose(base[:, :-1], changed[:, :-1], atol=1e-6)
  assert not np.allclose(base[:, -1], changed[:, -1], atol=1e-3)
  j = 3
  valid = jnp.ones((B, L), bool).at[:, j].set(False)
  masked = _hidden(apply, params, ids, valid)
  masked_changed = _hidden(apply, params, ids.at[:, j].set(7), valid)
  keep = np.arange(L) != j
  np.testing.assert_allclose(masked[:, keep], masked_changed[:, keep], atol=1e-6)
  unmasked_changed = _hidden(apply, params, ids.at[:, j].set(7))
  assert not np.allclose(base[:, j + 1 :], unmasked_changed[:, j + 1 :], atol=1e-3)


def test_causal_mask_values():
  m = mllm.causal_mask(jnp.array([[True, False, True]]))
  assert m.shape == (1, 1, 3, 3)
  np.testing.assert_array_equal(m[0, 0], [[1, 0, 0], [1, 0, 0], [1, 0, 1]])


def test_gqa_matches_duplicated_kv_heads():
  grouped = dataclasses.replace(TINY.text, num_layers=1)  # 4 heads, 2 kv heads, head dim 32
  full = dataclasses.replace(grouped, num_kv_heads=grouped.num_heads)
  x = jax.random.normal(jax.random.key(3), (B, 8, grouped.width))
  args = (x, _arange(B, 8), mllm.causal_mask(jnp.ones((B, 8), bool)))
  _, params = _init(mllm.TextModel(grouped), *args, seed=4)
  group, h = grouped.num_heads // grouped.num_kv_heads, grouped.head_dim

  def expand(path, p):  # kv head k serves query heads [k * group, (k + 1) * group)
    if path[-2].key not in ("k_proj", "v_proj"):
      return p
    split = p.reshape(*p.shape[:-1], grouped.num_kv_heads, h)
    return jnp.repeat(split, group, axis=-2).reshape(*p.shape[:-1], -1)

  full_params = jax.tree_util.tree_map_with_path(expand, params)
  want = jax.jit(mllm.TextModel(grouped).apply)(params, *args)
  got = jax.jit(mllm.TextModel(full).apply)(full_params, *args)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_tied_embeddings(tiny):
  cfg = mllm.get_mllm_config("tiny", tie_word_embeddings=True)
  model = mllm.InternVLModel(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), _ids(), _pixels())["params"]
  assert set(shapes) == {"vision_tower", "multi_modal_projector", "language_model"}
  params = {"params": {k: v for k, v in tiny[2]["params"].items() if k != "lm_head"}}
  hidden = jax.random.normal(jax.random.key(5), (B, 3, cfg.text.width))
  table = params["params"]["language_model"]["embed_tokens"]["embedding"]
  np.testing.assert_allclose(
    model.apply(params, hidden, method="logits"), hidden @ table.T, atol=1e-5
  )


def test_bfloat16_compute_is_close_to_float32(tiny):
  apply, _, params = tiny
  want = apply(params, _ids(), _pixels())
  got = _jit(mllm.InternVLModel(TINY, dtype=jnp.bfloat16))(params, _ids(), _pixels())
  assert got.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  assert err < 0.05


def test_native_grid_only(tiny):
  apply, _, params = tiny
  with pytest.raises(ValueError, match="native grid"):
    apply(params, jnp.zeros((1, 28, 28, 3)), method="encode_images")


def test_internvl3_2b_parameter_count():
  cfg = mllm.get_mllm_config("internvl3_2b")
  assert cfg.num_image_tokens == 256
  model = mllm.InternVLModel(cfg)
  shapes = jax.eval_shape(
    model.init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 8), jnp.int32),
    jax.ShapeDtypeStruct((1, 448, 448, 3), jnp.float32),
  )["params"]
  count = {k: layers.count_params(v) for k, v in shapes.items()}
  # Vision: patch conv 14*14*3*1024 + 1024 = 603,136; cls 1024; positions (32*32 + 1) * 1024
  # = 1,049,600; per layer q/k/v 3 * (1024^2 + 1024) = 3,148,800, projection_layer 1,049,600,
  # fc1 1024*4096 + 4096 = 4,198,400, fc2 4096*1024 + 1024 = 4,195,328, 2 LayerNorms 4,096,
  # lambdas 2,048 -> 12,598,272; x 24 = 302,358,528.
  assert count["vision_tower"] == 603_136 + 1_024 + 1_049_600 + 24 * 12_598_272 == 304_012_288
  # Projector: LayerNorm 2 * 4096 = 8,192; linear_1 4096*1536 + 1536 = 6,292,992;
  # linear_2 1536^2 + 1536 = 2,360,832.
  assert count["multi_modal_projector"] == 8_192 + 6_292_992 + 2_360_832 == 8_662_016
  # Text: embed 151674 * 1536 = 232,971,264; per layer q 1536^2 + 1536 = 2,360,832, k and v
  # 2 * (1536*256 + 256) = 786,944, o 1536^2 = 2,359,296, MLP 3 * 1536 * 8960 = 41,287,680,
  # 2 RMSNorms 3,072 -> 46,797,824; x 28 = 1,310,339,072; final norm 1,536.
  assert count["language_model"] == 232_971_264 + 28 * 46_797_824 + 1_536 == 1_543_311_872
  assert count["lm_head"] == 1536 * 151674 == 232_971_264  # untied
  assert sum(count.values()) == 2_088_957_440  # = 4.18 GB of bf16, the checkpoint's size


@pytest.mark.parametrize(
  "overrides, field",
  [
    (dict(vision_width=66), "VisionConfig.width"),
    (dict(image_size=30), "VisionConfig.image_size"),
    (dict(norm_type="batch_norm"), "VisionConfig.norm_type"),
    (dict(vision_num_layers=0), "VisionConfig.num_layers"),
    (dict(text_width=132), "TextConfig.width"),
    (dict(num_kv_heads=3), "TextConfig.num_kv_heads"),
    (dict(vocab_size=0), "TextConfig.vocab_size"),
    (dict(text_num_heads=8, num_kv_heads=2, text_width=24), "TextConfig.width"),  # odd head dim,
    (dict(downsample_ratio=0.3), "MLLMConfig.downsample_ratio"),
    (dict(image_size=36), "MLLMConfig.downsample_ratio"),  # grid 9 is odd
    (dict(image_token_id=512), "MLLMConfig.image_token_id"),
  ],
)
def test_config_validation(overrides, field):
  with pytest.raises(ValueError, match=field):
    mllm.get_mllm_config("tiny", **overrides)


def test_get_mllm_config_overrides():
  cfg = mllm.get_mllm_config("tiny", vocab_size=1000, image_token_id=999, vision_num_layers=1)
  assert (cfg.text.vocab_size, cfg.image_token_id, cfg.vision.num_layers) == (1000, 999, 1)
  assert mllm.MLLM_VARIANTS["tiny"].text.vocab_size == 512
  with pytest.raises(ValueError, match="tiny"):
    mllm.get_mllm_config("nope")
  with pytest.raises(ValueError, match="ambiguous"):
    mllm.get_mllm_config("tiny", width=32)
  with pytest.raises(ValueError, match="unknown override"):
    mllm.get_mllm_config("tiny", hidden_size=32)
