"""InternVL3 in transformers' "-hf" format <-> the frozen MLLM of ``models.mllm`` (issue 4).

``import_internvl(hf_dir, out_dir)`` reads a transformers ``InternVLForConditionalGeneration``
directory (``config.json`` + safetensors; pickles are refused) and writes an *imported directory*:

* ``params.safetensors``: our parameters, keys joined by ``/`` (``models.mllm``'s names);
* the tokenizer files found in ``hf_dir`` (``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``, ``chat_template.jinja``, ...), read by ``HFTokenizer``;
* ``config.json`` = ``{"format": "iomm_jax.mllm", "mllm": <MLLMConfig fields>, "source": hf_dir,
  "dtype": ...}``, written last, so an interrupted import never looks complete.

``load_internvl(dir)`` returns ``(MLLMConfig, params, HFTokenizer | None)`` and
``export_internvl(params, config, out_dir)`` writes a directory that
``InternVLForConditionalGeneration.from_pretrained`` loads with no missing or unexpected keys;
importing an export gives back the same arrays bit for bit.

Name table (``name_table``: our path -> the key ``save_pretrained`` writes and its hook; import
and export read it). ``hf_key`` is the name rule: ``/`` becomes ``.``, a ``layer_<i>`` /
``layers_<i>`` segment the list entry ``layer.<i>`` / ``layers.<i>``, a ``kernel`` / ``scale`` /
``embedding`` leaf ``weight``, and the text model sits under ``language_model.model.`` (its head
under ``language_model.lm_head.``), the on-disk layout of transformers 5 and of the hub's -hf
files. Hooks: linear ``weight`` (out, in) <-> ``kernel`` (in,
out) (``tensors.TRANSPOSE``); the patch convolution (D, C, p, p) <-> (p, p, C, D)
(``tensors.CONV``); ``cls_token`` (1, 1, D) <-> (D,) and ``position_embeddings``
(1, G*G + 1, D) <-> (G*G + 1, D) (``tensors.leading_ones``); the rest as is (``lambda_1`` /
``lambda_2`` keep their names). e.g. (ours -> file)
  ``vision_tower/encoder/layer_3/attention/q_proj/kernel``
    -> ``vision_tower.encoder.layer.3.attention.q_proj.weight`` (transposed)
  ``language_model/layers_0/input_layernorm/scale``
    -> ``language_model.model.layers.0.input_layernorm.weight``
  ``lm_head/kernel`` -> ``language_model.lm_head.weight`` (transposed)
A file keyed by the in-memory names (``model.`` + ``language_model.<x>`` / ``vision_tower.<x>``
/ ``multi_modal_projector.<x>``, ``lm_head.<x>``) reads through the same table: both layouts are
brought to one name (``_in_memory``) before the keys are matched.

Tied embeddings follow transformers 5: the top-level ``tie_word_embeddings`` decides (the text
config's when the top level does not say, default True); a tied config whose file still holds an
``lm_head`` that differs from the embedding is loaded untied, as transformers does.

Only what our port implements is accepted; any other setting is a ``ConversionError`` that names
the config key (e.g. a sliding window, a RoPE scaling type, vision features from another layer
than the last or with the cls token kept, a mask token, non-square images, Qwen3 text).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iomm_jax import dtypes
from iomm_jax.convert import tensors
from iomm_jax.convert.tensors import ConversionError
from iomm_jax.data.hf_tokenizer import TOKENIZER_JSON, HFTokenizer
from iomm_jax.models import mllm as mllm_lib
from iomm_jax.models.mllm import MLLMConfig, TextConfig, VisionConfig

FORMAT = "iomm_jax.mllm"
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_LISTS = ("layer", "layers")  # the ModuleLists: ``layer_<i>`` is ``layer.<i>`` there
PATCH_CONV = "vision_tower/embeddings/patch_embeddings/projection"
CLS_TOKEN = "vision_tower/embeddings/cls_token"
POSITIONS = "vision_tower/embeddings/position_embeddings"
EMBED = "language_model/embed_tokens/embedding"
LM_HEAD = "lm_head/kernel"

# transformers' config defaults for the keys read here (InternVLConfig, InternVLVisionConfig,
# Qwen2Config), used where a config.json omits a key.
VISION_DEFAULTS: dict[str, Any] = {
  "model_type": "internvl_vision",
  "hidden_size": 1024,
  "num_hidden_layers": 24,
  "num_attention_heads": 16,
  "attention_bias": False,
  "use_qk_norm": False,
  "intermediate_size": 4096,
  "hidden_act": "gelu",
  "norm_type": "layer_norm",
  "layer_norm_eps": 1e-6,
  "image_size": 448,
  "patch_size": 14,
  "num_channels": 3,
  "use_mask_token": False,
  "use_absolute_position_embeddings": True,
  "layer_scale_init_value": 0.1,
  "use_mean_pooling": True,
}
TEXT_DEFAULTS: dict[str, Any] = {
  "model_type": "qwen2",
  "vocab_size": 151936,
  "hidden_size": 4096,
  "intermediate_size": 22016,
  "num_hidden_layers": 32,
  "num_attention_heads": 32,
  "hidden_act": "silu",
  "rms_norm_eps": 1e-6,
  "use_sliding_window": False,
  "rope_theta": 10000.0,
}
TOP_DEFAULTS: dict[str, Any] = {
  "image_token_id": 151667,
  "downsample_ratio": 0.5,
  "projector_hidden_act": "gelu",
  "vision_feature_layer": -1,
  "vision_feature_select_strategy": "default",
}

# ----------------------------------------------------------------------------- configs


def _get(cfg: Mapping[str, Any], key: str, defaults: Mapping[str, Any]) -> Any:
  value = cfg.get(key)
  return defaults[key] if value is None and key in defaults else value


def _require(value: Any, want: Any, key: str) -> None:
  if value != want:
    raise ConversionError(
      f"unsupported InternVL config: {key}={value!r} (this port needs {want!r})"
    )


def _square(value: Any, key: str) -> int:
  if isinstance(value, list | tuple):
    if len(value) != 2 or value[0] != value[1]:
      raise ConversionError(f"unsupported InternVL config: {key}={value!r} (only square sizes)")
    value = value[0]
  return int(value)


def _tie(cfg: Mapping[str, Any]) -> bool:
  """transformers 5: the top-level flag ties ``lm_head``; else the text config's; default True."""
  if cfg.get("tie_word_embeddings") is not None:
    return bool(cfg["tie_word_embeddings"])
  text = cfg.get("text_config") or {}
  if text.get("tie_word_embeddings") is not None:
    return bool(text["tie_word_embeddings"])
  return True


