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

Key layouts (both are the torch state-dict keys, so torch loads them with ``load_state_dict``):

* transformer: ``mmdit.to_diffusers_key`` (``transformer_blocks_0/attn/to_out_0/kernel`` ->
  ``transformer_blocks.0.attn.to_out.0.weight``);
* adapter / connector: the Flax path joined with ``.``, a segment ``<name>_<i>`` (``blocks_0``)
  becoming the ModuleList entry ``<name>.<i>``; leaves as for the transformer
  (``blocks_0/attn/q_proj/kernel`` -> ``blocks.0.attn.q_proj.weight``, ``queries`` -> ``queries``,
  ``blocks_1/norm1/scale`` -> ``blocks.1.norm1.weight``).

Every Dense ``kernel`` (in, out) is stored transposed, as torch's ``nn.Linear.weight`` (out, in);
nothing else is transposed. Arrays are written in float32 unless ``dtype`` says otherwise.

A trained workdir (stage 1 or 2) exports with::

  config, ctx, params = inference.load_generator(workdir)
  flux.export_generator(ctx.model, params, out_dir, frozen=ctx.frozen)

Imports read safetensors only and check every tensor with ``tensors.match`` in the torch key
space, so a missing, unexpected or mis-shaped tensor is named as it appears in the file, with both
shapes (torch orientation).

Initialisation from an existing generator (``config.train.init_from`` = a diffusers
``FluxTransformer2DModel`` directory, or a pipeline directory holding one under ``transformer/``):
``read_transformer_init`` is the inverse of ``export_transformer`` over the same name table
(``mmdit.to_diffusers_key``, kernels transposed) into *our* generator config, strict: every key of
the file is used and every parameter of ours is filled, except the condition-input kernels of
``REINITIALISABLE`` when only their input width differs (ours reads the connector's output, the
checkpoint a text encoder's); those keep our init and are listed (``TransformerInit.
reinitialised``). Tensors are read one at a time (``TransformerInit.array``), so a 12 B
checkpoint never sits in host memory whole.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from iomm_jax import files
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
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}

Params = Any


# ----------------------------------------------------------------------------- shared helpers


def _numpy_tree(params: Params) -> dict[str, np.ndarray]:
  """Unboxed, flattened ('/'-joined) numpy copy of a parameter tree."""
  return {k: np.asarray(v) for k, v in tensors.flatten(nn.meta.unbox(params)).items()}


def _abstract(template: Params) -> dict[str, jax.ShapeDtypeStruct]:
  return {
    k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype)
    for k, v in tensors.flatten(nn.meta.unbox(template)).items()
  }


def _is_kernel(path: str) -> bool:
  return path.rsplit("/", 1)[-1] == "kernel"


def _cast(x: np.ndarray, dtype: str | None) -> np.ndarray:
  if dtype is None:
    return x.astype(np.float32) if x.dtype != np.float32 else x
  if dtype not in _DTYPES:
    raise ValueError(f"dtype {dtype!r} unknown; choose from {sorted(_DTYPES)}")
  return x.astype(_DTYPES[dtype])


def _to_torch(
  flat: Mapping[str, np.ndarray], key_fn: Callable[[tuple[str, ...]], str], dtype: str | None
) -> dict[str, np.ndarray]:
  """Flat Flax params -> {torch key: array}, Dense kernels transposed."""
  out = {}
  for path, x in flat.items():
    key = key_fn(tuple(path.split("/")))
    if key in out:
      raise ConversionError(f"two parameters map to the torch key {key!r}")
    out[key] = np.ascontiguousarray(_cast(x.T if _is_kernel(path) else x, dtype))
  return out


