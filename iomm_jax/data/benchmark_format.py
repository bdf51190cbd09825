"""Benchmark-format generation: prompt files in, the folder layout each official evaluator reads
out, for GenEval, WISE and DPG-Bench.

Layouts (``outdir`` = D):
  * ``geneval``: prompts from GenEval's ``evaluation_metadata.jsonl`` (one JSON object per line,
    with ``prompt``); writes ``D/<5-digit line index>/metadata.jsonl`` (that line, verbatim),
    ``D/<index>/samples/<4-digit sample>.png`` and ``D/<index>/grid.png`` (all samples).
  * ``dpg``: a folder of ``<key>.txt`` prompt files (DPG-Bench's ``prompts/``) or one such file;
    writes ``D/<key>.png``, a square grid of ``num_per_prompt`` samples with no padding (the
    evaluator crops it back into equal tiles; 4 samples = 2x2).
  * ``wise``: WISE's JSON prompt files (a list of ``{"Prompt", "prompt_id", ...}``; one file or a
    folder of them); writes ``D/<prompt_id>.png``, one image per prompt.
  * ``imgedit`` (``iomm-edit``; items from ``iomm_jax.edit.read_edits``): ImgEdit-Bench's
    ``{id: {"id": source file, "prompt": instruction, ...}}``; writes ``D/<id>.png``, one edited
    image per id (the layout its ``basic_bench.py`` reads).

Every image's noise comes from ``(seed, prompt index, sample index)`` alone, so an interrupted
run resumed later (existing images are skipped) gives the same images as one uninterrupted run
(byte for byte with the same ``batch``: a sampler call of another batch shape may round a float
differently, which can move a pixel by one level). Files are written to a temporary name and
renamed, so a crash never leaves half an image.

Several devices and processes (``generate(..., num_devices=n)``): each call hands ``batch``
images to each of the ``n`` devices (``generate.generate`` with a mesh), so the images are those
of a one-device run with the same ``batch``. Process 0 decides what is missing (its view of the
output folder is broadcast, so only it needs to see the folder) and writes every file, after
each call's images are gathered; the other processes only compute.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from iomm_jax import files, metrics, runtime

FORMATS = ("geneval", "wise", "dpg")  # iomm-sample's (prompt files)
EDIT_FORMAT = "imgedit"  # iomm-edit's (its items carry a source image)


@dataclasses.dataclass(frozen=True)
class Item:
  """One benchmark prompt: its output name, text, position in the file(s), and (GenEval) the
  metadata line to copy verbatim."""

  key: str
  prompt: str
  index: int
  line: str | None = None


def _read_geneval(path: str) -> list[Item]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GenEval prompts: {path!r} is not a file (evaluation_metadata.jsonl)")
  items = []
  with open(path) as f:
    for i, line in enumerate(f):
      line = line.rstrip("\n")
      if not line.strip():
        raise ValueError(f"{path}:{i + 1}: empty line (every line is one prompt's metadata)")
      try:
        meta = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i + 1}: not JSON ({e.msg})") from None
      if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
        raise ValueError(f'{path}:{i + 1}: no "prompt" string in {line[:80]!r}')
      items.append(Item(f"{i:05d}", meta["prompt"], i, line))
  return items


def _prompt_files(path: str, ext: str, empty: str, missing: str, any_file: bool) -> list[str]:
  """The sorted ``*<ext>`` files of folder ``path``, or ``[path]`` if it is one such file (any
  file if ``any_file``); ``empty`` / ``missing`` are the errors' texts."""
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*" + ext)))
    if not files:
      raise FileNotFoundError(empty)
    return files
  if os.path.isfile(path) and (any_file or path.endswith(ext)):
    return [path]
  raise FileNotFoundError(missing)


def _read_dpg(path: str) -> list[Item]:
  files = _prompt_files(
    path,
    ".txt",
    f"DPG prompts: {path!r} holds no <key>.txt prompt files",
    f"DPG prompts: {path!r} is neither a folder of .txt files nor one",
    any_file=False,
  )
  items = []
  for i, f in enumerate(files):
    with open(f) as fh:
      prompt = fh.read().strip()
    if not prompt:
      raise ValueError(f"DPG prompt file {f!r} is empty")
    items.append(Item(os.path.splitext(os.path.basename(f))[0], prompt, i))
  return items


