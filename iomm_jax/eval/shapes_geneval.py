"""GenEval for the shapes world: the one score of a shapes generator.

``evaluate`` generates images for the world's held-out prompt set (``shapes.eval_prompts(world,
None)``: every held-out prompt of the world's hold-out version, none of which appears among the
training captions) and scores them with the deterministic detector. The protocol is fixed, so a
checkpoint has one score whoever computes it (``iomm-eval``, ``iomm-demo``, the recipe study,
``benchmarks/shapes_score.py`` all call ``evaluate``):

* ``per_category`` images per GenEval category (default ``PER_CATEGORY`` = 64), cycling over the
  category's held-out prompts in their hold-out order, so every category weighs the same number
  of images and, under hold-out v2, rests on at least 8 distinct prompts;
* image i's noise comes from its own key, ``fold_in(key(seed), i)``, so an image does not depend
  on the batch it was generated in;
* the sampler settings of the run's ``config.sample`` (steps, solver, guidance, shift) and its
  EMA weights, unless the caller overrides them; ``batch_size`` images per sampler call on each
  device of ``mesh`` (default: one device), byte-identical on any number of devices and
  processes (``generate.generate``);
* overall = the mean over categories (GenEval's weighting), with its standard error, each
  category's standard error, and the share of empty images (the detector finds no object).

The error treats images as independent samples (sample variance / n per category; categories
independent): images of one prompt are alike, so it understates the uncertainty somewhat.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from iomm_jax import inference, metrics
from iomm_jax.configs import specs
from iomm_jax.data import pipeline, shapes
from iomm_jax.eval import shapes_detector

PER_CATEGORY = 64
"""Images per category of the shapes GenEval (every caller's default)."""


@dataclasses.dataclass
class Evaluation:
  """Scores (``report``, GenEval's JSON layout) plus every image, its metadata and verdict."""

  report: dict[str, Any]
  images: np.ndarray
  metas: list[dict[str, Any]]
  correct: list[bool]


def select_prompts(
  world: shapes.WorldConfig, per_category: int = PER_CATEGORY
) -> list[dict[str, Any]]:
  """One metadata row per image to generate: ``per_category`` per category, cycling over the
  category's held-out prompts (in hold-out order), categories in ``shapes.CATEGORIES`` order."""
  if per_category < 1:
    raise ValueError(f"images per category must be >= 1, got {per_category}")
  by_tag: dict[str, list[dict[str, Any]]] = {}
  for m in shapes.eval_prompts(world, per_category=None):
    by_tag.setdefault(m["tag"], []).append(m)
  return [by_tag[c][i % len(by_tag[c])] for c in shapes.CATEGORIES for i in range(per_category)]


def image_keys(seed: int, n: int) -> jax.Array:
  """[n] PRNG keys, image i's ``fold_in(key(seed), i)`` (batch-independent noise)."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(np.arange(n))


def score_images(
  images: np.ndarray, metas: list[dict[str, Any]], world: shapes.WorldConfig
) -> dict[str, Any]:
  """The report of already generated images (see the module docstring) and the verdicts."""
  found = [shapes_detector.detect(img, world) for img in images]  # once per image
  correct = [
    shapes_detector.score(img, m, world, detections=d)
    for img, m, d in zip(images, metas, found, strict=True)
  ]
  empty = [float(not d) for d in found]  # the detector finds no object at all
  overall, se, categories, category_se = _mean_of_categories(metas, [float(c) for c in correct])
  empty_share, _, empty_by_cat, _ = _mean_of_categories(metas, empty)
  per_prompt: dict[str, set[str]] = {}
  for m in metas:
    per_prompt.setdefault(m["tag"], set()).add(m["prompt"])
  report = {
    "overall": overall,
    "overall_se": se,
    "categories": categories,
    "category_se": category_se,
    "empty": empty_share,
    "empty_categories": empty_by_cat,
    "num_images": len(metas),
    "num_prompts": len({m["prompt"] for m in metas}),
    "prompts_per_category": {k: len(v) for k, v in per_prompt.items()},
    "prompt_set": world.holdout,
  }
  return {"report": report, "correct": correct}


def evaluate(
  config,
  ctx,
  params,
  *,
  per_category: int = PER_CATEGORY,
  seed: int = 0,
  metas: list[dict[str, Any]] | None = None,
  batch_size: int = 32,
  mesh: Mesh | None = None,
) -> Evaluation:
  """Generates and scores the evaluation images of a loaded generator (``inference``);
  ``metas`` replaces the held-out selection (e.g. ``scored_samples``' rows). ``batch_size``
  images per call on each device of ``mesh`` (``sharding.sampling_mesh``: every device of every
  process, each process then scoring all the gathered images; None: this process's first)."""
  spec = specs.from_config(config)
  world = pipeline.shapes_world(spec.data)
  metas = select_prompts(world, per_category) if metas is None else metas
  keys = image_keys(seed, len(metas))
  prompts = [m["prompt"] for m in metas]
  images = inference.sample_prompts(
    spec.sample, ctx, params, prompts, keys, batch_size=batch_size, mesh=mesh
  )
  scored = score_images(images, metas, world)
  s = spec.sample
  scored["report"].update(
    seed=seed,
    per_category=per_category,
    sample_steps=s.num_steps,
    solver=s.solver,
    cfg_scale=s.cfg_scale,
    shift=s.shift,
  )
  return Evaluation(scored["report"], images, metas, scored["correct"])


def scored_samples(
  config, ctx, params, prompts_per_category: int = 2, per_prompt: int = 8, seed: int = 1
) -> Evaluation:
  """A readable sample of the held-out set: the first ``prompts_per_category`` held-out prompts
  of each category, ``per_prompt`` images each, scored like ``evaluate`` (for ``scored_grid``)."""
  world = pipeline.shapes_world(specs.from_config(config).data)
  held = shapes.eval_prompts(world, per_category=None)
  metas = []
  for c in shapes.CATEGORIES:
    first = [m for m in held if m["tag"] == c][:prompts_per_category]
    metas += [m for m in first for _ in range(per_prompt)]
  return evaluate(config, ctx, params, per_category=per_prompt, seed=seed, metas=metas)


def _mean_of_categories(
  metas: list[dict[str, Any]], values: list[float]
) -> tuple[float, float, dict[str, float], dict[str, float]]:
  """Per-image values -> (mean over categories of each category's mean, its standard error,
  the category means, their standard errors). The errors treat images as independent samples
  (sample variance / n per category; categories independent), ignoring that images of one
  prompt are alike."""
  by_tag: dict[str, list[float]] = {}
  for m, v in zip(metas, values, strict=True):
    by_tag.setdefault(m["tag"], []).append(v)
  means = {tag: float(np.mean(v)) for tag, v in by_tag.items()}
  ses = {
    tag: float(np.sqrt(np.var(v, ddof=1) / len(v))) if len(v) > 1 else 0.0
    for tag, v in by_tag.items()
  }
  var = sum(se**2 for se in ses.values())
  return float(np.mean(list(means.values()))), float(np.sqrt(var) / len(by_tag)), means, ses


def compare(base: Evaluation, other: Evaluation) -> dict[str, Any]:
  """``other`` minus ``base`` on the same images (same prompts and seed, e.g. the stage-2 and
  the stage-1 model): the overall difference with its paired standard error, per category, and
  how many images only one of the two got right."""
  if [m["prompt"] for m in base.metas] != [m["prompt"] for m in other.metas]:
    raise ValueError("compare() needs two evaluations of the same prompts in the same order")
  d = [float(b) - float(a) for a, b in zip(base.correct, other.correct, strict=True)]
  diff, se, categories, _ = _mean_of_categories(base.metas, d)
  return {
    "difference": diff,
    "se": se,
    "categories": categories,
    "only_other": int(sum(x > 0 for x in d)),
    "only_base": int(sum(x < 0 for x in d)),
    "num_images": len(d),
  }


def scored_grid(ev: Evaluation, scale: int = 3) -> np.ndarray:
  """The images of ``ev`` one row per prompt (``[category] prompt: k/n right``), each framed in
  green when the detector scores it right and in red when wrong (``metrics.labelled_grid``)."""
  by_prompt: dict[str, tuple[str, list[np.ndarray], list[bool]]] = {}
  for img, m, ok in zip(ev.images, ev.metas, ev.correct, strict=True):
    row = by_prompt.setdefault(m["prompt"], (m["tag"], [], []))
    row[1].append(img)
    row[2].append(bool(ok))
  rows = [
    (f"[{tag}] {prompt}: {sum(oks)}/{len(oks)} right", imgs, oks)
    for prompt, (tag, imgs, oks) in by_prompt.items()
  ]
  return metrics.labelled_grid(
    rows, scale=scale, legend="frame: green = right, red = wrong (shapes detector)"
  )


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
        label, imgs = q.pop(0)
        rows.append((label, imgs[:12], [False] * len(imgs[:12])))
  return metrics.labelled_grid(rows, legend="failed images (red frame: scored wrong)")


def markdown_table(reports: dict[str, dict[str, Any]]) -> str:
  """A markdown table of several reports (row label -> report): categories (with their
  standard errors where the report has them), overall +- its error, empty share, images."""
  cats = [c for c in shapes.CATEGORIES if c in next(iter(reports.values()))["categories"]]
  lines = [
    "| model | " + " | ".join(cats) + " | overall | empty | images |",
    "|---" * (len(cats) + 4) + "|",
  ]

  def cell(r, c):
    v, se = r["categories"].get(c, float("nan")), r.get("category_se", {}).get(c)
    return f"{v:.3f}" if se is None else f"{v:.3f} ± {se:.3f}"

  for name, r in reports.items():
    cells = " | ".join(cell(r, c) for c in cats)
    overall = f"{r['overall']:.3f}" + (f" ± {r['overall_se']:.3f}" if "overall_se" in r else "")
    empty = f"{r['empty']:.3f}" if "empty" in r else "n/a"
    lines.append(f"| {name} | {cells} | {overall} | {empty} | {r['num_images']} |")
  return "\n".join(lines)
