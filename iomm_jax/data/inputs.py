"""The inputs ``iomm-prepare`` reads: an image folder, WebDataset tars, parquet files, tfds.

Every source is a fixed, deterministic sequence of items (``len(source)``; ``read(start,
stop)`` yields ``Raw`` records of items ``start..stop-1`` in order), so shard ``s`` always holds
the same items and an interrupted preparation resumes shard by shard. Problems of the user's
*arguments* (a missing folder, a missing column) raise ``InputError`` naming the flag or file;
problems of single *records* come back as ``Raw.skip`` reasons (``decode.SKIP_REASONS``).

* Folder: recursive (symlinks followed, each real directory visited once, so a symlink loop
  ends), sorted, files with an image extension. The key is the path relative to the folder
  without its extension; ``a.jpg`` next to ``a.png`` is a ``duplicate_key`` (the first in sorted
  order is kept). Captions come from ``--captions-jsonl`` (``{"file": relative path, "caption":
  ...}`` per line; it replaces sidecars) or else from a sidecar ``<stem>.txt`` (the whole file)
  or ``<stem>.json`` (its ``"caption"``).
* WebDataset tars (uncompressed ``.tar``): members grouped by key (the member path up to the
  first dot of its file name); the image is the first of ``IMAGE_EXTS`` present, the caption
  ``<key>.txt`` or ``<key>.json``'s ``"caption"``. A key seen before (in this or an earlier tar)
  is a ``duplicate_key``; a key without an image is ``no_image``.
* Parquet: an image column of bytes, or of structs with a ``bytes`` field (as Hugging Face
  datasets write images), and an optional caption column.
* tfds: a prepared dataset on disk (``tfds.builder_from_directory``, or a name and data dir with
  ``download=False``); never downloads. Images arrive decoded (arrays), captions as bytes.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class InputError(ValueError):
  """Bad arguments or input files; the message names the flag or file (CLI exit code 2)."""


@dataclasses.dataclass
class Raw:
  """One input record before decoding: ``image`` is bytes or an array (tfds); ``skip`` a
  ``decode.SKIP_REASONS`` entry when the record is already known to be unusable."""

  index: int
  key: str
  image: bytes | np.ndarray | None
  caption: str | bytes | None
  skip: str | None = None
  detail: str = ""


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _caption_from_json(data: bytes, key: str = "caption") -> str | None:
  try:
    obj = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  cap = obj.get(key) if isinstance(obj, dict) else None
  return cap if isinstance(cap, str) else None


# ----------------------------------------------------------------------------- image folder


def walk_images(root: str) -> list[str]:
  """Image files under ``root`` (relative paths, sorted), each real directory visited once."""
  seen: set[tuple[int, int]] = set()
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    st = os.stat(dirpath)
    if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a second link to a visited dir
      dirnames[:] = []
      continue
    seen.add((st.st_dev, st.st_ino))
    dirnames.sort()
    for name in sorted(filenames):
      if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in name:
        out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  return sorted(out)


class FolderSource:
  """Images in a folder tree, captions from sidecars or a jsonl file (module docstring)."""

  def __init__(self, root: str, captions_jsonl: str | None = None):
    if not os.path.isdir(root):
      raise InputError(f"--images {root!r} is not a folder")
    self.root, self.captions_jsonl = root, captions_jsonl
    self.files = walk_images(root)
    self.captions = _load_jsonl(captions_jsonl, root) if captions_jsonl else None
    seen: set[str] = set()
    self.dup = []
    for f in self.files:
      key = f.rsplit(".", 1)[0]
      self.dup.append(key in seen)
      seen.add(key)

  def describe(self) -> dict[str, Any]:
    return {
      "kind": "images",
      "path": os.path.abspath(self.root),
      "captions_jsonl": os.path.abspath(self.captions_jsonl) if self.captions_jsonl else None,
    }

  def __len__(self) -> int:
    return len(self.files)

  def _caption(self, rel: str) -> str | bytes | None:
    if self.captions is not None:
      return self.captions.get(rel)
    stem = os.path.join(self.root, rel.rsplit(".", 1)[0])
    if os.path.isfile(stem + ".txt"):
      return _read_bytes(stem + ".txt")
    if os.path.isfile(stem + ".json"):
      return _caption_from_json(_read_bytes(stem + ".json"))
    return None

  def read(self, start: int, stop: int) -> Iterator[Raw]:
    for i in range(start, stop):
      rel = self.files[i]
      key = rel.rsplit(".", 1)[0]
      if self.dup[i]:
        yield Raw(i, key, None, None, "duplicate_key", rel)
        continue
      try:
        data, cap = _read_bytes(os.path.join(self.root, rel)), self._caption(rel)
      except OSError as e:
        yield Raw(i, key, None, None, "unreadable", f"{rel}: {e}")
        continue
      yield Raw(i, key, data, cap)


def _load_jsonl(path: str, root: str) -> dict[str, str]:
  """``{"file": ..., "caption": ...}`` lines -> {relative path: caption}; the first entry of a
  file wins. A malformed line is an InputError naming the file and line."""
  if not os.path.isfile(path):
    raise InputError(f"--captions-jsonl {path!r} does not exist")
  out: dict[str, str] = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        name, cap = obj["file"], obj.get("caption")
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise InputError(
          f"--captions-jsonl {path}:{n}: expected a JSON object with 'file' and 'caption'"
        ) from None
      rel = os.path.normpath(name if not os.path.isabs(name) else os.path.relpath(name, root))
      out.setdefault(rel.replace(os.sep, "/"), cap if isinstance(cap, str) else None)
  return out


# ----------------------------------------------------------------------------- WebDataset tars


def _expand(paths: list[str], ext: str, flag: str) -> list[str]:
  """Files, folders (their ``*.ext``) and globs -> a sorted file list; none is an InputError."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      out += glob.glob(os.path.join(p, f"*.{ext}"))
    elif os.path.isfile(p):
      out.append(p)
    elif glob.glob(p):
      out += glob.glob(p)
    else:
      raise InputError(f"{flag} {p!r} does not exist")
  if not out:
    raise InputError(f"{flag} {' '.join(paths)}: no .{ext} files found")
  return sorted(set(out))


