"""Safetensors in and out, and the checks every converter shares (issue 4).

Only ``*.safetensors`` files are ever read (never pickles): a checkpoint directory holds one
``model.safetensors`` or several shards listed by ``model.safetensors.index.json`` (the layout
``save_pretrained`` writes in transformers; diffusers names the index
``diffusion_pytorch_model.safetensors.index.json``). Arrays travel as numpy; torch is not
needed here.

``match(template, loaded, what)`` is the one place that turns a converted flat dict into a
parameter tree and reports what does not fit: a missing key, an unexpected key, or a shape
mismatch names the parameter and both shapes. An importer whose file keys and layout differ from
ours passes ``describe=file_mismatch(...)``, so a mismatch names the file's key, the file and its
shape there, and the shape the model expects in the file's layout.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

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


def read(
  path: str, what: str = "checkpoint", origins: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors checkpoint (file or directory), key -> numpy array;
  ``origins``, if given, is filled with key -> the name of the file that holds it."""
  out: dict[str, np.ndarray] = {}
  for file in safetensors_files(path, what):
    for key, value in load_file(file).items():
      if key in out:
        raise ConversionError(f"{what} {path!r}: key {key!r} appears in more than one shard")
      out[key] = value
      if origins is not None:
        origins[key] = os.path.basename(file)
  return out


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


Describe = Callable[[str, tuple[int, ...], tuple[int, ...]], str]


def file_mismatch(
  keys: Mapping[str, str],
  raw: Mapping[str, np.ndarray],
  origins: Mapping[str, str],
  to_file: Callable[[str, np.ndarray], np.ndarray],
) -> Describe:
  """A ``match`` ``describe`` for an importer: our path -> "``'file.key'`` in FILE has shape S;
  the model expects E (our path: W in our layout, G given)", where ``keys`` maps our paths to
  the file's keys, ``raw`` holds the file's arrays, ``origins`` their files (``read``) and
  ``to_file(path, array)`` turns our layout into the file's (E is computed from shapes alone)."""

  def describe(path: str, want: tuple[int, ...], got: tuple[int, ...]) -> str:
    """The mismatch of our ``path`` (expected ``want``, given ``got``) in the file's terms."""
    key = keys[path]
    stand_in = np.broadcast_to(np.zeros((), np.uint8), want)  # no memory, any shape
    expected = tuple(to_file(path, stand_in).shape)
    return (
      f"{key!r} in {origins.get(key, 'the checkpoint')} has shape {tuple(raw[key].shape)}; the "
      f"model expects {expected} ({path}: {want} in our layout, {got} given)"
    )

  return describe


def match(
  template: Mapping[str, Any],
  loaded: Mapping[str, Any],
  what: str,
  dtype: Any = None,
  describe: Describe | None = None,
) -> dict[str, Any]:
  """Checks ``loaded`` (flat, ``/``-joined paths) against the parameter tree ``template``
  (arrays or ``jax.ShapeDtypeStruct``s) and returns it as a nested tree of numpy arrays.

  Raises ``ConversionError`` naming every missing and unexpected parameter and the first
  shape mismatches (parameter, expected shape, checkpoint shape; ``describe(path, expected,
  got)`` words each, e.g. ``file_mismatch``). ``dtype``: cast every leaf (default: the template
  leaf's dtype).
  """
  want = flatten(template)
  missing = sorted(set(want) - set(loaded))
  unexpected = sorted(set(loaded) - set(want))
  say = describe or (lambda k, w, g: f"{k}: model expects {w}, checkpoint has {g}")
  bad = [
    say(k, tuple(want[k].shape), tuple(np.shape(loaded[k])))
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