def _rope_theta(text: Mapping[str, Any]) -> float:
  rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
  key = "text_config.rope_parameters" if text.get("rope_parameters") else "text_config.rope_scaling"
  if any(isinstance(v, Mapping) for v in rope.values()):
    raise ConversionError(f"unsupported InternVL config: {key} is per layer type ({sorted(rope)})")
  _require(rope.get("rope_type", rope.get("type", "default")), "default", f"{key}.rope_type")
  factor = rope.get("partial_rotary_factor", text.get("partial_rotary_factor"))
  if factor not in (None, 1, 1.0):
    raise ConversionError(
      f"unsupported InternVL config: text_config.partial_rotary_factor={factor!r} "
      "(this port rotates whole heads)"
    )
  theta = rope.get("rope_theta", text.get("rope_theta"))
  return float(TEXT_DEFAULTS["rope_theta"] if theta is None else theta)


def mllm_config_from_hf(cfg: Mapping[str, Any]) -> MLLMConfig:
  """Our ``MLLMConfig`` for a transformers InternVL ``config.json`` (parsed).

  Raises ``ConversionError`` for another model type / architecture (naming it) and for settings
  this port does not implement (naming the key).
  """
  model_type = cfg.get("model_type")
  if model_type != "internvl":
    raise ConversionError(
      f"not a transformers InternVL config: model_type={model_type!r} (want 'internvl'; the "
      "original OpenGVLab 'internvl_chat' checkpoints must be converted to the -hf format first)"
    )
  for arch in cfg.get("architectures") or []:
    if arch not in ("InternVLForConditionalGeneration", "InternVLModel"):
      raise ConversionError(f"unsupported InternVL architecture {arch!r} in config.architectures")
  vis = dict(cfg.get("vision_config") or {})
  text = dict(cfg.get("text_config") or {})
  _require(_get(vis, "model_type", VISION_DEFAULTS), "internvl_vision", "vision_config.model_type")
  _require(_get(text, "model_type", TEXT_DEFAULTS), "qwen2", "text_config.model_type")
  for key, want in (
    ("hidden_act", "gelu"),
    ("use_mask_token", False),
    ("use_absolute_position_embeddings", True),
  ):
    _require(_get(vis, key, VISION_DEFAULTS), want, f"vision_config.{key}")
  _require(_get(text, "hidden_act", TEXT_DEFAULTS), "silu", "text_config.hidden_act")
  _require(
    bool(_get(text, "use_sliding_window", TEXT_DEFAULTS)), False, "text_config.use_sliding_window"
  )
  layer_types = text.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    raise ConversionError(
      f"unsupported InternVL config: text_config.layer_types={layer_types!r} (full attention only)"
    )
  for key, want in TOP_DEFAULTS.items():
    if key not in ("image_token_id", "downsample_ratio"):
      _require(_get(cfg, key, TOP_DEFAULTS), want, key)
  width, heads = (
    _get(text, "hidden_size", TEXT_DEFAULTS),
    _get(text, "num_attention_heads", TEXT_DEFAULTS),
  )
  if text.get("head_dim") not in (None, width // heads):
    raise ConversionError(
      f"unsupported InternVL config: text_config.head_dim={text['head_dim']} != "
      f"hidden_size / num_attention_heads = {width // heads}"
    )
  try:
    vision = VisionConfig(
      image_size=_square(_get(vis, "image_size", VISION_DEFAULTS), "vision_config.image_size"),
      patch_size=_square(_get(vis, "patch_size", VISION_DEFAULTS), "vision_config.patch_size"),
      width=_get(vis, "hidden_size", VISION_DEFAULTS),
      num_layers=_get(vis, "num_hidden_layers", VISION_DEFAULTS),
      num_heads=_get(vis, "num_attention_heads", VISION_DEFAULTS),
      mlp_dim=_get(vis, "intermediate_size", VISION_DEFAULTS),
      num_channels=_get(vis, "num_channels", VISION_DEFAULTS),
      norm_type=_get(vis, "norm_type", VISION_DEFAULTS),
      norm_eps=float(_get(vis, "layer_norm_eps", VISION_DEFAULTS)),
      attention_bias=bool(_get(vis, "attention_bias", VISION_DEFAULTS)),
      use_qk_norm=bool(_get(vis, "use_qk_norm", VISION_DEFAULTS)),
      layer_scale_init=float(_get(vis, "layer_scale_init_value", VISION_DEFAULTS)),
      post_layernorm=not _get(vis, "use_mean_pooling", VISION_DEFAULTS),
    )
    tie = _tie(cfg)
    textcfg = TextConfig(
      vocab_size=_get(text, "vocab_size", TEXT_DEFAULTS),
      width=width,
      num_layers=_get(text, "num_hidden_layers", TEXT_DEFAULTS),
      num_heads=heads,
      num_kv_heads=text.get("num_key_value_heads") or heads,
      mlp_dim=_get(text, "intermediate_size", TEXT_DEFAULTS),
      rope_theta=_rope_theta(text),
      norm_eps=float(_get(text, "rms_norm_eps", TEXT_DEFAULTS)),
      tie_word_embeddings=tie,
    )
    return MLLMConfig(
      vision=vision,
      text=textcfg,
      image_token_id=_get(cfg, "image_token_id", TOP_DEFAULTS),
      downsample_ratio=float(_get(cfg, "downsample_ratio", TOP_DEFAULTS)),
    )
  except ValueError as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"unsupported InternVL config: {e}") from e


