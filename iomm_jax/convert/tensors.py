"""Safetensors in and out, the name tables of the converters, and the checks they share (issue 4).

Only ``*.safetensors`` files are ever read (never pickles): a checkpoint directory holds one
``model.safetensors`` or several shards listed by ``model.safetensors.index.json`` (the layout
``save_pretrained`` writes in transformers; diffusers names the index
``diffusion_pytorch_model.safetensors.index.json``). Arrays travel as numpy; torch is not
needed here. ``Source`` opens a checkpoint lazily (headers first, one tensor at a time).

A converted family (``convert/flux.py``, ``vae.py``, ``internvl.py``) holds one name ``Table``:
our ``/``-joined parameter path -> ``Entry(file key, hook)``, one row per parameter, built from
the model's abstract parameters by ``name_table``. The hook is the layout change between our
array and the file's (``AS_IS``, ``TRANSPOSE`` for a Dense kernel, ``CONV`` for HWIO <-> OIHW,
``leading_ones(n)`` for axes of size 1 that torch keeps). Export (``to_file``) and import
(``check_keys``, ``from_file``) both read that table. ``torch_key`` is the rule most rows share:
the path joined with ``.``, ``<name>_<i>`` segments as ModuleList entries, ``kernel`` / ``scale``
/ ``embedding`` leaves as ``weight``.

``check_keys`` is the one check of a file against a table: every key of the file must be used
and every parameter filled, with the shape the hook gives; one ``ConversionError`` line names
every missing key (its expected shape and our path), every unexpected key (its shape) and the
first shape mismatches (the file's key, file and shape, ours there, and both shapes in our
layout). ``match`` checks a tree already in our layout (an export's parameters, an
imported directory) against the model's parameters, by our paths.

JSON: ``read_json`` / ``peek_json`` read configs, ``write_json`` writes them (``files.write_json``,
insertion order, a final newline).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from iomm_jax import files

INDEX = "model.safetensors.index.json"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
INDEXES = (INDEX, DIFFUSERS_INDEX)  # shard indexes, in the order they are looked for


class ConversionError(ValueError):
  """A checkpoint that does not fit the model it is converted into (or is not one)."""


def safetensors_files(path: str, what: str = "checkpoint") -> list[str]:
  """The safetensors files of a checkpoint directory (or the file itself), sorted."""
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise ConversionError(f"{what} {path!r} is not a .safetensors file (pickles are never read)")
    return [path]
  if not os.path.isdir(path):
    raise ConversionError(f"{what} {path!r} does not exist")
  for index_name in INDEXES:
    index = os.path.join(path, index_name)
    if not os.path.exists(index):
      continue
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(path, n) for n in names]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise ConversionError(f"{what} {path!r}: {index_name} names missing shards {missing}")
    return files
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    pickles = [
      os.path.basename(p)
      for ext in ("bin", "pt", "pth", "ckpt")
      for p in glob.glob(os.path.join(path, f"*.{ext}"))
    ]
    hint = (
      f" (found {pickles}: pickled weights are not read; re-save as safetensors)" if pickles else ""
    )
    raise ConversionError(f"{what} {path!r} is not a checkpoint: no *.safetensors files{hint}")
  return files


@dataclasses.dataclass(frozen=True)
class Source:
  """The tensors of a safetensors checkpoint, opened lazily (memory-mapped, read one at a time).

  ``shapes``: key -> shape; ``files``: key -> the file that holds it; ``handles``: the open
  files, by file path.
  """

  shapes: dict[str, tuple[int, ...]]
  files: dict[str, str]
  handles: dict[str, Any] = dataclasses.field(repr=False)

  @classmethod
  def open(cls, path: str, what: str = "checkpoint") -> Source:
    """The checkpoint at ``path`` (a file or directory, ``safetensors_files``), headers only."""
    shapes, where, handles = {}, {}, {}
    for file in safetensors_files(path, what):
      handle = handles[file] = safe_open(file, framework="numpy")
      for key in handle.keys():
        if key in shapes:
          raise ConversionError(f"{what} {path!r}: key {key!r} appears in more than one shard")
        shapes[key], where[key] = tuple(handle.get_slice(key).get_shape()), file
    return cls(shapes, where, handles)

  def get(self, key: str) -> np.ndarray:
    """The tensor ``key``, read now."""
    return self.handles[self.files[key]].get_tensor(key)

  def origins(self) -> dict[str, str]:
    """key -> the name of the file that holds it."""
    return {k: os.path.basename(f) for k, f in self.files.items()}


def read(
  path: str, what: str = "checkpoint", origins: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors checkpoint (file or directory), key -> numpy array;
  ``origins``, if given, is filled with key -> the name of the file that holds it."""
  source = Source.open(path, what)
  if origins is not None:
    origins.update(source.origins())
  return {key: source.get(key) for key in source.shapes}