def _read_wise(path: str) -> list[Item]:
  files = _prompt_files(
    path,
    ".json",
    f"WISE prompts: {path!r} holds no .json prompt files",
    f"WISE prompts: {path!r} does not exist",
    any_file=True,
  )
  items, seen = [], {}
  for f in files:
    with open(f) as fh:
      try:
        rows = json.load(fh)
      except json.JSONDecodeError as e:
        raise ValueError(f"WISE prompt file {f!r} is not JSON ({e.msg})") from None
    if not isinstance(rows, list):
      raise ValueError(f"WISE prompt file {f!r} must hold a JSON list of prompts")
    for j, row in enumerate(rows):
      if not isinstance(row, dict) or "Prompt" not in row or "prompt_id" not in row:
        raise ValueError(f'{f}: entry {j} lacks "Prompt" or "prompt_id"')
      key = str(row["prompt_id"])
      if key in seen:
        raise ValueError(f"{f}: prompt_id {key!r} repeats one of {seen[key]!r}")
      seen[key] = f
      items.append(Item(key, str(row["Prompt"]), len(items)))
  return items


READERS: dict[str, Callable[[str], list[Item]]] = {
  "geneval": _read_geneval,
  "wise": _read_wise,
  "dpg": _read_dpg,
}


def read_prompts(path: str, fmt: str) -> list[Item]:
  """The benchmark's prompts from ``path`` (see the module docstring), in file order."""
  if fmt not in READERS:
    raise ValueError(f"unknown benchmark format {fmt!r}; choose from {FORMATS}")
  return READERS[fmt](path)


def check_count(fmt: str, num_per_prompt: int) -> None:
  """The sample counts each evaluator accepts."""
  if num_per_prompt < 1:
    raise ValueError(f"--num_per_prompt must be >= 1, got {num_per_prompt}")
  if fmt in ("wise", EDIT_FORMAT) and num_per_prompt != 1:
    name = {"wise": "WISE", EDIT_FORMAT: "ImgEdit"}[fmt]
    raise ValueError(
      f"{name} scores one image per prompt: --num_per_prompt must be 1, got {num_per_prompt}"
    )
  if fmt == "dpg" and math.isqrt(num_per_prompt) ** 2 != num_per_prompt:
    raise ValueError(
      f"DPG-Bench reads a square grid of samples: --num_per_prompt must be a square "
      f"(1, 4, 9, ...), got {num_per_prompt}"
    )


def save_png(path: str, image: np.ndarray) -> None:
  """Writes ``image`` to ``path`` through a temporary file and a rename (never half-written)."""
  tmp = path + ".tmp.png"
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)


def _save_text(path: str, text: str) -> None:
  files.write_text(path, text)


class Writer:
  """Where each (item, sample) goes for one format, what already exists, and how to write it.

  A *unit* is what is written at once: one sample (GenEval) or one prompt's whole grid (DPG,
  WISE). ``pending`` lists the units still missing.
  """

  def __init__(self, fmt: str, outdir: str, num_per_prompt: int):
    check_count(fmt, num_per_prompt)
    self.fmt, self.outdir, self.n = fmt, outdir, num_per_prompt

  def _sample_path(self, item: Item, j: int) -> str:
    return os.path.join(self.outdir, item.key, "samples", f"{j:04d}.png")

  def _image_path(self, item: Item) -> str:
    return os.path.join(self.outdir, f"{item.key}.png")

  def pending(self, items: list[Item]) -> list[tuple[Item, list[int]]]:
    """(item, sample indices to generate) for every item with missing output."""
    out = []
    for item in items:
      if self.fmt == "geneval":
        missing = [j for j in range(self.n) if not os.path.exists(self._sample_path(item, j))]
      else:
        missing = [] if os.path.exists(self._image_path(item)) else list(range(self.n))
      if missing:
        out.append((item, missing))
    return out

  def write(self, item: Item, samples: dict[int, np.ndarray]) -> None:
    """Writes the generated ``samples`` (sample index -> uint8 image) of ``item``."""
    os.makedirs(self.outdir, exist_ok=True)
    if self.fmt == "geneval":
      folder = os.path.join(self.outdir, item.key)
      os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
      meta = os.path.join(folder, "metadata.jsonl")
      if not os.path.exists(meta):
        _save_text(meta, item.line + "\n")
      for j, img in samples.items():
        save_png(self._sample_path(item, j), img)
      paths = [self._sample_path(item, j) for j in range(self.n)]
      if all(os.path.exists(p) for p in paths):
        imgs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        save_png(os.path.join(folder, "grid.png"), metrics.image_grid(imgs, rows=1))
      return
    imgs = np.stack([samples[j] for j in range(self.n)])
    side = math.isqrt(self.n)
    path = self._image_path(item)
    os.makedirs(os.path.dirname(path), exist_ok=True)  # (iomm-edit: a folder's sub-folders)
    save_png(path, metrics.image_grid(imgs, rows=side, pad=0))


