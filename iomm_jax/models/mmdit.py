"""The generator: a FLUX-style MM-DiT, a Flax Linen re-implementation of diffusers'
``FluxTransformer2DModel`` with the same architecture and the same parameter layout.

Architecture (paper.md §2.5: "MM-DiT ... as implemented in FLUX"):
  * ``time_text_embed``: 256 sinusoidal features of ``1000 * t`` ([cos, sin], shift 0) -> MLP
    (``timestep_embedder``) plus an MLP of the pooled condition (``text_embedder``), and with
    ``guidance_embeds`` a third MLP of ``1000 * guidance``; the sum is ``temb`` [B, D].
  * ``x_embedder`` / ``context_embedder``: linear maps of packed latent tokens / condition tokens.
  * ``transformer_blocks_i`` (double stream): separate adaLN-Zero, QKV (with RMS QK-norm), output
    projection and GELU-tanh MLP per stream; one joint attention over ``[context; image]``.
  * ``single_transformer_blocks_i``: one stream over ``[context; image]``; adaLN-Zero-single,
    parallel attention and MLP, one output projection of ``concat(attn, mlp)``, gated residual.
  * ``norm_out`` (adaLN-continuous, chunk order *scale, shift*) and ``proj_out``.
  * RoPE: 3-axis (``axes_dims_rope``, theta 10000) on ``[txt_ids; img_ids]``, rotating adjacent
    pairs (x[2i], x[2i+1]) of queries and keys after QK-norm.

Parameter names are diffusers' module names (``<list>_<i>`` for its ``<list>.<i>``), so the
name table of ``convert.flux`` (which owns the diffusers keys) maps them one to one.

LoRA (``MMDiT.lora``, a ``LoRAConfig``; ``config.model.lora``): the block projections named by
``LoRAConfig.targets`` get ``layers.Dense``'s ``lora_rank`` (same ``kernel`` / ``bias`` plus
``lora_a`` / ``lora_b``); see ``LORA_LAYERS`` and ``LORA_GROUPS`` for the names. ``merge_lora``
folds the update into the kernels (the export writes a plain diffusers transformer).

Precision: matmuls in ``dtype``; norms, softmax, RoPE, timestep features, modulation and the
residual streams in float32; the output is float32.

Alphabet: B batch, L tokens (Lt condition, Li image), N heads, H head dim, D width, F MLP width,
C latent channels, P packed patch features (C * p * p).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from iomm_jax.models import layers
from iomm_jax.models.layers import Dense, Dtype

ROPE_THETA = 10000.0  # FluxPosEmbed(theta=10000), fixed in diffusers
TIMESTEP_FEATURES = 256  # Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
TIMESTEP_SCALE = 1000.0  # diffusers multiplies t in [0, 1] (and guidance) by 1000
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class MMDiTConfig:
  """MM-DiT size; fields (and defaults: FLUX.1) mirror diffusers' ``FluxTransformer2DModel``.

  ``latent_patch`` is ours: the 2x2 packing of latents into tokens that happens outside the
  model (``pack_latents``), so ``in_channels`` = latent channels * latent_patch**2 and diffusers'
  own ``patch_size`` stays 1.
  """

  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  latent_patch: int = 2
  mlp_ratio: float = 4.0
  # Ours, not diffusers': zero-initialise every adaLN modulation and the output projection, so
  # each block starts as the identity and the model predicts 0 (DiT's adaLN-Zero). Training
  # from scratch converges much faster; imported weights overwrite the init either way.
  zero_init: bool = True
  # Ours: the attention kernel (layers.dot_product_attention): "xla" anywhere, "cudnn" = fused
  # flash attention on NVIDIA GPUs with a bf16 dtype. A speed choice; parameters are the same.
  attention: str = "xla"
  # Ours: rematerialisation of the double/single blocks (layers.REMAT_POLICIES: "none", "block",
  # "dots"). A memory/compute trade; parameters and numerics are the same.
  remat: str = "none"

  def __post_init__(self):
    object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
    for name in (
      "patch_size",
      "in_channels",
      "attention_head_dim",
      "num_attention_heads",
      "joint_attention_dim",
      "pooled_projection_dim",
      "latent_patch",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"MMDiTConfig.{name} must be positive, got {getattr(self, name)}")
    for name in ("num_layers", "num_single_layers"):
      if getattr(self, name) < 0:
        raise ValueError(f"MMDiTConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.out_channels is not None and self.out_channels <= 0:
      raise ValueError(
        f"MMDiTConfig.out_channels must be positive or None, got {self.out_channels}"
      )
    if self.mlp_ratio <= 0:
      raise ValueError(f"MMDiTConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
    if self.attention not in layers.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
        f"MMDiTConfig.attention must be one of {layers.ATTENTION_IMPLEMENTATIONS}, "
        f"got {self.attention!r}"
      )
    if self.remat not in layers.REMAT_POLICIES:
      raise ValueError(
        f"MMDiTConfig.remat must be one of {tuple(layers.REMAT_POLICIES)}, got {self.remat!r}"
      )
    axes = self.axes_dims_rope
    if len(axes) != 3 or any(a <= 0 or a % 2 for a in axes):
      raise ValueError(
        f"MMDiTConfig.axes_dims_rope must be 3 positive even sizes (one per id axis), got {axes}"
      )
    if sum(axes) != self.attention_head_dim:
      raise ValueError(
        f"MMDiTConfig.axes_dims_rope {axes} sums to {sum(axes)}, but must equal "
        f"attention_head_dim={self.attention_head_dim}"
      )
    if self.in_channels % (self.latent_patch**2):
      raise ValueError(
        f"MMDiTConfig.in_channels={self.in_channels} is not divisible by "
        f"latent_patch**2={self.latent_patch**2}"
      )

  @property
  def inner_dim(self) -> int:
    """Model width D = heads x head dim."""
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_dim(self) -> int:
    """Feed-forward width F (``int(D * mlp_ratio)`` as in diffusers)."""
    return int(self.inner_dim * self.mlp_ratio)

  @property
  def out_features(self) -> int:
    """Width of each output token: ``patch_size**2 * (out_channels or in_channels)``."""
    return self.patch_size**2 * (self.out_channels or self.in_channels)


# CPU demo and tests: 16x16x12 pixel "latents" packed 2x2 -> 48 features; width 128 = 4x32.
_TINY_MMDIT = MMDiTConfig(
  in_channels=48,
  num_layers=2,
  num_single_layers=2,
  attention_head_dim=32,
  num_attention_heads=4,
  joint_attention_dim=128,
  pooled_projection_dim=128,
  axes_dims_rope=(8, 12, 12),
)

MMDIT_VARIANTS: dict[str, MMDiTConfig] = {
  "tiny": _TINY_MMDIT,
  # the shapes demo's generator: "tiny" at width 192 = 6x32 (4.07 M parameters). At the same
  # steps it scored 0.27 against 0.20 for "tiny", for 1.2x the step time; width 256 (0.26, 1.9x)
  # and depth 3+3 at width 128 (0.26, 1.3x) gained nothing more (docs/RESULTS.md, "What each
  # change did")
  "shapes": dataclasses.replace(
    _TINY_MMDIT, num_attention_heads=6, joint_attention_dim=192, pooled_projection_dim=192
  ),
  # IOMM-B (paper: 1.6 B): the size of /work/shared/bench/flux_torch_baseline.py B_CONFIG,
  # 12 double + 16 single blocks, width 1536 = 12x128, condition width 1536 (InternVL3-2B's
  # LLM width), 16-channel latents packed 2x2 -> 64. 1,601,038,400 parameters.
  "B": MMDiTConfig(
    in_channels=64,
    num_layers=12,
    num_single_layers=16,
    attention_head_dim=128,
    num_attention_heads=12,
    joint_attention_dim=1536,
    pooled_projection_dim=1536,
    axes_dims_rope=(16, 56, 56),
  ),
  # IOMM-L (paper: 2.7 B, dims not given): our choice. Width 2048 = 16x128 (FLUX's head dim),
  # same condition width and latents as B, B's 16 single blocks, and the most double blocks
  # (11) that stay within 2.7 B +- 0.05 B (12 would give 2.84 B). 2,692,494,912 parameters.
  "L": MMDiTConfig(
    in_channels=64,
    num_layers=11,
    num_single_layers=16,
    attention_head_dim=128,
    num_attention_heads=16,
    joint_attention_dim=1536,
    pooled_projection_dim=1536,
    axes_dims_rope=(16, 56, 56),
  ),
  # IOMM-XL (paper: "following the 6B parameter Z-Image framework", a single-stream DiT; dims
  # not given): an approximation with single-stream blocks only. Z-Image's width 3840 = 30x128;
  # 27 FLUX single-stream blocks (4x GELU-tanh MLP) hit the 6 B (26: 5.82 B, 28: 6.27 B). Not
  # Z-Image's SwiGLU blocks, refiner layers or RoPE axes; same condition width and latents as
  # B. 6,045,399,616 parameters.
  "XL": MMDiTConfig(
    in_channels=64,
    num_layers=0,
    num_single_layers=27,
    attention_head_dim=128,
    num_attention_heads=30,
    joint_attention_dim=1536,
    pooled_projection_dim=1536,
    axes_dims_rope=(16, 56, 56),
  ),
  # FLUX.1-schnell's transformer (black-forest-labs/FLUX.1-schnell transformer/config.json, also
  # diffusers' FluxTransformer2DModel defaults): 19 double + 38 single blocks, width 3072 =
  # 24x128, T5 width 4096, 16-channel latents packed 2x2 -> 64, no guidance embedding. One
  # change: pooled_projection_dim 4096, not CLIP-L's 768, since our pooled vector is the mean of
  # the 4096-wide context (iomm.condition); importing FLUX.1 re-initialises that projection's
  # first kernel (convert.flux.REINITIALISABLE). 11,901,402,176 parameters (FLUX.1-schnell's
  # own: 11,891,178,560, counted on diffusers' model).
  "flux1": MMDiTConfig(
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=4096,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
  ),
}


def parse_overrides(text: str, where: str = "config.model.generator_overrides") -> dict[str, Any]:
  """``"num_layers=3,num_attention_heads=8"`` -> ``{"num_layers": 3, ...}``: integer, float,
  bool or string values of ``MMDiTConfig`` fields (a ValueError names ``where`` and the item)."""
  fields = {f.name: f for f in dataclasses.fields(MMDiTConfig)}
  out: dict[str, Any] = {}
  for item in filter(None, (x.strip() for x in text.split(","))):
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or key not in fields:
      raise ValueError(
        f"{where}: {item!r} is not FIELD=VALUE with an MMDiTConfig field "
        f"({', '.join(sorted(fields))})"
      )
    if value.lower() in ("true", "false"):
      out[key] = value.lower() == "true"
      continue
    for cast in (int, float):
      try:
        out[key] = cast(value)
        break
      except ValueError:
        pass
    else:
      out[key] = value
  return out


def get_mmdit_config(name: str, **overrides) -> MMDiTConfig:
  """The named variant of ``MMDIT_VARIANTS``, with fields replaced by ``overrides``."""
  if name not in MMDIT_VARIANTS:
    raise ValueError(f"unknown MM-DiT variant {name!r}; known: {sorted(MMDIT_VARIANTS)}")
  return dataclasses.replace(MMDIT_VARIANTS[name], **overrides)


# ----------------------------------------------------------------------------- LoRA

# Every Dense a block makes, by its path inside the block (LoRA can wrap any of these).
LORA_LAYERS: dict[str, tuple[str, ...]] = {
  "double": (  # transformer_blocks_<i>/...
    "attn/to_q",
    "attn/to_k",
    "attn/to_v",
    "attn/to_out_0",
    "attn/add_q_proj",
    "attn/add_k_proj",
    "attn/add_v_proj",
    "attn/to_add_out",
    "ff/net_0/proj",
    "ff/net_2",
    "ff_context/net_0/proj",
    "ff_context/net_2",
  ),
  "single": (  # single_transformer_blocks_<i>/...
    "attn/to_q",
    "attn/to_k",
    "attn/to_v",
    "proj_mlp",
    "proj_out",
  ),
}
# Named groups of ``LoRAConfig.targets``. "attn": the query/key/value and output projections of
# both streams of the double blocks and of the single blocks (whose one output projection,
# ``proj_out``, maps concat(attention, MLP) and so is in both groups); "mlp": the MLP input and
# output projections (double: ``ff`` and ``ff_context``; single: ``proj_mlp`` and ``proj_out``).
# The adaLN modulations (``norm*/linear``) and the embedders outside the blocks get no LoRA.
_EVERY_LORA_LAYER = tuple(dict.fromkeys(LORA_LAYERS["double"] + LORA_LAYERS["single"]))
LORA_GROUPS: dict[str, tuple[str, ...]] = {
  "attn": tuple(p for p in _EVERY_LORA_LAYER if p.startswith("attn/")) + ("proj_out",),
  "mlp": tuple(p for p in _EVERY_LORA_LAYER if p.startswith(("ff", "proj_"))),
}
LORA_LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
  """Low-rank adapters on the generator's block projections (``config.model.lora``).

  ``targets``: names from ``LORA_GROUPS`` ("attn", "mlp") or ``fnmatch`` patterns over the
  block-relative paths of ``LORA_LAYERS`` (e.g. "attn/to_*", "ff_context/*"); a target that
  names no layer is an error. ``alpha``: the update is scaled by ``alpha / rank`` (0: alpha =
  rank, scale 1). ``trainable``: generator parameter path prefixes ('/'-joined, e.g.
  "context_embedder", "time_text_embed/text_embedder") that train in full beside the adapters
  (the rest of the base weights is frozen).
  """

  rank: int
  alpha: float = 0.0
  targets: tuple[str, ...] = ("attn", "mlp")
  trainable: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "trainable", tuple(self.trainable))
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"config.model.lora.rank={self.rank!r} must be a positive integer here")
    if self.alpha < 0:
      raise ValueError(f"config.model.lora.alpha={self.alpha} must be >= 0 (0: alpha = rank)")
    if not self.targets:
      raise ValueError("config.model.lora.targets is empty: name the layers LoRA wraps")
    every = _EVERY_LORA_LAYER
    for t in self.targets:
      if t not in LORA_GROUPS and not fnmatch.filter(every, t):
        raise ValueError(
          f"config.model.lora.targets: {t!r} names no block layer; use a group "
          f"{sorted(LORA_GROUPS)} or a pattern over {sorted(every)}"
        )

  @property
  def scale(self) -> float:
    """The update's factor ``alpha / rank`` (1 for alpha 0)."""
    return (self.alpha or self.rank) / self.rank

  def wraps(self, where: str) -> bool:
    """Whether the block layer at ``where`` (a ``LORA_LAYERS`` path) gets an adapter."""
    return any(
      where in LORA_GROUPS[t] if t in LORA_GROUPS else fnmatch.fnmatchcase(where, t)
      for t in self.targets
    )


