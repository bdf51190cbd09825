"""The IOMM model as pure functions over explicit parameter trees.

Data flow of one conditioned velocity prediction (paper Fig. 2a):

  cond ids [B, L] --embed (frozen)--> [B, L, D]          image [B, H, W, 3]
                                        ^                    | ViT + projector (frozen)
                                        | scatter at <IMG_CONTEXT>, masked tokens zeroed
  RQA(embeds, valid) -> queries [B, Q, D]  (trainable)
  MLLM decoder (frozen) over [embeds ; queries] -> hidden at the Q query positions
  Connector (trainable) -> context [B, Q, C]; pooled = mean over Q
  MM-DiT (trainable)(x_t tokens, context, pooled, t) -> velocity

Parameters live in two trees: ``trainable = {"adapter", "connector", "generator"}`` (differentiated
and optimised) and ``frozen = {"mllm", "codec"}`` (never differentiated, no optimizer state).
With LoRA (``spec.model.lora.rank`` > 0) the generator is split between them:
``trainable["generator"]`` holds the adapters' ``lora_a`` / ``lora_b`` (and the base parameters
``LoRAConfig.trainable`` names), ``frozen["generator"]`` every other base weight
(``split_generator``); ``generator_params`` joins the two for the forward pass.

Alphabet: B batch, L condition tokens, Q queries, P image tokens, D MLLM width, C context width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iomm_jax.configs import specs
from iomm_jax.diffusion import flow
from iomm_jax.models import adapter as adapter_lib
from iomm_jax.models import codec as codec_lib
from iomm_jax.models import mllm as mllm_lib
from iomm_jax.models import mmdit as mmdit_lib

# ImageNet statistics used by InternViT's preprocessing.
VIT_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
VIT_STD = np.array([0.229, 0.224, 0.225], np.float32)
# How the generator's condition is read off the frozen MLLM (paper §4.3's ablation):
#   "rqa": Residual Query Adapter queries appended to the input (the paper's method);
#   "queries": input-independent learned queries (MetaQuery style);
#   "raw": no queries: the MLLM's last hidden states of the input tokens themselves.
CONDITIONS = ("rqa", "queries", "raw")
POOLED = ("mean", "none")  # config.model.pooled: the generator's pooled vector


class LearnedQueries(nn.Module):
  """Input-independent learned queries (MetaQuery style); same interface as the RQA."""

  num_queries: int
  width: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, embeds: jax.Array, valid: jax.Array) -> jax.Array:
    del valid
    init = nn.initializers.normal(stddev=self.width**-0.5)
    q = self.param(
      "queries",
      nn.with_logical_partitioning(init, ("queries", "embed")),
      (self.num_queries, self.width),
      self.param_dtype,
    )
    return jnp.broadcast_to(q.astype(embeds.dtype), (embeds.shape[0], *q.shape))


@dataclasses.dataclass(frozen=True)
class IOMM:
  """The static half of the model: Linen modules and sizes, no parameters."""

  mllm: mllm_lib.InternVLModel
  adapter: nn.Module | None  # None: condition "raw" (no queries, no adapter parameters)
  connector: adapter_lib.Connector
  generator: mmdit_lib.MMDiT
  codec: Any
  image_size: int
  num_queries: int
  prediction: str = "velocity"  # the generator outputs the velocity or the clean x (flow.py)
  x_pred_t_min: float = 0.05  # with prediction "x": the smallest t the velocity divides by
  pooled: str = "mean"  # the generator's pooled vector: mean of the context, or "none" (zeros)

  @property
  def mllm_config(self) -> mllm_lib.MLLMConfig:
    return self.mllm.config

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return tuple(self.codec.latent_shape(self.image_size, self.image_size))

  @property
  def num_image_tokens(self) -> int:
    """Number of MLLM image tokens per condition image (after pixel shuffle)."""
    return self.mllm_config.num_image_tokens


def _dtype(name: str):
  return jnp.dtype(name)


def build(
  m: specs.ModelSpec,
  vocab_size: int,
  image_token_id: int,
  mllm_config: mllm_lib.MLLMConfig | None = None,
) -> IOMM:
  """Builds the modules of the model spec ``m`` (``specs.from_config(config).model``) for a
  tokenizer of ``vocab_size`` ids whose image-context placeholder is ``image_token_id``.

  ``mllm_config``: the frozen MLLM's config as given (an imported checkpoint's, used with
  ``config.model.mllm = "from_checkpoint"``) instead of the ``m.mllm`` variant.
  """
  if m.condition not in CONDITIONS:
    raise ValueError(f"config.model.condition={m.condition!r} unknown; choose from {CONDITIONS}")
  mcfg = mllm_config or mllm_lib.get_mllm_config(
    m.mllm, vocab_size=vocab_size, image_token_id=image_token_id
  )
  width = mcfg.text.width
  codec = codec_lib.make_codec(
    m.codec, **({"factor": m.codec_factor} if m.codec == "pixel" else {"variant": m.vae})
  )
  sized = mmdit_lib.parse_overrides(m.generator_overrides)
  gcfg = mmdit_lib.get_mmdit_config(m.generator, **sized)
  gcfg = mmdit_lib.get_mmdit_config(
    m.generator,
    **sized,
    in_channels=codec.latent_channels * gcfg.latent_patch**2,
    attention=m.attention,
    remat=m.remat,
  )
  if m.pooled not in POOLED:
    raise ValueError(f"config.model.pooled={m.pooled!r} unknown; choose from {POOLED}")
  if gcfg.attention == "cudnn" and m.dtype not in ("bfloat16", "float16"):
    raise ValueError(
      f"config.model.attention='cudnn' needs config.model.dtype bfloat16 or float16, "
      f"got {m.dtype!r}"
    )
  kw = dict(dtype=_dtype(m.dtype), param_dtype=_dtype(m.param_dtype))
  if m.condition == "rqa":
    acfg = adapter_lib.AdapterConfig(
      width=width,
      num_queries=m.num_queries,
      num_heads=m.adapter_heads,
      num_layers=m.adapter_layers,
      mlp_ratio=m.adapter_mlp_ratio,
      remat=m.remat,
    )
    adapter = adapter_lib.ResidualQueryAdapter(acfg, **kw)
  elif m.condition == "queries":
    adapter = LearnedQueries(m.num_queries, width, param_dtype=kw["param_dtype"])
  else:
    adapter = None
  ccfg = adapter_lib.ConnectorConfig(
    kind=m.connector,
    width_out=gcfg.joint_attention_dim,
    num_layers=m.connector_layers,
    num_heads=m.connector_heads,
  )
  if gcfg.pooled_projection_dim != gcfg.joint_attention_dim:
    raise ValueError(
      "generator pooled_projection_dim must equal joint_attention_dim: the pooled "
      "condition is the mean of the context tokens"
    )
  mdt = _dtype(m.mllm_dtype)
  if m.prediction not in flow.PREDICTIONS:
    raise ValueError(
      f"config.model.prediction={m.prediction!r} unknown; choose from {flow.PREDICTIONS}"
    )
  return IOMM(
    mllm=mllm_lib.InternVLModel(mcfg, dtype=mdt, param_dtype=mdt, remat=m.remat),
    adapter=adapter,
    connector=adapter_lib.Connector(ccfg, **kw),
    generator=mmdit_lib.MMDiT(gcfg, lora=lora_config(m.lora), **kw),
    codec=codec,
    image_size=m.image_size,
    num_queries=m.num_queries,
    prediction=m.prediction,
    x_pred_t_min=m.x_pred_t_min,
    pooled=m.pooled,
  )


def lora_config(lora: specs.LoRASpec) -> mmdit_lib.LoRAConfig | None:
  """The generator's ``LoRAConfig`` of the spec ``lora`` (``config.model.lora``); None with
  rank 0."""
  if lora.rank == 0:
    return None
  return mmdit_lib.LoRAConfig(
    rank=lora.rank, alpha=lora.alpha, targets=lora.targets, trainable=lora.trainable
  )


# ----------------------------------------------------------------------------- initialisation


def init_key(seed: int) -> jax.Array:
  """PRNG key for parameter initialisation. The "rbg" generator compiles ~4x faster than
  threefry on XLA's CPU backend, which matters for the many parameter shapes of an init."""
  return jax.random.key(seed, impl="rbg")


