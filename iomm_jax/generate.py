"""Text- or image-conditioned generation with a trained IOMM: condition, integrate, decode.

Used by the training loops (sample grids), ``iomm-sample``, ``iomm-eval`` and ``iomm-demo``.

Rows are generated in chunks of ``batch_size``. With a ``mesh`` (``sharding.sampling_mesh``:
every device of every process) each device generates one such chunk per call, the very chunk a
one-device run would generate, with the same ``batch_size`` rows, padding and keys, so the
images are byte-identical to a one-device run's whatever the device count (see ``generate``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from iomm_jax import sharding
from iomm_jax.configs import specs
from iomm_jax.diffusion import masking, sampling
from iomm_jax.models import codec as codec_lib
from iomm_jax.models import iomm


def _generate_rows(
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
  """uint8 images [B, H, W, 3] of one chunk of B condition rows (traced: ``_generate`` and, per
  device, ``_sharded_sampler``)."""
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
      iomm.generator_params(trainable, frozen),
      jnp.concatenate([x] * reps),
      jnp.concatenate([t] * reps),
      ctx,
      pooled,
    )
    if reps == 1:
      return v
    return sampling.cfg(v[:b], v[b:], cfg_scale)

  h, w, c = model.latent_shape
  if rng.ndim == 0:  # one key for the chunk
    noise = jax.random.normal(rng, (b, h, w, c), jnp.float32)
  else:  # one key per row: a row's image does not depend on its batch
    noise = jax.vmap(lambda k: jax.random.normal(k, (h, w, c), jnp.float32))(rng)
  x0 = sampling.sample(v_fn, noise, num_steps, solver, shift)
  return codec_lib.unit_to_images(model.codec.decode(frozen["codec"], x0))


_STATIC = ("model", "num_steps", "solver", "cfg_scale", "shift")
_generate = functools.partial(jax.jit, static_argnames=_STATIC)(_generate_rows)


@functools.lru_cache(maxsize=8)
def _sharded_sampler(
  mesh: Mesh,
  model: iomm.IOMM,
  num_steps: int,
  solver: str,
  cfg_scale: float,
  shift: float,
  key_impl: Any,
  row_keys: bool,
  with_images: bool,
):
  """``_generate_rows`` on every device of ``mesh`` at once (``jax.shard_map``): parameters
  replicated, each device given its own chunk of rows (and, with one key per chunk, that chunk's
  key), no communication.

  Why shard_map rather than a GSPMD ``jit`` of the whole batch: measured on CPU (jax 0.10.2,
  the shapes model, 8 fake devices, 2026-12), one-device chunks of 1, 2, 3, 4 and 16 rows give
  the same rows' floats up to 3.6e-7 apart (XLA's kernels depend on the batch shape), and a
  GSPMD-partitioned batch with 2 rows per device is 3.0e-7 away from a one-device chunk of the
  same 2 rows, while this per-device program on the same rows is 0.0 away. Rounding to uint8
  hides such differences almost always, not always; equal programs on equal inputs never differ.
  """
  rows, rep = PartitionSpec(sharding.BATCH_AXES), PartitionSpec()

  def per_device(trainable, frozen, ids, valid, null_ids, null_valid, key_data, *image_args):
    rng = jax.random.wrap_key_data(key_data if row_keys else key_data[0], impl=key_impl)
    images, keep = image_args if with_images else (None, None)
    return _generate_rows(
      model, trainable, frozen, ids, valid, null_ids, null_valid, images, keep, rng,
      num_steps=num_steps, solver=solver, cfg_scale=cfg_scale, shift=shift,
    )  # fmt: skip

  specs = (rep, rep, rows, rows, rep, rep, rows) + (rows, rows) * with_images
  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=rows))


def _chunks(
  model: iomm.IOMM,
  cond_ids: np.ndarray,
  cond_valid: np.ndarray,
  rng: jax.Array,
  images: np.ndarray | None,
  mask_ratio: float,
  batch_size: int,
) -> list[dict[str, Any]]:
  """The inputs of each chunk of ``batch_size`` rows as host arrays, padded to ``batch_size``
  rows (the last row repeated) so one compiled sampler serves every chunk: ``ids``, ``valid``,
  ``key_data`` ([batch_size, ...] row keys, or [1, ...] the chunk's key ``fold_in(rng, start)``),
  ``images`` and ``keep`` (image conditions only), and ``rows`` (how many are real)."""
  pad = lambda a: np.concatenate([a, np.repeat(a[-1:], batch_size - len(a), axis=0)])
  out = []
  for s in range(0, len(cond_ids), batch_size):
    sl = slice(s, s + batch_size)
    c = {"rows": len(cond_ids[sl]), "ids": pad(cond_ids[sl]), "valid": pad(cond_valid[sl])}
    if rng.ndim == 0:
      key = jax.random.fold_in(rng, s)
      mask_key = jax.random.fold_in(key, 1)
      c["key_data"] = np.asarray(jax.random.key_data(key))[None]
    else:
      c["key_data"] = pad(np.asarray(jax.random.key_data(rng[sl])))
      mask_key = jax.random.fold_in(rng[s], 1)
    if images is not None:
      c["images"] = pad(images[sl])
      shape = (batch_size, model.num_image_tokens)
      c["keep"] = np.asarray(masking.token_keep_mask(mask_key, shape, mask_ratio))
    out.append(c)
  return out


def generate(
  model: iomm.IOMM,
  trainable: Any,
  frozen: Any,
  cond_ids: np.ndarray,
  cond_valid: np.ndarray,
  null_ids: np.ndarray,
  null_valid: np.ndarray,
  rng: jax.Array,
  sampler: specs.SampleSpec,
  *,
  images: np.ndarray | None = None,
  mask_ratio: float = 0.0,
  batch_size: int = 32,
  mesh: Mesh | None = None,
) -> np.ndarray:
  """Generates one image per condition row; returns uint8 [B, H, W, 3] (on every process).

  Args:
    sampler: the ODE's steps, solver, guidance scale and time shift (``config.sample``'s spec).
    cond_ids / cond_valid: [B, L] tokenised conditions (text prompts, or image conditions whose
      image-context positions take the tokens of ``images``).
    null_ids / null_valid: [L0] the unconditional prompt (for guidance).
    images: optional uint8 [B, H, W, 3] condition images (self-conditioning, editing).
    mask_ratio: share of condition image tokens zeroed (0 = all kept).
    rng: one key (each chunk of ``batch_size`` rows folds in its offset), or [B] keys, one per
      row, so that a text-conditioned row's image depends only on its key (resumable benchmark
      generation); the token mask of image conditions (mask_ratio > 0) is still drawn per chunk.
    batch_size: rows per chunk, the shape of one sampler call on one device.
    mesh: None: the chunks run one after another on the parameters' devices (a ``jit`` over
      however they are placed: the training loops' sample grids). A mesh
      (``sharding.sampling_mesh``): the parameters are replicated onto it (arrays already
      placed so stay as they are) and each call hands one chunk to each of its devices, every
      process taking part (each process passes the same rows, keys and parameters); a short
      last call is padded with copies of the last chunk. Every device runs the one-device
      program on the one-device chunk, so the images are byte-identical to ``mesh=None`` on
      one device with the same ``batch_size``, whatever the device and process counts.
  """
  masking.check_mask_ratio(mask_ratio)
  n = len(cond_ids)
  if rng.ndim not in (0, 1) or (rng.ndim == 1 and len(rng) != n):
    raise ValueError(f"rng must be one key or {n} keys (one per condition row), got {rng.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  chunks = _chunks(model, cond_ids, cond_valid, rng, images, mask_ratio, batch_size)
  settings = dict(
    num_steps=sampler.num_steps,
    solver=sampler.solver,
    cfg_scale=float(sampler.cfg_scale),
    shift=float(sampler.shift),
  )
  impl = jax.random.key_impl(rng)
  if mesh is not None:
    return _generate_on_mesh(
      mesh, model, trainable, frozen, chunks, null_ids, null_valid, impl, rng.ndim == 1, settings
    )
  outs = []
  for c in chunks:
    key = jax.random.wrap_key_data(c["key_data"] if rng.ndim else c["key_data"][0], impl=impl)
    conds = [jnp.asarray(c[k]) if k in c else None for k in ("ids", "valid", "images", "keep")]
    ids, valid, imgs, keep = conds
    null = jnp.asarray(null_ids), jnp.asarray(null_valid)
    out = _generate(model, trainable, frozen, ids, valid, *null, imgs, keep, key, **settings)
    outs.append(sharding.to_host(out)[: c["rows"]])  # multi-process: gathered
  return np.concatenate(outs)


def _generate_on_mesh(
  mesh: Mesh,
  model: iomm.IOMM,
  trainable: Any,
  frozen: Any,
  chunks: list[dict[str, Any]],
  null_ids: np.ndarray,
  null_valid: np.ndarray,
  key_impl: Any,
  row_keys: bool,
  settings: dict[str, Any],
) -> np.ndarray:
  """``generate``'s chunks, ``mesh.size`` at a time, one per device (``_sharded_sampler``)."""
  rep = sharding.replicated(mesh)
  trainable, frozen = (
    sharding.place(t, jax.tree.map(lambda _: rep, t)) for t in (trainable, frozen)
  )
  null_ids, null_valid = (sharding.place(np.asarray(a), rep) for a in (null_ids, null_valid))
  with_images = "images" in chunks[0]
  fn = _sharded_sampler(mesh, model, key_impl=key_impl, row_keys=row_keys,
                        with_images=with_images, **settings)  # fmt: skip
  split = sharding.batch_sharding(mesh)
  names = ("ids", "valid", "key_data") + ("images", "keep") * with_images
  d, outs = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES), []  # chunks per call
  for g in range(0, len(chunks), d):
    group = chunks[g : g + d]
    group = group + [group[-1]] * (d - len(group))  # pad the last call to one chunk per device
    args = [sharding.place(np.concatenate([c[k] for c in group]), split) for k in names]
    out = sharding.to_host(fn(trainable, frozen, *args[:2], null_ids, null_valid, *args[2:]))
    per_chunk = out.reshape(d, -1, *out.shape[1:])
    outs += [per_chunk[i, : c["rows"]] for i, c in enumerate(chunks[g : g + d])]
  return np.concatenate(outs)
