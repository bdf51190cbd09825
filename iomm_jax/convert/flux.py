"""The trained generator in PyTorch layouts: the MM-DiT as a diffusers ``FluxTransformer2DModel``
checkpoint, and the adapter and connector as safetensors of ``iomm_jax.convert.torch_port`` modules.

numpy, jax and flax only (no torch): the files written here load in PyTorch with
``FluxTransformer2DModel.from_pretrained`` and ``torch_port.load_adapter`` / ``load_connector``.

Exported directory (``export_generator``)::

  out_dir/
    iomm.json                                  what the torch side needs (``export_trainable``)
    adapter.safetensors                        RQA or learned queries (absent for condition "raw")
    connector.safetensors                      connector
    transformer/config.json                    FluxTransformer2DModel config (``diffusers_config``)
    transformer/diffusion_pytorch_model.safetensors
    mllm/, vae/                                with ``frozen``: the MLLM and the VAE (codec "vae")

Name tables (``tensors.Table``: our path -> the torch state-dict key and its hook, so torch loads
the files with ``load_state_dict``); export and both imports read the same table:

* transformer (``transformer_table``; ``transformer_key``): the Flax path joined with ``.``; a
  segment ``<list>_<i>`` whose ``<list>`` is one of the ``ModuleList`` names of
  ``TRANSFORMER_LISTS`` becomes ``<list>.<i>``, every other segment is kept (``linear_1`` stays
  ``linear_1``); leaf ``kernel`` -> ``weight``, RMSNorm ``scale`` -> ``weight``, ``bias`` ->
  ``bias``. e.g. (ours -> diffusers)
    ``transformer_blocks_0/attn/to_out_0/kernel`` -> ``transformer_blocks.0.attn.to_out.0.weight``
    ``transformer_blocks_3/ff/net_0/proj/bias`` -> ``transformer_blocks.3.ff.net.0.proj.bias``
    ``time_text_embed/timestep_embedder/linear_1/kernel``
      -> ``time_text_embed.timestep_embedder.linear_1.weight``
    ``single_transformer_blocks_7/attn/norm_q/scale``
      -> ``single_transformer_blocks.7.attn.norm_q.weight``
  Parameter-free norms (``norm2``, ``norm2_context``, the LayerNorms inside adaLN) have no keys.
* adapter / connector (``part_table``): the same with every ``<name>_<i>`` segment a ModuleList
  entry (``blocks_0/attn/q_proj/kernel`` -> ``blocks.0.attn.q_proj.weight``, ``queries`` ->
  ``queries``, ``blocks_1/norm1/scale`` -> ``blocks.1.norm1.weight``).

Hooks: every Dense ``kernel`` (in, out) is stored transposed (``tensors.TRANSPOSE``), as torch's
``nn.Linear.weight`` (out, in); nothing else is. Arrays are written in float32 unless ``dtype``
says otherwise.

A trained workdir (stage 1 or 2) exports with::

  config, ctx, params = inference.load_generator(workdir)
  flux.export_generator(ctx.model, params, out_dir, frozen=ctx.frozen)

Imports read safetensors only and check every tensor with ``tensors.check_keys`` against the
table, so a missing, unexpected or mis-shaped tensor is named as it appears in the file, with both
shapes (torch orientation and ours).

The transformer has two readers over one path (``_read``: the table, ``tensors.check_keys``, a
lazily opened ``tensors.Source``): ``import_transformer`` reads a directory into the config of
its own ``config.json``; ``read_transformer_init`` (``config.train.init_from`` = a diffusers
``FluxTransformer2DModel`` directory, or a pipeline directory holding one under ``transformer/``)
reads it into *our* generator config, strict: every key of the file is used and every parameter
of ours is filled, except the condition-input kernels of ``REINITIALISABLE`` when only their
input width differs (ours reads the connector's output, the checkpoint a text encoder's); those
keep our init and are listed (``TransformerInit.reinitialised``). Tensors are read one at a time
(``TransformerInit.array``), so a 12 B checkpoint never sits in host memory whole.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iomm_jax import dtypes
from iomm_jax.convert import tensors
from iomm_jax.convert.tensors import ConversionError
from iomm_jax.models import adapter as adapter_lib
from iomm_jax.models import codec as codec_lib
from iomm_jax.models import mmdit as mmdit_lib

CLASS_NAME = "FluxTransformer2DModel"
TRANSFORMER_DIR = "transformer"
MLLM_DIR = "mllm"  # transformers InternVLForConditionalGeneration (export_generator with frozen)
VAE_DIR = "vae"  # diffusers AutoencoderKL (export_generator with frozen, codec "vae")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
META_NAME = "iomm.json"
ADAPTER_FILE = "adapter.safetensors"
CONNECTOR_FILE = "connector.safetensors"
FORMAT = "iomm_jax.generator/1"
# Our MMDiTConfig fields that diffusers' FluxTransformer2DModel.__init__ takes, in its order.
DIFFUSERS_FIELDS = (
  "patch_size",
  "in_channels",
  "out_channels",
  "num_layers",
  "num_single_layers",
  "attention_head_dim",
  "num_attention_heads",
  "joint_attention_dim",
  "pooled_projection_dim",
  "guidance_embeds",
  "axes_dims_rope",
)
# Ours, in config.json under a private key (diffusers drops ``_*`` keys when it builds the model).
LATENT_PATCH_KEY = "_iomm_latent_patch"
DIFFUSERS_MLP_RATIO = 4.0  # FluxTransformerBlock / FluxSingleTransformerBlock default, not a field
# The torch ModuleList names of FluxTransformer2DModel (``<list>_<i>`` is ``<list>.<i>`` there).
TRANSFORMER_LISTS = ("transformer_blocks", "single_transformer_blocks", "to_out", "net")

Params = Any


# ----------------------------------------------------------------------------- name tables


def _numpy_tree(params: Params) -> dict[str, np.ndarray]:
  """Unboxed, flattened ('/'-joined) numpy copy of a parameter tree."""
  return {k: np.asarray(v) for k, v in tensors.flatten(nn.meta.unbox(params)).items()}


def _check_tree(params: Params, template: Params, what: str) -> dict[str, np.ndarray]:
  """Flat numpy params, after checking them against ``template`` (names and shapes)."""
  flat = _numpy_tree(params)
  tensors.match(template, flat, what)
  return flat


def _torch_row(key: Callable[[str], str]) -> Callable[[str, tuple[int, ...]], tensors.Entry]:
  """A name-table row of a torch module: the key ``key(path)``, Dense kernels transposed."""

  def row(path: str, shape: tuple[int, ...]) -> tensors.Entry:
    leaf = path.rsplit("/", 1)[-1]
    return tensors.Entry(key(path), tensors.TRANSPOSE if leaf == "kernel" else tensors.AS_IS)

  return row


def transformer_key(path: str) -> str:
  """The diffusers state-dict key of our MM-DiT parameter path (module docstring)."""
  return tensors.torch_key(path, TRANSFORMER_LISTS)


def transformer_table(template: Params) -> tensors.Table:
  """The name table of the MM-DiT parameters ``template`` (``transformer_template``)."""
  return tensors.name_table(template, _torch_row(transformer_key))


def part_table(template: Params) -> tensors.Table:
  """The name table of adapter / connector parameters ``template`` (torch_port's modules)."""
  return tensors.name_table(template, _torch_row(tensors.torch_key))


def _out_dtype(dtype: str | None) -> np.dtype:
  """The storage dtype of an export: float32 unless ``dtype`` names another."""
  return dtypes.dtype(dtype or "float32")


def _diffusers_version() -> str | None:
  try:
    return importlib.metadata.version("diffusers")
  except importlib.metadata.PackageNotFoundError:
    return None


# ----------------------------------------------------------------------------- transformer


def diffusers_config(cfg: mmdit_lib.MMDiTConfig) -> dict[str, Any]:
  """The ``config.json`` of the diffusers ``FluxTransformer2DModel`` equal to ``cfg``.

  ``latent_patch`` (ours: the 2x2 packing outside the model) rides along as the private key
  ``_iomm_latent_patch``, which diffusers ignores. ``zero_init`` and ``attention`` are training
  choices with no effect on the weights and are not written. Raises ``ConversionError`` when
  ``cfg.mlp_ratio`` is not diffusers' fixed 4.0.
  """
  if cfg.mlp_ratio != DIFFUSERS_MLP_RATIO:
    raise ConversionError(
      f"MMDiTConfig.mlp_ratio={cfg.mlp_ratio}: diffusers' FluxTransformer2DModel has a fixed "
      f"mlp_ratio of {DIFFUSERS_MLP_RATIO}"
    )
  out: dict[str, Any] = {"_class_name": CLASS_NAME}
  version = _diffusers_version()
  if version:
    out["_diffusers_version"] = version
  for name in DIFFUSERS_FIELDS:
    value = getattr(cfg, name)
    out[name] = list(value) if isinstance(value, tuple) else value
  out[LATENT_PATCH_KEY] = cfg.latent_patch
  return out


def mmdit_config_from_diffusers(config: Mapping[str, Any]) -> mmdit_lib.MMDiTConfig:
  """``MMDiTConfig`` of a diffusers ``FluxTransformer2DModel`` config dict.

  Missing fields take diffusers' defaults (which are ``MMDiTConfig``'s); ``latent_patch`` comes
  from ``_iomm_latent_patch`` (default 2, FLUX's packing); other keys are ignored.
  Raises ``ConversionError`` for another ``_class_name`` or invalid values.
  """
  name = config.get("_class_name")
  if name != CLASS_NAME:
    raise ConversionError(
      f"config _class_name is {name!r}, expected {CLASS_NAME!r}: not a FLUX transformer"
    )
  kw = {k: config[k] for k in DIFFUSERS_FIELDS if k in config}
  if "axes_dims_rope" in kw:
    kw["axes_dims_rope"] = tuple(kw["axes_dims_rope"])
  kw["latent_patch"] = config.get(LATENT_PATCH_KEY, 2)
  try:
    return mmdit_lib.MMDiTConfig(**kw)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"invalid {CLASS_NAME} config: {e}") from e


