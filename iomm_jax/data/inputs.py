"""The inputs ``iomm-prepare`` reads: an image folder, WebDataset tars, parquet files, tfds.

Every source is a fixed, deterministic sequence of items (``len(source)``; ``read(start,
stop)`` yields ``Raw`` records of items ``start..stop-1`` in order), so shard ``s`` always holds
the same items and an interrupted preparation resumes shard by shard. Problems of the user's
*arguments* (a missing folder, a missing column) raise ``InputError`` naming the flag or file;
problems of single *records* come back as ``Raw.skip`` reasons (``decode.SKIP_REASONS``).

* Folder: recursive (symlinks followed, each real directory visited once, so a symlink loop
  ends), sorted, names with an image extension. The key is the path relative to the folder
  without its extension; ``a.jpg`` next to ``a.png`` is a ``duplicate_key`` (the first in sorted
  order is kept). A name that is not valid UTF-8 keeps its bytes in the key as ``\\xNN`` escapes
  (``display_name``). Only regular files (after resolving symlinks) of at most
  ``max_file_bytes`` are read, checked with ``os.stat`` before anything is opened: a FIFO, a
  device or a socket is ``not_a_file``, a larger file ``too_large``; a file or a directory that
  cannot be read is ``unreadable`` (a directory is then one item of its own, key ``dir/``), and
  an unreadable root an ``InputError``. Captions come from ``--captions-jsonl`` (``{"file":
  relative path, "caption": ...}`` per line; it replaces sidecars) or else from a sidecar
  ``<stem>.txt`` (the whole file) or ``<stem>.json`` (its ``"caption"``).
* Caption fields that cannot be used keep the image without a caption and are counted as a fix
  (``Raw.fixes``): ``caption_not_a_string`` (a number, list, null or missing ``"caption"`` in a
  jsonl line or a ``.json`` sidecar, a non-text parquet cell), ``caption_bad_json`` (a ``.json``
  sidecar that is not a JSON object), ``caption_unreadable`` / ``caption_not_a_file`` /
  ``caption_too_large`` (a sidecar that cannot be read, is special, or exceeds
  ``SIDECAR_BYTES``). A jsonl line that is not an object with a string ``"file"`` is an
  ``InputError`` naming the file and line, as for any malformed line.
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
import stat
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# An uncompressed image at the default max_pixels (64 M RGB pixels, e.g. a BMP) is 192 MiB.
MAX_FILE_BYTES = 256 * 2**20
SIDECAR_BYTES = 2**20  # a caption sidecar is cut to 2000 characters anyway


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
  fixes: tuple[str, ...] = ()  # repairs already made while reading (``caption_not_a_string``)
  name: str = ""  # where the bytes came from, for messages (a relative path, tar:member)


class Unusable(Exception):
  """A path that is not read: ``reason`` is a ``decode.SKIP_REASONS`` entry."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


def display_name(name: str) -> str:
  """``name`` as valid UTF-8 text: bytes that are not UTF-8 (which ``os`` hands back as
  surrogate escapes) become ``\\xNN``, so a key keeps them and JSON / msgpack can hold it."""
  return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _kind(mode: int) -> str:
  for test, what in (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
  ):
    if test(mode):
      return what
  return "not a regular file"


def read_regular(path: str, max_bytes: int, shown: str) -> bytes:
  """The bytes of ``path`` if it is a regular file (symlinks resolved) of at most ``max_bytes``.

  ``os.stat`` decides before anything is opened, so a FIFO or a device is never opened; the open
  is non-blocking and re-checked with ``fstat`` (the path may change in between), and the read
  stops at ``max_bytes + 1`` (the file may grow). ``shown`` names the path in messages.

  Raises:
    Unusable: ``unreadable``, ``not_a_file`` or ``too_large``, with a detail naming ``shown``.
  """
  data = b""
  try:
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode) and st.st_size <= max_bytes:
      fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
      with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode):
          data = f.read(max_bytes + 1)
  except OSError as e:
    raise Unusable("unreadable", f"{shown}: {e.strerror or type(e).__name__}") from None
  if not stat.S_ISREG(st.st_mode):
    raise Unusable("not_a_file", f"{shown} is {_kind(st.st_mode)}")
  if st.st_size > max_bytes or len(data) > max_bytes:
    size = max(st.st_size, len(data))
    raise Unusable("too_large", f"{shown}: {size} bytes > --max-file-bytes {max_bytes}")
  return data