def hf_config_from_mllm(c: MLLMConfig, dtype: str = "float32") -> dict[str, Any]:
  """The transformers ``config.json`` (a dict) of an ``MLLMConfig`` (inverse of
  ``mllm_config_from_hf``)."""
  if c.projector_norm_eps != 1e-5:
    raise ConversionError(
      f"MLLMConfig.projector_norm_eps={c.projector_norm_eps} cannot be exported: transformers' "
      "projector LayerNorm has the fixed eps 1e-5"
    )
  v, t = c.vision, c.text
  return {
    "architectures": ["InternVLForConditionalGeneration"],
    "model_type": "internvl",
    "downsample_ratio": c.downsample_ratio,
    "image_token_id": c.image_token_id,
    "image_seq_length": c.num_image_tokens,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": t.tie_word_embeddings,
    "dtype": dtype,
    "vision_config": {
      "model_type": "internvl_vision",
      "hidden_size": v.width,
      "num_hidden_layers": v.num_layers,
      "num_attention_heads": v.num_heads,
      "intermediate_size": v.mlp_dim,
      "attention_bias": v.attention_bias,
      "use_qk_norm": v.use_qk_norm,
      "hidden_act": "gelu",
      "norm_type": v.norm_type,
      "layer_norm_eps": v.norm_eps,
      "image_size": [v.image_size, v.image_size],
      "patch_size": [v.patch_size, v.patch_size],
      "num_channels": v.num_channels,
      "use_mask_token": False,
      "use_absolute_position_embeddings": True,
      "layer_scale_init_value": v.layer_scale_init,
      "use_mean_pooling": not v.post_layernorm,
    },
    "text_config": {
      "model_type": "qwen2",
      "vocab_size": t.vocab_size,
      "hidden_size": t.width,
      "intermediate_size": t.mlp_dim,
      "num_hidden_layers": t.num_layers,
      "num_attention_heads": t.num_heads,
      "num_key_value_heads": t.num_kv_heads,
      "hidden_act": "silu",
      "rms_norm_eps": t.norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
      "use_sliding_window": False,
      "tie_word_embeddings": t.tie_word_embeddings,
    },
  }


