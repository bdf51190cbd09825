"""GenEval for the shapes world: generate images for the fixed, held-out prompt set and score them
with the deterministic detector, per GenEval category (overall = mean of the categories).

The prompt set is ``shapes.eval_prompts(world, None, PROMPT_SET)``: every held-out prompt of the
world, none of which appears among the training captions (``shapes.is_heldout``). Two ways to
choose the images:

* ``num_per_prompt`` (``iomm-eval``, as GenEval): every prompt, that many images each;
* ``per_category`` (``iomm-demo``, cheaper): that many images per category, cycling over the
  category's prompts, so that every category weighs the same number of images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from iomm_jax import inference
from iomm_jax.data import pipeline, shapes
from iomm_jax.eval import shapes_detector

PROMPT_SET = "v1"  # shapes.HOLDOUT_VERSIONS entry; bump it (never edit it) to change the set


@dataclasses.dataclass
class Evaluation:
  """Scores (``report``, GenEval's JSON layout) plus every image, its metadata and verdict."""

  report: dict[str, Any]
  images: np.ndarray
  metas: list[dict[str, Any]]
  correct: list[bool]


def select_prompts(
  world: shapes.WorldConfig,
  num_per_prompt: int | None = None,
  per_category: int | None = None,
  version: str = PROMPT_SET,
) -> list[dict[str, Any]]:
  """One metadata row per image to generate (see the module docstring); exactly one of the two
  counts must be given."""
  if (num_per_prompt is None) == (per_category is None):
    raise ValueError("give exactly one of num_per_prompt and per_category")
  count = num_per_prompt if per_category is None else per_category
  if count < 1:
    raise ValueError(f"images per {'prompt' if per_category is None else 'category'} must be >= 1")
  prompts = shapes.eval_prompts(world, per_category=None, version=version)
  if num_per_prompt is not None:
    return [m for m in prompts for _ in range(num_per_prompt)]
  by_tag: dict[str, list[dict[str, Any]]] = {}
  for m in prompts:
    by_tag.setdefault(m["tag"], []).append(m)
  return [ms[i % len(ms)] for ms in by_tag.values() for i in range(per_category)]


def evaluate(
  config,
  ctx,
  params,
  *,
  num_per_prompt: int | None = None,
  per_category: int | None = None,
  seed: int = 0,
) -> Evaluation:
  """Generates and scores the evaluation images of a loaded generator (``inference``)."""
  world = pipeline.world_from_config(config)
  metas = select_prompts(world, num_per_prompt, per_category)
  images = inference.sample_prompts(config, ctx, params, [m["prompt"] for m in metas], seed)
  correct = [shapes_detector.score(img, m, world) for img, m in zip(images, metas, strict=True)]
  overall, se, categories = _mean_of_categories(metas, [float(ok) for ok in correct])
  report = {
    "overall": overall,
    "overall_se": se,
    "categories": categories,
    "num_images": len(metas),
    "num_prompts": len({m["prompt"] for m in metas}),
    "prompt_set": PROMPT_SET,
  }
  return Evaluation(report, images, metas, correct)


def _mean_of_categories(
  metas: list[dict[str, Any]], values: list[float]
) -> tuple[float, float, dict[str, float]]:
  """Per-image values -> (mean over categories of each category's mean, its standard error,
  the category means). The error treats images as independent samples (sample variance / n per
  category; categories independent), ignoring that images of one prompt are alike."""
  by_tag: dict[str, list[float]] = {}
  for m, v in zip(metas, values, strict=True):
    by_tag.setdefault(m["tag"], []).append(v)
  means = {tag: float(np.mean(v)) for tag, v in by_tag.items()}
  var = sum(np.var(v, ddof=1) / len(v) for v in by_tag.values() if len(v) > 1)
  return float(np.mean(list(means.values()))), float(np.sqrt(var) / len(by_tag)), means


def compare(base: Evaluation, other: Evaluation) -> dict[str, Any]:
  """``other`` minus ``base`` on the same images (same prompts and seed, e.g. the stage-2 and
  the stage-1 model): the overall difference with its paired standard error, per category, and
  how many images only one of the two got right."""
  if [m["prompt"] for m in base.metas] != [m["prompt"] for m in other.metas]:
    raise ValueError("compare() needs two evaluations of the same prompts in the same order")
  d = [float(b) - float(a) for a, b in zip(base.correct, other.correct, strict=True)]
  diff, se, categories = _mean_of_categories(base.metas, d)
  return {
    "difference": diff,
    "se": se,
    "categories": categories,
    "only_other": int(sum(x > 0 for x in d)),
    "only_base": int(sum(x < 0 for x in d)),
    "num_images": len(d),
  }


def labelled_rows(
  rows: list[tuple[str, list[np.ndarray]]], scale: int = 3, label_width: int = 330
) -> np.ndarray:
  """A PNG-ready uint8 canvas: one row per (label, images), the label on the left, each image
  upscaled and framed in grey (so a blank white sample stays visible)."""
  h, w = rows[0][1][0].shape[:2]
  per_row = max(len(imgs) for _, imgs in rows)
  cell_h, cell_w = h * scale + 4, w * scale + 4
  canvas = Image.new("RGB", (label_width + per_row * cell_w, len(rows) * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=14)
  for r, (label, imgs) in enumerate(rows):
    draw.text((4, r * cell_h + cell_h // 2 - 6), label, fill="black", font=font)
    for k, img in enumerate(imgs):
      x, y = label_width + k * cell_w, r * cell_h
      draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), outline=(200, 200, 200))
      tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
      canvas.paste(tile, (x + 2, y + 2))
  return np.asarray(canvas)


def failure_grid(ev: Evaluation, max_rows: int = 24) -> np.ndarray | None:
  """The failed images, one row per prompt (``[tag] prompt``), at most ``max_rows`` rows chosen
  round-robin over the categories; None if nothing failed."""
  by_prompt: dict[str, tuple[str, list[np.ndarray]]] = {}
  for img, m, ok in zip(ev.images, ev.metas, ev.correct, strict=True):
    if not ok:
      by_prompt.setdefault(m["prompt"], (m["tag"], []))[1].append(img)
  if not by_prompt:
    return None
  by_tag: dict[str, list[tuple[str, list[np.ndarray]]]] = {}
  for prompt, (tag, imgs) in by_prompt.items():
    by_tag.setdefault(tag, []).append((f"[{tag}] {prompt}", imgs))
  rows, queues = [], list(by_tag.values())
  while len(rows) < max_rows and any(queues):
    for q in queues:
      if q and len(rows) < max_rows:
        rows.append(q.pop(0))
  return labelled_rows(rows, label_width=400)


def markdown_table(reports: dict[str, dict[str, Any]]) -> str:
  """A markdown table of several reports (row label -> report), categories as columns."""
  cats = sorted(next(iter(reports.values()))["categories"])
  lines = [
    "| model | " + " | ".join(cats) + " | overall | images |",
    "|---" * (len(cats) + 3) + "|",
  ]
  for name, r in reports.items():
    cells = " | ".join(f"{r['categories'].get(c, float('nan')):.3f}" for c in cats)
    lines.append(f"| {name} | {cells} | {r['overall']:.3f} | {r['num_images']} |")
  return "\n".join(lines)
