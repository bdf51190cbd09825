"""Pure training-step functions shared by all stages.

``train_step(state, batch, frozen, rng) -> (state, metrics)``: the randomness of a step is
``fold_in(rng, state.step)``, so nothing random lives in the state and a resumed run replays the
same noise. Frozen parameters (MLLM, codec; with LoRA the base generator weights) are a
separate, non-donated argument that is never differentiated. Losses and flow-matching arithmetic
are float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from iomm_jax.configs import specs
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
  ema: Any  # None when the run keeps no EMA (``config.train.ema_decay = 0``)
  nonfinite: jax.Array  # consecutive non-finite updates (skipped)


def create_state(
  params: Any, optimizer: optax.GradientTransformation, ema: bool = True
) -> TrainState:
  """Step 0 state; the EMA starts as a copy of the parameters (separate buffers, so the state
  can be donated). ``ema=False`` (``ema_decay = 0``): no EMA copy is kept at all; the EMA of
  such a run is its parameters (``ema_params``)."""
  copy = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params) if ema else None
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    ema=copy,
    nonfinite=jnp.zeros((), jnp.int32),
  )


def ema_params(state: TrainState) -> Any:
  """The EMA parameters, or the parameters themselves when the run keeps no EMA."""
  return state.params if state.ema is None else state.ema


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """EMA decay, optionally warmed up as min(decay, (1 + step) / (10 + step))."""
  d = jnp.asarray(decay, jnp.float32)
  if warmup:
    s = step.astype(jnp.float32)
    d = jnp.minimum(d, (1.0 + s) / (10.0 + s))
  return d


def split_micro_batches(tree: Any, k: int) -> Any:
  """[B, ...] leaves -> [k, B / k, ...]: micro-batch ``i`` holds rows ``i, i + k, i + 2k, ...``.

  Interleaved rather than contiguous so that a batch split over devices along B stays where it
  is: each device's contiguous rows hold ``B / k / devices`` rows of every micro-batch (a
  contiguous split would move rows between devices)."""

  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  return jax.tree_util.tree_map(split, tree)


def finish_aux(aux: dict[str, Any]) -> dict[str, jax.Array]:
  """Aux metrics as scalars: a ``(numerator, denominator)`` pair (a share of the rows, such as
  the mean loss of the image-only rows) becomes their ratio, 0 where the denominator is 0.

  A ``given`` loss reports such pairs so that accumulation can sum them over micro-batches:
  the mean of per-micro-batch ratios would weigh a micro-batch with one image-only row like
  one with all of them, and count one without any as a 0."""

  def ratio(v):
    if not isinstance(v, tuple):
      return v
    num, den = v
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)

  return {k: ratio(v) for k, v in aux.items()}


def accumulated_value_and_grad(loss_fn: LossFn, k: int) -> Callable:
  """``value_and_grad(loss_fn, has_aux=True)`` over ``k`` micro-batches of the batch, one at a
  time under ``lax.scan`` (activations of one micro-batch live at once): the mean loss, aux and
  gradient of the micro-batches, gradients summed in float32.

  A ``loss_fn`` with a ``draw(rng, batch)`` attribute draws the step's randomness for the whole
  batch first (per-row arrays) and ``loss_fn.given(params, frozen, batch, noise)`` computes the
  loss from it, so each row sees the same noise as with ``k = 1`` and k micro-batches of B / k
  make the same update as one batch of B; its aux ratios are pairs summed over the
  micro-batches (``finish_aux``), so they are the whole batch's too. Without ``draw``,
  micro-batch ``i`` gets ``fold_in(rng, i)`` and aux is the micro-batches' mean.
  """
  draw = getattr(loss_fn, "draw", None)
  given = getattr(loss_fn, "given", None)
  finish = finish_aux if draw is not None else (lambda aux: aux)

  def value_and_grad(params, frozen, batch, rng):
    if draw is not None:
      xs = split_micro_batches((batch, draw(rng, batch)), k)
      fn = jax.value_and_grad(given, has_aux=True)
      micro = lambda i, x: fn(params, frozen, *x)
    else:
      xs = split_micro_batches(batch, k)
      fn = jax.value_and_grad(loss_fn, has_aux=True)
      micro = lambda i, x: fn(params, frozen, x, jax.random.fold_in(rng, i))
    f32 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)
    first = jax.tree_util.tree_map(lambda a: a[0], xs)
    shapes = jax.eval_shape(lambda x: micro(0, x), first)
    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), shapes)

    def body(acc, ix):
      out = micro(*ix)
      return jax.tree_util.tree_map(jnp.add, acc, f32(out)), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), xs))
    mean = jax.tree_util.tree_map(lambda a: a / k, total)
    (loss, aux), grads = mean
    # gradients back in the parameters' dtypes (so is the optimiser state); aux as it was
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
    aux = jax.tree_util.tree_map(lambda a, s: a.astype(s.dtype), aux, shapes[0][1])
    return (loss, finish(aux)), grads

  return value_and_grad


def make_train_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  ema_decay: float,
  ema_warmup: bool,
  grad_accum: int = 1,
):
  """Builds ``train_step(state, batch, frozen, rng)`` around ``loss_fn``.

  ``grad_accum`` k > 1: the batch is split into k micro-batches whose gradients are averaged
  inside the step (``accumulated_value_and_grad``) before the one optimiser update, EMA update
  and non-finite decision of the step.

  A step whose loss or gradient norm is not finite leaves parameters, optimiser state and EMA
  unchanged and increments ``state.nonfinite`` (reset by the next finite step). A state without
  an EMA (``create_state(..., ema=False)``) keeps none.
  """
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
  grad_fn = (
    jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1
    else accumulated_value_and_grad(loss_fn, grad_accum)
  )

  def train_step(state: TrainState, batch: dict, frozen: Any, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = grad_fn(state.params, frozen, batch, rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    ema = None
    if state.ema is not None:
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
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
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
  model: iomm.IOMM, spec: specs.RunSpec, null_ids: jax.Array, null_valid: jax.Array
) -> LossFn:
  """Stages 1 and 2: rectified-flow loss of the generator under masked self-conditioning.

  ``batch``: image uint8 [B, H, W, 3] (the target, and for image-only samples also the
  condition), cond_ids [B, L], cond_valid [B, L], is_image_only [B] bool; optionally cond_image
  [B, H, W, 3], an image other than the target whose tokens condition (diagnostics:
  ``benchmarks/condition_use.py``). Image tokens of the condition are zeroed per token with
  probability ``mask_ratio``; each sample's whole condition is replaced by the null prompt with
  probability ``cond_dropout``. The returned function carries ``draw(rng, batch)`` (the step's
  per-row randomness: token keep mask, condition drop, t, noise) and ``given(trainable, frozen,
  batch, noise)`` (the loss under it), which gradient accumulation uses.

  ``spec``: the run's specs (``diffusion``, and ``data.vae_latent``). Cached features
  (``config.data.features``): the batch carries, instead of ``image``, vision
  [B, P, D] (the unmasked tokens after the projector) and latent_mean [B, h, w, C] (+ latent_std,
  a VAE's); the frozen ViT and VAE encoder do not run, and the tokens are masked here with the
  same ``token_keep_mask`` draw as online. ``config.data.vae_latent`` "sample" makes the target a
  draw mean + std * eps from the VAE posterior, with the same ``eps`` in both paths; "mean"
  (default) takes its mean.
  """
  dcfg = spec.diffusion
  sample_latent = spec.data.vae_latent == "sample"
  latent_stream = 0x1A7E47  # fold_in data of the posterior-sample key (apart from split(rng, 4))

  def draw(rng, batch):
    """The step's randomness, one row per batch row (so micro-batches can share it)."""
    r_mask, r_drop, r_t, r_noise = jax.random.split(rng, 4)
    b = batch["cond_ids"].shape[0]
    t = flow.sample_timesteps(r_t, b, dcfg.t_sampler, dcfg.logit_mean, dcfg.logit_std, dcfg.t_shift)
    noise = {
      "keep": masking.token_keep_mask(r_mask, (b, model.num_image_tokens), dcfg.mask_ratio),
      "drop": jax.random.uniform(r_drop, (b,)) < dcfg.cond_dropout,
      "t": t,
      "z": jax.random.normal(r_noise, (b, *model.latent_shape), jnp.float32),
    }
    if sample_latent:
      r_latent = jax.random.fold_in(rng, latent_stream)
      noise["eps"] = jax.random.normal(r_latent, (b, *model.latent_shape), jnp.float32)
    return noise

  def given(trainable, frozen, batch, noise):
    """The loss of ``batch`` under the randomness ``noise`` (``draw``)."""
    cached = "vision" in batch  # data.sources.FeatureSample's batches: no encoder runs
    images = None if cached else batch["image"]
    if cached:
      vis = batch["vision"].astype(model.mllm.dtype)
    else:
      vis = iomm.vision_tokens(model, frozen["mllm"], batch.get("cond_image", images))
    keep, drop, t = noise["keep"], noise["drop"], noise["t"]
    vis = masking.mask_tokens(vis, keep)
    ids = jnp.where(drop[:, None], null_ids[None], batch["cond_ids"])
    valid = jnp.where(drop[:, None], null_valid[None], batch["cond_valid"])
    ctx, pooled = iomm.condition(model, trainable, frozen["mllm"], ids, valid, vis)
    eps = noise.get("eps")  # a posterior sample's noise (data.vae_latent "sample"), else None
    if cached:
      x = model.codec.latent_from_moments(batch["latent_mean"], batch.get("latent_std"), eps)
    elif eps is not None:
      moments = model.codec.moments(frozen["codec"], codec_lib.images_to_unit(images))
      x = model.codec.latent_from_moments(*moments, eps)
    else:
      x = model.codec.encode(frozen["codec"], codec_lib.images_to_unit(images))
    pair = flow.training_pair(x, noise["z"], t)
    gen = iomm.generator_params(trainable, frozen)  # + the frozen base weights under LoRA
    pred = iomm.velocity(model, gen, pair["x_t"], t, ctx, pooled)
    per_ex = flow.flow_matching_loss(pred, pair["target"])
    img_only = batch["is_image_only"].astype(jnp.float32)
    aux = {  # (numerator, denominator) pairs: finish_aux
      "loss_image_only": (jnp.sum(per_ex * img_only), img_only.sum()),
      "loss_pair": (jnp.sum(per_ex * (1 - img_only)), (1 - img_only).sum()),
      "image_only_share": jnp.mean(img_only),
      "kept_token_share": jnp.mean(keep.astype(jnp.float32)),
    }
    return jnp.mean(per_ex), aux

  def loss_fn(trainable, frozen, batch, rng):
    loss, aux = given(trainable, frozen, batch, draw(rng, batch))
    return loss, finish_aux(aux)

  # gradient accumulation draws the whole batch's randomness once (accumulated_value_and_grad)
  loss_fn.draw, loss_fn.given = draw, given
  return loss_fn