def transformer_template(cfg: mmdit_lib.MMDiTConfig) -> dict[str, Any]:
  """Abstract (``jax.ShapeDtypeStruct``) float32 parameter tree of ``MMDiT(cfg)``."""
  args = (
    jnp.zeros((1, 1, cfg.in_channels)),
    jnp.zeros((1, 1, 3)),
    jnp.zeros((1, 1, cfg.joint_attention_dim)),
    jnp.zeros((1, 1, 3)),
    jnp.zeros((1, cfg.pooled_projection_dim)),
    jnp.zeros((1,)),
  )
  guidance = jnp.zeros((1,)) if cfg.guidance_embeds else None
  shapes = jax.eval_shape(
    lambda: mmdit_lib.MMDiT(cfg).init(jax.random.key(0), *args, guidance=guidance)
  )
  return nn.meta.unbox(shapes["params"])


def transformer_state_dict(
  params: Params, cfg: mmdit_lib.MMDiTConfig, dtype: str | None = None
) -> dict[str, np.ndarray]:
  """diffusers state dict (numpy, torch orientation) of MM-DiT ``params`` (checked against
  ``cfg``)."""
  template = transformer_template(cfg)
  flat = _check_tree(params, template, "MM-DiT parameters")
  return tensors.to_file(transformer_table(template), flat, _out_dtype(dtype))


