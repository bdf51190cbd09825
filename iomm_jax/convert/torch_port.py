"""The trained generator in PyTorch: adapter and connector modules, the condition path through a
transformers InternVL, and a sampler that reproduces ``iomm_jax.generate`` given the same noise.

The only module of the project that imports torch (import it explicitly; nothing else does).
Weights come from ``iomm_jax.convert.flux.export_generator``'s directory (see its docstring):
``load_adapter`` / ``load_connector`` read ``adapter.safetensors`` / ``connector.safetensors``,
``load_transformer`` the diffusers ``FluxTransformer2DModel`` in ``transformer/``, and
``IOMMPipeline.from_pretrained`` all of them plus the codec (the parameter-free ``PixelCodec``, or
a diffusers ``AutoencoderKL`` for "vae") and the frozen MLLM, a transformers
``InternVLForConditionalGeneration`` (passed in, or read from ``mllm/``).

What matches the JAX code, step by step (``iomm.condition``, ``generate._generate``,
``sampling.sample``):

* condition: token embeddings, image tokens scattered row by row at the image-context id
  (``merge_image_tokens_per_row``), queries from the adapter appended, the MLLM decoder over
  ``[prompt; queries]`` with ``query_attention``'s mask and positions (an explicit 4-D mask), the
  connector on the hidden states of the query positions, pooled = mean over the queries ("raw":
  every input position, padding zeroed, pooled over the valid ones);
* sampler: times ``linspace(1, 0, steps + 1)`` shifted by ``s t / (1 + (s - 1) t)``, Euler or Heun
  (every step corrected), guidance ``v_u + s (v_c - v_u)`` with the unconditional branch from the
  null prompt, conditional and unconditional rows in one batch ``[cond; uncond]``;
* latents NHWC ``[B, h, w, C]`` (as in JAX, so the same noise array can be fed to both), packed
  2x2 into tokens (``pack_latents``), image RoPE ids ``(0, row, col)``, text ids zeros;
* decode: the pixel codec's depth-to-space, or ``AutoencoderKL.decode`` of
  ``latents / scaling_factor + shift_factor``; then clip to [-1, 1] and round to uint8.

Alphabet: B batch, L prompt tokens, Q queries, D MLLM width, C condition width.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iomm_jax.convert import flux as flux_convert

VIT_MEAN = (0.485, 0.456, 0.406)  # iomm.VIT_MEAN
VIT_STD = (0.229, 0.224, 0.225)  # iomm.VIT_STD
NORM_EPS = 1e-6  # layers.layer_norm / layers.LayerNorm default
SOLVERS = ("euler", "heun")


# ----------------------------------------------------------------------------- building blocks


def layer_norm(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
  """Parameter-free layer norm in float32, returned in x's dtype (``layers.layer_norm``)."""
  return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def attention(
  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
  """``layers.dot_product_attention`` (equal heads): q [B, L, N, H], k/v [B, S, N, H], mask
  broadcastable to [B, N, L, S] (True = attend); float32 softmax; a query with no allowed key
  gets zeros. Returns [B, L, N, H] in q's dtype."""
  qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
  logits = torch.matmul(qt.float(), kt.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
  if mask is not None:
    logits = logits.masked_fill(~mask, torch.finfo(torch.float32).min)
  probs = torch.softmax(logits, dim=-1)
  if mask is not None:
    probs = probs.masked_fill(~mask, 0.0)
  return torch.matmul(probs.to(v.dtype), vt).transpose(1, 2).to(q.dtype)


class CrossAttention(nn.Module):
  """Multi-head cross-attention (``adapter.CrossAttention``): q/k/v/o projections with bias."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))

  def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_valid: torch.Tensor) -> torch.Tensor:
    """x [B, Q, D] attends to ctx [B, L, D] where ctx_valid [B, L] (bool) -> [B, Q, D]."""
    split = lambda t: t.reshape(*t.shape[:2], self.num_heads, -1)
    out = attention(
      split(self.q_proj(x)),
      split(self.k_proj(ctx)),
      split(self.v_proj(ctx)),
      ctx_valid[:, None, None, :].bool(),
    )
    return self.o_proj(out.reshape(x.shape))


class AdapterBlock(nn.Module):
  """``adapter.AdapterBlock``: parameter-free pre-norms, cross-attention and a GELU-tanh MLP,
  each with a residual add."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: float):
    super().__init__()
    self.attn = CrossAttention(width, num_heads)
    self.fc1 = nn.Linear(width, int(width * mlp_ratio))
    self.fc2 = nn.Linear(int(width * mlp_ratio), width)

  def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_valid: torch.Tensor) -> torch.Tensor:
    """x [B, Q, D], ctx [B, L, D], ctx_valid [B, L] -> [B, Q, D]."""
    x = x + self.attn(layer_norm(x), layer_norm(ctx), ctx_valid)
    return x + self.fc2(F.gelu(self.fc1(layer_norm(x)), approximate="tanh"))


class ResidualQueryAdapter(nn.Module):
  """``adapter.ResidualQueryAdapter``: learned queries [Q, D] cross-attending to the MLLM's
  input embeddings. forward(embeds [B, L, D], valid [B, L]) -> [B, Q, D]."""

  def __init__(
    self, width: int, num_queries: int, num_heads: int, num_layers: int, mlp_ratio: float
  ):
    super().__init__()
    self.queries = nn.Parameter(torch.zeros(num_queries, width))
    self.blocks = nn.ModuleList(
      AdapterBlock(width, num_heads, mlp_ratio) for _ in range(num_layers)
    )

  def forward(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """See the class docstring."""
    x = self.queries.to(embeds.dtype).expand(embeds.shape[0], *self.queries.shape)
    for block in self.blocks:
      x = block(x, embeds, valid)
    return x


class LearnedQueries(nn.Module):
  """``iomm.LearnedQueries``: input-independent queries; same interface as the RQA."""

  def __init__(self, width: int, num_queries: int):
    super().__init__()
    self.queries = nn.Parameter(torch.zeros(num_queries, width))

  def forward(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """embeds [B, L, D] (only its batch and dtype are used) -> [B, Q, D]."""
    del valid
    return self.queries.to(embeds.dtype).expand(embeds.shape[0], *self.queries.shape)


class EncoderBlock(nn.Module):
  """``adapter.EncoderBlock``: pre-norm (affine LayerNorm, eps 1e-6) self-attention + 4x MLP."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=NORM_EPS)
    self.attn = CrossAttention(width, num_heads)
    self.norm2 = nn.LayerNorm(width, eps=NORM_EPS)
    self.fc1 = nn.Linear(width, 4 * width)
    self.fc2 = nn.Linear(4 * width, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[B, Q, D] -> [B, Q, D]."""
    h = self.norm1(x)
    x = x + self.attn(h, h, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Connector(nn.Module):
  """``adapter.Connector``: [B, Q, width_in] -> [B, Q, width_out] ("linear": ``proj``; "mlp":
  ``fc1`` -> GELU-tanh -> ``fc2``; "transformer": ``blocks`` then ``proj``)."""

  def __init__(
    self, kind: str, width_in: int, width_out: int, num_layers: int = 2, num_heads: int = 8
  ):
    super().__init__()
    self.kind = kind
    if kind == "transformer":
      self.blocks = nn.ModuleList(EncoderBlock(width_in, num_heads) for _ in range(num_layers))
    if kind == "mlp":
      self.fc1 = nn.Linear(width_in, width_out)
      self.fc2 = nn.Linear(width_out, width_out)
    elif kind in ("linear", "transformer"):
      self.proj = nn.Linear(width_in, width_out)
    else:
      raise ValueError(f"connector kind {kind!r} unknown")

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    """See the class docstring."""
    if self.kind == "transformer":
      for block in self.blocks:
        h = block(h)
    if self.kind == "mlp":
      return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
    return self.proj(h)


# ----------------------------------------------------------------------------- loading


def _load_state(module: nn.Module, state: dict[str, np.ndarray]) -> nn.Module:
  module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  return module.float().eval()


def build_adapter(meta: dict[str, Any]) -> nn.Module | None:
  """An uninitialised adapter module for ``iomm.json``'s meta (None for condition "raw")."""
  a = meta["adapter"]
  if a is None:
    return None
  if a["kind"] == "queries":
    return LearnedQueries(a["width"], a["num_queries"])
  return ResidualQueryAdapter(
    a["width"], a["num_queries"], a["num_heads"], a["num_layers"], a["mlp_ratio"]
  )


def build_connector(meta: dict[str, Any]) -> Connector:
  """An uninitialised ``Connector`` for ``iomm.json``'s meta."""
  c = meta["connector"]
  return Connector(c["kind"], c["width_in"], c["width_out"], c["num_layers"], c["num_heads"])


def load_adapter(path: str) -> nn.Module | None:
  """The float32 adapter (RQA or learned queries; None for "raw") of an exported directory."""
  meta, state = flux_convert.read_trainable(path)
  module = build_adapter(meta)
  return None if module is None else _load_state(module, state["adapter"])


def load_connector(path: str) -> Connector:
  """The float32 connector of an exported directory."""
  meta, state = flux_convert.read_trainable(path)
  return _load_state(build_connector(meta), state["connector"])


def load_transformer(path: str, **kwargs: Any):
  """diffusers ``FluxTransformer2DModel`` of an exported directory (its ``transformer/``
  subfolder, or the transformer folder itself); ``kwargs`` go to ``from_pretrained``."""
  from diffusers import FluxTransformer2DModel

  sub = os.path.join(path, flux_convert.TRANSFORMER_DIR)
  folder = sub if os.path.isdir(sub) else path
  return FluxTransformer2DModel.from_pretrained(folder, **kwargs).eval()


# ----------------------------------------------------------------------------- latents and ids


def pack_latents(latents: torch.Tensor, p: int = 2) -> torch.Tensor:
  """[B, h, w, C] -> [B, (h/p)(w/p), C p p], features ordered (C, py, px) (``pack_latents``)."""
  b, h, w, c = latents.shape
  x = latents.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: torch.Tensor, h: int, w: int, p: int = 2) -> torch.Tensor:
  """Inverse of ``pack_latents``: -> [B, h, w, C]."""
  b, _, f = tokens.shape
  x = tokens.reshape(b, h // p, w // p, f // (p * p), p, p).permute(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h, w, f // (p * p))


def image_ids(hp: int, wp: int, device: Any = None) -> torch.Tensor:
  """[hp*wp, 3] float32 ids (0, row, col), row-major (diffusers takes 2-D ids)."""
  rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
  ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(hp * wp, 3)
  return ids.to(device=device, dtype=torch.float32)


def velocity(
  transformer: nn.Module,
  x_t: torch.Tensor,
  t: torch.Tensor,
  ctx: torch.Tensor,
  pooled: torch.Tensor,
  latent_patch: int = 2,
  guidance: torch.Tensor | None = None,
  prediction: str = "velocity",
  x_pred_t_min: float = 0.05,
) -> torch.Tensor:
  """``iomm.velocity`` with a diffusers ``FluxTransformer2DModel``: x_t [B, h, w, c], t [B] in
  [0, 1] -> velocity [B, h, w, c] float32 (``prediction`` "x": the transformer outputs the clean
  sample, as ``flow.velocity_from_output``)."""
  b, h, w, _ = x_t.shape
  p = latent_patch
  dtype = next(transformer.parameters()).dtype
  out = transformer(
    hidden_states=pack_latents(x_t, p).to(dtype),
    encoder_hidden_states=ctx.to(dtype),
    pooled_projections=pooled.to(dtype),
    timestep=t.to(dtype),
    img_ids=image_ids(h // p, w // p, x_t.device),
    txt_ids=torch.zeros(ctx.shape[1], 3, device=x_t.device),
    guidance=guidance,
    return_dict=False,
  )[0]
  out = unpack_latents(out.float(), h, w, p)
  if prediction == "velocity":
    return out
  if prediction != "x":
    raise ValueError(f"unknown prediction {prediction!r}; choose 'velocity' or 'x'")
  tb = torch.clamp(t.float(), min=x_pred_t_min).reshape(-1, 1, 1, 1)
  return (x_t.float() - out) / tb


# ----------------------------------------------------------------------------- sampler


def time_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
  """Decreasing float32 times [num_steps + 1] from 1 to 0, shifted (``sampling.time_grid``)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)
  return shift * t / (1.0 + (shift - 1.0) * t) if shift != 1.0 else t


def sample(
  velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
  noise: torch.Tensor,
  num_steps: int,
  solver: str = "euler",
  shift: float = 1.0,
) -> torch.Tensor:
  """``sampling.sample``: integrates v(x, t [B]) from ``noise`` (t = 1) to t = 0, float32."""
  if solver not in SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
  ts = time_grid(num_steps, shift).tolist()
  x = noise.float()
  b = x.shape[0]
  for i in range(num_steps):
    t, t_next = torch.tensor(ts[i]), torch.tensor(ts[i + 1])  # float32 scalars
    dt = (t_next - t).to(x.device)
    v = velocity_fn(x, torch.full((b,), ts[i], device=x.device))
    x_euler = x + dt * v
    if solver == "euler":
      x = x_euler
      continue
    v_next = velocity_fn(x_euler, torch.full((b,), ts[i + 1], device=x.device))
    x = x + dt * 0.5 * (v + v_next)
  return x


@torch.no_grad()
def sample_latents(
  transformer: nn.Module,
  ctx: torch.Tensor,
  pooled: torch.Tensor,
  noise: torch.Tensor,
  *,
  num_steps: int = 25,
  solver: str = "euler",
  cfg_scale: float = 4.0,
  shift: float = 1.0,
  latent_patch: int = 2,
  ctx_uncond: torch.Tensor | None = None,
  pooled_uncond: torch.Tensor | None = None,
  prediction: str = "velocity",
  x_pred_t_min: float = 0.05,
) -> torch.Tensor:
  """Latents [B, h, w, c] at t = 0 from ``noise`` given the condition (``generate._generate``'s
  sampling half): with ``cfg_scale != 1`` the unconditional ``ctx_uncond`` / ``pooled_uncond``
  (one row or B rows) join the batch as ``[cond; uncond]``; ``prediction`` as in ``velocity``."""
  b = noise.shape[0]
  if cfg_scale != 1.0:
    if ctx_uncond is None or pooled_uncond is None:
      raise ValueError("cfg_scale != 1 needs ctx_uncond and pooled_uncond")
    ctx_u = ctx_uncond.expand(b, *ctx_uncond.shape[1:])
    pooled_u = pooled_uncond.expand(b, *pooled_uncond.shape[1:])
    ctx, pooled = torch.cat([ctx, ctx_u]), torch.cat([pooled, pooled_u])

  def v_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    reps = ctx.shape[0] // b
    v = velocity(
      transformer, torch.cat([x] * reps), torch.cat([t] * reps), ctx, pooled, latent_patch,
      prediction=prediction, x_pred_t_min=x_pred_t_min,
    )  # fmt: skip
    if reps == 1:
      return v
    vc, vu = v[:b], v[b:]
    return vu + cfg_scale * (vc - vu)  # diffusion.sampling.cfg

  return sample(v_fn, noise, num_steps, solver, shift)


# ----------------------------------------------------------------------------- codecs


def pixel_decode(latents: torch.Tensor, factor: int, channels: int = 3) -> torch.Tensor:
  """``PixelCodec.decode``: [B, h, w, f f c] -> [B, h f, w f, c] (depth-to-space)."""
  b, h, w, _ = latents.shape
  x = latents.reshape(b, h, w, factor, factor, channels).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * factor, w * factor, channels)


def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
  """``VAECodec.decode`` with a diffusers ``AutoencoderKL``: latents [B, h, w, C] (scaled and
  shifted) -> [B, H, W, 3] float32 (NHWC)."""
  cfg = vae.config
  z = latents.float() / cfg.scaling_factor + (cfg.shift_factor or 0.0)
  dtype = next(vae.parameters()).dtype
  out = vae.decode(z.permute(0, 3, 1, 2).to(dtype), return_dict=False)[0]
  return out.float().permute(0, 2, 3, 1)


def unit_to_images(x: torch.Tensor) -> np.ndarray:
  """[-1, 1] float -> uint8 numpy: clip, scale by 127.5, round half to even (``unit_to_images``)."""
  y = (x.float().clamp(-1.0, 1.0) + 1.0) * 127.5
  return torch.round(y).to(torch.uint8).cpu().numpy()


# ----------------------------------------------------------------------------- condition


def _language_model(mllm: nn.Module) -> nn.Module:
  """The decoder stack of a transformers InternVL (or of a bare text model)."""
  inner = getattr(mllm, "model", None)
  if inner is not None and hasattr(inner, "language_model"):
    return inner.language_model
  return getattr(mllm, "language_model", mllm)


def query_attention(valid: torch.Tensor, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
  """``iomm.query_attention``: mask [B, 1, L+Q, L+Q] bool (causal prompt, queries see every valid
  prompt token and all queries) and positions [B, L+Q] int64."""
  b, l = valid.shape
  n = l + num_queries
  valid = valid.bool()
  key_valid = torch.cat(
    [valid, torch.ones(b, num_queries, dtype=torch.bool, device=valid.device)], 1
  )
  i = torch.arange(n, device=valid.device)[:, None]
  j = torch.arange(n, device=valid.device)[None, :]
  allowed = torch.where(i < l, j <= i, torch.ones_like(j <= i))
  mask = allowed[None, None] & key_valid[:, None, None, :]
  length = valid.sum(dim=1, keepdim=True)
  pos = torch.cat(
    [valid.long().cumsum(dim=1) - 1, length + torch.arange(num_queries, device=valid.device)[None]],
    dim=1,
  )
  return mask, pos.clamp(min=0)


def decode(
  mllm: nn.Module, embeds: torch.Tensor, valid: torch.Tensor, num_queries: int
) -> torch.Tensor:
  """Final-norm hidden states [B, L, D] of the MLLM decoder over ``embeds`` (prompt of
  ``valid`` [B, L - Q] then Q queries), with ``query_attention``'s mask as an additive 4-D mask."""
  mask, pos = query_attention(valid, num_queries)
  lm = _language_model(mllm)
  additive = torch.zeros(mask.shape, dtype=embeds.dtype, device=embeds.device)
  additive = additive.masked_fill(~mask, torch.finfo(embeds.dtype).min)
  out = lm(inputs_embeds=embeds, attention_mask=additive, position_ids=pos, use_cache=False)
  return out.last_hidden_state


def merge_image_tokens_per_row(
  embeds: torch.Tensor, ids: torch.Tensor, image_tokens: torch.Tensor, image_token_id: int
) -> torch.Tensor:
  """``iomm.merge_image_tokens_per_row``: row b's j-th placeholder takes image_tokens[b, j]."""
  is_image = ids == image_token_id
  index = (is_image.long().cumsum(dim=1) - 1).clamp(0, image_tokens.shape[1] - 1)
  gathered = torch.gather(
    image_tokens.to(embeds.dtype), 1, index[..., None].expand(-1, -1, embeds.shape[-1])
  )
  return torch.where(is_image[..., None], gathered, embeds)


def vit_pixels(images: torch.Tensor, image_size: int) -> torch.Tensor:
  """``iomm.vit_pixels`` as NCHW: uint8 or [-1, 1] images [B, H, W, 3] -> normalised pixels.

  A resize uses torch's antialiased bilinear interpolation, close to but not bit-identical with
  ``jax.image.resize``; at the MLLM's own resolution there is no resize.
  """
  x = images.float()
  x = x / 255.0 if images.dtype == torch.uint8 else (x + 1.0) / 2.0
  x = x.permute(0, 3, 1, 2)
  if x.shape[-2:] != (image_size, image_size):
    x = F.interpolate(x, (image_size, image_size), mode="bilinear", antialias=True)
  mean = torch.tensor(VIT_MEAN, device=x.device)[None, :, None, None]
  std = torch.tensor(VIT_STD, device=x.device)[None, :, None, None]
  return (x - mean) / std


def vision_tokens(mllm: nn.Module, images: torch.Tensor, image_size: int) -> torch.Tensor:
  """Projected MLLM image tokens [B, P, D] of images [B, H, W, 3] (``iomm.vision_tokens``)."""
  pixels = vit_pixels(images, image_size).to(next(mllm.parameters()).dtype)
  out = mllm.model.get_image_features(
    pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
  )
  return out.pooler_output if hasattr(out, "pooler_output") else out


def condition(
  mllm: nn.Module,
  adapter: nn.Module | None,
  connector: nn.Module,
  ids: torch.Tensor,
  valid: torch.Tensor,
  image_tokens: torch.Tensor | None = None,
  image_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
  """``iomm.condition``: (context [B, Q, C], pooled [B, C]) of prompts ids/valid [B, L]
  (right-padded), with optional (already masked) image tokens [B, P, D] scattered at
  ``image_token_id``. ``adapter`` None is condition "raw" (context [B, L, C])."""
  embeds = mllm.get_input_embeddings()(ids)
  if image_tokens is not None:
    if image_token_id is None:
      raise ValueError("image_tokens need image_token_id")
    embeds = merge_image_tokens_per_row(embeds, ids, image_tokens, image_token_id)
  valid = valid.bool()
  if adapter is None:
    hidden = decode(mllm, embeds, valid, 0)
    keep = valid[..., None]
    ctx = connector(hidden.to(_dtype(connector))) * keep.to(hidden.dtype)
    pooled = ctx.float().sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    return ctx, pooled.to(ctx.dtype)
  queries = adapter(embeds.to(_dtype(adapter)), valid)
  q = queries.shape[1]
  hidden = decode(mllm, torch.cat([embeds, queries.to(embeds.dtype)], dim=1), valid, q)
  ctx = connector(hidden[:, -q:].to(_dtype(connector)))
  return ctx, ctx.float().mean(dim=1).to(ctx.dtype)


def _dtype(module: nn.Module) -> torch.dtype:
  return next(module.parameters()).dtype


# ----------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass
class IOMMPipeline:
  """Everything ``generate`` needs: the frozen MLLM (transformers InternVL), adapter (None for
  "raw"), connector, diffusers transformer, the VAE (None for the pixel codec) and ``iomm.json``."""

  meta: dict[str, Any]
  mllm: nn.Module
  adapter: nn.Module | None
  connector: nn.Module
  transformer: nn.Module
  vae: nn.Module | None = None

  @classmethod
  def from_pretrained(
    cls, path: str, mllm: nn.Module | None = None, vae: nn.Module | None = None
  ) -> IOMMPipeline:
    """Loads an ``export_generator`` directory; ``mllm`` / ``vae`` default to its ``mllm/``
    (``InternVLForConditionalGeneration``) and ``vae/`` (``AutoencoderKL``) subfolders."""
    meta, state = flux_convert.read_trainable(path)
    adapter = build_adapter(meta)
    if adapter is not None:
      _load_state(adapter, state["adapter"])
    connector = _load_state(build_connector(meta), state["connector"])
    if mllm is None:
      from transformers import InternVLForConditionalGeneration

      mllm = InternVLForConditionalGeneration.from_pretrained(
        os.path.join(path, flux_convert.MLLM_DIR)
      )
    if vae is None and meta["codec"]["kind"] == "vae":
      from diffusers import AutoencoderKL

      vae = AutoencoderKL.from_pretrained(os.path.join(path, flux_convert.VAE_DIR))
    return cls(meta, mllm.eval(), adapter, connector, load_transformer(path), vae)

  def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, h, w, c] -> images [B, H, W, 3] in [-1, 1] (not clipped)."""
    codec = self.meta["codec"]
    if codec["kind"] == "pixel":
      return pixel_decode(latents, codec["factor"], codec.get("channels", 3))
    if self.vae is None:
      raise ValueError("codec 'vae' needs the pipeline's vae (diffusers AutoencoderKL)")
    return vae_decode(self.vae, latents)

  @torch.no_grad()
  def generate_unit(
    self,
    cond_ids: torch.Tensor,
    cond_valid: torch.Tensor,
    null_ids: torch.Tensor,
    null_valid: torch.Tensor,
    noise: torch.Tensor,
    *,
    num_steps: int = 25,
    solver: str = "euler",
    cfg_scale: float = 4.0,
    shift: float = 1.0,
    images: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
  ) -> torch.Tensor:
    """Float images [B, H, W, 3] in about [-1, 1] (not clipped), one per condition row: what
    ``generate.generate`` computes for one chunk before ``unit_to_images``.

    Args:
      cond_ids / cond_valid: [B, L] tokenised conditions (right-padded).
      null_ids / null_valid: [L0] the unconditional prompt (used iff cfg_scale != 1).
      noise: [B, h, w, c] float32 starting latents (NHWC, e.g. the JAX sampler's noise).
      images: optional uint8 [B, H, W, 3] condition images; ``keep`` [B, P] bool token mask.
    """
    image_token_id = self.meta["image_token_id"]
    vis = None
    if images is not None:
      vis = vision_tokens(self.mllm, images, self.meta["mllm_image_size"])
      if keep is not None:
        vis = vis * keep[..., None].to(vis.dtype)
    ctx, pooled = condition(
      self.mllm, self.adapter, self.connector, cond_ids, cond_valid, vis, image_token_id
    )
    ctx_u = pooled_u = None
    if cfg_scale != 1.0:
      ctx_u, pooled_u = condition(
        self.mllm, self.adapter, self.connector, null_ids[None], null_valid[None]
      )
    if self.meta.get("pooled", "mean") == "none":  # iomm.condition's ablation
      pooled = torch.zeros_like(pooled)
      pooled_u = None if pooled_u is None else torch.zeros_like(pooled_u)
    latents = sample_latents(
      self.transformer,
      ctx,
      pooled,
      noise,
      num_steps=num_steps,
      solver=solver,
      cfg_scale=cfg_scale,
      shift=shift,
      latent_patch=self.meta["latent_patch"],
      ctx_uncond=ctx_u,
      pooled_uncond=pooled_u,
      prediction=self.meta.get("prediction", "velocity"),
      x_pred_t_min=self.meta.get("x_pred_t_min", 0.05),
    )
    return self.decode_latents(latents)

  def generate(self, *args: Any, **kwargs: Any) -> np.ndarray:
    """uint8 images [B, H, W, 3] (``unit_to_images`` of ``generate_unit(*args, **kwargs)``)."""
    return unit_to_images(self.generate_unit(*args, **kwargs))
