"""FLUX VAE weights: diffusers ``AutoencoderKL`` directories in, our converted directory, and out.

* ``import_vae(diffusers_dir, out_dir)`` reads ``config.json`` + safetensors (never pickles) of a
  diffusers ``AutoencoderKL`` (``save_pretrained`` layout: ``diffusion_pytorch_model.safetensors``
  or shards listed by ``diffusion_pytorch_model.safetensors.index.json``; a pipeline directory
  with a ``vae/`` subfolder, such as FLUX.1-dev's, is accepted too), checks every key and shape
  against the name table (``name_table``; ``tensors.check_keys``: missing / unexpected /
  shape-mismatched keys are named, with both shapes), brings each tensor to the Flax path and
  layout of ``iomm_jax.models.codec.AutoencoderKL`` and writes ``out_dir/params.safetensors``
  (``/``-joined Flax paths) and
  ``out_dir/config.json`` (the ``VAEConfig`` fields plus ``format``/``source``/``params_dtype``).
  ``config.json`` is written last and removed first, so an interrupted import never leaves a
  directory that ``load_vae`` accepts with stale or partial weights.
* ``load_vae(ckpt_dir)`` -> (``VAEConfig``, params tree) of such a directory.
* ``export_vae(params, vae_config, out_dir)`` writes a diffusers ``AutoencoderKL`` directory that
  ``diffusers.AutoencoderKL.from_pretrained`` loads with no missing or unexpected keys; import
  of the export gives bit-identical params (the transposes are exact).
* ``load_into(path, want, template, what, wanted)`` -> the converted weights at ``path``, checked
  to be the VAE ``want`` and against ``template``'s shapes. A run's ``config.model.vae_checkpoint``
  arrives here through ``assembly.context.codec_params``, which reads the model spec.

Name table (``name_table``: our path -> diffusers key and hook; import and export read it):

* path components join with ``.``; a component ``name_N`` (N digits) is the ModuleList entry
  ``name.N``: ``encoder/down_blocks_0/resnets_1/conv1/kernel`` <->
  ``encoder.down_blocks.0.resnets.1.conv1.weight``, ``encoder/mid_block/attentions_0/to_out_0``
  <-> ``encoder.mid_block.attentions.0.to_out.0``, ``decoder/up_blocks_0/upsamplers_0/conv``.
* leaves: a conv ``kernel`` is ``weight`` with the hook ``tensors.CONV`` (HWIO <-> OIHW); a dense
  ``kernel`` (to_q/to_k/to_v/to_out_0) is ``weight`` transposed (``tensors.TRANSPOSE``); a
  GroupNorm ``scale`` is ``weight``; ``bias`` is ``bias``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iomm_jax import dtypes
from iomm_jax.convert import tensors
from iomm_jax.convert.tensors import ConversionError
from iomm_jax.models import codec

FORMAT = "iomm_jax.vae"
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CLASS = "AutoencoderKL"

_META_KEYS = ("format", "source", "params_dtype")

# diffusers AutoencoderKL.__init__ defaults: a config.json that omits a key means this value.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ("DownEncoderBlock2D",),
  "up_block_types": ("UpDecoderBlock2D",),
  "block_out_channels": (64,),
  "layers_per_block": 1,
  "act_fn": "silu",
  "latent_channels": 4,
  "norm_num_groups": 32,
  "sample_size": 32,
  "scaling_factor": 0.18215,
  "shift_factor": None,
  "latents_mean": None,
  "latents_std": None,
  "force_upcast": True,
  "use_quant_conv": True,
  "use_post_quant_conv": True,
  "mid_block_add_attention": True,
}
# Options that only steer diffusers' runtime (tiling threshold, fp16 upcast), not the weights.
_RUNTIME_ONLY = ("sample_size", "force_upcast")
_DIFFUSERS_NORM_EPS = 1e-6  # hard-coded in diffusers' Encoder/Decoder


# ----------------------------------------------------------------------------- configs


def vae_config_from_diffusers(cfg: Mapping[str, Any], what: str = "config.json") -> codec.VAEConfig:
  """Our ``VAEConfig`` of a diffusers ``AutoencoderKL`` config.json dict.

  Missing keys take diffusers' defaults (note ``use_quant_conv``/``use_post_quant_conv`` default
  to True there); ``shift_factor: null`` is 0. Raises ``ConversionError`` naming the class when
  ``_class_name`` is not ``AutoencoderKL``, and naming the key for an option our port lacks
  (``latents_mean``/``latents_std``, an ``act_fn`` other than silu, other block types, unknown
  keys).
  """
  name = cfg.get("_class_name")
  if name != DIFFUSERS_CLASS:
    raise ConversionError(
      f"{what}: wrong model type: _class_name={name!r}, expected {DIFFUSERS_CLASS!r}"
    )
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
  if unknown:
    raise ConversionError(f"{what}: unsupported AutoencoderKL option(s) {unknown}")
  c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
  blocks = tuple(c["block_out_channels"])
  for key, kind in (
    ("down_block_types", "DownEncoderBlock2D"),
    ("up_block_types", "UpDecoderBlock2D"),
  ):
    types = tuple(c[key])
    if types != (kind,) * len(blocks):
      raise ConversionError(
        f"{what}: {key}={list(types)} unsupported: the port has {len(blocks)} x {kind!r} "
        f"(one per block_out_channels entry)"
      )
  if c["act_fn"] != "silu":
    raise ConversionError(f"{what}: act_fn={c['act_fn']!r} unsupported (only 'silu')")
  for key in ("latents_mean", "latents_std"):
    if c[key] is not None:
      raise ConversionError(f"{what}: {key} is set; per-channel latent statistics are unsupported")
  try:
    return codec.VAEConfig(
      in_channels=c["in_channels"],
      out_channels=c["out_channels"],
      latent_channels=c["latent_channels"],
      block_out_channels=blocks,
      layers_per_block=c["layers_per_block"],
      norm_num_groups=c["norm_num_groups"],
      norm_eps=_DIFFUSERS_NORM_EPS,
      mid_block_add_attention=bool(c["mid_block_add_attention"]),
      use_quant_conv=bool(c["use_quant_conv"]),
      use_post_quant_conv=bool(c["use_post_quant_conv"]),
      scaling_factor=float(c["scaling_factor"]),
      shift_factor=0.0 if c["shift_factor"] is None else float(c["shift_factor"]),
    )
  except ValueError as e:
    raise ConversionError(f"{what}: {e}") from e


def diffusers_config(
  vae_config: codec.VAEConfig, sample_size: int = 1024, force_upcast: bool = True
) -> dict[str, Any]:
  """The diffusers ``AutoencoderKL`` config.json dict of our ``VAEConfig``.

  ``sample_size`` (diffusers' tiling threshold) and ``force_upcast`` do not affect the weights;
  the defaults are FLUX.1's. Raises ``ConversionError`` when ``norm_eps`` is not diffusers'
  fixed 1e-6.
  """
  c = vae_config
  if c.norm_eps != _DIFFUSERS_NORM_EPS:
    raise ConversionError(
      f"VAEConfig.norm_eps={c.norm_eps} cannot be exported: diffusers fixes it to "
      f"{_DIFFUSERS_NORM_EPS}"
    )
  n = len(c.block_out_channels)
  return {
    "_class_name": DIFFUSERS_CLASS,
    "act_fn": "silu",
    "block_out_channels": list(c.block_out_channels),
    "down_block_types": ["DownEncoderBlock2D"] * n,
    "force_upcast": force_upcast,
    "in_channels": c.in_channels,
    "latent_channels": c.latent_channels,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": c.layers_per_block,
    "mid_block_add_attention": c.mid_block_add_attention,
    "norm_num_groups": c.norm_num_groups,
    "out_channels": c.out_channels,
    "sample_size": sample_size,
    "scaling_factor": c.scaling_factor,
    "shift_factor": c.shift_factor,
    "up_block_types": ["UpDecoderBlock2D"] * n,
    "use_post_quant_conv": c.use_post_quant_conv,
    "use_quant_conv": c.use_quant_conv,
  }


# ----------------------------------------------------------------------------- name map


@functools.lru_cache(maxsize=16)
def _abstract_flat(vae_config: codec.VAEConfig, param_dtype: Any) -> tuple[tuple[str, Any], ...]:
  module = codec.AutoencoderKL(vae_config, param_dtype=param_dtype)
  f = vae_config.downsample
  x = jax.ShapeDtypeStruct((1, f, f, vae_config.in_channels), jnp.float32)
  boxed = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
  return tuple(tensors.flatten(nn.meta.unbox(boxed)["params"]).items())


def abstract_params(vae_config: codec.VAEConfig, param_dtype: Any = jnp.float32) -> dict[str, Any]:
  """Unboxed ``jax.ShapeDtypeStruct`` tree of ``AutoencoderKL(vae_config)``'s params (traced
  once per config and dtype, no FLOPs; a fresh tree on every call)."""
  return tensors.unflatten(dict(_abstract_flat(vae_config, jnp.dtype(param_dtype))))


def diffusers_key(path: str) -> str:
  """The diffusers key of our '/'-joined parameter path (module docstring):
  ``encoder/down_blocks_0/resnets_1/conv1/kernel`` ->
  ``encoder.down_blocks.0.resnets.1.conv1.weight``."""
  return tensors.torch_key(path)


def _row(path: str, shape: tuple[int, ...]) -> tensors.Entry:
  """The table row of a parameter: its diffusers key; conv kernels OIHW, dense kernels (out, in)."""
  hook = tensors.AS_IS
  if path.endswith("/kernel"):
    hook = {4: tensors.CONV, 2: tensors.TRANSPOSE}.get(len(shape), tensors.AS_IS)
  return tensors.Entry(diffusers_key(path), hook)


def name_table(template: Mapping[str, Any]) -> tensors.Table:
  """Our path -> (diffusers key, hook) of every parameter of ``template`` (``abstract_params``)."""
  return tensors.name_table(template, _row)


# ----------------------------------------------------------------------------- import / load


def _diffusers_root(path: str) -> str:
  """``path`` itself, or its ``vae/`` subfolder when ``path`` is a pipeline directory."""
  if not os.path.exists(os.path.join(path, CONFIG_FILE)):
    sub = os.path.join(path, "vae")
    if os.path.exists(os.path.join(sub, CONFIG_FILE)):
      return sub
  return path


def _read_diffusers_weights(
  root: str, what: str, origins: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
  """The tensors of a diffusers model directory; the plain single file wins over variants
  (``origins``: as in ``tensors.read``)."""
  single = os.path.join(root, DIFFUSERS_WEIGHTS)
  has_index = any(os.path.exists(os.path.join(root, i)) for i in tensors.INDEXES)
  if os.path.isfile(single) and not has_index:
    return tensors.read(single, what, origins)
  return tensors.read(root, what, origins)


def _is_converted(config_path: str) -> bool:
  """Whether a config.json is the one ``import_vae`` writes."""
  return (tensors.peek_json(config_path) or {}).get("format") == FORMAT


def _remove(path: str) -> None:
  """Deletes a file if it exists."""
  if os.path.exists(path):
    os.remove(path)


def import_vae(diffusers_dir: str, out_dir: str, dtype: str = "float32") -> codec.VAEConfig:
  """Converts a diffusers ``AutoencoderKL`` directory into ``out_dir``; returns its ``VAEConfig``.

  ``dtype``: storage dtype of ``params.safetensors`` ("float32" or "bfloat16").
  """
  param_dtype = dtypes.dtype(dtype, dtypes.STORAGE, "import_vae: dtype", ConversionError)
  if not os.path.isdir(diffusers_dir):
    raise ConversionError(f"VAE checkpoint {diffusers_dir!r} is not a directory")
  root = _diffusers_root(diffusers_dir)
  what = f"VAE checkpoint {root!r}"
  cfg = tensors.read_json(os.path.join(root, CONFIG_FILE), what)
  vae_config = vae_config_from_diffusers(cfg, f"{what} config.json")
  if os.path.abspath(out_dir) in (os.path.abspath(root), os.path.abspath(diffusers_dir)):
    raise ConversionError(f"{what}: out_dir must differ from the diffusers directory")
  origins: dict[str, str] = {}
  raw = _read_diffusers_weights(root, what, origins)
  template = abstract_params(vae_config, param_dtype)
  params = tensors.from_file(name_table(template), template, raw, what, origins)
  os.makedirs(out_dir, exist_ok=True)
  config_path = os.path.join(out_dir, CONFIG_FILE)
  _remove(config_path)  # from here until the end, out_dir is not a valid checkpoint
  tensors.write(
    os.path.join(out_dir, PARAMS_FILE), tensors.flatten(params), metadata={"format": FORMAT}
  )
  meta = {"format": FORMAT, "source": os.path.abspath(root), "params_dtype": dtype}
  tensors.write_json(config_path, {**dataclasses.asdict(vae_config), **meta})
  return vae_config


def load_vae(ckpt_dir: str) -> tuple[codec.VAEConfig, dict[str, Any]]:
  """(``VAEConfig``, params tree of numpy arrays in the stored dtype) of an ``import_vae`` dir."""
  what = f"converted VAE {ckpt_dir!r}"
  config_path = os.path.join(ckpt_dir, CONFIG_FILE)
  if not os.path.isdir(ckpt_dir) or not os.path.exists(config_path):
    raise ConversionError(f"{what} is not a converted VAE directory (no {CONFIG_FILE}; run import)")
  cfg = tensors.read_json(config_path, what)
  if cfg.get("format") != FORMAT:
    raise ConversionError(
      f"{what} is not a converted VAE directory: {CONFIG_FILE} has format="
      f"{cfg.get('format')!r}, expected {FORMAT!r} (a diffusers directory needs import_vae first)"
    )
  param_dtype = dtypes.dtype(
    cfg.get("params_dtype", "float32"), dtypes.STORAGE, f"{what}: params_dtype", ConversionError
  )
  fields = {k: v for k, v in cfg.items() if k not in _META_KEYS}
  try:
    vae_config = codec.VAEConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{what}: bad {CONFIG_FILE}: {e}") from e
  template = abstract_params(vae_config, param_dtype)
  loaded = tensors.read(os.path.join(ckpt_dir, PARAMS_FILE), what)
  return vae_config, tensors.match(template, loaded, what)


# ----------------------------------------------------------------------------- export


def export_vae(
  params: Mapping[str, Any],
  vae_config: codec.VAEConfig,
  out_dir: str,
  sample_size: int = 1024,
  force_upcast: bool = True,
) -> None:
  """Writes ``params`` (our tree, any float dtype, kept) as a diffusers ``AutoencoderKL`` dir:
  ``config.json`` + ``diffusion_pytorch_model.safetensors``.

  The params are checked against ``vae_config`` first; ``config.json`` is removed first and
  written last. A directory that already holds a sharded index is refused.
  """
  what = f"export_vae to {out_dir!r}"
  flat = {k: np.asarray(v) for k, v in tensors.flatten(params).items()}
  template = abstract_params(vae_config)
  tensors.match(template, flat, what)
  config = diffusers_config(vae_config, sample_size, force_upcast)
  for index in tensors.INDEXES:
    if os.path.exists(os.path.join(out_dir, index)):
      raise ConversionError(f"{what}: the directory already holds a sharded checkpoint ({index})")
  config_path = os.path.join(out_dir, CONFIG_FILE)
  if os.path.exists(config_path) and _is_converted(config_path):
    raise ConversionError(f"{what}: the directory holds a converted (import_vae) VAE")
  os.makedirs(out_dir, exist_ok=True)
  _remove(config_path)
  state = tensors.to_file(name_table(template), flat)
  tensors.write(os.path.join(out_dir, DIFFUSERS_WEIGHTS), state, metadata={"format": "pt"})
  tensors.write_json(config_path, config)


# ----------------------------------------------------------------------------- runs


def _differing(a: codec.VAEConfig, b: codec.VAEConfig) -> list[str]:
  """Fields (other than the compute dtype) in which two VAE configs differ."""
  return [
    f.name
    for f in dataclasses.fields(codec.VAEConfig)
    if f.name != "dtype" and getattr(a, f.name) != getattr(b, f.name)
  ]


def load_into(
  path: str, want: codec.VAEConfig, template: Any, what: str, wanted: str = "the expected one"
) -> Any:
  """The VAE weights imported at ``path`` (by ``import_vae``), checked to be the VAE ``want``
  describes and against ``template``'s shapes, cast to its dtypes (``template`` may be arrays or
  ``jax.ShapeDtypeStruct``s). ``what`` names the source in errors, ``wanted`` the VAE it must be.

  Raises ``ConversionError`` when the checkpoint holds another VAE (the differing fields named).
  """
  got, params = load_vae(path)
  diff = _differing(got, want)
  if diff:
    detail = "; ".join(f"{k}: checkpoint {getattr(got, k)!r} vs {getattr(want, k)!r}" for k in diff)
    raise ConversionError(f"{what} holds a different VAE than {wanted} ({detail})")
  loaded = tensors.match(template, tensors.flatten(params), what)
  return jax.tree.map(jnp.asarray, loaded)