def export_transformer(
  params: Params, cfg: mmdit_lib.MMDiTConfig, out_dir: str, dtype: str | None = None
) -> str:
  """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` of ``MMDiT(cfg)``'s
  ``params`` into ``out_dir`` (loadable by ``FluxTransformer2DModel.from_pretrained``).

  ``dtype``: "float32" (default), "bfloat16" or "float16". Returns ``out_dir``.
  """
  config = diffusers_config(cfg)
  state = transformer_state_dict(params, cfg, dtype)
  tensors.write(os.path.join(out_dir, WEIGHTS_NAME), state, metadata={"format": "pt"})
  tensors.write_json(os.path.join(out_dir, CONFIG_NAME), config)
  return out_dir


def import_transformer(path: str) -> tuple[mmdit_lib.MMDiTConfig, dict[str, Any]]:
  """(config, float32 Flax params) of a diffusers ``FluxTransformer2DModel`` directory
  (``config.json`` + safetensors, sharded or not; pickles are never read)."""
  config = tensors.read_json(os.path.join(path, CONFIG_NAME), f"{CLASS_NAME} config")
  cfg = mmdit_config_from_diffusers(config)
  init = _read(path, config, cfg, f"{CLASS_NAME} checkpoint", reinitialise=False)
  return cfg, tensors.unflatten({p: init.array(p) for p in init.keys})


