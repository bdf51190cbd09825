"""``iomm-cache-features``' library: a prepared folder -> the run's frozen encoder outputs, and the
check that a run may train on them (``config.data.features``).

``cache_features`` encodes every record of an ``iomm-prepare`` folder with the frozen ViT +
projector of ``config`` (the *unmasked* tokens of ``iomm.vision_tokens``) and its codec
(``codec.moments``: the VAE posterior mean and std, or the pixel codec's latent) and writes them in
the format of ``data.features``. Each record is decoded exactly as online training decodes it
(``sources.decode_element`` at ``config.model.image_size``), and feature shard s holds prepared
shard s record for record, so the same shuffle reads the same samples. The shards are written with
``data.prepare``'s machinery: process p of N writes shards p, p + N, ...; each one through a
temporary file and a rename; a rerun with the same arguments skips finished shards (and refuses
other settings: ``features.json``); whichever process finds every shard finished writes the
manifest.

``fingerprint`` hashes parameter values where they live (a jitted integer checksum per leaf, exact
whatever the sharding, then SHA-256 over the leaves' paths, shapes, dtypes and checksums), so the
cache command and a training run on any mesh compute the same value. ``check_run`` compares the
features' encoders (fingerprints, image size, token count and width, latent shape) with the
run's; a difference is a one-line error naming both values and the config key.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from iomm_jax import sharding
from iomm_jax.assembly import context
from iomm_jax.configs import loading, specs
from iomm_jax.data import decode, features, prepare, records, sources
from iomm_jax.data.inputs import InputError
from iomm_jax.models import codec as codec_lib
from iomm_jax.models import iomm
from iomm_jax.models import mllm as mllm_lib

VISION_PARAMS = ("vision_tower", "multi_modal_projector")  # the MLLM subtrees vision_tokens uses
READ_CHUNK = 256  # prepared records read at once


# ----------------------------------------------------------------------------- fingerprints


def _fmix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (uint32 -> uint32; wrapping arithmetic)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _checksum(x: jax.Array) -> jax.Array:
  """Two uint32 sums of per-element hashes of (bits, flat index): order-free, so exact under any
  sharding or reduction order."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  index = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)  # flat C-order position
  h = _fmix(bits ^ _fmix(index + jnp.uint32(0x9E3779B9)))
  return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(_fmix(h ^ 0x5BD1E995), dtype=jnp.uint32)])


def fingerprint(tree: Any, salt: str = "") -> str:
  """16 hex digits identifying the values (and paths, shapes, dtypes) of a parameter tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.jit(lambda xs: [_checksum(x) for x in xs])([x for _, x in leaves])
  h = hashlib.sha256(salt.encode())
  for (path, x), s in zip(leaves, sums):
    a, b = (int(v) for v in sharding.to_host(s))
    h.update(f"{jax.tree_util.keystr(path)}|{tuple(x.shape)}|{x.dtype}|{a}|{b};".encode())
  return h.hexdigest()[:16]


def _vision_from(config: ml_collections.ConfigDict) -> str:
  """Where ``config``'s ViT + projector weights come from, as config keys (for messages)."""
  m = config.model
  if m.mllm_init == "random":
    return f"config.model.mllm_init='random', config.seed={config.seed}"
  return f"config.model.mllm_from={m.mllm_from!r}"


def _codec_from(config: ml_collections.ConfigDict) -> str:
  """Where ``config``'s codec weights come from, as config keys (for messages)."""
  m = config.model
  if m.codec != "vae":
    return f"config.model.codec={m.codec!r}"
  if m.vae_checkpoint:
    return f"config.model.vae_checkpoint={m.vae_checkpoint!r}"
  return f"config.model.vae_checkpoint='' (random init, config.seed={config.seed})"


def encoders(config: ml_collections.ConfigDict, model: iomm.IOMM, frozen: dict) -> dict[str, Any]:
  """What the cached features depend on: the fingerprints of the ViT + projector and of the codec
  (values, architecture, dtypes), image size, tokens, width, latent shape, and where the weights
  came from (for messages)."""
  mc = model.mllm_config
  vision_salt = repr((mc.vision, mc.downsample_ratio, mc.projector_norm_eps, str(model.mllm.dtype)))
  return {
    "vision_fingerprint": fingerprint({k: frozen["mllm"][k] for k in VISION_PARAMS}, vision_salt),
    "codec_fingerprint": fingerprint(frozen["codec"], repr(model.codec)),
    "image_size": int(model.image_size),
    "num_image_tokens": int(model.num_image_tokens),
    "vision_width": int(mc.text.width),
    "latent_shape": [int(n) for n in model.latent_shape],
    "vision_from": _vision_from(config),
    "codec_from": _codec_from(config),
  }