class TarSource:
  """WebDataset-style tar shards (module docstring)."""

  def __init__(self, paths: list[str]):
    self.paths = _expand(paths, "tar", "--tar")
    # one entry per sample: (tar path, key, {ext: (offset, size)}, duplicate?)
    self.samples: list[tuple[str, str, dict[str, tuple[int, int]], bool]] = []
    seen: set[str] = set()
    for path in self.paths:
      try:
        tf = tarfile.open(path, "r:")
      except (tarfile.TarError, OSError) as e:
        raise InputError(f"--tar {path}: not an uncompressed tar file ({e})") from None
      with tf:
        current: dict[str, int] = {}  # key -> index in self.samples of its open group
        for m in tf:
          if not m.isfile():
            continue
          d, base = os.path.split(m.name)
          stem, dot, ext = base.partition(".")
          if not dot:
            continue
          key, ext = f"{d}/{stem}" if d else stem, ext.lower()
          j = current.get(key)
          if j is None or ext in self.samples[j][2]:  # a new sample (or the key again)
            self.samples.append((path, key, {}, key in seen))
            j = current[key] = len(self.samples) - 1
            seen.add(key)
          self.samples[j][2][ext] = (m.offset_data, m.size)

  def describe(self) -> dict[str, Any]:
    return {"kind": "tar", "paths": [os.path.abspath(p) for p in self.paths]}

  def __len__(self) -> int:
    return len(self.samples)

  def read(self, start: int, stop: int) -> Iterator[Raw]:
    handles: dict[str, Any] = {}
    try:
      for i in range(start, stop):
        path, key, members, dup = self.samples[i]
        if dup:
          yield Raw(i, key, None, None, "duplicate_key", f"{os.path.basename(path)}:{key}")
          continue
        if path not in handles:
          handles[path] = open(path, "rb")
        f = handles[path]

        def member(ext, f=f, members=members):
          off, size = members[ext]
          f.seek(off)
          return f.read(size)

        img_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if img_ext is None:
          yield Raw(i, key, None, None, "no_image", f"members: {sorted(members)}")
          continue
        cap = None
        if "txt" in members:
          cap = member("txt")
        elif "json" in members:
          cap = _caption_from_json(member("json"))
        yield Raw(i, key, member(img_ext), cap)
    finally:
      for f in handles.values():
        f.close()


# ----------------------------------------------------------------------------- parquet