def _dense(
  features: int,
  axes: tuple[str, str],
  name: str,
  where: str,
  lora: LoRAConfig | None,
  **kw,
) -> nn.Module:
  """The block layer ``name`` (``where`` inside its block): a ``Dense``, with LoRA if ``lora``
  wraps it."""
  if lora is not None and lora.wraps(where):
    kw = dict(kw, lora_rank=lora.rank, lora_alpha=lora.alpha or lora.rank)
  return Dense(features, axes, name=name, **kw)


def merge_lora(params: Any, lora: LoRAConfig | None) -> Any:
  """``params`` with every LoRA layer folded into its kernel (float32 ``kernel + scale * a @ b``,
  stored in the kernel's dtype) and ``lora_a`` / ``lora_b`` dropped: the plain tree of the same
  architecture without LoRA. Unchanged (a copy of the dicts) when ``lora`` is None."""
  if not isinstance(params, dict):
    return params
  out = {k: merge_lora(v, lora) for k, v in params.items() if k not in LORA_LEAVES}
  if "lora_a" in params:
    if lora is None:
      raise ValueError("parameters hold LoRA layers but no LoRAConfig was given to merge them")
    k = params["kernel"]
    a, b = (jnp.asarray(params[n], jnp.float32) for n in LORA_LEAVES)
    ab = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    out["kernel"] = (jnp.asarray(k, jnp.float32) + lora.scale * ab).astype(k.dtype)
  return out


