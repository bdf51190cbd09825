"""The cached-feature format that ``iomm-cache-features`` writes and training reads
(``config.data.features``).

A features folder mirrors the prepared folder (``records``) it encodes, shard for shard and record
for record, so that the same shuffle visits the same records in the same order as a run that
encodes them online:

* ``shard-SSSSS-of-NNNNN.array_record`` (``group_size:1``): record i of shard s stands for record i
  of the prepared shard s, a msgpack map ``{"key", "caption", "vision", "latent_mean"
  [, "latent_std"]}``. ``caption`` is the cleaned caption (``decode.clean_caption``) or None;
  the arrays are raw little-endian C-order bytes of the shapes and dtype the manifest lists:
  ``vision`` [P, D] the *unmasked* image tokens after the projector (masked at train time),
  ``latent_mean`` [h, w, C] the codec latent before any shift/scale (the VAE posterior mean;
  the pixel codec's latent itself) and ``latent_std`` [h, w, C] the VAE posterior std (VAE only;
  std rather than logvar: in bfloat16 it keeps a relative error of 2^-8). A prepared record that
  does not decode becomes ``{"key", "bad": reason}``; training skips it as online training does.
* ``shard-SSSSS-of-NNNNN.json``: that shard's counts (written before the shard is renamed into
  place, ``prepare.write_shard``).
* ``features.json`` (``SETTINGS``): what the shards are computed from (the prepared folder, the
  encoders, the dtype); a resumed run must match it.
* ``manifest.json``: written last, once every shard is finished: ``encoders`` (fingerprints of
  the ViT + projector and of the codec parameters, image size, token count and width, latent
  shape, and the config values they came from), ``arrays`` (shape and dtype of each array),
  shards and counts, ``feature_bytes_per_record`` (the arrays) and ``stored_bytes_per_record``
  (the shard files over the records).
"""

from __future__ import annotations

import math
import os
from typing import Any

import msgpack
import numpy as np

from iomm_jax import dtypes
from iomm_jax.data import records

FORMAT = "iomm-features"
FORMAT_VERSION = 1
MANIFEST = records.MANIFEST
SETTINGS = "features.json"
VISION, MEAN, STD = "vision", "latent_mean", "latent_std"
DTYPES = {n: dtypes.DTYPES[n] for n in ("bfloat16", "float32")}  # the cache's choices
RECORD_ENCODING = (
  "msgpack {key: str, caption: str|null, vision, latent_mean[, latent_std]: raw little-endian "
  "arrays of the shapes and dtype in 'arrays'} or {key, bad: reason} for an undecodable record"
)

Specs = tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype name) per array


def array_specs(
  num_tokens: int, width: int, latent_shape: tuple[int, int, int], has_std: bool, dtype: str
) -> Specs:
  """The arrays of one record: vision [P, D], latent_mean [h, w, C] (+ latent_std, a VAE)."""
  dtypes.dtype(dtype, tuple(DTYPES), "feature dtype")
  latent = tuple(int(n) for n in latent_shape)
  out = [(VISION, (int(num_tokens), int(width)), dtype), (MEAN, latent, dtype)]
  if has_std:
    out.append((STD, latent, dtype))
  return tuple(out)


def specs_to_json(specs: Specs) -> dict[str, dict[str, Any]]:
  """``{"vision": {"shape": [P, D], "dtype": "bfloat16"}, ...}`` (the manifest's ``arrays``)."""
  return {name: {"shape": list(shape), "dtype": dtype} for name, shape, dtype in specs}


def specs_from_json(arrays: dict[str, dict[str, Any]]) -> Specs:
  """The inverse of ``specs_to_json``, in the record order vision, latent_mean, latent_std."""
  order = [n for n in (VISION, MEAN, STD) if n in arrays]
  return tuple((n, tuple(arrays[n]["shape"]), arrays[n]["dtype"]) for n in order)


def feature_bytes(specs: Specs) -> int:
  """Bytes of one record's arrays (shapes x itemsize; msgpack adds a few dozen more)."""
  return sum(math.prod(shape) * DTYPES[dtype].itemsize for _, shape, dtype in specs)


def encode_record(key: str, caption: str | None, arrays: dict[str, np.ndarray], specs: Specs):
  """One record's bytes; ``arrays`` must have the shapes of ``specs`` (cast to their dtype)."""
  rec: dict[str, Any] = {"key": key, "caption": caption}
  for name, shape, dtype in specs:
    a = np.asarray(arrays[name])
    if a.shape != shape:
      raise ValueError(f"feature {name!r} has shape {a.shape}, the folder's is {shape}")
    rec[name] = np.ascontiguousarray(a.astype(DTYPES[dtype].newbyteorder("<"))).tobytes()
  return msgpack.packb(rec, use_bin_type=True)


def encode_bad(key: str | None, reason: str) -> bytes:
  """The record that stands for an undecodable prepared record."""
  return msgpack.packb({"key": key, "bad": reason}, use_bin_type=True)


def decode_record(data: bytes, specs: Specs) -> dict[str, Any]:
  """Record bytes -> ``{"key", "caption", <array name>: np.ndarray, ...}`` or ``{"key", "bad"}``;
  ValueError if malformed."""
  try:
    rec = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise ValueError(f"feature record is not msgpack: {type(e).__name__}") from None
  if not isinstance(rec, dict):
    raise ValueError("not an iomm-features record")
  if "bad" in rec:
    return {"key": rec.get("key"), "bad": str(rec["bad"])}
  out = {"key": rec.get("key"), "caption": rec.get("caption")}
  for name, shape, dtype in specs:
    raw = rec.get(name)
    dt = DTYPES[dtype].newbyteorder("<")
    if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dt.itemsize:
      raise ValueError(f"feature record lacks {name!r} of shape {shape} {dtype}")
    out[name] = np.frombuffer(raw, dt).reshape(shape)
  return out


def read_manifest(path: str, what: str = "config.data.features") -> dict[str, Any]:
  """The manifest of features folder ``path``, checked; errors name ``what`` and the file."""
  m = records.check_manifest(path, what, FORMAT, FORMAT_VERSION, "iomm-cache-features")
  if not m["num_records"] - m["num_bad"]:
    raise ValueError(f"{os.path.join(path, MANIFEST)} ({what}={path!r}) holds no usable records")
  return m
