"""The trainable pieces between the frozen MLLM and the generator.

* ``ResidualQueryAdapter`` (RQA, paper §2.4): learned queries cross-attend, with a key padding
  mask, to the MLLM's *input* token embeddings; the result is appended to the MLLM input.
  One block = parameter-free LayerNorms, multi-head cross-attention with a residual add, a
  GELU-tanh MLP with a residual add. At width 1536 with 256 queries and a 4x MLP one block has
  28.7 M parameters, the paper's "~29 M" (the structure is our reading, see paper.md §2.4).
* ``Connector``: maps the MLLM's hidden states at the query positions to the generator's
  condition width (linear by default; an MLP or a small transformer encoder on request).

Alphabet: B batch, L input tokens, Q queries, D width, N heads, H head dim, F MLP width.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from iomm_jax.models import layers
from iomm_jax.models.layers import Dense, Dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
  """Residual Query Adapter size; `width` must equal the MLLM's token-embedding width."""

  width: int
  num_queries: int = 256
  num_heads: int = 12
  num_layers: int = 1
  mlp_ratio: float = 4.0
  remat: str = "none"  # rematerialisation of each block (layers.REMAT_POLICIES)

  def __post_init__(self):
    if self.remat not in layers.REMAT_POLICIES:
      raise ValueError(
        f"AdapterConfig.remat must be one of {tuple(layers.REMAT_POLICIES)}, got {self.remat!r}"
      )
    for name in ("width", "num_queries", "num_heads", "num_layers"):
      if getattr(self, name) <= 0:
        raise ValueError(f"AdapterConfig.{name} must be positive, got {getattr(self, name)}")
    if self.width % self.num_heads:
      raise ValueError(
        f"AdapterConfig.width={self.width} is not divisible by num_heads={self.num_heads}"
      )


class CrossAttention(nn.Module):
  """Multi-head cross-attention from queries [B, Q, D] to keys/values [B, L, D]."""

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, ctx_valid: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = Dense(d, ("embed", "heads"), name="q_proj", **kw)(x)
    k = Dense(d, ("embed", "heads"), name="k_proj", **kw)(ctx)
    v = Dense(d, ("embed", "heads"), name="v_proj", **kw)(ctx)
    split = lambda t: t.reshape(*t.shape[:2], self.num_heads, h)
    mask = ctx_valid[:, None, None, :]  # [B, 1, 1, L] key padding mask
    out = layers.dot_product_attention(split(q), split(k), split(v), mask)
    return Dense(d, ("heads", "embed"), name="o_proj", **kw)(out.reshape(*x.shape[:2], d))


class AdapterBlock(nn.Module):
  """Pre-norm cross-attention + MLP block with residual adds (norms have no parameters)."""

  num_heads: int
  mlp_ratio: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, ctx_valid: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    x = x + CrossAttention(self.num_heads, name="attn", **kw)(
      layers.layer_norm(x), layers.layer_norm(ctx), ctx_valid
    )
    y = Dense(int(d * self.mlp_ratio), ("embed", "mlp"), name="fc1", **kw)(layers.layer_norm(x))
    y = Dense(d, ("mlp", "embed"), name="fc2", **kw)(layers.gelu_tanh(y))
    return x + y


class ResidualQueryAdapter(nn.Module):
  """Learned queries made input-dependent by cross-attention to the MLLM's input embeddings.

  __call__(embeds [B, L, D], valid [B, L] bool) -> [B, Q, D], the "residual queries" that the
  caller appends to the MLLM input sequence.
  """

  config: AdapterConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, embeds: jax.Array, valid: jax.Array) -> jax.Array:
    c = self.config
    init = nn.initializers.normal(stddev=c.width**-0.5)
    queries = self.param(
      "queries",
      layers.logical(init, ("queries", "embed")),
      (c.num_queries, c.width),
      self.param_dtype,
    )
    x = jnp.broadcast_to(queries.astype(self.dtype), (embeds.shape[0], *queries.shape))
    ctx = embeds.astype(self.dtype)
    block = layers.remat(AdapterBlock, c.remat)
    for i in range(c.num_layers):
      x = block(
        c.num_heads, c.mlp_ratio, dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{i}"
      )(x, ctx, valid)
    return x


CONNECTOR_KINDS = ("linear", "mlp", "transformer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
  """Connector from MLLM hidden states (width_in) to the generator condition width (width_out)."""

  kind: str = "linear"
  width_out: int
  num_layers: int = 2  # for kind="transformer"
  num_heads: int = 8  # for kind="transformer"

  def __post_init__(self):
    if self.kind not in CONNECTOR_KINDS:
      raise ValueError(f"ConnectorConfig.kind={self.kind!r} unknown; choose from {CONNECTOR_KINDS}")
    if self.width_out <= 0:
      raise ValueError(f"ConnectorConfig.width_out must be positive, got {self.width_out}")


class EncoderBlock(nn.Module):
  """Pre-norm self-attention + MLP block, used by the "transformer" connector."""

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    valid = jnp.ones(x.shape[:2], bool)
    h = layers.LayerNorm(name="norm1", **kw)(x)
    x = x + CrossAttention(self.num_heads, name="attn", **kw)(h, h, valid)
    h = layers.LayerNorm(name="norm2", **kw)(x)
    h = Dense(4 * d, ("embed", "mlp"), name="fc1", **kw)(h)
    return x + Dense(d, ("mlp", "embed"), name="fc2", **kw)(layers.gelu_tanh(h))


class Connector(nn.Module):
  """Maps [B, Q, D_mllm] hidden states to generator condition tokens [B, Q, D_ctx]."""

  config: ConnectorConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if c.kind == "transformer":
      for i in range(c.num_layers):
        h = EncoderBlock(c.num_heads, name=f"blocks_{i}", **kw)(h)
    if c.kind == "mlp":
      h = layers.gelu_tanh(Dense(c.width_out, ("embed", "mlp"), name="fc1", **kw)(h))
      return Dense(c.width_out, ("mlp", "cond"), name="fc2", **kw)(h)
    return Dense(c.width_out, ("embed", "cond"), name="proj", **kw)(h)
