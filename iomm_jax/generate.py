"""Text- or image-conditioned generation with a trained IOMM: condition, integrate, decode.

Used by the training loops (sample grids), ``iomm-sample`` and ``iomm-demo``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iomm_jax import sharding
from iomm_jax.diffusion import masking, sampling
from iomm_jax.models import codec as codec_lib
from iomm_jax.models import iomm


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "solver", "cfg_scale", "shift"))
def _generate(
  model: iomm.IOMM,
  trainable: Any,
  frozen: Any,
  cond_ids: jax.Array,
  cond_valid: jax.Array,
  null_ids: jax.Array,
  null_valid: jax.Array,
  images: jax.Array | None,
  keep: jax.Array | None,
  rng: jax.Array,
  *,
  num_steps: int,
  solver: str,
  cfg_scale: float,
  shift: float,
) -> jax.Array:
  b = cond_ids.shape[0]
  vis = None
  if images is not None:
    vis = masking.mask_tokens(iomm.vision_tokens(model, frozen["mllm"], images), keep)
  ctx, pooled = iomm.condition(model, trainable, frozen["mllm"], cond_ids, cond_valid, vis)
  if cfg_scale != 1.0:
    n_ids = jnp.broadcast_to(null_ids, (b, null_ids.shape[-1]))
    n_valid = jnp.broadcast_to(null_valid, (b, null_valid.shape[-1]))
    ctx_u, pooled_u = iomm.condition(model, trainable, frozen["mllm"], n_ids, n_valid, None)
    ctx, pooled = jnp.concatenate([ctx, ctx_u]), jnp.concatenate([pooled, pooled_u])

  def v_fn(x, t):
    reps = ctx.shape[0] // b
    v = iomm.velocity(
      model,
      trainable["generator"],
      jnp.concatenate([x] * reps),
      jnp.concatenate([t] * reps),
      ctx,
      pooled,
    )
    if reps == 1:
      return v
    vc, vu = v[:b], v[b:]
    return vu + cfg_scale * (vc - vu)

  h, w, c = model.latent_shape
  if rng.ndim == 0:  # one key for the chunk
    noise = jax.random.normal(rng, (b, h, w, c), jnp.float32)
  else:  # one key per row: a row's image does not depend on its batch
    noise = jax.vmap(lambda k: jax.random.normal(k, (h, w, c), jnp.float32))(rng)
  x0 = sampling.sample(v_fn, noise, num_steps, solver, shift)
  return codec_lib.unit_to_images(model.codec.decode(frozen["codec"], x0))


def generate(
  model: iomm.IOMM,
  trainable: Any,
  frozen: Any,
  cond_ids: np.ndarray,
  cond_valid: np.ndarray,
  null_ids: np.ndarray,
  null_valid: np.ndarray,
  rng: jax.Array,
  *,
  num_steps: int = 25,
  solver: str = "euler",
  cfg_scale: float = 4.0,
  shift: float = 1.0,
  images: np.ndarray | None = None,
  mask_ratio: float = 0.0,
  batch_size: int = 32,
) -> np.ndarray:
  """Generates one image per condition row; returns uint8 [B, H, W, 3].

  Args:
    cond_ids / cond_valid: [B, L] tokenised conditions (text prompts, or image conditions whose
      image-context positions take the tokens of ``images``).
    null_ids / null_valid: [L0] the unconditional prompt (for guidance).
    images: optional uint8 [B, H, W, 3] condition images (self-conditioning, editing).
    mask_ratio: share of condition image tokens zeroed (0 = all kept).
    rng: one key (each chunk of ``batch_size`` rows folds in its offset), or [B] keys, one per
      row, so that a text-conditioned row's image depends only on its key (resumable benchmark
      generation); the token mask of image conditions (mask_ratio > 0) is still drawn per chunk.
  """
  masking.check_mask_ratio(mask_ratio)
  n = len(cond_ids)
  if rng.ndim not in (0, 1) or (rng.ndim == 1 and len(rng) != n):
    raise ValueError(f"rng must be one key or {n} keys (one per condition row), got {rng.shape}")
  # Every chunk is padded to ``batch_size`` rows so one compiled sampler serves all calls.
  pad = lambda a: np.concatenate([a, np.repeat(a[-1:], batch_size - len(a), axis=0)])
  outs = []
  for s in range(0, n, batch_size):
    sl = slice(s, s + batch_size)
    if rng.ndim == 0:
      key = jax.random.fold_in(rng, s)
      mask_key = jax.random.fold_in(key, 1)
    else:
      keys = rng[sl]
      key = jnp.concatenate([keys, jnp.repeat(keys[-1:], batch_size - len(keys), axis=0)])
      mask_key = jax.random.fold_in(keys[0], 1)
    imgs = keep = None
    if images is not None:
      imgs = jnp.asarray(pad(images[sl]))
      keep = masking.token_keep_mask(mask_key, (batch_size, model.num_image_tokens), mask_ratio)
    out = _generate(
      model,
      trainable,
      frozen,
      jnp.asarray(pad(cond_ids[sl])),
      jnp.asarray(pad(cond_valid[sl])),
      jnp.asarray(null_ids),
      jnp.asarray(null_valid),
      imgs,
      keep,
      key,
      num_steps=num_steps,
      solver=solver,
      cfg_scale=float(cfg_scale),
      shift=float(shift),
    )
    outs.append(sharding.to_host(out)[: len(cond_ids[sl])])  # multi-process: gathered
  return np.concatenate(outs)