def _caption_from_json(data: bytes, key: str = "caption") -> tuple[str | None, str | None]:
  """(caption, fix): the ``key`` field of a JSON object, or None and the fix it counts as."""
  try:
    obj = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None, "caption_bad_json"
  if not isinstance(obj, dict):
    return None, "caption_bad_json"
  return _string_caption(obj.get(key))


def _string_caption(cap: Any) -> tuple[str | None, str | None]:
  """(caption, fix): a string caption as it is, anything else None and ``caption_not_a_string``."""
  return (cap, None) if isinstance(cap, str) else (None, "caption_not_a_string")


# ----------------------------------------------------------------------------- image folder


def walk_images(root: str) -> tuple[list[str], dict[str, str]]:
  """(image names under ``root``, {unreadable directory: why}), relative paths, sorted; each real
  directory visited once. An unreadable directory is ``"dir/"``; an unreadable root an
  InputError naming ``--images``."""
  seen: set[tuple[int, int]] = set()
  out, bad = [], {}

  def rel(path: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")

  def failed(e: OSError) -> None:
    where = e.filename if isinstance(e.filename, str) else root
    if os.path.normpath(where) == os.path.normpath(root):
      raise InputError(f"--images {display_name(root)!r} cannot be read: {e.strerror or e}")
    bad[rel(where) + "/"] = e.strerror or type(e).__name__

  for dirpath, dirnames, filenames in os.walk(root, onerror=failed, followlinks=True):
    try:
      st = os.stat(dirpath)
    except OSError as e:  # it vanished after its parent was listed
      failed(e)
      dirnames[:] = []
      continue
    if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a second link to a visited dir
      dirnames[:] = []
      continue
    seen.add((st.st_dev, st.st_ino))
    dirnames.sort()
    for name in sorted(filenames):
      if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in name:
        out.append(rel(os.path.join(dirpath, name)))
  return sorted(out), bad


class FolderSource:
  """Images in a folder tree, captions from sidecars or a jsonl file (module docstring)."""

  def __init__(
    self, root: str, captions_jsonl: str | None = None, max_file_bytes: int = MAX_FILE_BYTES
  ):
    if max_file_bytes < 1:
      raise InputError(f"--max-file-bytes {max_file_bytes} must be positive")
    if not os.path.isdir(root):
      raise InputError(f"--images {display_name(root)!r} is not a folder")
    self.root, self.captions_jsonl, self.max_file_bytes = root, captions_jsonl, max_file_bytes
    names, bad = walk_images(root)
    self.files = sorted(names + list(bad))
    self.captions = _load_jsonl(captions_jsonl, root) if captions_jsonl else None
    # Known skips by index: an unreadable directory, a key seen before (display names compared,
    # so a name that only differs from another by its escapes is a duplicate, not a collision).
    seen: set[str] = set()
    self.pre_skip: list[tuple[str, str] | None] = []
    for f in self.files:
      key = _key(f)
      if f in bad:
        self.pre_skip.append(("unreadable", f"{display_name(f)}: {bad[f]}"))
      elif key in seen:
        self.pre_skip.append(("duplicate_key", display_name(f)))
      else:
        self.pre_skip.append(None)
      seen.add(key)

  def describe(self) -> dict[str, Any]:
    return {
      "kind": "images",
      "path": display_name(os.path.abspath(self.root)),
      "captions_jsonl": os.path.abspath(self.captions_jsonl) if self.captions_jsonl else None,
      "max_file_bytes": self.max_file_bytes,
    }

  def __len__(self) -> int:
    return len(self.files)

  def _caption(self, rel: str) -> tuple[str | bytes | None, str | None]:
    """(caption, fix) of image ``rel``: from the jsonl, else its sidecar (module docstring)."""
    if self.captions is not None:
      return self.captions.get(rel) or self.captions.get(display_name(rel)) or (None, None)
    stem = rel.rsplit(".", 1)[0]
    for ext in ("txt", "json"):
      path = os.path.join(self.root, f"{stem}.{ext}")
      if not os.path.lexists(path):
        continue
      try:
        data = read_regular(path, min(SIDECAR_BYTES, self.max_file_bytes), "")
      except Unusable as e:
        return None, f"caption_{e.reason}"
      return (data, None) if ext == "txt" else _caption_from_json(data)
    return None, None

  def read(self, start: int, stop: int) -> Iterator[Raw]:
    for i in range(start, stop):
      rel = self.files[i]
      key, shown = _key(rel), display_name(rel)
      if self.pre_skip[i] is not None:
        yield Raw(i, key, None, None, *self.pre_skip[i], name=shown)
        continue
      try:
        data = read_regular(os.path.join(self.root, rel), self.max_file_bytes, shown)
      except Unusable as e:
        yield Raw(i, key, None, None, e.reason, e.detail, name=shown)
        continue
      cap, fix = self._caption(rel)
      yield Raw(i, key, data, cap, fixes=(fix,) if fix else (), name=shown)


def _key(rel: str) -> str:
  """The record key of folder item ``rel``: its display name without the extension."""
  return display_name(rel if rel.endswith("/") else rel.rsplit(".", 1)[0])


def _load_jsonl(path: str, root: str) -> dict[str, tuple[str | None, str | None]]:
  """``{"file": ..., "caption": ...}`` lines -> {relative path: (caption, fix)}; the first entry
  of a file wins; a caption that is not a string is None with fix ``caption_not_a_string``. A
  line that is not a JSON object with a string ``"file"`` is an InputError naming file and line."""
  if not os.path.exists(path):
    raise InputError(f"--captions-jsonl {path!r} does not exist")
  if not os.path.isfile(path):
    raise InputError(f"--captions-jsonl {path!r} is not a regular file")
  out: dict[str, tuple[str | None, str | None]] = {}
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = list(enumerate(f, 1))
  except OSError as e:
    raise InputError(f"--captions-jsonl {path!r} cannot be read: {e.strerror or e}") from None
  for n, line in lines:
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError:
      obj = None
    name = obj.get("file") if isinstance(obj, dict) else None
    if not isinstance(name, str) or not name:
      got = "no 'file'" if not isinstance(obj, dict) or "file" not in obj else repr(name)[:40]
      raise InputError(
        f"--captions-jsonl {path}:{n}: expected a JSON object with a string 'file' and a "
        f"'caption' (got {got})"
      )
    rel = os.path.normpath(name if not os.path.isabs(name) else os.path.relpath(name, root))
    out.setdefault(rel.replace(os.sep, "/"), _string_caption(obj.get("caption")))
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

  def __init__(self, paths: list[str], max_file_bytes: int = MAX_FILE_BYTES):
    if max_file_bytes < 1:
      raise InputError(f"--max-file-bytes {max_file_bytes} must be positive")
    self.max_file_bytes = max_file_bytes
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
          key, ext = display_name(f"{d}/{stem}" if d else stem), ext.lower()
          j = current.get(key)
          if j is None or ext in self.samples[j][2]:  # a new sample (or the key again)
            self.samples.append((path, key, {}, key in seen))
            j = current[key] = len(self.samples) - 1
            seen.add(key)
          self.samples[j][2][ext] = (m.offset_data, m.size)

  def describe(self) -> dict[str, Any]:
    return {
      "kind": "tar",
      "paths": [display_name(os.path.abspath(p)) for p in self.paths],
      "max_file_bytes": self.max_file_bytes,
    }

  def __len__(self) -> int:
    return len(self.samples)

  def read(self, start: int, stop: int) -> Iterator[Raw]:
    handles: dict[str, Any] = {}
    try:
      for i in range(start, stop):
        path, key, members, dup = self.samples[i]
        shown = f"{display_name(os.path.basename(path))}:{key}"
        if dup:
          yield Raw(i, key, None, None, "duplicate_key", shown, name=shown)
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
          yield Raw(i, key, None, None, "no_image", f"members: {sorted(members)}", name=shown)
          continue
        size = members[img_ext][1]
        if size > self.max_file_bytes:
          detail = f"{shown}.{img_ext}: {size} bytes > --max-file-bytes {self.max_file_bytes}"
          yield Raw(i, key, None, None, "too_large", detail, name=shown)
          continue
        cap, fix = None, None
        cap_ext = next((e for e in ("txt", "json") if e in members), None)
        if cap_ext and members[cap_ext][1] > SIDECAR_BYTES:
          fix = "caption_too_large"
        elif cap_ext == "txt":
          cap = member("txt")
        elif cap_ext == "json":
          cap, fix = _caption_from_json(member("json"))
        yield Raw(i, key, member(img_ext), cap, fixes=(fix,) if fix else (), name=shown)
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
      name = display_name(os.path.basename(self.paths[f]))
      for j, img in enumerate(images):
        key = f"{name}:{lo + j}"
        if isinstance(img, dict):
          img = img.get("bytes")
        cap = caps[j] if caps is not None else None
        fixes = ("caption_not_a_string",) if not isinstance(cap, str | bytes | None) else ()
        if not isinstance(img, bytes):
          detail = f"{key}: image cell is {type(img).__name__}"
          yield Raw(i + j, key, None, None, "no_image", detail, name=key)
        else:
          yield Raw(i + j, key, img, None if fixes else cap, fixes=fixes, name=key)
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