def init_trainable(model: IOMM, seed: int, cond_len: int) -> dict[str, Any]:
  """Boxed (logically annotated) parameters of the adapter, connector and generator."""
  r_a, r_c, r_g = jax.random.split(init_key(seed), 3)
  d = model.mllm_config.text.width
  embeds = jnp.zeros((1, cond_len, d), jnp.float32)
  valid = jnp.ones((1, cond_len), bool)
  h, w, c = model.latent_shape
  tokens = mmdit_lib.pack_latents(jnp.zeros((1, h, w, c)), model.generator.config.latent_patch)
  gp = model.generator.config.latent_patch
  ctx_w = model.generator.config.joint_attention_dim
  adapter = {} if model.adapter is None else {"adapter": model.adapter.init(r_a, embeds, valid)}
  return {
    **{k: v["params"] for k, v in adapter.items()},
    "connector": model.connector.init(r_c, jnp.zeros((1, model.num_queries, d)))["params"],
    "generator": model.generator.init(
      r_g,
      tokens,
      mmdit_lib.image_ids(1, h // gp, w // gp),
      jnp.zeros((1, model.num_queries, ctx_w)),
      mmdit_lib.text_ids(1, model.num_queries),
      jnp.zeros((1, ctx_w)),
      jnp.zeros((1,)),
    )["params"],
  }


def _trains(path: tuple[str, ...], lora: mmdit_lib.LoRAConfig) -> bool:
  """Whether the generator parameter at ``path`` trains under ``lora``."""
  joined = "/".join(path)
  return path[-1] in mmdit_lib.LORA_LEAVES or any(
    joined == p or joined.startswith(p.rstrip("/") + "/") for p in lora.trainable
  )


def split_generator(model: IOMM, trainable: dict[str, Any]) -> tuple[dict[str, Any], Any]:
  """(trainable tree, frozen generator tree) of a full trainable tree (``init_trainable``'s, or
  loaded), boxed or not: with LoRA, ``trainable["generator"]`` keeps the LoRA leaves and the
  base parameters ``LoRAConfig.trainable`` names, and the other base weights move to the
  second tree (for ``frozen["generator"]``); without LoRA the tree is returned whole with None.

  A ``trainable`` prefix that names no generator parameter is a ValueError naming it.
  """
  lora = model.generator.lora
  if lora is None:
    return trainable, None
  paths: list[tuple[str, ...]] = []

  def split(node: Any, path: tuple[str, ...]) -> tuple[Any, Any]:
    """(trained part, frozen part) of the subtree ``node`` at ``path``."""
    if not isinstance(node, dict):
      paths.append(path)
      return (node, None) if _trains(path, lora) else (None, node)
    parts = {k: split(v, (*path, k)) for k, v in node.items()}
    empty = lambda x: x is None or (isinstance(x, dict) and not x)
    keep = {k: a for k, (a, _) in parts.items() if not empty(a)}
    rest = {k: b for k, (_, b) in parts.items() if not empty(b)}
    return keep, rest

  train_gen, frozen_gen = split(trainable["generator"], ())
  joined = ["/".join(p) for p in paths]
  for prefix in lora.trainable:
    p = prefix.rstrip("/")
    if not any(j == p or j.startswith(p + "/") for j in joined):
      raise ValueError(
        f"config.model.lora.trainable: {prefix!r} names no generator parameter (paths are "
        f"'/'-joined, e.g. 'context_embedder' or 'time_text_embed/text_embedder')"
      )
  return {**trainable, "generator": train_gen}, frozen_gen


def _merge(a: Any, b: Any) -> Any:
  """Nested dicts ``a`` and ``b`` joined (disjoint leaves)."""
  if not isinstance(a, dict) or not isinstance(b, dict):
    raise ValueError("generator parameters are both trainable and frozen")
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(a[k], v) if k in a else v
  return out


def generator_params(trainable: dict[str, Any], frozen: dict[str, Any] | None) -> Any:
  """The generator's whole parameter tree: ``trainable["generator"]``, joined with the frozen
  base weights ``frozen["generator"]`` when LoRA put them there (``split_generator``)."""
  base = None if frozen is None else frozen.get("generator")
  if base is None:
    return trainable["generator"]
  return _merge(trainable["generator"], base)


def init_mllm(model: IOMM, seed: int) -> Any:
  """Boxed parameters of the whole MLLM (vision tower, projector, decoder, LM head)."""
  rng = init_key(seed)
  s = model.mllm_config.vision.image_size
  ids = jnp.zeros((1, model.num_image_tokens + 4), jnp.int32)
  return jax.jit(model.mllm.init)(rng, ids, jnp.zeros((1, s, s, 3)))["params"]


# ----------------------------------------------------------------------------- the forward pass


def vit_input(images: jax.Array, image_size: int) -> jax.Array:
  """uint8 or [-1, 1] images [B, H, W, 3] -> normalised ViT input at ``image_size``: scaled to
  [0, 1], resized bilinearly with antialiasing if needed, ImageNet mean / std."""
  images = jnp.asarray(images)
  x = images.astype(jnp.float32)
  x = x / 255.0 if images.dtype == jnp.uint8 else (x + 1.0) / 2.0
  if x.shape[1:3] != (image_size, image_size):
    shape = (x.shape[0], image_size, image_size, 3)
    x = jax.image.resize(x, shape, "bilinear", antialias=True)
  return (x - VIT_MEAN) / VIT_STD


def vit_pixels(model: IOMM, images: jax.Array) -> jax.Array:
  """``vit_input`` at the MLLM's resolution."""
  return vit_input(images, model.mllm_config.vision.image_size)


def vision_tokens(model: IOMM, mllm_params: Any, images: jax.Array) -> jax.Array:
  """Frozen MLLM image tokens [B, P, D] (ViT + pixel shuffle + projector), no gradient."""
  toks = model.mllm.apply(
    {"params": mllm_params}, vit_pixels(model, images), method=mllm_lib.InternVLModel.encode_images
  )
  return jax.lax.stop_gradient(toks)


def merge_image_tokens_per_row(
  embeds: jax.Array, ids: jax.Array, image_tokens: jax.Array, image_token_id: int
) -> jax.Array:
  """Row b's j-th image-context placeholder takes ``image_tokens[b, j]``.

  Unlike transformers' ``masked_scatter`` (``mllm.merge_image_tokens``), which fills placeholders
  in order over the whole flattened batch, this keeps each sample's image in its own row, so a
  batch may mix image-conditioned and text-only rows (stage 2).
  embeds [B, L, D], ids [B, L], image_tokens [B, P, D] -> [B, L, D].
  """
  is_image = ids == image_token_id
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_tokens.shape[1] - 1)
  gathered = jnp.take_along_axis(image_tokens.astype(embeds.dtype), index[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered, embeds)


def query_attention(valid: jax.Array, num_queries: int) -> tuple[jax.Array, jax.Array]:
  """Mask and positions for the MLLM sequence [prompt (L, right-padded) ; queries (Q)].

  Prompt tokens attend causally to valid prompt tokens and never to the queries; queries attend
  to every valid prompt token and to all queries (paper Fig. 2a's "MLLM Attn. Mask").
  Returns mask [B, 1, L+Q, L+Q] bool and positions [B, L+Q] int32 (queries continue after the
  last valid prompt token).
  """
  b, l = valid.shape
  n = l + num_queries
  key_valid = jnp.concatenate([valid, jnp.ones((b, num_queries), bool)], axis=1)
  i = jnp.arange(n)[:, None]
  j = jnp.arange(n)[None, :]
  allowed = jnp.where(i < l, (j <= i), True)  # causal in the prompt, full for the queries
  mask = allowed[None, None] & key_valid[:, None, None, :]
  length = valid.sum(axis=1, keepdims=True).astype(jnp.int32)
  pos = jnp.concatenate(
    [
      jnp.cumsum(valid, axis=1).astype(jnp.int32) - 1,
      length + jnp.arange(num_queries, dtype=jnp.int32)[None],
    ],
    axis=1,
  )
  return mask, jnp.maximum(pos, 0)


def condition(
  model: IOMM,
  trainable: Any,
  mllm_params: Any,
  cond_ids: jax.Array,
  cond_valid: jax.Array,
  image_tokens: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
  """Generator condition from a prompt (and its possibly masked image tokens).

  Args:
    cond_ids: [B, L] ids; positions holding the image-context id receive ``image_tokens``.
    cond_valid: [B, L] key padding mask (True = real token).
    image_tokens: [B, P, D] already masked, or None for text-only batches.
  Returns:
    context [B, Q, C] and pooled [B, C]; with ``model.adapter`` None ("raw"), context [B, L, C]
    from every input position, padding positions zeroed, and pooled the mean of the valid ones.
  """
  apply_m = lambda method, *a: model.mllm.apply({"params": mllm_params}, *a, method=method)
  embeds = apply_m(mllm_lib.InternVLModel.embed, cond_ids)
  if image_tokens is not None:
    embeds = merge_image_tokens_per_row(
      embeds, cond_ids, image_tokens, model.mllm_config.image_token_id
    )
  if model.adapter is None:
    mask, pos = query_attention(cond_valid, 0)
    hidden = apply_m(mllm_lib.InternVLModel.decode, embeds, pos, mask)
    keep = cond_valid[..., None]
    ctx = model.connector.apply({"params": trainable["connector"]}, hidden) * keep.astype(
      hidden.dtype
    )
    pooled = jnp.sum(ctx.astype(jnp.float32), axis=1) / jnp.maximum(keep.sum(axis=1), 1)
    return ctx, pooled.astype(ctx.dtype) * (model.pooled != "none")
  queries = model.adapter.apply({"params": trainable["adapter"]}, embeds, cond_valid)
  seq = jnp.concatenate([embeds, queries.astype(embeds.dtype)], axis=1)
  mask, pos = query_attention(cond_valid, queries.shape[1])
  hidden = apply_m(mllm_lib.InternVLModel.decode, seq, pos, mask)
  ctx = model.connector.apply({"params": trainable["connector"]}, hidden[:, -queries.shape[1] :])
  pooled = jnp.mean(ctx.astype(jnp.float32), axis=1).astype(ctx.dtype)
  # "none" (ablation): the generator's global vector carries no condition
  return ctx, pooled * (model.pooled != "none")


def velocity(
  model: IOMM,
  generator_params: Any,
  x_t: jax.Array,
  t: jax.Array,
  ctx: jax.Array,
  pooled: jax.Array,
) -> jax.Array:
  """Predicted velocity for latents x_t [B, h, w, c] at times t [B]; returns [B, h, w, c] f32
  (with ``model.prediction`` "x" the generator's output is the clean sample, converted by
  ``flow.velocity_from_output``)."""
  b, h, w, _ = x_t.shape
  p = model.generator.config.latent_patch
  out = model.generator.apply(
    {"params": generator_params},
    mmdit_lib.pack_latents(x_t, p),
    mmdit_lib.image_ids(b, h // p, w // p),
    ctx,
    mmdit_lib.text_ids(b, ctx.shape[1]),
    pooled,
    t,
  )
  out = mmdit_lib.unpack_latents(out.astype(jnp.float32), h, w, p)
  return flow.velocity_from_output(out, x_t, t, model.prediction, model.x_pred_t_min)
