"""Shared Flax Linen building blocks: dense layers with logical axes, norms, RoPE, attention.

Every parameter created here carries logical axis names (``nn.with_logical_partitioning``) so
that a mesh and a rule table (``config.sharding.logical_axis_rules``) can place it later.

Logical axis names (one vocabulary for the whole project, see ``LOGICAL_AXES``):
  batch, length, embed (model width), mlp (feed-forward width), heads (query heads x head dim,
  joined), kv_heads (key/value heads x head dim, joined), kv (one head's dim), vocab, norm (a norm
  scale or bias), queries (learned query tokens), modulation (adaLN outputs), conv_h, conv_w,
  conv_in, conv_out (convolution kernels), patch (patchified pixels/latents), pos (position tables),
  cond (an input-condition width such as pooled or timestep features), lora (the rank of a
  low-rank adapter: ``Dense`` with ``lora_rank``).

Einsum alphabet: B batch, L/S tokens (query/key side), N query heads, K kv heads, H head dim,
D width, F MLP width.

Dense kernels are stored as (in, out), i.e. the transpose of a PyTorch ``nn.Linear.weight``; a
checkpoint converter only transposes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from iomm_jax import sharding

Dtype = Any
Initializer = Callable[..., jax.Array]

LOGICAL_AXES = (
  "batch",
  "length",
  "embed",
  "mlp",
  "heads",
  "kv_heads",
  "kv",
  "vocab",
  "norm",
  "queries",
  "modulation",
  "conv_h",
  "conv_w",
  "conv_in",
  "conv_out",
  "patch",
  "pos",
  "cond",
  "lora",
)

default_kernel_init = nn.initializers.lecun_normal()


def with_logical_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical axis names, e.g. ("batch", "length",
  "embed"), under the mesh and rules bound while tracing (``sharding.with_rules``).

  ``nn.with_logical_constraint`` with one difference: a mesh axis that does not divide its
  dimension is left out (a batch of 4 on 8 data devices stays replicated). Without a mesh or
  rules in scope it returns ``x`` itself, so single-device numerics are untouched.
  """
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  spec = sharding.mesh_axes_for(x.shape, tuple(names), rules, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


ACTIVATION = ("batch", "length", "embed")  # logical axes of a [B, L, D] residual stream


# Rematerialisation of transformer blocks (``config.model.remat``): what the backward pass keeps
# of a block's forward activations; the rest is recomputed. Parameters and numerics are the same.
#   "none": keep everything (fastest, most memory);
#   "block": keep only each block's inputs, recompute the whole block (least memory, ~1/3 more
#     FLOPs for the blocks);
#   "dots": also keep the outputs of matmuls without batch dimensions (the projections and MLPs),
#     recompute the rest (norms, activations, attention scores).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
  "none": None,
  "block": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(module: type[nn.Module], policy: str) -> type[nn.Module]:
  """``module`` wrapped in ``nn.remat`` with the named ``REMAT_POLICIES`` policy (the class itself
  for "none"). Parameter names and shapes are unchanged, so checkpoints stay compatible.

  The blocks are applied in a Python loop (not a scan), so ``prevent_cse`` stays on: without it
  XLA may merge the recomputation into the forward pass and keep the activations after all.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat policy {policy!r} unknown; choose from {tuple(REMAT_POLICIES)}")
  if policy == "none":
    return module
  return nn.remat(module, policy=REMAT_POLICIES[policy], prevent_cse=True)


def logical(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  """Wraps an initializer so that the parameter it makes carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


class Dense(nn.Module):
  """A linear layer ``y = x @ kernel + bias`` whose kernel (in, out) has logical axis names,
  optionally with a trainable low-rank update (LoRA, Hu et al. 2021) when ``lora_rank`` > 0:
  ``y = x @ kernel + bias + (lora_alpha / lora_rank) * (x @ lora_a) @ lora_b``.

  A LoRA layer keeps the plain layer's ``kernel`` / ``bias`` under the same names (a checkpoint
  of the plain layer fills them); ``lora_a`` [in, rank] starts uniform in +-1/sqrt(in) (PEFT's
  kaiming-uniform with a = sqrt(5)) and ``lora_b`` [rank, out] at zero, so a fresh LoRA layer
  computes exactly its base layer. Logical axes: ``(axes[0], "lora")`` and ``("lora", axes[1])``.

  Attributes:
    features: output width.
    axes: logical names of the kernel's (in, out) axes; the bias takes ``axes[1]``.
    lora_rank: LoRA rank r (0: a plain layer).
    lora_alpha: the update's scale is ``lora_alpha / lora_rank``.
  """

  features: int
  axes: tuple[str, str]
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  lora_rank: int = 0
  lora_alpha: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_in = x.shape[-1]
    kernel = self.param(
      "kernel", logical(self.kernel_init, self.axes), (d_in, self.features), self.param_dtype
    )
    # A 2-D matmul: XLA's CPU backend runs the weight gradient of a 3-D einsum ~2x slower.
    x2 = x.reshape(-1, d_in).astype(self.dtype)
    y = x2 @ kernel.astype(self.dtype)
    if self.lora_rank > 0:
      y = y + self._low_rank(x2)
    y = y.reshape(*x.shape[:-1], self.features)
    if self.use_bias:
      bias = self.param(
        "bias", logical(self.bias_init, self.axes[1:]), (self.features,), self.param_dtype
      )
      y = y + bias.astype(self.dtype)
    return y

  def _low_rank(self, x2: jax.Array) -> jax.Array:
    """The LoRA update of [N, in] ``x2``: [N, out] (exact zeros while ``lora_b`` = 0)."""
    d_in, r = x2.shape[-1], self.lora_rank
    a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    a = self.param("lora_a", logical(a_init, (self.axes[0], "lora")), (d_in, r), self.param_dtype)
    b = self.param(
      "lora_b",
      logical(nn.initializers.zeros_init(), ("lora", self.axes[1])),
      (r, self.features),
      self.param_dtype,
    )
    low = (x2 @ a.astype(self.dtype)) * jnp.asarray(self.lora_alpha / r, self.dtype)
    return low @ b.astype(self.dtype)


class RMSNorm(nn.Module):
  """RMS normalisation over the last axis, computed in float32 (Qwen2, FLUX QK-norm)."""

  eps: float = 1e-6
  use_scale: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.use_scale:
      scale = self.param(
        "scale",
        logical(nn.initializers.ones_init(), (self.axis_name,)),
        (x.shape[-1],),
        self.param_dtype,
      )
      y = y * scale.astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """Layer normalisation over the last axis in float32, with optional affine parameters."""

  eps: float = 1e-6
  use_scale: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.use_scale:
      scale = self.param(
        "scale", logical(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],), self.param_dtype
      )
      y = y * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param(
        "bias", logical(nn.initializers.zeros_init(), ("norm",)), (x.shape[-1],), self.param_dtype
      )
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Parameter-free layer norm in float32 (FLUX's elementwise_affine=False norms)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


# ----------------------------------------------------------------------------- rotary embeddings


def rope_half(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, "rotate half" layout (Qwen2 / Llama).

  Args:
    x: [B, L, N, H] queries or keys.
    positions: [B, L] integer positions.
    theta: RoPE base.
  Returns:
    [B, L, N, H] rotated, in x's dtype (angles computed in float32).
  """
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, H/2]
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(ang) + rotated * jnp.sin(ang)).astype(x.dtype)


def rope_axes_freqs(ids: jax.Array, axes_dim: Sequence[int], theta: float) -> jax.Array:
  """Per-axis rotary angles for multi-axis positions (FLUX's 3-axis RoPE).

  Args:
    ids: [B, L, A] float or int positions, one column per axis.
    axes_dim: head-dim share of each axis (sums to H, each even).
    theta: RoPE base.
  Returns:
    [B, L, H/2] angles, float32; pair i rotates head dims (2i, 2i+1).
  """
  angs = []
  for a, dim in enumerate(axes_dim):
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angs.append(ids[..., a].astype(jnp.float32)[..., None] * inv_freq)
  return jnp.concatenate(angs, axis=-1)


def rope_interleaved(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotary embedding on adjacent pairs (x[2i], x[2i+1]) (FLUX layout).

  Args:
    x: [B, L, N, H].
    angles: [B, L, H/2] from ``rope_axes_freqs``.
  """
  x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x0, x1 = x32[..., 0], x32[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------- attention


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None = None,
  implementation: str = "xla",
) -> jax.Array:
  """Multi-head attention with grouped key/value heads; softmax in float32.

  ``implementation``: "xla" (einsums below: any backend, any dtype, materialises the [B, N, L, S]
  logits) or "cudnn" (``jax.nn.dot_product_attention``'s fused flash attention: NVIDIA GPUs,
  bf16/fp16 inputs, no logits in memory; a fully masked query row is then undefined).

  Args:
    q: [B, L, N, H] queries.
    k: [B, S, K, H] keys, N divisible by K (K < N is grouped-query attention).
    v: [B, S, K, H] values.
    mask: boolean, broadcastable to [B, N, L, S]; True = attend. A query row with no allowed
      key returns zeros rather than NaN.
  Returns:
    [B, L, N, H] in q's dtype.
  """
  b, l, n, h = q.shape
  kh = k.shape[2]
  if n % kh:
    raise ValueError(f"query heads {n} not divisible by kv heads {kh}")
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  if implementation != "xla":
    raise ValueError(
      f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
    )
  if kh != n:  # grouped-query attention: share each kv head over its group of query heads
    k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)
  # Heads go first so both contractions are plain batched matmuls over (B, N): XLA's CPU
  # backend is ~5x slower on the grouped 5-D form.
  qt, kt, vt = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, N, L|S, H]
  logits = jnp.einsum("bnlh,bnsh->bnls", qt, kt, preferred_element_type=jnp.float32)
  logits = logits * (h**-0.5)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    probs = jnp.where(mask, probs, 0.0)
  out = jnp.einsum("bnls,bnsh->bnlh", probs.astype(v.dtype), vt)
  return jnp.swapaxes(out, 1, 2)


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(
  t: jax.Array,
  dim: int,
  flip_sin_to_cos: bool = True,
  downscale_freq_shift: float = 0.0,
  max_period: float = 10000.0,
) -> jax.Array:
  """Sinusoidal timestep features in float32 (DDPM / diffusers ``get_timestep_embedding``).

  Frequency i of ``dim // 2`` is ``exp(-ln(max_period) * i / (dim // 2 - downscale_freq_shift))``.

  Args:
    t: [B] (possibly fractional) timesteps, already scaled (FLUX feeds ``1000 * t``).
    dim: output width; an odd width gets one zero column at the end.
    flip_sin_to_cos: order ``[cos, sin]`` if True (FLUX, SD3), else ``[sin, cos]``.
    downscale_freq_shift: shift of the frequency denominator (0 in FLUX, 1 in DDPM).
    max_period: longest period.
  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  exponent = -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU with the tanh approximation (FLUX feed-forwards, the adapter MLP)."""
  return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU (InternViT MLP, the InternVL projector)."""
  return jax.nn.gelu(x, approximate=False)


def count_params(tree: Any) -> int:
  """Number of scalars in a (possibly abstract or boxed) parameter tree."""
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(tree))
  return int(sum(int(jnp.size(x)) if not hasattr(x, "size") else int(x.size) for x in leaves))


def logical_axes_tree(boxed: Any) -> Any:
  """Logical axis names of each parameter in a boxed tree (``None`` for an unnamed leaf)."""
  return jax.tree_util.tree_map(
    lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else None,
    boxed,
    is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
  )