def _from_torch(
  loaded: Mapping[str, np.ndarray],
  template: Params,
  key_fn: Callable[[tuple[str, ...]], str],
  what: str,
) -> dict[str, Any]:
  """{torch key: array} -> nested Flax tree shaped like ``template``; problems named by torch key
  and torch shape (``tensors.match``)."""
  want = _abstract(template)
  keys = {path: key_fn(tuple(path.split("/"))) for path in want}
  torch_want = {
    keys[p]: jax.ShapeDtypeStruct(s.shape[::-1] if _is_kernel(p) else s.shape, s.dtype)
    for p, s in want.items()
  }
  # torch keys contain no "/", so match's unflatten leaves the dict flat.
  checked = tensors.match(torch_want, loaded, what)
  return tensors.unflatten(
    {p: (checked[k].T if _is_kernel(p) else checked[k]).copy() for p, k in keys.items()}
  )


def _check_tree(params: Params, template: Params, what: str) -> dict[str, np.ndarray]:
  """Flat numpy params, after checking them against ``template`` (names and shapes)."""
  flat = _numpy_tree(params)
  tensors.match(_abstract(template), flat, what)
  return flat


def _diffusers_version() -> str | None:
  try:
    return importlib.metadata.version("diffusers")
  except importlib.metadata.PackageNotFoundError:
    return None


def _write_json(path: str, obj: dict) -> None:
  """Writes JSON atomically in insertion order, creating the directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.write_json(path, obj, sort_keys=False, newline=True)


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
  flat = _check_tree(params, transformer_template(cfg), "MM-DiT parameters")
  return _to_torch(flat, mmdit_lib.to_diffusers_key, dtype)


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
  _write_json(os.path.join(out_dir, CONFIG_NAME), config)
  return out_dir


def import_transformer(path: str) -> tuple[mmdit_lib.MMDiTConfig, dict[str, Any]]:
  """(config, float32 Flax params) of a diffusers ``FluxTransformer2DModel`` directory
  (``config.json`` + safetensors, sharded or not; pickles are never read)."""
  cfg = mmdit_config_from_diffusers(
    tensors.read_json(os.path.join(path, CONFIG_NAME), f"{CLASS_NAME} config")
  )
  loaded = tensors.read(path, f"{CLASS_NAME} checkpoint")
  params = _from_torch(
    loaded, transformer_template(cfg), mmdit_lib.to_diffusers_key, f"{CLASS_NAME} {path!r}"
  )
  return cfg, params


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
    file = os.path.join(d, CONFIG_NAME)
    if not os.path.isfile(file):
      continue
    try:
      with open(file) as f:
        name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
      continue
    if name == CLASS_NAME:
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

  ``keys``: our parameter path ('/'-joined) -> the file's key, for every parameter the file
  fills; ``files``: file key -> safetensors file; ``reinitialised``: what keeps our init;
  ``handles``: the open (lazy, memory-mapped) safetensors files, by file name.
  """

  path: str
  config: dict[str, Any]
  keys: dict[str, str]
  files: dict[str, str]
  reinitialised: tuple[Reinitialised, ...]
  handles: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  def array(self, path: str, dtype: Any = np.float32) -> np.ndarray:
    """Our parameter ``path`` from the file, in our layout (kernels transposed), as ``dtype``."""
    key = self.keys[path]
    x = self.handles[self.files[key]].get_tensor(key)
    return np.ascontiguousarray((x.T if _is_kernel(path) else x).astype(dtype))

  def meta(self) -> dict[str, Any]:
    """JSON record of the import (for the checkpoint's metadata)."""
    return {
      "format": CLASS_NAME,
      "path": os.path.abspath(self.path),
      "loaded": len(self.keys),
      "reinitialised": [dataclasses.asdict(r) for r in self.reinitialised],
    }

  def summary(self) -> str:
    """One log line: what was loaded and each re-initialised parameter."""
    re_ = "; ".join(r.describe() for r in self.reinitialised) or "none"
    return (
      f"init_from {self.path} ({CLASS_NAME}): {len(self.keys)} tensors loaded; "
      f"re-initialised: {re_}"
    )


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
  label = f"{what} {CLASS_NAME} {where!r}"
  config = tensors.read_json(os.path.join(where, CONFIG_NAME), label)
  theirs = mmdit_config_from_diffusers(config)
  for name in _UNSHAPED_FIELDS:
    if getattr(theirs, name) != getattr(cfg, name):
      raise ConversionError(
        f"{label}: {name} is {getattr(theirs, name)!r} there, {getattr(cfg, name)!r} in our "
        f"generator config"
      )
  shapes, files, handles = {}, {}, {}
  for file in tensors.safetensors_files(where, label):
    handle = handles[file] = safe_open(file, framework="numpy")
    for key in handle.keys():
      if key in shapes:
        raise ConversionError(f"{label}: key {key!r} appears in more than one shard")
      shapes[key], files[key] = tuple(handle.get_slice(key).get_shape()), file
  want = _abstract(transformer_template(cfg))
  keys = {p: mmdit_lib.to_diffusers_key(tuple(p.split("/"))) for p in want}
  ours = {keys[p]: tuple(s.shape[::-1] if _is_kernel(p) else s.shape) for p, s in want.items()}
  missing = sorted(set(ours) - set(shapes))
  unexpected = sorted(set(shapes) - set(ours))
  reinit, bad = [], []
  for p, key in sorted(keys.items()):
    got, exp = shapes.get(key), ours[key]
    if got is None or got == exp:
      continue
    if key in REINITIALISABLE and len(got) == 2 and got[0] == exp[0]:
      reinit.append(Reinitialised(key, p, got, exp))
      continue
    bad.append(
      f"{key!r} in {os.path.basename(files[key])} has shape {got}, ours is {exp} ({p}: "
      f"{want[p].shape} in our layout)"
    )
  tensors.raise_problems(
    label,
    tensors.listed(
      "missing key(s), ours with no tensor there", [f"{k!r} {ours[k]}" for k in missing]
    ),
    tensors.listed(
      "unexpected key(s), not in our generator", [f"{k!r} {shapes[k]}" for k in unexpected]
    ),
    tensors.listed("shape mismatch(es)", bad, sep="; "),
  )
  skipped = {r.path for r in reinit}
  return TransformerInit(
    where,
    config,
    {p: k for p, k in keys.items() if p not in skipped},
    files,
    tuple(reinit),
    handles,
  )


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