def mllm_config_to_dict(c: MLLMConfig) -> dict[str, Any]:
  """``MLLMConfig`` -> JSON-able nested dict (``vision`` / ``text`` sub-dicts)."""
  return dataclasses.asdict(c)


def mllm_config_from_dict(d: Mapping[str, Any], what: str = "mllm config") -> MLLMConfig:
  """Inverse of ``mllm_config_to_dict``; unknown or missing fields are a ``ConversionError``."""
  try:
    d = dict(d)
    vision = VisionConfig(**d.pop("vision"))
    text = TextConfig(**d.pop("text"))
    return MLLMConfig(vision=vision, text=text, **d)
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"{what}: not a valid MLLMConfig ({e})") from e


# ----------------------------------------------------------------------------- names and arrays


def _hf_name(key: str) -> str:
  """A file key -> the in-memory transformers name without ``model.``."""
  if key.startswith("model."):
    return key[len("model.") :]
  if key.startswith("language_model.model."):
    return "language_model." + key[len("language_model.model.") :]
  if key.startswith("language_model.lm_head."):
    return key[len("language_model.") :]
  return key


def hf_key(path: str) -> str:
  """Our param path -> the key ``save_pretrained`` writes (``language_model.model.`` layout)."""
  name = tensors.torch_key(path, HF_LISTS)
  if name.startswith("language_model."):
    return "language_model.model." + name[len("language_model.") :]
  if name.startswith("lm_head."):
    return "language_model." + name
  return name


# The parameters whose layout change is not a linear's transpose.
HOOKS = {
  f"{PATCH_CONV}/kernel": tensors.CONV,  # (p, p, C, D) <-> (D, C, p, p)
  CLS_TOKEN: tensors.leading_ones(2),  # (D,) <-> (1, 1, D)
  POSITIONS: tensors.leading_ones(1),  # (G*G + 1, D) <-> (1, G*G + 1, D)
}


