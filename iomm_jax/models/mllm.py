"""The frozen unified transformer: InternVL3 (transformers' "-hf" layout) in Flax Linen.

Architecture (transformers ``InternVLForConditionalGeneration``; checkpoints such as
OpenGVLab/InternVL3-2B-hf):

* ``vision_tower`` (InternViT): a stride = kernel patch convolution, a learned cls token prepended,
  absolute position embeddings added (native grid only, no interpolation), then pre-norm encoder
  layers: ``x += lambda_1 * attention(layernorm_before(x))``, ``x += lambda_2 *
  mlp(layernorm_after(x))`` with per-channel layer scales, LayerNorm (or RMSNorm) norms, q/k/v
  projections with bias, optional whole-width q/k RMSNorm, exact-GELU MLP fc1/fc2.
* ``multi_modal_projector``: the last encoder layer's output (vision_feature_layer = -1) minus the
  cls token, laid out on its patch grid, pixel-shuffled by ``downsample_ratio`` (0.5: 2x2
  neighbouring patches -> one token of 4x the width), then LayerNorm (eps 1e-5), linear_1, exact
  GELU, linear_2 into the text width.
* ``language_model`` (Qwen2): token embeddings, pre-norm decoder layers (RMSNorm
  ``input_layernorm`` / ``post_attention_layernorm``; grouped-query self-attention with biased
  q/k/v, unbiased o_proj and rotate-half RoPE; SwiGLU MLP gate/up/down without bias), a final
  RMSNorm, and ``lm_head`` (or the transposed token embedding when ``tie_word_embeddings``).

The image placeholder tokens (``image_token_id``) in the text are replaced, in order, by the
projected image tokens before the language model runs (``merge_image_tokens``).

Parameter names are transformers' module names (``layer_<i>`` / ``layers_<i>`` for its list
entries), so the name table of ``convert.internvl`` (which owns the transformers keys and the
layout changes) maps them one to one.

Every parameter carries logical axis names (see ``layers.LOGICAL_AXES``). Norms and softmax run in
float32; matmuls run in ``dtype``; logits come out in float32.

Einsum alphabet (patch convolution): b batch, y/x patch-grid row/column, i/j pixel row/column
inside a patch, c input channels, d width. Shapes: B batch, L text tokens, N images, P image tokens
per image, D width (D_text / D_vision where it matters), V vocabulary, G patch-grid side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from iomm_jax.models import layers
from iomm_jax.models.layers import Dense, Dtype

NORM_TYPES = ("layer_norm", "rms_norm")

# ----------------------------------------------------------------------------- configs


def _require_positive(obj: Any, names: tuple[str, ...]) -> None:
  for name in names:
    value = getattr(obj, name)
    if value <= 0:
      raise ValueError(f"{type(obj).__name__}.{name} must be positive, got {value}")


def _require_divisible(obj: Any, num: str, den: str) -> None:
  a, b = getattr(obj, num), getattr(obj, den)
  if a % b:
    cls = type(obj).__name__
    raise ValueError(f"{cls}.{num}={a} is not divisible by {cls}.{den}={b}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
  """InternViT encoder (transformers ``InternVLVisionConfig``); square images only."""

  image_size: int
  patch_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  num_channels: int = 3
  norm_type: str = "layer_norm"  # "layer_norm" | "rms_norm"
  norm_eps: float = 1e-6
  attention_bias: bool = True  # q/k/v bias (original config: qkv_bias)
  use_qk_norm: bool = False  # whole-width RMSNorm on q and k (original: qk_normalization)
  layer_scale_init: float = 0.1  # init of lambda_1 / lambda_2
  post_layernorm: bool = False  # final LayerNorm (transformers: not use_mean_pooling)

  def __post_init__(self):
    _require_positive(
      self,
      (
        "image_size",
        "patch_size",
        "width",
        "num_layers",
        "num_heads",
        "mlp_dim",
        "num_channels",
        "norm_eps",
      ),
    )
    _require_divisible(self, "width", "num_heads")
    _require_divisible(self, "image_size", "patch_size")
    if self.norm_type not in NORM_TYPES:
      raise ValueError(
        f"VisionConfig.norm_type={self.norm_type!r} unknown; choose from {NORM_TYPES}"
      )

  @property
  def grid(self) -> int:
    """Patches per image side, G."""
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.width // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig:
  """Qwen2 decoder (transformers ``Qwen2Config``); head_dim = width / num_heads."""

  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  rope_theta: float = 1e6
  norm_eps: float = 1e-6
  tie_word_embeddings: bool = False

  def __post_init__(self):
    _require_positive(
      self,
      (
        "vocab_size",
        "width",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "mlp_dim",
        "rope_theta",
        "norm_eps",
      ),
    )
    _require_divisible(self, "width", "num_heads")
    _require_divisible(self, "num_heads", "num_kv_heads")
    if self.head_dim % 2:
      raise ValueError(
        f"TextConfig.width / TextConfig.num_heads = {self.head_dim} must be even "
        "for rotate-half RoPE"
      )

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.width // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLLMConfig:
  """Whole InternVL model: vision tower, projector, language model, image placeholder id.

  The vision input size is ``vision.image_size`` (also ``MLLMConfig.image_size``); each image
  becomes ``num_image_tokens`` = (G * downsample_ratio)^2 text-width tokens.
  """

  vision: VisionConfig
  text: TextConfig
  image_token_id: int
  downsample_ratio: float = 0.5
  projector_norm_eps: float = 1e-5  # torch nn.LayerNorm default, as in the projector

  def __post_init__(self):
    r = self.downsample_ratio
    if not 0 < r <= 1 or abs(round(1 / r) * r - 1) > 1e-6:
      raise ValueError(f"MLLMConfig.downsample_ratio={r} must be 1/k for an integer k >= 1")
    if self.vision.grid % self.shuffle_factor:
      raise ValueError(
        f"MLLMConfig.downsample_ratio={r}: the patch grid {self.vision.grid} (from "
        f"VisionConfig.image_size / patch_size) is not divisible by "
        f"{self.shuffle_factor} for the pixel shuffle"
      )
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(
        f"MLLMConfig.image_token_id={self.image_token_id} is outside the "
        f"vocabulary [0, {self.text.vocab_size}) of TextConfig.vocab_size"
      )
    _require_positive(self, ("projector_norm_eps",))

  @property
  def image_size(self) -> int:
    """Side of the (square) vision input, in pixels."""
    return self.vision.image_size

  @property
  def shuffle_factor(self) -> int:
    """k = 1 / downsample_ratio: k x k patches merge into one image token."""
    return round(1 / self.downsample_ratio)

  @property
  def num_image_tokens(self) -> int:
    """P, image tokens per image."""
    return (self.vision.grid // self.shuffle_factor) ** 2


# CPU demo and tests.
_TINY_MLLM = MLLMConfig(
  vision=VisionConfig(
    image_size=32, patch_size=4, width=64, num_layers=2, num_heads=4, mlp_dim=256
  ),
  text=TextConfig(
    vocab_size=512,
    width=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=384,
    rope_theta=10000.0,
  ),
  image_token_id=511,
)

# Sources: transformers configuration_internvl.py defaults (InternViT-300M: hidden 1024, 24 layers,
# 16 heads, intermediate 4096, patch 14, image 448, layer_norm eps 1e-6, no qk norm, layer scale,
# use_mean_pooling -> no final norm; image_token_id 151667 (<IMG_CONTEXT>), downsample 0.5) and
# convert_internvl_weights_to_hf.py (qkv_bias -> attention_bias, True in the InternVL3 vision
# configs); the InternVL3-2B text model is Qwen2.5-1.5B: hidden 1536, 28 layers, 12 heads, 2 kv
# heads, intermediate 8960, rope_theta 1e6, rms eps 1e-6, vocab 151674 (the InternVL tokenizer),
# tie_word_embeddings false (the checkpoint stores a separate lm_head: 4.18 GB of bf16 =
# 2.09 B parameters, which matches the untied count in tests/models/test_mllm.py).
MLLM_VARIANTS: dict[str, MLLMConfig] = {
  "tiny": _TINY_MLLM,
  # The shapes world's MLLM (experiments/shapes): the tiny one at the 24 px canvas itself with
  # patch 2, so an image is 12 x 12 patches -> 6 x 6 = 36 image tokens after the pixel shuffle
  # (a 12 px cell is 9 tokens; r = 0.85 keeps ~5.4 of 36, the paper's keeps ~38 of 256).
  "shapes": dataclasses.replace(
    _TINY_MLLM, vision=dataclasses.replace(_TINY_MLLM.vision, image_size=24, patch_size=2)
  ),
  "internvl3_2b": MLLMConfig(
    vision=VisionConfig(
      image_size=448, patch_size=14, width=1024, num_layers=24, num_heads=16, mlp_dim=4096
    ),
    text=TextConfig(
      vocab_size=151674,
      width=1536,
      num_layers=28,
      num_heads=12,
      num_kv_heads=2,
      mlp_dim=8960,
      rope_theta=1e6,
    ),
    image_token_id=151667,
  ),
}


def _field_names(cls: type) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def get_mllm_config(name: str, **overrides: Any) -> MLLMConfig:
  """A variant of ``MLLM_VARIANTS`` with fields replaced.

  An override key is an ``MLLMConfig`` field, ``vision_<field>`` / ``text_<field>`` for a
  sub-config field, or a bare sub-config field name that only one sub-config has (e.g.
  ``vocab_size``, ``image_size``). E.g. ``get_mllm_config("tiny", vocab_size=len(tokenizer))``.
  """
  if name not in MLLM_VARIANTS:
    raise ValueError(f"unknown MLLM variant {name!r}; known: {sorted(MLLM_VARIANTS)}")
  top_f, vis_f, txt_f = (_field_names(c) for c in (MLLMConfig, VisionConfig, TextConfig))
  top, vis, txt = {}, {}, {}
  for key, value in overrides.items():
    if key in top_f:
      top[key] = value
    elif key.startswith("vision_") and key[len("vision_") :] in vis_f:
      vis[key[len("vision_") :]] = value
    elif key.startswith("text_") and key[len("text_") :] in txt_f:
      txt[key[len("text_") :]] = value
    elif key in vis_f and key in txt_f:
      raise ValueError(
        f"override {key!r} is ambiguous (VisionConfig and TextConfig both have "
        f"it); use vision_{key} or text_{key}"
      )
    elif key in vis_f or key in txt_f:
      (vis if key in vis_f else txt)[key] = value
    else:
      raise ValueError(
        f"unknown override {key!r}; valid: {sorted(top_f)}, VisionConfig "
        f"{sorted(vis_f)}, TextConfig {sorted(txt_f)}"
      )
  base = MLLM_VARIANTS[name]
  vision = dataclasses.replace(top.pop("vision", base.vision), **vis)
  text = dataclasses.replace(top.pop("text", base.text), **txt)
  return dataclasses.replace(base, vision=vision, text=text, **top)


# ----------------------------------------------------------------------------- pure helpers


def pixel_shuffle(x: jax.Array, ratio: float) -> jax.Array:
  """InternVL's pixel shuffle: [B, h, w, C] -> [B, h*ratio, w*ratio, C/ratio^2].

  With k = 1/ratio, out[b, i, j, (m*k + n)*C + c] = x[b, i*k + m, j*k + n, c]: each k x k block
  of neighbours becomes one token whose channels are the block's tokens concatenated, row offset m
  major, column offset n minor (the order of transformers' ``InternVLModel.pixel_shuffle``).
  """
  if not 0 < ratio <= 1 or abs(round(1 / ratio) * ratio - 1) > 1e-6:
    raise ValueError(f"pixel_shuffle ratio={ratio} must be 1/k for an integer k >= 1")
  k = round(1 / ratio)
  b, h, w, c = x.shape
  if h % k or w % k:
    raise ValueError(f"pixel_shuffle: grid {h}x{w} is not divisible by {k} (ratio={ratio})")
  x = x.reshape(b, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // k, w // k, k * k * c)


def merge_image_tokens(
  embeds: jax.Array, ids: jax.Array, image_tokens: jax.Array, image_token_id: int
) -> jax.Array:
  """Writes image tokens into the placeholder positions (transformers' ``masked_scatter``).

  Args:
    embeds: [B, L, D] token embeddings.
    ids: [B, L] token ids; positions equal to ``image_token_id`` are placeholders.
    image_tokens: [N, P, D] projected image tokens.
    image_token_id: the placeholder id.
  Returns:
    [B, L, D]: the k-th placeholder in row-major (batch, position) order gets the k-th of the N*P
    image tokens in (image, token) order, so with P placeholders per row row b gets image b.
    Placeholders beyond N*P keep their embedding and surplus image tokens are unused (transformers
    raises on a count mismatch; the shapes here are static, so the caller must ensure it).
  """
  b, length, d = embeds.shape
  if image_tokens.shape[-1] != d:
    raise ValueError(f"image token width {image_tokens.shape[-1]} != embedding width {d}")
  flat = image_tokens.reshape(-1, d).astype(embeds.dtype)
  is_image = (ids == image_token_id).reshape(-1)
  index = jnp.cumsum(is_image) - 1  # running placeholder index
  take = is_image & (index < flat.shape[0])
  gathered = jnp.take(flat, jnp.clip(index, 0, flat.shape[0] - 1), axis=0)
  return jnp.where(take[:, None], gathered, embeds.reshape(-1, d)).reshape(b, length, d)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """One decoder layer's key/value cache: k, v [B, S, K, H] (RoPE already applied to k).

  A pytree, so it passes through ``jit`` / ``lax.while_loop``; ``write`` is pure (a new cache).
  """

  k: jax.Array
  v: jax.Array

  def write(self, k: jax.Array, v: jax.Array, index: jax.Array | int) -> KVCache:
    """The cache with [B, L, K, H] ``k`` / ``v`` written at slots ``[index, index + L)``."""
    at = (0, index, 0, 0)
    return KVCache(
      jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
      jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at),
    )


def init_cache(config: TextConfig, batch: int, size: int, dtype: Dtype) -> tuple[KVCache, ...]:
  """Empty (zero) caches of ``size`` slots for each of the ``config.num_layers`` decoder layers,
  in the model's compute ``dtype`` (that of its keys and values)."""
  shape = (batch, size, config.num_kv_heads, config.head_dim)
  return tuple(
    KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)
  )


def causal_mask(valid: jax.Array) -> jax.Array:
  """[B, L] bool key validity -> [B, 1, L, L] bool mask, True where query i may attend key j<=i."""
  length = valid.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return causal[None, None] & valid[:, None, None, :]


# ----------------------------------------------------------------------------- vision tower


class PatchConv(nn.Module):
  """Conv2d with kernel = stride = patch: [B, H, W, C] -> [B, H/p, W/p, D], as one einsum.

  kernel (p, p, C, D) is the PyTorch weight (D, C, p, p) transposed (2, 3, 1, 0).
  """

  features: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    p = self.patch_size
    kernel = self.param(
      "kernel",
      layers.logical(layers.default_kernel_init, ("conv_h", "conv_w", "conv_in", "embed")),
      (p, p, c, self.features),
      self.param_dtype,
    )
    bias = self.param(
      "bias",
      layers.logical(nn.initializers.zeros_init(), ("embed",)),
      (self.features,),
      self.param_dtype,
    )
    patches = x.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
    y = jnp.einsum("byixjc,ijcd->byxd", patches, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class PatchEmbeddings(nn.Module):
  """Holds the patch convolution under its transformers name ``patch_embeddings/projection``."""

  features: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return PatchConv(
      self.features, self.patch_size, self.dtype, self.param_dtype, name="projection"
    )(x)


class VisionEmbeddings(nn.Module):
  """[B, H, W, C] pixels -> [B, 1 + G*G, D]: cls token, patch tokens, + position embeddings."""

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    want = (c.image_size, c.image_size, c.num_channels)
    if pixel_values.shape[1:] != want:
      raise ValueError(
        f"pixel_values {pixel_values.shape} must be [B, {want[0]}, {want[1]}, "
        f"{want[2]}]: only the native grid is supported (no position "
        "embedding interpolation)"
      )
    init = nn.initializers.normal(stddev=0.02)
    cls = self.param("cls_token", layers.logical(init, ("embed",)), (c.width,), self.param_dtype)
    pos = self.param(
      "position_embeddings",
      layers.logical(init, ("pos", "embed")),
      (c.grid * c.grid + 1, c.width),
      self.param_dtype,
    )
    x = PatchEmbeddings(
      c.width, c.patch_size, self.dtype, self.param_dtype, name="patch_embeddings"
    )(pixel_values)
    x = x.reshape(x.shape[0], -1, c.width)  # row-major over the grid, as torch's flatten(2)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, c.width))
    return jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)


def _vision_norm(c: VisionConfig, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Module:
  if c.norm_type == "rms_norm":
    return layers.RMSNorm(eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)
  return layers.LayerNorm(eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


class VisionAttention(nn.Module):
  """Bidirectional multi-head self-attention [B, S, D] -> [B, S, D] (optional q/k RMSNorm)."""

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, s, d = x.shape
    proj = lambda name: Dense(d, ("embed", "heads"), use_bias=c.attention_bias, name=name, **kw)
    q, k, v = proj("q_proj")(x), proj("k_proj")(x), proj("v_proj")(x)
    if c.use_qk_norm:  # over the whole width, default eps, as transformers
      q = layers.RMSNorm(eps=1e-6, name="q_norm", **kw)(q)
      k = layers.RMSNorm(eps=1e-6, name="k_norm", **kw)(k)
    split = lambda t: t.reshape(b, s, c.num_heads, c.head_dim)
    out = layers.dot_product_attention(split(q), split(k), split(v))
    return Dense(d, ("heads", "embed"), name="projection_layer", **kw)(out.reshape(b, s, d))


class VisionMLP(nn.Module):
  """fc1 -> exact GELU -> fc2, [B, S, D] -> [B, S, D]."""

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.config.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(x)
    return Dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(layers.gelu_exact(h))


class VisionLayer(nn.Module):
  """Pre-norm encoder layer with per-channel layer scales lambda_1 / lambda_2."""

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    scale_init = layers.logical(nn.initializers.constant(c.layer_scale_init), ("norm",))
    lambda_1 = self.param("lambda_1", scale_init, (c.width,), self.param_dtype)
    lambda_2 = self.param("lambda_2", scale_init, (c.width,), self.param_dtype)
    h = _vision_norm(c, "layernorm_before", **kw)(x)
    x = x + lambda_1.astype(self.dtype) * VisionAttention(c, name="attention", **kw)(h)
    h = _vision_norm(c, "layernorm_after", **kw)(x)
    return x + lambda_2.astype(self.dtype) * VisionMLP(c, name="mlp", **kw)(h)


class VisionEncoder(nn.Module):
  """The stack of ``VisionLayer`` s, named ``layer_<i>``."""

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = lambda a: layers.with_logical_constraint(a, layers.ACTIVATION)
    x = act(x)
    for i in range(self.config.num_layers):
      x = act(VisionLayer(self.config, self.dtype, self.param_dtype, name=f"layer_{i}")(x))
    return x


class VisionModel(nn.Module):
  """InternViT: [B, H, W, C] pixels -> [B, 1 + G*G, D_vision] last hidden states (cls first)."""

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = VisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
    x = VisionEncoder(c, name="encoder", **kw)(x)
    if c.post_layernorm:
      x = layers.LayerNorm(eps=c.norm_eps, name="layernorm", **kw)(x)
    return x


class MultiModalProjector(nn.Module):
  """[..., k*k*D_vision] shuffled features -> [..., D_text]: LayerNorm, linear, GELU, linear."""

  config: MLLMConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.LayerNorm(eps=c.projector_norm_eps, name="layer_norm", **kw)(x)
    x = Dense(c.text.width, ("embed", "mlp"), name="linear_1", **kw)(x)
    return Dense(c.text.width, ("mlp", "embed"), name="linear_2", **kw)(layers.gelu_exact(x))


# ----------------------------------------------------------------------------- language model


class TextAttention(nn.Module):
  """Causal grouped-query self-attention with rotate-half RoPE, [B, L, D] -> [B, L, D].

  With ``cache`` (this layer's ``KVCache``), the L new keys / values (RoPE applied) are written
  into its slots ``[cache_index, cache_index + L)`` (one slot index for every row), the queries
  attend over all S slots under ``mask`` [B, 1, L, S], and ``(out, updated cache)`` is returned;
  without it the computation is the plain causal one over the L tokens.
  """

  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, length, _ = x.shape
    h = c.head_dim
    q = Dense(c.num_heads * h, ("embed", "heads"), name="q_proj", **kw)(x)
    k = Dense(c.num_kv_heads * h, ("embed", "kv_heads"), name="k_proj", **kw)(x)
    v = Dense(c.num_kv_heads * h, ("embed", "kv_heads"), name="v_proj", **kw)(x)
    q = layers.rope_half(q.reshape(b, length, c.num_heads, h), positions, c.rope_theta)
    k = layers.rope_half(k.reshape(b, length, c.num_kv_heads, h), positions, c.rope_theta)
    v = v.reshape(b, length, c.num_kv_heads, h)
    if cache is not None:
      cache = cache.write(k, v, cache_index)
      k, v = cache.k, cache.v
    out = layers.dot_product_attention(q, k, v, mask)
    out = Dense(c.width, ("heads", "embed"), use_bias=False, name="o_proj", **kw)(
      out.reshape(b, length, c.num_heads * h)
    )
    return out if cache is None else (out, cache)


class TextMLP(nn.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
    gate = Dense(c.mlp_dim, ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = Dense(c.mlp_dim, ("embed", "mlp"), name="up_proj", **kw)(x)
    return Dense(c.width, ("mlp", "embed"), name="down_proj", **kw)(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Qwen2 pre-norm decoder layer: RMSNorm -> attention -> add, RMSNorm -> MLP -> add."""

  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.RMSNorm(eps=c.norm_eps, name="input_layernorm", **kw)(x)
    attn = TextAttention(c, name="self_attn", **kw)
    if cache is None:
      x = x + attn(h, positions, mask)
    else:
      a, cache = attn(h, positions, mask, cache, cache_index)
      x = x + a
    h = layers.RMSNorm(eps=c.norm_eps, name="post_attention_layernorm", **kw)(x)
    x = x + TextMLP(c, name="mlp", **kw)(h)
    return x if cache is None else (x, cache)


class TextModel(nn.Module):
  """Qwen2 body: ``embed`` (ids -> [B, L, D]) and ``__call__`` (embeds -> final-norm states)."""

  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"  # rematerialisation of each decoder layer (layers.REMAT_POLICIES)

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = layers.logical(nn.initializers.normal(stddev=0.02), ("vocab", "embed"))
    self.embed_tokens = nn.Embed(c.vocab_size, c.width, embedding_init=init, **kw)
    layer = layers.remat(DecoderLayer, self.remat)
    self.layers = [layer(c, **kw) for _ in range(c.num_layers)]  # named layers_<i>
    self.norm = layers.RMSNorm(eps=c.norm_eps, **kw)

  def embed(self, ids: jax.Array) -> jax.Array:
    """[B, L] int -> [B, L, D]."""
    return self.embed_tokens(ids)

  def __call__(self, embeds: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, L, D] embeddings, [B, L] positions, [B, 1, L, L] mask -> [B, L, D]."""
    return self._run(embeds, positions, mask)[0]

  def cached(
    self,
    embeds: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache: tuple[KVCache, ...],
    cache_index: jax.Array | int,
  ) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """``__call__`` for L new tokens written at cache slots ``[cache_index, cache_index + L)``:
    [B, L, D] embeddings, [B, L] positions, [B, 1, L, S] mask over the S slots, one ``KVCache``
    per layer -> ([B, L, D] final-norm states, the updated caches)."""
    if len(cache) != len(self.layers):
      raise ValueError(f"{len(cache)} layer caches for {len(self.layers)} decoder layers")
    return self._run(embeds, positions, mask, cache, cache_index)

  def _run(self, embeds, positions, mask, cache=None, cache_index=0):
    """The decoder stack, with (``cached``) or without (``__call__``) per-layer caches."""
    act = lambda a: layers.with_logical_constraint(a, layers.ACTIVATION)
    x = act(embeds.astype(self.dtype))
    new = []
    for i, layer in enumerate(self.layers):
      if cache is None:
        x = layer(x, positions, mask)
      else:
        x, layer_cache = layer(x, positions, mask, cache[i], cache_index)
        new.append(layer_cache)
      x = act(x)
    return self.norm(x), (tuple(new) if cache is not None else None)


# ----------------------------------------------------------------------------- the whole model


class InternVLModel(nn.Module):
  """InternVL3 (vision tower + projector + Qwen2 + lm_head); see the module docstring.

  Methods (use ``model.apply(params, ..., method=...)``): ``encode_images``, ``embed``,
  ``decode``, ``decode_cached`` (with a ``KVCache`` per layer: incremental decoding), ``logits``
  and ``__call__`` (the full forward). Initialise through ``__call__``
  with ``pixel_values`` given so that every parameter is created.
  """

  config: MLLMConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # Rematerialisation of the decoder layers (layers.REMAT_POLICIES). Frozen in stages 1-2, but the
  # adapter's gradient flows back through every decoder layer, which keeps their activations.
  # Not part of MLLMConfig: it is no property of a checkpoint.
  remat: str = "none"

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision_tower = VisionModel(c.vision, **kw)
    self.multi_modal_projector = MultiModalProjector(c, **kw)
    self.language_model = TextModel(c.text, remat=self.remat, **kw)
    if not c.text.tie_word_embeddings:
      self.lm_head = Dense(c.text.vocab_size, ("embed", "vocab"), use_bias=False, **kw)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """[N, H, W, 3] float pixels (already normalised) -> [N, P, D_text] image tokens."""
    feats = self.vision_tower(pixel_values)[:, 1:]  # last layer, cls token dropped
    n, _, d = feats.shape
    g = self.config.vision.grid
    feats = pixel_shuffle(feats.reshape(n, g, g, d), self.config.downsample_ratio)
    return self.multi_modal_projector(feats.reshape(n, -1, feats.shape[-1]))

  def embed(self, ids: jax.Array) -> jax.Array:
    """[B, L] int token ids -> [B, L, D_text] embeddings."""
    return self.language_model.embed(ids)

  def decode(self, embeds: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, L, D] embeddings, [B, L] int positions, [B, 1, L, L] bool mask (True = attend) ->
    [B, L, D] final-norm hidden states."""
    return self.language_model(embeds, positions, mask)

  def decode_cached(
    self,
    embeds: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache: tuple[KVCache, ...],
    cache_index: jax.Array | int,
  ) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """``decode`` with a key/value cache (incremental decoding, ``iomm_jax.chat``).

    The L new tokens' keys and values go into slots ``[cache_index, cache_index + L)`` of the
    per-layer caches (``init_cache``: S slots); queries attend over all S slots under ``mask``
    [B, 1, L, S] (True = attend; the caller marks which slots are filled and causal). Prefill is
    a call with the whole prompt at index 0, then one call per generated token. Returns ([B, L, D]
    final-norm hidden states, the updated caches). ``decode`` is untouched by this path.
    """
    return self.language_model.cached(embeds, positions, mask, cache, cache_index)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, L, D] hidden states -> [B, L, V] float32 logits."""
    if self.config.text.tie_word_embeddings:
      out = self.language_model.embed_tokens.attend(hidden.astype(self.dtype))
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def __call__(
    self,
    ids: jax.Array,
    pixel_values: jax.Array | None = None,
    positions: jax.Array | None = None,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Full forward: [B, L] ids (+ [N, H, W, 3] images) -> [B, L, V] float32 logits.

    Placeholders (``image_token_id``) take the image tokens in order (``merge_image_tokens``).
    Defaults: positions arange(L) per row, a causal mask over all tokens.
    """
    embeds = self.embed(ids)
    if pixel_values is not None:
      embeds = merge_image_tokens(
        embeds, ids, self.encode_images(pixel_values), self.config.image_token_id
      )
    b, length = ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    if mask is None:
      mask = causal_mask(jnp.ones((b, length), bool))
    return self.logits(self.decode(embeds, positions, mask))