_LIST_SEGMENT = re.compile(r"^(.+)_(\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path: tuple[str, ...]) -> str:
  """torch state-dict key of an adapter / connector parameter path (see the module docstring)."""
  *mods, leaf = path
  return ".".join([_LIST_SEGMENT.sub(r"\1.\2", m) for m in mods] + [_LEAVES.get(leaf, leaf)])


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
  module configs describe the tensors). Keys are torch-module keys (``torch_key``). The generator
  is ``export_transformer``'s (``export_generator`` writes all three). Returns the meta dict."""
  meta = generator_meta(model)
  for name, file, template in _parts(meta):
    if name not in trainable:
      raise ConversionError(f"trainable parameters have no {name!r} tree")
    flat = _check_tree(trainable[name], template, f"{name} parameters")
    state = _to_torch(flat, torch_key, dtype)
    tensors.write(os.path.join(out_dir, file), state, metadata={"format": "pt"})
  _write_json(os.path.join(out_dir, META_NAME), meta)
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
    file = os.path.join(path, file)
    out[name] = tensors.read(file, name)
    _from_torch(out[name], template, torch_key, f"{name} {file!r}")  # raises on any mismatch
  return meta, out


def import_trainable(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(meta, {"adapter": tree, "connector": tree}) in our Flax layout (float32), from an
  ``export_trainable`` directory; the inverse of ``export_trainable``."""
  meta = read_meta(path)
  out = {}
  for name, file, template in _parts(meta):
    file = os.path.join(path, file)
    out[name] = _from_torch(tensors.read(file, name), template, torch_key, f"{name} {file!r}")
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