def _row(path: str, shape: tuple[int, ...]) -> tensors.Entry:
  """The table row of one parameter: its key and the hook of its layout change."""
  linear = path.endswith("/kernel") and len(shape) == 2
  hook = HOOKS.get(path, tensors.TRANSPOSE if linear else tensors.AS_IS)
  return tensors.Entry(hf_key(path), hook)


def name_table(template: Mapping[str, Any]) -> tensors.Table:
  """Our path -> (transformers key, hook) of every parameter of ``template``
  (``abstract_params``)."""
  return tensors.name_table(template, _row)


def _in_memory(keys: Iterable[str], what: str) -> dict[str, str]:
  """The in-memory name (``_hf_name``) of each file key -> the key; two keys of one name (both
  layouts in one file) are an error."""
  out: dict[str, str] = {}
  for key in keys:
    name = _hf_name(key)
    if name in out:
      raise ConversionError(f"{what}: keys {out[name]!r} and {key!r} both name {name!r}")
    out[name] = key
  return out


def abstract_params(config: MLLMConfig, param_dtype: Any = jnp.float32) -> dict[str, Any]:
  """Our parameter tree as ``jax.ShapeDtypeStruct`` s (no memory, nothing compiled)."""
  model = mllm_lib.InternVLModel(config, param_dtype=param_dtype)
  s = config.vision.image_size
  ids = jnp.zeros((1, config.num_image_tokens + 2), jnp.int32)
  pixels = jnp.zeros((1, s, s, config.vision.num_channels), jnp.float32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, pixels))["params"]
  return nn.meta.unbox(boxed)


# ----------------------------------------------------------------------------- import / load


def read_hf(hf_dir: str, dtype: str = "float32") -> tuple[MLLMConfig, dict[str, Any]]:
  """``(MLLMConfig, params)`` of a transformers InternVL directory; params as a nested tree of
  numpy arrays in ``dtype``, checked against our model (every missing / unexpected key and shape
  mismatch is named)."""
  np_dtype = dtypes.dtype(dtype, dtypes.STORAGE)
  if not os.path.isdir(hf_dir):
    raise ConversionError(f"InternVL checkpoint {hf_dir!r} is not a directory")
  cfg = tensors.read_json(os.path.join(hf_dir, CONFIG_FILE), "InternVL checkpoint config")
  if cfg.get("format") == FORMAT:
    raise ConversionError(f"{hf_dir!r} is already an imported directory (use load_internvl)")
  config = mllm_config_from_hf(cfg)
  what = f"InternVL checkpoint {hf_dir!r}"
  origins: dict[str, str] = {}
  raw = tensors.read(hf_dir, "InternVL checkpoint", origins)
  keys = _in_memory(raw, what)  # in-memory name -> the file's key
  head, embed = (keys.get(_hf_name(hf_key(p))) for p in (LM_HEAD, EMBED))
  if config.text.tie_word_embeddings and head is not None:
    if embed is not None and np.array_equal(raw[head], raw[embed]):
      raw = {k: v for k, v in raw.items() if k != head}  # the tied copy, not a parameter
    else:  # transformers 5 does not tie differing weights either
      config = dataclasses.replace(
        config, text=dataclasses.replace(config.text, tie_word_embeddings=False)
      )
  template = abstract_params(config)
  table = {  # each row keyed as the file keys it (either layout)
    p: dataclasses.replace(e, key=keys.get(_hf_name(e.key), e.key))
    for p, e in name_table(template).items()
  }
  return config, tensors.from_file(table, template, raw, what, origins, dtype=np_dtype)