def write(path: str, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> None:
  """Writes one safetensors file atomically (a temporary file, then a rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
  tmp = path + ".tmp"
  save_file(arrays, tmp, metadata=metadata)
  os.replace(tmp, path)


def read_json(path: str, what: str) -> dict[str, Any]:
  """A JSON config file, with an error that names it when it is absent or malformed."""
  if not os.path.exists(path):
    raise ConversionError(f"{what}: {path!r} does not exist")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{what}: {path!r} is not valid JSON ({e})") from e


def peek_json(path: str) -> dict[str, Any] | None:
  """The JSON object in ``path``; None when it is absent, unreadable or not an object."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, ValueError):
    return None
  return obj if isinstance(obj, dict) else None


def write_json(path: str, obj: Mapping[str, Any]) -> None:
  """Writes a config (``files.write_json``: atomic, insertion order, a final newline), creating
  the directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.write_json(path, obj, sort_keys=False, newline=True)


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      for kk, vv in flatten(v, sep).items():
        out[f"{k}{sep}{kk}"] = vv
    else:
      out[k] = v
  return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """{"a/b/c": leaf} -> nested dict."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def listed(label: str, items: Sequence[str], sep: str = ", ", limit: int = 10) -> str | None:
  """``"N label: a, b, ..."`` of the first ``limit`` ``items``, for ``raise_problems`` (None when
  there are none)."""
  return f"{len(items)} {label}: " + sep.join(items[:limit]) if items else None


def raise_problems(what: str, *problems: str | None) -> None:
  """Raises ``ConversionError("what: p1 | p2 ...")`` of the ``problems`` that are not None;
  returns when all are None."""
  found = [p for p in problems if p]
  if found:
    raise ConversionError(f"{what}: " + " | ".join(found))


def match(
  template: Mapping[str, Any], loaded: Mapping[str, Any], what: str, dtype: Any = None
) -> dict[str, Any]:
  """Checks ``loaded`` (flat, ``/``-joined paths, our layout) against the parameter tree
  ``template`` (arrays or ``jax.ShapeDtypeStruct``s) and returns it as a nested tree of numpy
  arrays.

  Raises ``ConversionError`` naming every missing and unexpected parameter and the first
  shape mismatches (parameter, expected shape, given shape). ``dtype``: cast every leaf
  (default: the template leaf's dtype).
  """
  want = flatten(template)
  missing = sorted(set(want) - set(loaded))
  unexpected = sorted(set(loaded) - set(want))
  bad = [
    f"{k}: model expects {tuple(want[k].shape)}, checkpoint has {tuple(np.shape(loaded[k]))}"
    for k in sorted(set(want) & set(loaded))
    if tuple(want[k].shape) != tuple(np.shape(loaded[k]))
  ]
  raise_problems(
    what,
    listed("missing parameter(s)", missing),
    listed("unexpected parameter(s)", unexpected),
    listed("shape mismatch(es)", bad, sep="; "),
  )
  return unflatten({k: np.asarray(loaded[k], dtype=dtype or want[k].dtype) for k in want})


# ----------------------------------------------------------------------------- name tables


@dataclasses.dataclass(frozen=True)
class Hook:
  """The layout change of one parameter: ``to_file`` turns our array into the file's, ``to_ours``
  back (exact inverses: a round trip is bit for bit)."""

  name: str
  to_file: Callable[[np.ndarray], np.ndarray]
  to_ours: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
  return x


def _swap(x: np.ndarray) -> np.ndarray:
  return x.T


AS_IS = Hook("as is", _same, _same)
TRANSPOSE = Hook("transposed", _swap, _swap)  # Dense kernel (in, out) <-> torch weight (out, in)
CONV = Hook(  # conv kernel HWIO (kh, kw, in, out) <-> torch OIHW
  "HWIO <-> OIHW", lambda x: x.transpose(3, 2, 0, 1), lambda x: x.transpose(2, 3, 1, 0)
)


def leading_ones(n: int) -> Hook:
  """Our array with ``n`` leading axes of size 1 more in the file (torch's (1, 1, D) token)."""
  return Hook(f"{n} leading axes of 1", lambda x: x[(None,) * n], lambda x: x[(0,) * n])


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of a name table: the file's key of a parameter and the hook between the layouts."""

  key: str
  hook: Hook = AS_IS

  def load(self, get: Callable[[str], np.ndarray], dtype: Any) -> np.ndarray:
    """The file's tensor (``get(key)`` reads it) in our layout, contiguous, as ``dtype``."""
    return np.ascontiguousarray(self.hook.to_ours(get(self.key)), dtype=dtype)


Table = dict[str, Entry]  # our '/'-joined parameter path -> its row


def name_table(template: Mapping[str, Any], row: Callable[[str, tuple[int, ...]], Entry]) -> Table:
  """``{path: row(path, shape)}`` over the parameters of ``template`` (a tree, arrays or
  ``jax.ShapeDtypeStruct``s); two parameters on one file key are a ``ConversionError``."""
  table: Table = {}
  seen: dict[str, str] = {}
  for path, leaf in flatten(template).items():
    entry = table[path] = row(path, tuple(leaf.shape))
    if entry.key in seen:
      raise ConversionError(f"{seen[entry.key]} and {path} both map to the file key {entry.key!r}")
    seen[entry.key] = path
  return table


LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}  # ours -> torch
_LIST_ENTRY = re.compile(r"(.+)_(\d+)")