def feature_specs(model: iomm.IOMM, dtype: str) -> features.Specs:
  """The arrays a record of ``model``'s features holds, stored in ``dtype``."""
  has_std = isinstance(model.codec, codec_lib.VAECodec)
  return features.array_specs(
    model.num_image_tokens, model.mllm_config.text.width, model.latent_shape, has_std, dtype
  )


def shape_specs(config: ml_collections.ConfigDict, dtype: str) -> features.Specs:
  """``feature_specs`` of ``config``'s model from its variants alone (no weights, no data)."""
  try:
    mcfg = mllm_lib.get_mllm_config(config.model.mllm)
  except (KeyError, ValueError) as e:
    raise InputError(f"config.model.mllm={config.model.mllm!r}: name a variant ({e})") from None
  return feature_specs(
    iomm.build(specs.from_config(config).model, mcfg.text.vocab_size, mcfg.image_token_id), dtype
  )


# ----------------------------------------------------------------------------- the check


CHECKS = (  # encoders key, what it is, the "from" key for messages (fingerprints)
  ("image_size", "image size", None),
  ("num_image_tokens", "vision tokens per image", None),
  ("vision_width", "vision token width", None),
  ("latent_shape", "latent shape", None),
  ("vision_fingerprint", "ViT + projector fingerprint", "vision_from"),
  ("codec_fingerprint", "codec fingerprint", "codec_from"),
)


def _config_key(config: ml_collections.ConfigDict, check: str) -> str:
  """The config key that sets what ``check`` compares."""
  m = config.model
  if check == "vision_fingerprint":
    return "seed" if m.mllm_init == "random" else "model.mllm_from"
  if check == "codec_fingerprint":
    return (
      "model.codec" if m.codec != "vae" else "model.vae_checkpoint" if m.vae_checkpoint else "seed"
    )
  return {"image_size": "model.image_size", "latent_shape": "model.codec"}.get(check, "model.mllm")


class FeaturesError(ValueError):
  """``config.data.features`` cannot serve this run (missing, unfinished, or of other encoders);
  the message is one line naming the key and the values."""


def check_run(config: ml_collections.ConfigDict, model: iomm.IOMM, frozen: dict) -> dict:
  """The manifest of ``config.data.features`` if they were encoded by this run's encoders at its
  image size; else a ``FeaturesError`` naming the config key and both values."""
  path = config.data.features
  try:
    m = features.read_manifest(path)
  except (FileNotFoundError, ValueError) as e:
    raise FeaturesError(str(e)) from None
  cached, run = m["encoders"], encoders(config, model, frozen)
  for check, what, source in CHECKS:
    if cached[check] != run[check]:
      key = _config_key(config, check)
      was = f" ({cached[source]})" if source else ""
      now = f" ({run[source]})" if source else ""
      raise FeaturesError(
        f"config.data.features={path!r} holds features of {what} {cached[check]!r}{was}, but "
        f"this run (config.{key}={loading.get_dotted(config, key)!r}) has {run[check]!r}{now}; "
        "run iomm-cache-features with this run's config into a new folder"
      )
  return m


# ----------------------------------------------------------------------------- the cache command


def make_encoder(model: iomm.IOMM, specs: features.Specs) -> Callable:
  """jit(frozen, images uint8 [B, S, S, 3]) -> {vision, latent_mean[, latent_std]} in the dtypes
  of ``specs``: what ``steps.generator_loss_fn`` would compute from the images online."""
  dtypes = {name: jnp.dtype(dtype) for name, _, dtype in specs}

  def encode(frozen, images):
    vis = iomm.vision_tokens(model, frozen["mllm"], images)
    mean, std = model.codec.moments(frozen["codec"], codec_lib.images_to_unit(images))
    out = {features.VISION: vis, features.MEAN: mean, features.STD: std}
    return {k: out[k].astype(dt) for k, dt in dtypes.items()}

  return jax.jit(encode)


def _key_of(element: bytes) -> str | None:
  """The key of a prepared record, or None if it is not one."""
  try:
    return records.decode_record(element).get("key")
  except ValueError:
    return None