# ----------------------------------------------------------------------------- initialisation

# diffusers keys whose *input* width is set by our condition, not by the checkpoint's text
# encoders: when only that width differs, ``read_transformer_init`` keeps our init for them.
REINITIALISABLE = {
  "context_embedder.weight": "joint_attention_dim, the connector's output width",
  "time_text_embed.text_embedder.linear_1.weight": "pooled_projection_dim, the pooled condition",
}
# MMDiTConfig fields that change the computation but no parameter shape: must agree.
_UNSHAPED_FIELDS = ("axes_dims_rope", "latent_patch")


def transformer_dir(path: str) -> str | None:
  """The ``FluxTransformer2DModel`` directory at ``path`` (its ``config.json`` names the class),
  or at ``path/transformer`` (a pipeline or ``export_generator`` directory); None otherwise."""
  for d in (path, os.path.join(path, TRANSFORMER_DIR)):
    if (tensors.peek_json(os.path.join(d, CONFIG_NAME)) or {}).get("_class_name") == CLASS_NAME:
      return d
  return None


@dataclasses.dataclass(frozen=True)
class Reinitialised:
  """A checkpoint tensor left unused: our parameter ``path`` keeps its init (shapes in torch
  orientation, (out, in))."""

  key: str
  path: str
  file_shape: tuple[int, ...]
  shape: tuple[int, ...]

  def describe(self) -> str:
    """``key (file (out, in_file), ours (out, in))``."""
    return f"{self.key} (file {self.file_shape}, ours {self.shape})"


@dataclasses.dataclass(frozen=True)
class TransformerInit:
  """A checked FLUX-format checkpoint as the initialisation of our generator (headers only).

  ``table``: the rows (our '/'-joined path -> the file's key and hook) of every parameter the
  file fills; ``source``: the open (lazy, memory-mapped) safetensors files; ``reinitialised``:
  what keeps our init.
  """

  path: str
  config: dict[str, Any]
  table: tensors.Table
  source: tensors.Source
  reinitialised: tuple[Reinitialised, ...]

  @property
  def keys(self) -> dict[str, str]:
    """Our path -> the file's key, for every parameter the file fills."""
    return {p: e.key for p, e in self.table.items()}

  def array(self, path: str, dtype: Any = np.float32) -> np.ndarray:
    """Our parameter ``path`` from the file, in our layout (kernels transposed), as ``dtype``."""
    return self.table[path].load(self.source.get, dtype)

  def meta(self) -> dict[str, Any]:
    """JSON record of the import (for the checkpoint's metadata)."""
    return {
      "format": CLASS_NAME,
      "path": os.path.abspath(self.path),
      "loaded": len(self.table),
      "reinitialised": [dataclasses.asdict(r) for r in self.reinitialised],
    }

  def summary(self) -> str:
    """One log line: what was loaded and each re-initialised parameter."""
    re_ = "; ".join(r.describe() for r in self.reinitialised) or "none"
    return (
      f"init_from {self.path} ({CLASS_NAME}): {len(self.table)} tensors loaded; "
      f"re-initialised: {re_}"
    )