def torch_key(path: str, lists: Collection[str] | None = None) -> str:
  """The torch state-dict key of our ``/``-joined ``path``: segments joined by ``.``, a segment
  ``<name>_<i>`` becoming the ModuleList entry ``<name>.<i>`` (only for a ``<name>`` in ``lists``,
  when given: ``linear_1`` is a module of its own in diffusers), the leaf renamed by
  ``LEAF_NAMES`` (``blocks_0/attn/q_proj/kernel`` -> ``blocks.0.attn.q_proj.weight``)."""
  *mods, leaf = path.split("/")
  parts = []
  for m in mods:
    entry = _LIST_ENTRY.fullmatch(m)
    parts.append(f"{entry[1]}.{entry[2]}" if entry and (lists is None or entry[1] in lists) else m)
  return ".".join([*parts, LEAF_NAMES.get(leaf, leaf)])


def _shape_of(hook: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]) -> Any:
  """The shape ``hook`` gives an array of ``shape`` (from shapes alone); None if it cannot."""
  stand_in = np.broadcast_to(np.zeros((), np.uint8), shape)  # no memory, any shape
  try:
    return tuple(hook(stand_in).shape)
  except (ValueError, IndexError):
    return None


def file_shapes(table: Table, template: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """Our path -> the shape its tensor has in the file (``template``: our layout)."""
  flat = flatten(template)
  return {p: _shape_of(e.hook.to_file, tuple(flat[p].shape)) for p, e in table.items()}


def check_keys(
  table: Table,
  template: Mapping[str, Any],
  shapes: Mapping[str, tuple[int, ...]],
  what: str,
  origins: Mapping[str, str] | None = None,
  tolerate: Callable[[str, tuple[int, ...], tuple[int, ...]], bool] | None = None,
) -> list[str]:
  """Checks a checkpoint's keys and shapes (``shapes``: file key -> shape, headers are enough)
  against ``table`` and ``template`` (our parameters: arrays or ``jax.ShapeDtypeStruct``s).

  Every key of the file must be a parameter's and every parameter's key must be there, with the
  shape its hook gives. Raises one ``ConversionError`` line naming every missing key (with the
  shape expected there and our path), every unexpected key (with its shape) and the first shape
  mismatches (the key, its file (``origins``), its shape and the expected one, and both in our
  layout). ``tolerate(path, file_shape, expected)`` accepts a mismatch that the caller handles;
  the paths accepted are returned.
  """
  origins, template = origins or {}, flatten(template)
  want = file_shapes(table, template)
  used = {e.key for e in table.values()}
  missing = [f"{e.key!r} {want[p]} for {p}" for p, e in table.items() if e.key not in shapes]
  unexpected = [f"{k!r} {tuple(shapes[k])}" for k in sorted(set(shapes) - used)]
  bad, tolerated = [], []
  for p, e in sorted(table.items()):
    got = tuple(shapes.get(e.key, want[p]))
    if got == want[p]:
      continue
    if tolerate is not None and tolerate(p, got, want[p]):
      tolerated.append(p)
      continue
    given = _shape_of(e.hook.to_ours, got)
    ours = f"{tuple(template[p].shape)} in our layout" + (f", {given} given" if given else "")
    bad.append(
      f"{e.key!r} in {origins.get(e.key, 'the checkpoint')} has shape {got}, ours is {want[p]} "
      f"({p}: {ours})"
    )
  raise_problems(
    what,
    listed("missing key(s)", sorted(missing)),
    listed("unexpected key(s)", unexpected),
    listed("shape mismatch(es)", bad, sep="; "),
  )
  return tolerated


def from_file(
  table: Table,
  template: Mapping[str, Any],
  arrays: Mapping[str, np.ndarray],
  what: str,
  origins: Mapping[str, str] | None = None,
  dtype: Any = None,
) -> dict[str, Any]:
  """The nested tree, in our layout, of a checkpoint's ``arrays`` (file key -> array), checked by
  ``check_keys``; cast to ``dtype`` (default: the template leaf's)."""
  flat = flatten(template)
  check_keys(table, flat, {k: np.shape(v) for k, v in arrays.items()}, what, origins)
  return unflatten(
    {p: e.load(arrays.__getitem__, dtype or flat[p].dtype) for p, e in table.items()}
  )


def to_file(table: Table, flat: Mapping[str, Any], dtype: Any = None) -> dict[str, np.ndarray]:
  """The file's state dict (file key -> contiguous array in the file's layout) of our flat
  parameters, one per row; ``dtype`` casts (default: as they are)."""
  return {
    e.key: np.ascontiguousarray(e.hook.to_file(np.asarray(flat[p])), dtype=dtype)
    for p, e in table.items()
  }