class ParquetSource:
  """Parquet files with an image column (bytes or {"bytes": ...} structs) and a caption column
  (optional: a missing caption column means no captions)."""

  def __init__(
    self, paths: list[str], image_column: str = "image", caption_column: str = "caption"
  ):
    import pyarrow.parquet as pq

    self.paths = _expand(paths, "parquet", "--parquet")
    self.image_column, self.caption_column = image_column, caption_column
    self.counts, self.has_caption = [], []
    for p in self.paths:
      try:
        schema = pq.ParquetFile(p).schema_arrow
        n = pq.ParquetFile(p).metadata.num_rows
      except Exception as e:  # pyarrow raises ArrowInvalid / OSError on non-parquet files
        raise InputError(f"--parquet {p}: not a readable parquet file ({e})") from None
      if image_column not in schema.names:
        raise InputError(
          f"--parquet {p}: no image column {image_column!r} (--image-column); "
          f"columns: {schema.names}"
        )
      self.has_caption.append(caption_column in schema.names)
      self.counts.append(n)
    self.starts = np.concatenate([[0], np.cumsum(self.counts)]).tolist()

  def describe(self) -> dict[str, Any]:
    return {
      "kind": "parquet",
      "paths": [os.path.abspath(p) for p in self.paths],
      "image_column": self.image_column,
      "caption_column": self.caption_column,
    }

  def __len__(self) -> int:
    return int(self.starts[-1])

  def read(self, start: int, stop: int) -> Iterator[Raw]:
    import pyarrow.parquet as pq

    i = start
    while i < stop:
      f = bisect.bisect_right(self.starts, i) - 1
      lo, hi = i - self.starts[f], min(stop, self.starts[f + 1]) - self.starts[f]
      cols = [self.image_column] + ([self.caption_column] if self.has_caption[f] else [])
      table = _read_rows(pq.ParquetFile(self.paths[f]), cols, lo, hi)
      images = table.column(self.image_column).to_pylist()
      caps = table.column(self.caption_column).to_pylist() if self.has_caption[f] else None
      name = os.path.basename(self.paths[f])
      for j, img in enumerate(images):
        key = f"{name}:{lo + j}"
        if isinstance(img, dict):
          img = img.get("bytes")
        cap = caps[j] if caps is not None else None
        if not isinstance(img, bytes):
          yield Raw(i + j, key, None, None, "no_image", f"image cell is {type(img).__name__}")
        else:
          yield Raw(i + j, key, img, cap if isinstance(cap, str | bytes) else None)
      i += hi - lo


def _read_rows(pf, columns: list[str], lo: int, hi: int):
  """Rows ``lo..hi-1`` of a parquet file, reading only the row groups that hold them."""
  groups, first, row = [], None, 0
  for g in range(pf.metadata.num_row_groups):
    n = pf.metadata.row_group(g).num_rows
    if row < hi and row + n > lo:
      groups.append(g)
      first = row if first is None else first
    row += n
  return pf.read_row_groups(groups, columns=columns).slice(lo - first, hi - lo)


# ----------------------------------------------------------------------------- tfds


def open_tfds(builder_dir: str = "", name: str = "", data_dir: str = "", split: str = "train"):
  """A random-access tfds data source of a dataset already on disk (never downloads)."""
  import tensorflow_datasets as tfds

  try:
    if builder_dir:
      if not os.path.isdir(builder_dir):
        raise InputError(f"tfds directory {builder_dir!r} does not exist")
      return tfds.builder_from_directory(builder_dir).as_data_source(split=split)
    return tfds.data_source(name, data_dir=data_dir or None, split=split, download=False)
  except InputError:
    raise
  except Exception as e:  # tfds raises many types for a missing / unprepared dataset
    where = builder_dir or f"{name} in {data_dir or 'the default data dir'}"
    raise InputError(f"tfds dataset {where} (split {split!r}) cannot be opened: {e}") from None


class TfdsSource:
  """A tfds dataset on disk, read through ``as_data_source`` (the builder's ArrayRecord files)."""

  def __init__(
    self,
    builder_dir: str = "",
    name: str = "",
    data_dir: str = "",
    split: str = "train",
    image_key: str = "image",
    caption_key: str = "caption",
  ):
    self.args = dict(builder_dir=builder_dir, name=name, data_dir=data_dir, split=split)
    self.ds = open_tfds(builder_dir, name, data_dir, split)
    self.image_key, self.caption_key = image_key, caption_key
    if len(self.ds) and image_key not in self.ds[0]:
      raise InputError(f"tfds dataset has no feature {image_key!r} (--image-column)")

  def describe(self) -> dict[str, Any]:
    return {"kind": "tfds", **self.args, "image_key": self.image_key}

  def __len__(self) -> int:
    return len(self.ds)

  def read(self, start: int, stop: int) -> Iterator[Raw]:
    for i in range(start, stop):
      try:
        ex = self.ds[i]
      except Exception as e:  # a corrupt example in the tfds files
        yield Raw(i, str(i), None, None, "corrupt", f"{type(e).__name__}: {e}"[:200])
        continue
      yield Raw(i, str(i), ex[self.image_key], ex.get(self.caption_key))