# ----------------------------------------------------------------------------- latents and ids


def pack_latents(latents: jax.Array, p: int = 2) -> jax.Array:
  """[B, h, w, C] latents -> [B, (h/p)*(w/p), C*p*p] tokens, features ordered (C, py, px).

  Row-major over patches; the same as diffusers ``FluxPipeline._pack_latents`` on the NCHW
  tensor.
  """
  b, h, w, c = latents.shape
  if h % p or w % p:
    raise ValueError(f"latent size {h}x{w} is not divisible by the patch {p}")
  x = latents.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # [B, h/p, w/p, C, py, px]
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: jax.Array, h: int, w: int, p: int = 2) -> jax.Array:
  """Inverse of ``pack_latents``: [B, (h/p)*(w/p), C*p*p] -> [B, h, w, C] (h, w in latents)."""
  b, n, f = tokens.shape
  if n != (h // p) * (w // p) or f % (p * p):
    raise ValueError(f"tokens {tokens.shape} do not fit a {h}x{w} latent with patch {p}")
  x = tokens.reshape(b, h // p, w // p, f // (p * p), p, p)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # [B, h/p, py, w/p, px, C]
  return x.reshape(b, h, w, f // (p * p))


def image_ids(batch: int, hp: int, wp: int) -> jax.Array:
  """[B, hp*wp, 3] float32 RoPE ids of packed image tokens: (0, row, col), row-major."""
  rows, cols = jnp.meshgrid(jnp.arange(hp), jnp.arange(wp), indexing="ij")
  ids = jnp.stack([jnp.zeros_like(rows), rows, cols], axis=-1).reshape(hp * wp, 3)
  return jnp.broadcast_to(ids.astype(jnp.float32), (batch, hp * wp, 3))


def text_ids(batch: int, length: int) -> jax.Array:
  """[B, L, 3] float32 zeros: condition tokens carry no position (as in FLUX)."""
  return jnp.zeros((batch, length, 3), jnp.float32)


# ----------------------------------------------------------------------------- embeddings


class TimestepEmbedding(nn.Module):
  """Two-layer SiLU MLP ``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding`` and
  ``PixArtAlphaTextProjection(act_fn="silu")`` share this layout). [B, cond] -> [B, D] float32."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.features, ("cond", "embed"), name="linear_1", **kw)(x)
    h = nn.silu(h.astype(jnp.float32))
    return Dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(h).astype(jnp.float32)


class CombinedTimestepTextProjEmbeddings(nn.Module):
  """``temb`` [B, D] float32 from timestep [B] (in [0, 1]), pooled [B, cond] and, with
  ``guidance_embeds``, guidance [B] (diffusers ``CombinedTimestep(Guidance)TextProjEmbeddings``)."""

  features: int
  guidance_embeds: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, timestep: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None
  ) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t_proj = layers.timestep_embedding(
      timestep.astype(jnp.float32) * TIMESTEP_SCALE, TIMESTEP_FEATURES
    )
    temb = TimestepEmbedding(self.features, name="timestep_embedder", **kw)(t_proj)
    if self.guidance_embeds:
      if guidance is None:
        raise ValueError("this MM-DiT has guidance_embeds=True: pass `guidance` [B]")
      g_proj = layers.timestep_embedding(
        guidance.astype(jnp.float32) * TIMESTEP_SCALE, TIMESTEP_FEATURES
      )
      temb = temb + TimestepEmbedding(self.features, name="guidance_embedder", **kw)(g_proj)
    elif guidance is not None:
      raise ValueError("`guidance` given but the MM-DiT config has guidance_embeds=False")
    return temb + TimestepEmbedding(self.features, name="text_embedder", **kw)(pooled)


# ----------------------------------------------------------------------------- adaptive norms


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """Parameter-free LayerNorm (eps 1e-6) of x [B, L, D], then ``* (1 + scale) + shift`` (f32)."""
  x = layers.layer_norm(x.astype(jnp.float32), NORM_EPS)
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _init(zero: bool) -> layers.Initializer:
  return nn.initializers.zeros_init() if zero else layers.default_kernel_init


def _modulation(
  temb: jax.Array, chunks: int, width: int, dtype: Dtype, param_dtype: Dtype, zero: bool
) -> list[jax.Array]:
  """``linear(SiLU(temb))`` split into ``chunks`` float32 [B, D] vectors.

  Call it inside a compact adaLN module: the Dense it makes is that module's ``linear``
  (zero-initialised when ``zero``).
  """
  emb = Dense(
    chunks * width,
    ("embed", "modulation"),
    name="linear",
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_init(zero),
  )(nn.silu(temb.astype(jnp.float32)))
  return jnp.split(emb.astype(jnp.float32), chunks, axis=-1)


class AdaLayerNormZero(nn.Module):
  """adaLN-Zero of a double-stream block (param ``linear``, D -> 6D).

  Returns the modulated x [B, L, D] float32 and ``(gate_msa, shift_mlp, scale_mlp, gate_mlp)``,
  each [B, D]; chunk order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  zero_init: bool = True  # zero-initialised modulation (MMDiTConfig.zero_init)

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _modulation(
      temb, 6, x.shape[-1], self.dtype, self.param_dtype, self.zero_init
    )
    return _modulate(x, shift, scale), (gate, shift_mlp, scale_mlp, gate_mlp)


class AdaLayerNormZeroSingle(nn.Module):
  """adaLN-Zero of a single-stream block (``linear``, D -> 3D: shift, scale, gate).

  Returns the modulated x [B, L, D] float32 and the gate [B, D].
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  zero_init: bool = True  # zero-initialised modulation (MMDiTConfig.zero_init)

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, jax.Array]:
    shift, scale, gate = _modulation(
      temb, 3, x.shape[-1], self.dtype, self.param_dtype, self.zero_init
    )
    return _modulate(x, shift, scale), gate


class AdaLayerNormContinuous(nn.Module):
  """Final adaptive norm (``linear``, D -> 2D), chunk order **scale, shift**; [B, L, D] f32."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  zero_init: bool = True  # zero-initialised modulation (MMDiTConfig.zero_init)

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    scale, shift = _modulation(temb, 2, x.shape[-1], self.dtype, self.param_dtype, self.zero_init)
    return _modulate(x, shift, scale)


# ----------------------------------------------------------------------------- attention and MLP


def _qkv(
  x: jax.Array,
  names: Sequence[str],
  num_heads: int,
  head_dim: int,
  dtype: Dtype,
  param_dtype: Dtype,
  lora: LoRAConfig | None = None,
  prefix: str = "attn",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k, v [B, L, N, H] from x [B, L, D], with RMS QK-norm (eps 1e-6) over H.

  ``names`` = (q, k, v, q-norm, k-norm) submodule names, created in the calling compact module
  (``prefix``: its name in the block, for ``lora``).
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  split = lambda t: t.reshape(*t.shape[:2], num_heads, head_dim)
  width = num_heads * head_dim
  q, k, v = (
    split(_dense(width, ("embed", "heads"), n, f"{prefix}/{n}", lora, **kw)(x)) for n in names[:3]
  )
  q = layers.RMSNorm(NORM_EPS, name=names[3], **kw)(q)
  k = layers.RMSNorm(NORM_EPS, name=names[4], **kw)(k)
  return q, k, v


class FluxAttention(nn.Module):
  """FLUX attention with RoPE (diffusers ``FluxAttention`` + ``FluxAttnProcessor``).

  With ``ctx`` (double stream): joint attention over ``[ctx; x]`` (condition first) with the
  ``add_*`` projections and ``norm_added_*`` for ctx; returns ``(to_out_0(x part),
  to_add_out(ctx part))``, each [B, L*, D]. Without ``ctx`` (single stream, ``pre_only``):
  self-attention over x, returned as [B, L, N*H] with no output projection.
  ``angles`` [B, Lt + Li, H/2] (or [B, L, H/2]) from ``layers.rope_axes_freqs``.
  """

  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"  # MMDiTConfig.attention
  lora: LoRAConfig | None = None  # adapters on the projections LoRAConfig.targets names

  @nn.compact
  def __call__(
    self, x: jax.Array, angles: jax.Array, ctx: jax.Array | None = None
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads = (self.num_heads, self.head_dim, self.dtype, self.param_dtype, self.lora, self.name)
    q, k, v = _qkv(x, ("to_q", "to_k", "to_v", "norm_q", "norm_k"), *heads)
    lt = 0
    if ctx is not None:
      names = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
      cq, ck, cv = _qkv(ctx, names, *heads)
      lt = ctx.shape[1]
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
    q = layers.rope_interleaved(q, angles)
    k = layers.rope_interleaved(k, angles)
    out = layers.dot_product_attention(q, k, v, implementation=self.attention)
    out = out.reshape(*out.shape[:2], -1)  # [B, L, N*H]
    if ctx is None:
      return out
    d = x.shape[-1]
    axes, lora = ("heads", "embed"), self.lora
    x_out = _dense(d, axes, "to_out_0", f"{self.name}/to_out_0", lora, **kw)(out[:, lt:])
    ctx_out = _dense(ctx.shape[-1], axes, "to_add_out", f"{self.name}/to_add_out", lora, **kw)(
      out[:, :lt]
    )
    return x_out, ctx_out


class GeluProj(nn.Module):
  """``net.0`` of a diffusers FeedForward: ``proj`` (D -> F) then GELU-tanh."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRAConfig | None = None  # adapter on ``proj`` if LoRAConfig.targets names ``where``
  where: str = "ff/net_0"  # this module's path in its block

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _dense(self.features, ("embed", "mlp"), "proj", f"{self.where}/proj", self.lora, **kw)(x)
    return layers.gelu_tanh(h)


class FeedForward(nn.Module):
  """GELU-tanh MLP [B, L, D] -> [B, L, D]: ``net_0`` (GeluProj, D -> F) then ``net_2`` (F -> D)."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRAConfig | None = None  # adapters on the layers LoRAConfig.targets names

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GeluProj(self.mlp_dim, lora=self.lora, where=f"{self.name}/net_0", name="net_0", **kw)(x)
    return _dense(x.shape[-1], ("mlp", "embed"), "net_2", f"{self.name}/net_2", self.lora, **kw)(h)


# ----------------------------------------------------------------------------- blocks


class DoubleStreamBlock(nn.Module):
  """diffusers ``FluxTransformerBlock``: per-stream adaLN-Zero, joint attention, gated residuals,
  parameter-free LayerNorm (``norm2``) + modulation + MLP, gated residuals.

  x [B, Li, D] and ctx [B, Lt, D] float32 residual streams, temb [B, D], angles
  [B, Lt + Li, H/2]; returns (ctx, x).
  """

  num_heads: int
  head_dim: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  zero_init: bool = True  # zero-initialised modulation (MMDiTConfig.zero_init)
  attention: str = "xla"  # MMDiTConfig.attention
  lora: LoRAConfig | None = None  # MMDiT.lora

  @nn.compact
  def __call__(
    self, x: jax.Array, ctx: jax.Array, temb: jax.Array, angles: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lora = self.lora
    ada = dict(zero_init=self.zero_init, **kw)
    nx, (gate, shift_mlp, scale_mlp, gate_mlp) = AdaLayerNormZero(name="norm1", **ada)(x, temb)
    nc, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = AdaLayerNormZero(
      name="norm1_context", **ada
    )(ctx, temb)
    attn_x, attn_c = FluxAttention(
      self.num_heads, self.head_dim, attention=self.attention, lora=lora, name="attn", **kw
    )(nx, angles, nc)
    x = x + gate[:, None] * attn_x.astype(jnp.float32)
    ff = FeedForward(self.mlp_dim, lora=lora, name="ff", **kw)(_modulate(x, shift_mlp, scale_mlp))
    x = x + gate_mlp[:, None] * ff.astype(jnp.float32)
    ctx = ctx + c_gate[:, None] * attn_c.astype(jnp.float32)
    ff_c = FeedForward(self.mlp_dim, lora=lora, name="ff_context", **kw)(
      _modulate(ctx, c_shift_mlp, c_scale_mlp)
    )
    ctx = ctx + c_gate_mlp[:, None] * ff_c.astype(jnp.float32)
    return ctx, x


class SingleStreamBlock(nn.Module):
  """diffusers ``FluxSingleTransformerBlock`` on the joined stream h = [ctx; x] [B, L, D] f32:
  ``h + gate * proj_out(concat(attn(n), GELU-tanh(proj_mlp(n))))`` with n = adaLN-Zero-single(h).

  (diffusers joins and splits ctx / x inside every block; joining once outside is the same.)
  """

  num_heads: int
  head_dim: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  zero_init: bool = True  # zero-initialised modulation (MMDiTConfig.zero_init)
  attention: str = "xla"  # MMDiTConfig.attention
  lora: LoRAConfig | None = None  # MMDiT.lora

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, angles: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lora = self.lora
    n, gate = AdaLayerNormZeroSingle(name="norm", zero_init=self.zero_init, **kw)(h, temb)
    mlp = _dense(self.mlp_dim, ("embed", "mlp"), "proj_mlp", "proj_mlp", lora, **kw)(n)
    mlp = layers.gelu_tanh(mlp)
    attn = FluxAttention(
      self.num_heads, self.head_dim, attention=self.attention, lora=lora, name="attn", **kw
    )(n, angles)
    out = _dense(h.shape[-1], ("mlp", "embed"), "proj_out", "proj_out", lora, **kw)(
      jnp.concatenate([attn, mlp], axis=-1)
    )
    return h + gate[:, None] * out.astype(jnp.float32)


# ----------------------------------------------------------------------------- the model


class MMDiT(nn.Module):
  """FLUX-style MM-DiT (diffusers ``FluxTransformer2DModel``), predicting per-token outputs.

  Attributes:
    config: sizes.
    lora: LoRA adapters on the block projections (None: none); see ``LoRAConfig``.
    dtype: matmul dtype (bfloat16 for training); norms, softmax, RoPE, modulation, residuals f32.
    param_dtype: parameter storage dtype.
  """

  config: MMDiTConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoRAConfig | None = None  # adapters on the block projections (config.model.lora)

  @nn.compact
  def __call__(
    self,
    img: jax.Array,
    img_ids: jax.Array,
    txt: jax.Array,
    txt_ids: jax.Array,
    pooled: jax.Array,
    timestep: jax.Array,
    guidance: jax.Array | None = None,
  ) -> jax.Array:
    """Velocity (or whatever the loss trains) of the image tokens.

    Args:
      img: [B, Li, in_channels] packed latent tokens (``pack_latents``).
      img_ids: [B, Li, 3] RoPE ids (``image_ids``).
      txt: [B, Lt, joint_attention_dim] condition tokens.
      txt_ids: [B, Lt, 3] RoPE ids (``text_ids``: zeros).
      pooled: [B, pooled_projection_dim] pooled condition.
      timestep: [B] float in [0, 1]; t = 1 is pure noise (diffusers' sigmas).
      guidance: [B] guidance scale; required iff ``config.guidance_embeds``.
    Returns:
      [B, Li, out_features] float32.
    """
    c = self.config
    if img.shape[-1] != c.in_channels or txt.shape[-1] != c.joint_attention_dim:
      raise ValueError(
        f"img {img.shape} / txt {txt.shape} do not match in_channels="
        f"{c.in_channels} / joint_attention_dim={c.joint_attention_dim}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blk = dict(
      num_heads=c.num_attention_heads,
      head_dim=c.attention_head_dim,
      mlp_dim=c.mlp_dim,
      zero_init=c.zero_init,
      attention=c.attention,
      lora=self.lora,
      **kw,
    )
    d = c.inner_dim
    temb = CombinedTimestepTextProjEmbeddings(d, c.guidance_embeds, name="time_text_embed", **kw)(
      timestep, pooled, guidance
    )
    # Residual streams are constrained to (batch, length, embed) at every block boundary; a
    # no-op unless a mesh and rules are bound (sharding.with_rules in a sharded train step).
    act = lambda a: layers.with_logical_constraint(a, layers.ACTIVATION)
    x = act(Dense(d, ("patch", "embed"), name="x_embedder", **kw)(img).astype(jnp.float32))
    ctx = act(Dense(d, ("cond", "embed"), name="context_embedder", **kw)(txt).astype(jnp.float32))
    ids = jnp.concatenate([txt_ids, img_ids], axis=1)  # condition first, as in diffusers
    angles = layers.rope_axes_freqs(ids, c.axes_dims_rope, ROPE_THETA)  # [B, Lt + Li, H/2]
    double = layers.remat(DoubleStreamBlock, c.remat)
    single = layers.remat(SingleStreamBlock, c.remat)
    for i in range(c.num_layers):
      ctx, x = double(name=f"transformer_blocks_{i}", **blk)(x, ctx, temb, angles)
      ctx, x = act(ctx), act(x)
    lt = ctx.shape[1]
    h = jnp.concatenate([ctx, x], axis=1)
    for i in range(c.num_single_layers):
      h = act(single(name=f"single_transformer_blocks_{i}", **blk)(h, temb, angles))
    x = AdaLayerNormContinuous(name="norm_out", zero_init=c.zero_init, **kw)(h[:, lt:], temb)
    out = Dense(
      c.out_features, ("embed", "patch"), name="proj_out", kernel_init=_init(c.zero_init), **kw
    )(x)
    return out.astype(jnp.float32)
