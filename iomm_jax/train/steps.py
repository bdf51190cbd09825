"""Pure training-step functions shared by all stages.

``train_step(state, batch, frozen, rng) -> (state, metrics)``: the randomness of a step is
``fold_in(rng, state.step)``, so nothing random lives in the state and a resumed run replays the
same noise. Frozen parameters (MLLM, codec) are a separate, non-donated argument that is never
differentiated. Losses and flow-matching arithmetic are float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from iomm_jax.diffusion import flow, masking
from iomm_jax.models import codec as codec_lib
from iomm_jax.models import iomm

LossFn = Callable[[Any, Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any
  nonfinite: jax.Array  # consecutive non-finite updates (skipped)


def create_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  """Step 0 state; the EMA starts as a copy of the parameters (separate buffers, so the state
  can be donated)."""
  ema = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    ema=ema,
    nonfinite=jnp.zeros((), jnp.int32),
  )


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """EMA decay, optionally warmed up as min(decay, (1 + step) / (10 + step))."""
  d = jnp.asarray(decay, jnp.float32)
  if warmup:
    s = step.astype(jnp.float32)
    d = jnp.minimum(d, (1.0 + s) / (10.0 + s))
  return d


def make_train_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  ema_decay: float,
  ema_warmup: bool,
):
  """Builds ``train_step(state, batch, frozen, rng)`` around ``loss_fn``.

  A step whose loss or gradient norm is not finite leaves parameters, optimiser state and EMA
  unchanged and increments ``state.nonfinite`` (reset by the next finite step).
  """

  def train_step(state: TrainState, batch: dict, frozen: Any, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, rng)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    d = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema = jax.tree_util.tree_map(
      lambda e, p: (d * e + (1 - d) * p).astype(e.dtype), state.ema, params
    )
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      ema=ema,
      nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
    )
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": schedule(state.step),
      "param_norm": optax.global_norm(params),
      "update_norm": optax.global_norm(updates),
      "nonfinite": new_state.nonfinite,
      **aux,
    }
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------- losses


def caption_loss_fn(model: iomm.IOMM) -> LossFn:
  """Stage 0: next-token cross-entropy of the MLLM on captions of images (all params trained)."""

  def loss_fn(params, frozen, batch, rng):
    del frozen, rng
    pixels = iomm.vit_pixels(model, batch["image"])
    logits = model.mllm.apply({"params": params}, batch["ids"], pixels)
    logits = logits[:, :-1].astype(jnp.float32)
    targets = batch["ids"][:, 1:]
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / jnp.maximum(weights.sum(), 1)
    return loss, {"token_accuracy": acc}

  return loss_fn


def generator_loss_fn(
  model: iomm.IOMM, config: ml_collections.ConfigDict, null_ids: jax.Array, null_valid: jax.Array
) -> LossFn:
  """Stages 1 and 2: rectified-flow loss of the generator under masked self-conditioning.

  ``batch``: image uint8 [B, H, W, 3] (the target, and for image-only samples also the
  condition), cond_ids [B, L], cond_valid [B, L], is_image_only [B] bool; optionally cond_image
  [B, H, W, 3], an image other than the target whose tokens condition (diagnostics:
  ``benchmarks/condition_use.py``). Image tokens of the condition are zeroed per token with
  probability ``mask_ratio``; each sample's whole condition is replaced by the null prompt with
  probability ``cond_dropout``.
  """
  dcfg = config.diffusion

  def loss_fn(trainable, frozen, batch, rng):
    r_mask, r_drop, r_t, r_noise = jax.random.split(rng, 4)
    images = batch["image"]
    b = images.shape[0]
    vis = iomm.vision_tokens(model, frozen["mllm"], batch.get("cond_image", images))
    keep = masking.token_keep_mask(r_mask, vis.shape[:2], dcfg.mask_ratio)
    vis = masking.mask_tokens(vis, keep)
    drop = jax.random.uniform(r_drop, (b,)) < dcfg.cond_dropout
    ids = jnp.where(drop[:, None], null_ids[None], batch["cond_ids"])
    valid = jnp.where(drop[:, None], null_valid[None], batch["cond_valid"])
    ctx, pooled = iomm.condition(model, trainable, frozen["mllm"], ids, valid, vis)
    x = model.codec.encode(frozen["codec"], codec_lib.images_to_unit(images))
    t = flow.sample_timesteps(r_t, b, dcfg.t_sampler, dcfg.logit_mean, dcfg.logit_std, dcfg.t_shift)
    pair = flow.make_training_pair(r_noise, x, t)
    pred = iomm.velocity(model, trainable["generator"], pair["x_t"], t, ctx, pooled)
    per_ex = flow.flow_matching_loss(pred, pair["target"])
    img_only = batch["is_image_only"].astype(jnp.float32)
    aux = {
      "loss_image_only": jnp.sum(per_ex * img_only) / jnp.maximum(img_only.sum(), 1.0),
      "loss_pair": jnp.sum(per_ex * (1 - img_only)) / jnp.maximum((1 - img_only).sum(), 1.0),
      "image_only_share": jnp.mean(img_only),
      "kept_token_share": jnp.mean(keep.astype(jnp.float32)),
    }
    return jnp.mean(per_ex), aux

  return loss_fn
