"""The prepared-data format that ``iomm-prepare`` writes and training reads.

A prepared folder holds:

* ``shard-SSSSS-of-NNNNN.array_record``: ArrayRecord files (``group_size:1``, so any record is
  one seek away, as grain's random access wants). Each record is a msgpack map
  ``{"key": str, "image": bytes, "caption": str | None}``; ``image`` is the square, already
  resized RGB image encoded as JPEG, quality 95, 4:4:4 chroma (``encode_image``). JPEG rather
  than PNG: at 512 px a photo is ~3-5x smaller and decodes faster, and q95 without chroma
  subsampling is visually lossless; raw arrays would be 768 KiB a record. msgpack rather than
  tf.Example: no TensorFlow on the read path.
* ``shard-SSSSS-of-NNNNN.json``: that shard's record counts, skipped records and caption fixes
  (written before the shard is renamed into place; a shard is finished iff its
  ``.array_record`` file exists).
* ``manifest.json`` (``MANIFEST``): written last, once every shard is finished: shards and
  their record counts, resolution, whether captions were kept, the source, ``format_version``,
  skipped-record counts by reason. Its presence means the folder is complete.
* ``skipped.jsonl``: one line per skipped record (index, key, reason, detail).
* ``prepare.json``: the settings the shards are written with (a resumed run must match them).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import msgpack
import numpy as np
from PIL import Image

from iomm_jax import files

FORMAT = "iomm-array-record"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JPEG_QUALITY = 95


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


def encode_image(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
  """uint8 [H, W, 3] -> JPEG bytes (4:4:4, optimised Huffman tables)."""
  buf = io.BytesIO()
  Image.fromarray(image, "RGB").save(buf, "JPEG", quality=quality, subsampling=0, optimize=True)
  return buf.getvalue()


def encode_record(key: str, image_bytes: bytes, caption: str | None) -> bytes:
  return msgpack.packb({"key": key, "image": image_bytes, "caption": caption}, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  """Record bytes -> ``{"key", "image" (encoded bytes), "caption"}``; ValueError if malformed."""
  try:
    rec = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise ValueError(f"record is not msgpack: {type(e).__name__}") from None
  if not isinstance(rec, dict) or not isinstance(rec.get("image"), bytes):
    raise ValueError("record is not an iomm-prepare record (no 'image' bytes)")
  return rec


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` to ``path`` atomically (``files.write_json``, indent 1, sorted keys)."""
  files.write_json(path, obj, indent=1)


def check_manifest(path: str, what: str, fmt: str, version: int, tool: str) -> dict[str, Any]:
  """The ``manifest.json`` of a folder that ``tool`` writes (format ``fmt``, ``version``), with
  every shard it lists present; errors name ``what`` (the flag or config key) and the file."""
  mpath = os.path.join(path, MANIFEST)
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f"{what}={path!r} is not a folder written by {tool}")
  if not os.path.exists(mpath):
    raise FileNotFoundError(
      f"{what}={path!r} has no {MANIFEST}: not a {tool} output, or it has not finished (rerun "
      f"{tool} with the same arguments to resume)"
    )
  with open(mpath) as f:
    try:
      m = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{mpath} ({what}={path!r}) is not valid JSON: {e}") from None
  if m.get("format") != fmt or m.get("format_version") != version:
    raise ValueError(
      f"{mpath} ({what}={path!r}) has format {m.get('format')!r} version "
      f"{m.get('format_version')!r}; this code reads {fmt!r} version {version}"
    )
  for s in m["shards"]:
    if not os.path.exists(os.path.join(path, s["file"])):
      raise FileNotFoundError(f"{mpath} ({what}={path!r}) lists {s['file']}, which is missing")
  return m


def read_manifest(path: str, what: str = "config.data.path") -> dict[str, Any]:
  """The manifest of prepared folder ``path``, checked; errors name ``what`` and the file."""
  m = check_manifest(path, what, FORMAT, FORMAT_VERSION, "iomm-prepare")
  if not m["num_records"]:
    raise ValueError(f"{os.path.join(path, MANIFEST)} ({what}={path!r}) holds no records")
  return m
