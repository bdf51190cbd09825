"""Library functions of the generator stages (1: image-only pre-training, 2: mixed fine-tune).

With LoRA (``config.model.lora.rank`` > 0) the trainable state holds the adapters (+ RQA and
connector, + ``lora.trainable``'s base parameters) and ``frozen["generator"]`` the other base
weights, placed by their logical axes like the MLLM (``iomm.split_generator``); they are not
checkpointed but loaded from ``config.train.init_from`` at every start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from iomm_jax import checkpointing, inference, metrics, sharding
from iomm_jax.assembly import context, workdirs
from iomm_jax.configs import specs
from iomm_jax.data import pipeline, shapes, sources
from iomm_jax.models import iomm
from iomm_jax.train import cache, loop, steps


def _abstract_frozen_boxed(model: iomm.IOMM) -> dict[str, Any]:
  """Boxed abstract ``{"mllm", "codec"}`` parameters (logical axis names, no values), and with
  LoRA the frozen base weights of the generator (``"generator"``)."""
  mllm = jax.eval_shape(lambda: iomm.init_mllm(model, 0))
  codec = model.codec
  if hasattr(codec, "module"):  # the VAE: its Linen module carries the logical axis names
    f = codec.downsample
    x = jax.ShapeDtypeStruct((1, f, f, codec.config.in_channels), jnp.float32)
    codec_tree = jax.eval_shape(lambda x: codec.module.init(iomm.init_key(0), x)["params"], x)
  else:
    codec_tree = jax.eval_shape(lambda: codec.init_params(iomm.init_key(0), model.image_size))
  out = {"mllm": mllm, "codec": codec_tree}
  if model.generator.lora is not None:  # (no generator parameter depends on the prompt length)
    full = jax.eval_shape(lambda: iomm.init_trainable(model, 0, 1))
    out["generator"] = iomm.split_generator(model, full)[1]
  return out


def frozen_shardings(model: iomm.IOMM, mesh: Mesh, rules: sharding.Rules) -> dict[str, Any]:
  """Shardings of the frozen ``{"mllm", "codec"}`` parameters, by their logical axes."""
  boxed = _abstract_frozen_boxed(model)
  return {k: sharding.logical_shardings(v, mesh, rules) for k, v in boxed.items()}


def abstract_frozen(model: iomm.IOMM, shardings: dict[str, Any]) -> dict[str, Any]:
  """The frozen parameters as ``jax.ShapeDtypeStruct`` s placed by ``shardings`` (planning
  without weights: ``plan.py``)."""
  return sharding.abstract_target(_abstract_frozen_boxed(model), shardings)


def abstract_batch(
  model: iomm.IOMM, batch_size: int, cond_len: int, feature_dtype: str | None = None
) -> dict[str, Any]:
  """Shapes and dtypes of a generator batch (``pipeline.make_dataset``'s stage-1/2 batches); with
  ``feature_dtype``, of a batch of cached features stored in it (``config.data.features``)."""
  s, sds = model.image_size, jax.ShapeDtypeStruct
  if feature_dtype is None:
    inputs = {"image": sds((batch_size, s, s, 3), jnp.uint8)}
  else:
    arrays = cache.feature_specs(model, feature_dtype)
    inputs = {name: sds((batch_size, *shape), jnp.dtype(dt)) for name, shape, dt in arrays}
  return {
    **inputs,
    "cond_ids": sds((batch_size, cond_len), jnp.int32),
    "cond_valid": sds((batch_size, cond_len), jnp.bool_),
    "is_image_only": sds((batch_size,), jnp.bool_),
  }


def init_fn(model: iomm.IOMM, config: ml_collections.ConfigDict, cond_len: int) -> Callable:
  """The boxed initialiser of the trainable parameters (adapter, connector, generator; with LoRA
  only the generator's trainable part, ``iomm.split_generator``)."""
  return lambda: iomm.split_generator(model, iomm.init_trainable(model, config.seed, cond_len))[0]


def make_step(
  spec: specs.RunSpec, model: iomm.IOMM, null_ids: Any, null_valid: Any
) -> tuple[Any, Callable]:
  """(optimizer, pure ``train_step``) of a generator stage: the rectified-flow loss under masked
  self-conditioning (``steps.generator_loss_fn``) with ``config.optim`` / ``config.train``; jit it
  with ``sharding.jit_step``."""
  loss_fn = steps.generator_loss_fn(model, spec, jnp.asarray(null_ids), jnp.asarray(null_valid))
  return loop.make_train_step(loss_fn, spec, spec.train.num_steps)


def setup(
  config: ml_collections.ConfigDict,
  workdir: str,
  from_init: bool = False,
  sample_kind: str = "text",
) -> loop.Run:
  """Everything the step loop needs for a generator stage, restored or initialised, sharded over
  the mesh of ``config.sharding`` (trainable state and frozen MLLM / codec alike).

  ``from_init``: a fresh start takes ``context.initial_trainable`` (``config.train.init_from``:
  a stage-1 workdir or a FLUX-format directory) instead of the init. With LoRA the base weights
  are frozen and come from there (or, without ``from_init``, from the seeded init) at every
  start, resumes included; the checkpoints' metadata record the source (``init_from``)."""
  workdirs.prepare_workdir(config, workdir)
  spec = specs.from_config(config)  # what the model, data, loss and sampler read
  mesh, rules = workdirs.mesh_and_rules(config)
  if config.model.mllm_init != "checkpoint":  # trained once, by process 0 (build then loads it)
    context.ensure_tokenizer(config, workdir)
  with sharding.placing_on(mesh, rules):  # a stage-0 MLLM restores straight into its shards
    ctx = context.build(config, workdir)
  frozen_sh = frozen_shardings(ctx.model, mesh, rules)
  cond_len = ctx.conditioner.cond_len
  record: dict[str, Any] = {}

  def initial() -> tuple[Any, Any]:
    """(trainable, frozen generator) of ``context.initial_trainable``; records its source."""
    with sharding.placing_on(mesh, rules):  # loaded straight into the parameters' shards
      full, rec = context.initial_trainable(config, ctx.model, cond_len)
    record.update(rec or {})
    return iomm.split_generator(ctx.model, full)

  init_from = (lambda boxed: initial()[0]) if from_init else None  # a fresh start only
  if ctx.model.generator.lora is not None:  # the frozen base weights: at every start
    trainable0, frozen_generator = initial()
    ctx = dataclasses.replace(ctx, frozen={**ctx.frozen, "generator": frozen_generator})
    init_from = lambda boxed: trainable0
  ctx = dataclasses.replace(ctx, frozen=sharding.place(ctx.frozen, frozen_sh))
  if config.data.features:  # encoded by this run's frozen encoders? (else an error naming both)
    cache.check_run(config, ctx.model, ctx.frozen)
  data_iter = iter(pipeline.make_dataset(spec, ctx.conditioner))
  # own data: the held-out records are read (or refused) before training, not after it
  grid = grid_material(spec, sample_kind) if spec.sample.num_grid else None
  optimizer, step = make_step(spec, ctx.model, *ctx.conditioner.null_condition())
  state, state_sh, ckpt, start = loop.restore_or_init(
    config,
    workdir,
    init_fn(ctx.model, config, cond_len),
    optimizer,
    data_iter,
    mesh,
    rules,
    init_from=init_from,
  )
  meta = {"stage": config.stage, "model": checkpointing.model_signature(config)}
  if record:
    meta["init_from"] = record
  return loop.Run(
    config,
    workdir,
    state,
    ctx.frozen,
    data_iter,
    sharding.jit_step(step, mesh, rules, state_sh, frozen_sh),
    ckpt,
    meta,
    sample_fn=(
      (lambda s: sample_grid(ctx, spec, s, sample_kind, grid)) if spec.sample.num_grid else None
    ),
    start_step=start,
    mesh=mesh,
  )


def grid_prompts(spec: specs.RunSpec) -> list[str]:
  """``config.sample.num_grid`` held-out evaluation prompts: the shapes world's, spread over the
  categories, or (own data) the captions of the first captioned held-out records."""
  if spec.data.source != "shapes":  # (training records when none are held out)
    return [c for _, c in sources.heldout(spec, spec.sample.num_grid, or_training=True)]
  metas = shapes.eval_prompts(pipeline.shapes_world(spec.data), per_category=None)
  by_cat: dict[str, list[str]] = {}
  for m in metas:
    by_cat.setdefault(m["tag"], []).append(m["prompt"])
  cats = [c for c in shapes.CATEGORIES if c in by_cat]
  return [by_cat[cats[i % len(cats)]][i // len(cats)] for i in range(spec.sample.num_grid)]


def _what(spec: specs.RunSpec) -> str:
  """What the grid's prompts are: held-out ones, or (own data, none held out) training ones."""
  if spec.data.source == "shapes" or spec.data.holdout_records:
    return "held-out prompts"
  return "training captions (config.data.holdout_records=0)"


def grid_sources(spec: specs.RunSpec) -> np.ndarray:
  """uint8 [N, S, S, 3] source images of the stage-1 grid: ``config.sample.num_grid`` fresh
  shapes scenes, or (own data) held-out records' images."""
  if spec.data.source != "shapes":
    held = sources.heldout(spec, spec.sample.num_grid, captioned=False, or_training=True)
    return np.stack([image for image, _ in held])
  world = pipeline.shapes_world(spec.data)
  return np.stack(
    [
      shapes.render(shapes.sample_scene(np.random.default_rng((7, i)), world), world)
      for i in range(spec.sample.num_grid)
    ]
  )


def grid_material(spec: specs.RunSpec, kind: str) -> list[str] | np.ndarray:
  """What the grid of ``kind`` shows: prompts ("text") or source images ("image")."""
  return grid_prompts(spec) if kind == "text" else grid_sources(spec)


def sample_grid(
  ctx: context.GenerationContext,
  spec: specs.RunSpec,
  state: steps.TrainState,
  kind: str,
  material: list[str] | np.ndarray | None = None,
) -> np.ndarray:
  """A PNG-ready grid: one row per held-out prompt, labelled with it ("text"), or, for
  "image", each row a source image (the column headed "source") followed by generations from
  its masked self-condition. ``material``: ``grid_material`` (read here if not given)."""
  s = spec.sample
  params = steps.ema_params(state) if s.use_ema else state.params
  seed = spec.seed + 99
  if material is None:
    material = grid_material(spec, kind)
  if kind == "text":
    names = list(material)
    prompts = [p for p in names for _ in range(s.per_prompt)]
    imgs = inference.sample_prompts(s, ctx, params, prompts, seed=seed)
    rows = [(p, list(imgs[i * s.per_prompt : (i + 1) * s.per_prompt]), None) for i, p in
            enumerate(names)]  # fmt: skip
    return metrics.labelled_grid(rows, legend=f"step {int(state.step)}: {_what(spec)}")
  src = np.asarray(material)
  cond = np.repeat(src, s.per_prompt, axis=0)
  ids, valid = ctx.conditioner.image_condition()
  ids, valid = np.tile(ids, (len(cond), 1)), np.tile(valid, (len(cond), 1))
  r = spec.diffusion.mask_ratio
  imgs = inference.sample(s, ctx, params, ids, valid, seed, images=cond, mask_ratio=r)
  imgs = imgs.reshape(len(src), s.per_prompt, *imgs.shape[1:])
  label = {"shapes": "scene"}.get(spec.data.source, _what(spec).split(" ")[0] + " image")
  rows = [(f"{label} {i}", [src[i], *imgs[i]], None) for i in range(len(src))]
  header = ["source"] + [f"sample {k + 1}" for k in range(s.per_prompt)]
  legend = (
    f"step {int(state.step)}: source image, then samples conditioned on it with "
    f"{r:.0%} of its vision tokens masked"
  )
  return metrics.labelled_grid(rows, header=header, legend=legend)