def _read(
  where: str, config: dict[str, Any], cfg: mmdit_lib.MMDiTConfig, what: str, reinitialise: bool
) -> TransformerInit:
  """The one reading path of a FLUX transformer directory ``where`` (``config``: its
  ``config.json``) into ``MMDiT(cfg)``: headers opened, every key and shape checked against the
  name table; with ``reinitialise``, a ``REINITIALISABLE`` kernel whose input width alone differs
  keeps our init."""
  source = tensors.Source.open(where, what)
  template = transformer_template(cfg)
  table = transformer_table(template)
  want = tensors.file_shapes(table, template)

  def tolerate(path: str, got: tuple[int, ...], exp: tuple[int, ...]) -> bool:
    return (
      reinitialise and table[path].key in REINITIALISABLE and len(got) == 2 and got[0] == exp[0]
    )

  label = f"{what} {where!r}"
  skipped = tensors.check_keys(table, template, source.shapes, label, source.origins(), tolerate)
  reinit = tuple(
    Reinitialised(table[p].key, p, source.shapes[table[p].key], want[p]) for p in skipped
  )
  rows = {p: e for p, e in table.items() if p not in skipped}
  return TransformerInit(where, config, rows, source, reinit)


def read_transformer_init(
  path: str, cfg: mmdit_lib.MMDiTConfig, what: str = "config.train.init_from"
) -> TransformerInit:
  """Checks the ``FluxTransformer2DModel`` at ``path`` against our generator ``cfg`` (headers
  and ``config.json`` only) and returns what fills it. Raises one-line ``ConversionError`` s
  naming the file's key, its shape and ours (torch orientation) for a missing key, an unused
  key or a shape that cannot carry over, and the field for a RoPE / packing mismatch."""
  where = transformer_dir(path)
  if where is None:
    raise ConversionError(
      f"{what}={path!r} is not a {CLASS_NAME} directory (no {CONFIG_NAME} naming it, there or "
      f"in {TRANSFORMER_DIR}/)"
    )
  label = f"{what} {CLASS_NAME}"
  config = tensors.read_json(os.path.join(where, CONFIG_NAME), f"{label} {where!r}")
  theirs = mmdit_config_from_diffusers(config)
  for name in _UNSHAPED_FIELDS:
    if getattr(theirs, name) != getattr(cfg, name):
      raise ConversionError(
        f"{label} {where!r}: {name} is {getattr(theirs, name)!r} there, {getattr(cfg, name)!r} "
        f"in our generator config"
      )
  return _read(where, config, cfg, label, reinitialise=True)


def lora_merged(model: Any, trainable: Params, frozen: Params | None) -> Params:
  """The plain generator tree of ``model`` (an ``iomm.IOMM``): its trainable part joined with the
  frozen base weights (LoRA runs keep them in ``frozen["generator"]``) and every LoRA update
  folded into its kernel (``mmdit.merge_lora``). The tree of a run without LoRA as it is."""
  from iomm_jax.models import iomm  # deferred: iomm imports the whole model zoo

  lora = model.generator.lora
  if lora is not None and (frozen is None or "generator" not in frozen):
    raise ConversionError(
      "a LoRA generator exports with its frozen base weights: pass frozen (with 'generator')"
    )
  params = iomm.generator_params(trainable, frozen)
  return params if lora is None else mmdit_lib.merge_lora(params, lora)


# ----------------------------------------------------------------------------- adapter, connector


def adapter_meta(model: Any) -> dict[str, Any] | None:
  """JSON description of ``model.adapter`` (an ``iomm.IOMM``): kind "rqa" with the
  ``AdapterConfig`` fields, kind "queries" with num_queries and width, or None ("raw")."""
  a = model.adapter
  if a is None:
    return None
  if isinstance(a, adapter_lib.ResidualQueryAdapter):
    return {"kind": "rqa", **dataclasses.asdict(a.config)}
  if hasattr(a, "num_queries") and hasattr(a, "width"):  # iomm.LearnedQueries
    return {"kind": "queries", "num_queries": a.num_queries, "width": a.width}
  raise ConversionError(f"no export for the adapter module {type(a).__name__}")