def jobs(
  pending: list[tuple[Item, list[int]]], batch: int
) -> Iterator[list[tuple[Item, int, bool]]]:
  """Batches of (item, sample index, last sample of the item) over the pending units."""
  flat = [(item, j, k == len(js) - 1) for item, js in pending for k, j in enumerate(js)]
  for s in range(0, len(flat), batch):
    yield flat[s : s + batch]


def sample_keys(seed: int, items_and_samples: list[tuple[Item, int]]):
  """One PRNG key per (item, sample index): fold_in(fold_in(key(seed), item.index), sample)."""
  base = jax.random.key(seed)
  return jnp.stack(
    [jax.random.fold_in(jax.random.fold_in(base, it.index), j) for it, j in items_and_samples]
  )


def _agreed_pending(writer: Writer, items: list[Item]) -> list[tuple[Item, list[int]]]:
  """``writer.pending(items)`` as process 0 sees it, on every process (one process: its own)."""
  if jax.process_count() == 1:
    return writer.pending(items)
  from jax.experimental import multihost_utils

  missing = np.zeros((len(items), writer.n), np.bool_)
  if jax.process_index() == 0:
    pos = {item.key: i for i, item in enumerate(items)}
    for item, js in writer.pending(items):
      missing[pos[item.key], js] = True
  missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
  return [
    (item, [int(j) for j in np.flatnonzero(row)]) for item, row in zip(items, missing) if row.any()
  ]


def generate(
  sample_fn: Callable[[list[str], object], np.ndarray],
  items: list[Item],
  writer: Writer,
  seed: int,
  batch: int,
  progress: bool = True,
  num_devices: int = 1,
  pass_items: bool = False,
) -> dict[str, int]:
  """Generates every missing unit of ``items`` with ``sample_fn(prompts, keys) -> uint8
  images`` (with ``pass_items``, ``sample_fn(items, keys)``: one item per image, e.g. an edit
  and its source) in calls of ``batch`` images per device (``batch * num_devices`` per call;
  the images on every process) and writes them (process 0); returns counts of prompts done
  before and now, images generated, and images this process wrote (each is written once, by
  process 0). Every process must call it with the same arguments."""
  if batch < 1:
    raise ValueError(f"--batch must be >= 1, got {batch}")
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  writes = jax.process_index() == 0
  pending = _agreed_pending(writer, items)
  total = sum(len(js) for _, js in pending)
  bar = tqdm(
    total=total,
    unit="img",
    disable=not (progress and writes),
    desc=f"{writer.fmt} -> {writer.outdir}",
  )
  buffers: dict[str, dict[int, np.ndarray]] = {}
  written = 0
  for chunk in jobs(pending, batch * num_devices):
    keys = sample_keys(seed, [(it, j) for it, j, _ in chunk])
    images = sample_fn([it if pass_items else it.prompt for it, _, _ in chunk], keys)
    for (item, j, last), img in zip(chunk, images, strict=True):
      buffers.setdefault(item.key, {})[j] = img
      if last:
        unit = buffers.pop(item.key)
        if writes:
          writer.write(item, unit)
          written += len(unit)
    bar.update(len(chunk))
  bar.close()
  runtime.barrier("iomm_jax benchmark files written")  # every process returns after the files
  return {
    "prompts": len(items),
    "skipped_prompts": len(items) - len(pending),
    "generated_images": total,
    "written_images": written,
  }