def import_internvl(
  hf_dir: str, out_dir: str, dtype: str = "float32", tokenizer_dir: str | None = None
) -> MLLMConfig:
  """Converts a transformers InternVL directory into an imported directory (module docstring).

  ``tokenizer_dir``: where the tokenizer files are (default ``hf_dir``). Returns the config.
  """
  if os.path.abspath(out_dir) == os.path.abspath(hf_dir):
    raise ConversionError(f"import_internvl: out_dir {out_dir!r} must differ from hf_dir")
  config, params = read_hf(hf_dir, dtype)
  os.makedirs(out_dir, exist_ok=True)
  stale = os.path.join(out_dir, CONFIG_FILE)
  if os.path.exists(stale):  # an older import: invalid until the new config is written
    os.remove(stale)
  tensors.write(os.path.join(out_dir, PARAMS_FILE), tensors.flatten(params))
  HFTokenizer.copy_files(tokenizer_dir or hf_dir, out_dir)
  tensors.write_json(
    os.path.join(out_dir, CONFIG_FILE),
    {
      "format": FORMAT,
      "mllm": mllm_config_to_dict(config),
      "source": os.path.abspath(hf_dir),
      "dtype": dtype,
    },
  )
  return config


def is_imported(path: str) -> bool:
  """Whether ``path`` is an imported directory (``config.json`` with format ``iomm_jax.mllm``)."""
  return (
    bool(path)
    and (tensors.peek_json(os.path.join(path, CONFIG_FILE)) or {}).get("format") == FORMAT
  )


def load_internvl(
  ckpt_dir: str, dtype: str | None = None
) -> tuple[MLLMConfig, dict[str, Any], HFTokenizer | None]:
  """``(MLLMConfig, params, tokenizer)`` of an imported directory.

  params: nested numpy arrays in the stored dtype (or ``dtype``); tokenizer: ``HFTokenizer``
  of the copied files, None if the source had no ``tokenizer.json``.
  """
  cfg = tensors.read_json(os.path.join(ckpt_dir, CONFIG_FILE), "imported MLLM config")
  if cfg.get("format") != FORMAT:
    raise ConversionError(
      f"{ckpt_dir!r} is not an imported MLLM directory: its {CONFIG_FILE} has format "
      f"{cfg.get('format')!r}, not {FORMAT!r} (convert it with import_internvl first)"
    )
  config = mllm_config_from_dict(cfg.get("mllm", {}), f"{ckpt_dir!r}")
  flat = tensors.read(os.path.join(ckpt_dir, PARAMS_FILE), "imported MLLM parameters")
  stored = {np.dtype(v.dtype) for v in flat.values()}
  if dtype is not None:
    target = dtypes.dtype(dtype, dtypes.STORAGE)
  elif len(stored) == 1:
    target = stored.pop()
  else:
    target = np.dtype(np.float32)
  params = tensors.match(abstract_params(config), flat, f"imported MLLM {ckpt_dir!r}", dtype=target)
  tok = None
  if os.path.exists(os.path.join(ckpt_dir, TOKENIZER_JSON)):
    tok = HFTokenizer.load(ckpt_dir)
  return config, params, tok


# ----------------------------------------------------------------------------- export


def export_internvl(
  params: Mapping[str, Any],
  mllm_config: MLLMConfig,
  out_dir: str,
  tokenizer_dir: str | None = None,
) -> None:
  """Writes a transformers InternVL directory (``config.json`` + ``model.safetensors``, keys in
  ``save_pretrained``'s layout, arrays in the params' dtype); with ``tokenizer_dir``, its
  tokenizer files are copied too."""
  given = {k: np.asarray(v) for k, v in tensors.flatten(params).items()}
  stored = {np.dtype(v.dtype) for v in given.values()}
  dt = stored.pop() if len(stored) == 1 else np.dtype(np.float32)
  if dtypes.name_of(dt) not in dtypes.STORAGE:
    raise ConversionError(f"export_internvl: dtype {dt} unsupported; use float32 or bfloat16")
  template = abstract_params(mllm_config)
  tree = tensors.match(template, given, "export_internvl params", dtype=dt)
  out = tensors.to_file(name_table(template), tensors.flatten(tree))
  os.makedirs(out_dir, exist_ok=True)
  tensors.write(os.path.join(out_dir, HF_WEIGHTS_FILE), out, metadata={"format": "pt"})
  if tokenizer_dir is not None:
    HFTokenizer.copy_files(tokenizer_dir, out_dir)
  tensors.write_json(
    os.path.join(out_dir, CONFIG_FILE), hf_config_from_mllm(mllm_config, dtypes.name_of(dt))
  )