def _codec_meta(codec: Any) -> dict[str, Any]:
  if isinstance(codec, codec_lib.PixelCodec):
    return {"kind": "pixel", "factor": codec.factor, "channels": codec.channels}
  if isinstance(codec, codec_lib.VAECodec):
    cfg = dataclasses.asdict(codec.config)
    cfg["block_out_channels"] = list(cfg["block_out_channels"])
    return {"kind": "vae", "config": cfg}
  raise ConversionError(f"no export for the codec {codec!r}")


def _adapter_template(meta: Mapping[str, Any]) -> dict[str, Any]:
  from iomm_jax.models import iomm  # deferred: iomm imports the whole model zoo

  if meta["kind"] == "rqa":
    fields = {f.name for f in dataclasses.fields(adapter_lib.AdapterConfig)}
    acfg = adapter_lib.AdapterConfig(**{k: v for k, v in meta.items() if k in fields})
    module, width = adapter_lib.ResidualQueryAdapter(acfg), acfg.width
  elif meta["kind"] == "queries":
    module, width = iomm.LearnedQueries(meta["num_queries"], meta["width"]), meta["width"]
  else:
    raise ConversionError(f"adapter kind {meta['kind']!r} unknown; expected 'rqa' or 'queries'")
  x, valid = jnp.zeros((1, 1, width)), jnp.ones((1, 1), bool)
  return nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), x, valid))["params"])


def _connector_template(meta: Mapping[str, Any]) -> dict[str, Any]:
  fields = {f.name for f in dataclasses.fields(adapter_lib.ConnectorConfig)}
  ccfg = adapter_lib.ConnectorConfig(**{k: v for k, v in meta.items() if k in fields})
  module = adapter_lib.Connector(ccfg)
  h = jnp.zeros((1, 1, meta["width_in"]))
  return nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), h))["params"])


def generator_meta(model: Any) -> dict[str, Any]:
  """The ``iomm.json`` content for an ``iomm.IOMM``: condition mode, adapter / connector
  configs, codec, image size, latent packing, the MLLM's width and image-context id."""
  mcfg = model.mllm_config
  width = mcfg.text.width
  a = adapter_meta(model)
  gcfg = model.generator.config
  return {
    "format": FORMAT,
    "condition": "raw" if a is None else a["kind"],
    "num_queries": model.num_queries,
    "mllm_width": width,
    "image_token_id": mcfg.image_token_id,
    "num_image_tokens": model.num_image_tokens,
    "mllm_image_size": mcfg.image_size,
    "adapter": a,
    "connector": {**dataclasses.asdict(model.connector.config), "width_in": width},
    "codec": _codec_meta(model.codec),
    "image_size": model.image_size,
    "latent_shape": list(model.latent_shape),
    "latent_patch": gcfg.latent_patch,
    "prediction": model.prediction,
    "x_pred_t_min": model.x_pred_t_min,
    "pooled": model.pooled,
  }


