"""Loading a trained generator workdir and sampling it (shared by iomm-sample, iomm-eval and
iomm-demo).

With a ``mesh`` (``sharding.sampling_mesh()``: every device of every process) the parameters
are loaded replicated onto it and ``sample`` gives each device its own ``batch_size`` rows per
call (``generate.generate``), with images byte-identical to a one-device run's.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from iomm_jax import generate, sharding
from iomm_jax.assembly import context, workdirs
from iomm_jax.configs import specs
from iomm_jax.models import iomm


def load_generator(
  workdir: str,
  use_ema: bool = True,
  step: int | None = None,
  max_text_len: int | None = None,
  mesh: Mesh | None = None,
):
  """(config, GenerationContext, trainable params) of a trained generator workdir, at its
  checkpoint ``step`` (default: the latest); a LoRA run's frozen base generator weights (from
  its ``config.train.init_from``) are ``ctx.frozen["generator"]``. ``max_text_len`` raises the
  prompt token limit the run was trained with (long benchmark prompts; no parameter depends on
  it). With ``mesh``, every parameter (trainable and frozen) is replicated on all of its devices
  (checkpoints are restored straight into place); else it is on this process's first device."""
  config = workdirs.load_workdir_config(workdir)
  if max_text_len is not None:
    if max_text_len < 1:
      raise ValueError(f"max_text_len must be >= 1, got {max_text_len}")
    config.model.max_text_len = max_text_len
  if config.stage not in ("pretrain", "finetune"):
    raise ValueError(
      f"{workdir!r} is a {config.stage!r} run; sample from a stage-1 or stage-2 workdir"
    )
  # no rules: every logical axis maps to no mesh axis, i.e. each array is replicated
  with sharding.placing_on(mesh, ()) if mesh is not None else contextlib.nullcontext():
    ctx = context.build(config)
    cond_len = ctx.conditioner.cond_len
    full = jax.eval_shape(lambda: iomm.init_trainable(ctx.model, 0, cond_len))
    boxed = iomm.split_generator(ctx.model, full)[0]  # with LoRA: the adapters' part only
    which = "ema" if use_ema else "params"
    params = context.restore_params(workdir, boxed, which=which, step=step)
    if ctx.model.generator.lora is not None:  # its frozen base: from config.train.init_from
      full = context.initial_trainable(config, ctx.model, cond_len)[0]
      ctx.frozen = {**ctx.frozen, "generator": iomm.split_generator(ctx.model, full)[1]}
  if mesh is not None:  # seeded inits and imported weights were made on one device
    rep = sharding.replicated(mesh)
    ctx.frozen = sharding.place(ctx.frozen, jax.tree.map(lambda _: rep, ctx.frozen))
  return config, ctx, params


def sample(
  sampler: specs.SampleSpec,
  ctx,
  params,
  ids: np.ndarray,
  valid: np.ndarray,
  seed: int | jax.Array,
  steps: int | None = None,
  cfg: float | None = None,
  solver: str | None = None,
  batch_size: int = 32,
  mesh: Mesh | None = None,
  **condition,
) -> np.ndarray:
  """uint8 images, one per condition row, with the ``sampler`` spec's settings (the run's
  ``config.sample``: ``specs.from_config(config).sample``) unless overridden;
  ``condition`` may add ``images`` and ``mask_ratio`` (image-conditioned rows). ``seed``: an int,
  or one PRNG key per row (``generate.generate``'s per-row noise). ``batch_size`` rows per call
  on each device; ``mesh``: the devices to split the calls over (``generate.generate``)."""
  sampler = dataclasses.replace(
    sampler,
    num_steps=steps or sampler.num_steps,
    solver=solver or sampler.solver,
    cfg_scale=sampler.cfg_scale if cfg is None else float(cfg),
  )
  null_ids, null_valid = ctx.conditioner.null_condition()
  return generate.generate(
    ctx.model, params, ctx.frozen, ids, valid, null_ids, null_valid,
    jax.random.key(seed) if isinstance(seed, int) else seed, sampler,
    batch_size=batch_size, mesh=mesh, **condition,
  )  # fmt: skip


def sample_prompts(
  sampler: specs.SampleSpec, ctx, params, prompts: list[str], seed: int | jax.Array, **kw
) -> np.ndarray:
  """uint8 [len(prompts), H, W, 3] images, one per text prompt (``kw`` as in ``sample``)."""
  ids, valid = ctx.conditioner.text_conditions(prompts)
  return sample(sampler, ctx, params, ids, valid, seed, **kw)
