"""Zero-shot image editing with a trained generator (paper §4, Table 3: ImgEdit-Bench).

No editing data is trained on. The condition is stage 1's image-only layout with the auxiliary
prompt replaced by the instruction:

  [BOS] instruction <img> <IMG_CONTEXT> x P </img>

the placeholders taking the frozen ViT's tokens of the source image (resized and centre-cropped
to ``model.image_size`` like training data, ``data.decode.load_image``). The generator then
samples from noise as for any prompt (``config.sample``'s steps, solver and guidance scale).

Choices the paper leaves open, and the ones made here (those of the recipe study's editing
scorer, ``eval.shapes_editing``, which calls this module):

* mask ratio of the source's tokens at test time: 0 (every token kept) by default; stage 1
  trains at r = 0.85, so ``mask_ratio`` is a flag (at r > 0 the mask is drawn per sampler call);
* guidance: one scale against the null condition ([BOS] alone: no instruction and no image),
  so guidance pushes towards source and instruction together; no separate image guidance;
* the instruction replaces the auxiliary prompt verbatim (no template around it);
* noise: one key per output, ``fold_in(fold_in(key(seed), index), 0)`` of the edit's position
  in the input list (``data.benchmark_format.sample_keys``), so a resumed run writes the images
  an uninterrupted one would;
* output size: ``model.image_size`` (the benchmark scorers resize as they need).
"""

from __future__ import annotations

import json
import os

import numpy as np

from iomm_jax import inference
from iomm_jax.configs import specs
from iomm_jax.data import benchmark_format, decode, pipeline


def edit_conditions(
  conditioner: pipeline.Conditioner, instructions: list[str]
) -> tuple[np.ndarray, np.ndarray]:
  """[B, cond_len] ids and validity of ``[BOS] instruction <img> ... </img>`` conditions; an
  instruction too long for the condition length is a ValueError naming it."""
  t = conditioner.tokenizer
  img = [t.img_start_id] + [t.img_context_id] * conditioner.num_image_tokens + [t.img_end_id]
  ids, valid = [], []
  for text in instructions:
    seq = t.encode(text, bos=True) + img
    if len(seq) > conditioner.cond_len:
      raise ValueError(
        f"instruction {text!r} is too long: {len(seq)} tokens with the image, condition length "
        f"{conditioner.cond_len}"
      )
    i, v = conditioner._pad(seq)
    ids.append(i)
    valid.append(v)
  return np.stack(ids), np.stack(valid)


def load_source(path: str, image_size: int) -> np.ndarray:
  """uint8 [S, S, 3] of the image file ``path`` as training sees images (shorter side resized,
  centre square); a missing or undecodable file is a ValueError naming it and why."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"source image {path!r}: {e.strerror or e}") from None
  try:
    return decode.load_image(data, decode.ImagePolicy(resolution=image_size, min_size=0), path)
  except decode.BadRecord as e:
    raise ValueError(f"source image {path!r}: {e.reason} ({e.detail})") from None


def edit(
  config,
  ctx,
  params,
  sources: np.ndarray,
  instructions: list[str],
  seed,
  mask_ratio: float = 0.0,
  **kw,
) -> np.ndarray:
  """uint8 [B, S, S, 3]: ``sources`` (uint8 [B, S, S, 3]) edited by ``instructions``. ``seed``:
  an int or one PRNG key per row; ``kw``: ``inference.sample``'s (steps, cfg, solver,
  batch_size, mesh)."""
  if len(sources) != len(instructions):
    raise ValueError(f"{len(sources)} source images for {len(instructions)} instructions")
  ids, valid = edit_conditions(ctx.conditioner, instructions)
  return inference.sample(
    specs.from_config(config).sample,
    ctx,
    params,
    ids,
    valid,
    seed,
    images=np.asarray(sources),
    mask_ratio=mask_ratio,
    **kw,
  )


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_edits(path: str, image_root: str | None = None) -> list[benchmark_format.Item]:
  """The edits of an ImgEdit-Bench-style JSON, ``{id: {"id": file, "prompt": instruction}}``, in
  file order: items keyed by id, ``line`` the source's path (``image_root`` joined with the
  entry's file; default root: the JSON's folder). Errors name the file and the entry."""
  if not os.path.isfile(path):
    raise ValueError(f"--edits {path!r} is not a file")
  with open(path, encoding="utf-8") as f:
    try:
      table = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"--edits {path!r} is not JSON ({e})") from None
  if not isinstance(table, dict) or not table:
    raise ValueError(f'--edits {path!r} must be a non-empty {{id: {{"id": file, "prompt": ...}}}}')
  root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
  items = []
  for key, entry in table.items():
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
      raise ValueError(f'--edits {path!r}: entry {key!r} has no "id" (the source file) string')
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
      raise ValueError(f'--edits {path!r}: entry {key!r} has no "prompt" (the instruction)')
    if "/" in key or key in (".", ".."):
      raise ValueError(f"--edits {path!r}: id {key!r} cannot be a file name")
    src = os.path.join(root, entry["id"])
    items.append(benchmark_format.Item(key, entry["prompt"].strip(), len(items), src))
  return items


def folder_edits(folder: str, instruction: str) -> list[benchmark_format.Item]:
  """One edit per image file under ``folder`` (recursive, sorted), all by ``instruction``;
  keyed by the path relative to ``folder`` without its extension (the output mirrors it)."""
  if not os.path.isdir(folder):
    raise ValueError(f"--images {folder!r} is not a folder")
  files = sorted(
    os.path.relpath(os.path.join(d, f), folder)
    for d, _, fs in os.walk(folder)
    for f in fs
    if f.lower().endswith(IMAGE_EXTENSIONS)
  )
  if not files:
    raise ValueError(f"--images {folder!r} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
  return [
    benchmark_format.Item(os.path.splitext(f)[0], instruction, i, os.path.join(folder, f))
    for i, f in enumerate(files)
  ]


def check_sources(items: list[benchmark_format.Item]) -> None:
  """Every item's source exists as a file (checked before a model loads)."""
  for it in items:
    if not os.path.isfile(it.line):
      raise ValueError(f"edit {it.key!r}: source image {it.line!r} is not a file")