def _parts(meta: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
  """(name, file, abstract Flax template) of each exported trainable part of ``meta``."""
  parts = [("connector", CONNECTOR_FILE, _connector_template(meta["connector"]))]
  if meta["adapter"] is not None:
    parts.insert(0, ("adapter", ADAPTER_FILE, _adapter_template(meta["adapter"])))
  return parts


def export_trainable(
  trainable: Params, model: Any, out_dir: str, dtype: str | None = None
) -> dict[str, Any]:
  """Writes ``adapter.safetensors`` (unless condition "raw"), ``connector.safetensors`` and
  ``iomm.json`` for the ``trainable`` tree of ``model`` (an ``iomm.IOMM``: the static half, whose
  module configs describe the tensors). Keys are torch-module keys (``part_table``). The generator
  is ``export_transformer``'s (``export_generator`` writes all three). Returns the meta dict."""
  meta = generator_meta(model)
  for name, file, template in _parts(meta):
    if name not in trainable:
      raise ConversionError(f"trainable parameters have no {name!r} tree")
    flat = _check_tree(trainable[name], template, f"{name} parameters")
    state = tensors.to_file(part_table(template), flat, _out_dtype(dtype))
    tensors.write(os.path.join(out_dir, file), state, metadata={"format": "pt"})
  tensors.write_json(os.path.join(out_dir, META_NAME), meta)
  return meta


def read_meta(path: str) -> dict[str, Any]:
  """The ``iomm.json`` of an exported generator directory (format checked)."""
  meta = tensors.read_json(os.path.join(path, META_NAME), "exported IOMM generator")
  if meta.get("format") != FORMAT:
    raise ConversionError(
      f"{os.path.join(path, META_NAME)!r} has format {meta.get('format')!r}, expected {FORMAT!r}"
    )
  return meta


def read_trainable(path: str) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
  """(meta, {"adapter": {torch key: array}, "connector": ...}) of an exported directory, every
  tensor checked against the configs in ``iomm.json`` (``adapter`` absent for "raw"); arrays in
  the file's dtype."""
  meta = read_meta(path)
  out = {}
  for name, file, template in _parts(meta):
    file, origins = os.path.join(path, file), {}
    out[name] = tensors.read(file, name, origins)
    shapes = {k: v.shape for k, v in out[name].items()}
    tensors.check_keys(part_table(template), template, shapes, f"{name} {file!r}", origins)
  return meta, out


def import_trainable(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(meta, {"adapter": tree, "connector": tree}) in our Flax layout (float32), from an
  ``export_trainable`` directory; the inverse of ``export_trainable``."""
  meta, state = read_trainable(path)
  out = {
    name: tensors.from_file(part_table(template), template, state[name], f"{name} {path!r}")
    for name, _, template in _parts(meta)
  }
  return meta, out


def export_generator(
  model: Any,
  trainable: Params,
  out_dir: str,
  frozen: Params | None = None,
  dtype: str | None = None,
) -> dict[str, Any]:
  """Writes the whole trained generator: ``export_trainable`` + ``export_transformer`` into
  ``out_dir/transformer`` (a LoRA generator with its adapters folded into the kernels, its base
  weights taken from ``frozen["generator"]``: ``lora_merged``); with ``frozen`` (``{"mllm",
  "codec"}`` as in training, + "generator" with LoRA) also the MLLM
  (``convert.internvl.export_internvl`` into ``out_dir/mllm``) and, for the "vae" codec, the VAE
  (``convert.vae.export_vae`` into ``out_dir/vae``): what ``torch_port.IOMMPipeline`` loads.
  Returns the meta dict."""
  if "generator" not in trainable:
    raise ConversionError("trainable parameters have no 'generator' tree")
  generator = lora_merged(model, trainable, frozen)  # a plain transformer, adapters folded in
  export_transformer(
    generator, model.generator.config, os.path.join(out_dir, TRANSFORMER_DIR), dtype
  )
  if frozen is not None:
    from iomm_jax.convert import internvl, vae  # deferred: optional parts

    internvl.export_internvl(
      nn.meta.unbox(frozen["mllm"]), model.mllm_config, os.path.join(out_dir, MLLM_DIR)
    )
    if isinstance(model.codec, codec_lib.VAECodec):
      vae.export_vae(
        nn.meta.unbox(frozen["codec"]), model.codec.config, os.path.join(out_dir, VAE_DIR)
      )
  return export_trainable(trainable, model, out_dir, dtype)


def import_generator(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(meta, trainable tree {"adapter"?, "connector", "generator"}) of an ``export_generator``
  directory."""
  meta, trainable = import_trainable(path)
  cfg, trainable["generator"] = import_transformer(os.path.join(path, TRANSFORMER_DIR))
  if cfg.latent_patch != meta["latent_patch"]:
    raise ConversionError(
      f"{path!r}: transformer latent_patch {cfg.latent_patch} != iomm.json's {meta['latent_patch']}"
    )
  return meta, trainable