def _fill(path: str, model, frozen, encode, specs, batch_size: int, bar) -> Callable:
  """The ``prepare.write_shard`` filler of the features of prepared shard ``path``."""

  def fill(writer) -> dict[str, Any]:
    from array_record.python.array_record_module import ArrayRecordReader

    counts = {"records": 0, "bad": 0, "captioned": 0}
    pending: list[tuple] = []  # (key, caption) or (key, None, reason), in record order
    images: list[np.ndarray] = []

    def flush():
      out = {}
      if images:
        pad = [np.zeros_like(images[0])] * (batch_size - len(images))  # one compiled shape
        out = jax.device_get(encode(frozen, np.stack(images + pad)))
      row = 0
      for entry in pending:
        if len(entry) == 3:
          writer.write(features.encode_bad(entry[0], entry[2]))
          continue
        arrays = {name: out[name][row] for name, _, _ in specs}
        writer.write(features.encode_record(entry[0], entry[1], arrays, specs))
        row += 1
      pending.clear()
      images.clear()

    reader = ArrayRecordReader(path)
    try:
      n = reader.num_records()
      for start in range(0, n, READ_CHUNK):
        for element in reader.read(start, min(start + READ_CHUNK, n)):
          bar.update(1)
          counts["records"] += 1
          try:
            image, caption = sources.decode_element(element, model.image_size)
          except decode.BadRecord as e:
            pending.append((_key_of(element), None, e.reason))
            counts["bad"] += 1
            continue
          pending.append((_key_of(element), caption))
          images.append(image)
          counts["captioned"] += caption is not None
          if len(images) == batch_size:
            flush()
      flush()
    finally:
      reader.close()
    return counts

  return fill


def _digest(path: str) -> str:
  """SHA-256 of a file's bytes."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def cache_features(
  config: ml_collections.ConfigDict,
  prepared: str,
  out_dir: str,
  dtype: str = "bfloat16",
  batch_size: int = 16,
  num_processes: int = 1,
  process_index: int = 0,
  progress: bool = True,
  after_shard: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:
  """Writes this process's unfinished feature shards of ``prepared`` to ``out_dir``; returns the
  manifest if every shard is now finished, else None. ``after_shard(s)`` runs after each shard
  written (tests use it to simulate an interruption). Errors name the command's flags."""
  prepare.check_process_split(num_processes, process_index)
  if dtype not in features.DTYPES:
    raise InputError(f"--dtype {dtype!r} unknown; choose from {tuple(features.DTYPES)}")
  if batch_size < 1:
    raise InputError(f"--batch-size {batch_size} must be positive")
  pm = records.read_manifest(prepared, what="--data")
  ctx = context.build(config)
  model, frozen = ctx.model, ctx.frozen
  specs = feature_specs(model, dtype)
  settings = {
    "format_version": features.FORMAT_VERSION,
    "prepared": {
      "path": os.path.abspath(prepared),
      "manifest_sha256": _digest(os.path.join(prepared, records.MANIFEST)),
      "num_records": pm["num_records"],
      "resolution": pm["resolution"],
    },
    "encoders": encoders(config, model, frozen),
    "arrays": features.specs_to_json(specs),
    "dtype": dtype,
  }
  os.makedirs(out_dir, exist_ok=True)
  prepare.check_settings(out_dir, settings, features.SETTINGS)
  shards = pm["shards"]
  mine = prepare.unfinished_shards(out_dir, len(shards), num_processes, process_index)
  encode = make_encoder(model, specs)
  todo = sum(shards[s]["records"] for s in mine)
  with tqdm(total=todo, unit="rec", disable=not progress, file=sys.stderr) as bar:
    for s in mine:
      src = os.path.join(prepared, shards[s]["file"])
      prepare.write_shard(
        out_dir, s, len(shards), _fill(src, model, frozen, encode, specs, batch_size, bar)
      )
      if after_shard is not None:
        after_shard(s)
  return finalize(out_dir, settings, len(shards))


def finalize(out_dir: str, settings: dict[str, Any], num_shards: int) -> dict[str, Any] | None:
  """Writes the manifest if every shard is finished; returns it or None."""
  reports = prepare.shard_reports(out_dir, num_shards)
  if reports is None:
    return None
  shards = [{"file": n, **rep} for n, rep in reports]
  total = sum(s["records"] for s in shards)
  stored = sum(os.path.getsize(os.path.join(out_dir, s["file"])) for s in shards)
  specs = features.specs_from_json(settings["arrays"])
  manifest = {
    "format": features.FORMAT,
    "format_version": features.FORMAT_VERSION,
    "record_encoding": features.RECORD_ENCODING,
    "prepared": settings["prepared"],
    "encoders": settings["encoders"],
    "arrays": settings["arrays"],
    "dtype": settings["dtype"],
    "num_records": total,
    "num_bad": sum(s["bad"] for s in shards),
    "num_captioned": sum(s["captioned"] for s in shards),
    "shards": shards,
    "feature_bytes_per_record": features.feature_bytes(specs),
    "stored_bytes_per_record": round(stored / max(total, 1), 1),
  }
  records.write_json_atomic(os.path.join(out_dir, features.MANIFEST), manifest)
  return manifest
