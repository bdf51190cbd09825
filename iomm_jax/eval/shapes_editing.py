"""Zero-shot editing in the shapes world (study question 7; paper §4's editing results).

No editing data is ever trained on. At test time the condition is the instruction followed by
the source image's (unmasked) vision tokens, ``[BOS] instruction <img> tokens </img>``, the
layout of stage 1's image-only conditions with the auxiliary prompt replaced by the instruction
(``iomm_jax.edit``, the route of ``iomm-edit``).

Tasks (each on a random source scene of 1 to grid**2 - 1 objects):
  * ``recolor``: "make the {shape} {colour}": the scene's only object of that shape, recoloured;
  * ``add``: "add a {colour} {shape}": a new object in a free cell.

A control, plain reconstruction: the stage-1 condition itself (auxiliary prompt, no instruction)
on a source scene, its vision tokens masked at ratio r (0, and training's 0.85). It separates "the
model cannot carry the source image through" from "the instruction derails it".

Scores, by the deterministic detector:
  * success: the output holds an object of the edit's shape and colour in the edited cell (the
    recoloured object's; for ``add``, the free cell the target puts it in: the instruction does
    not name a place, so an add elsewhere counts as a failure and the score is a lower bound);
  * preservation: the share of the other source objects found unchanged (same shape and colour,
    same grid cell);
  * reconstruction: the share of source objects found unchanged, and of scenes reproduced
    exactly (every object found, nothing else).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from iomm_jax import edit as edit_lib
from iomm_jax import inference
from iomm_jax.configs import specs
from iomm_jax.data import benchmark_format, pipeline, shapes
from iomm_jax.eval import shapes_detector

KINDS = ("recolor", "add")
RECONSTRUCT_RATIOS = (0.0, 0.85)  # mask ratios of the reconstruction control


@dataclasses.dataclass(frozen=True)
class EditTask:
  """One edit: the source scene, the instruction, the target scene and what must change."""

  kind: str
  source: shapes.Scene
  instruction: str
  target: shapes.Scene
  edited: shapes.Obj  # the recoloured or added object, as in the target
  kept: tuple[shapes.Obj, ...]  # the source objects that must stay as they are


def _recolor(rng: np.random.Generator, world: shapes.WorldConfig) -> EditTask | None:
  scene = shapes.sample_scene(rng, world)
  by_shape: dict[str, list[shapes.Obj]] = {}
  for o in scene.objects:
    by_shape.setdefault(o.shape, []).append(o)
  unique = [objs[0] for objs in by_shape.values() if len(objs) == 1]
  if not unique:
    return None
  obj = unique[int(rng.integers(len(unique)))]
  color = shapes._pick(rng, [c for c in world.colors if c != obj.color])
  edited = dataclasses.replace(obj, color=color)
  kept = tuple(o for o in scene.objects if o is not obj)
  target = shapes.Scene(kept + (edited,))
  return EditTask("recolor", scene, f"make the {obj.shape} {color}", target, edited, kept)


def _add(rng: np.random.Generator, world: shapes.WorldConfig) -> EditTask | None:
  scene = shapes.sample_scene(rng, world)
  used = {(o.row, o.col) for o in scene.objects}
  free = [(r, c) for r in range(world.grid) for c in range(world.grid) if (r, c) not in used]
  if not free:
    return None
  r, c = free[int(rng.integers(len(free)))]
  shape, color = shapes._pick(rng, world.shapes), shapes._pick(rng, world.colors)
  added = shapes._place(rng, world, shape, color, r, c)
  instruction = f"add {shapes.article(color)} {color} {shape}"
  target = shapes.Scene(scene.objects + (added,))
  return EditTask("add", scene, instruction, target, added, scene.objects)


def make_tasks(world: shapes.WorldConfig, per_kind: int, seed: int = 0) -> list[EditTask]:
  """``per_kind`` tasks of each kind, deterministic in ``seed``."""
  rng = np.random.default_rng((seed, 7))
  out = []
  for make in (_recolor, _add):  # KINDS order
    n = 0
    while n < per_kind:
      task = make(rng, world)
      if task is not None:
        out.append(task)
        n += 1
  return out


def _cell(d: shapes_detector.Detection, world: shapes.WorldConfig) -> tuple[int, int]:
  g = world.grid
  return (min(int(d.cy // world.cell), g - 1), min(int(d.cx // world.cell), g - 1))


def _found(image: np.ndarray, world: shapes.WorldConfig) -> set[tuple[tuple[int, int], str, str]]:
  """The detected objects as (grid cell, shape, colour), objects of no known shape left out."""
  dets = [d for d in shapes_detector.detect(image, world) if d.shape is not None]
  return {(_cell(d, world), d.shape, d.color) for d in dets}


def score(
  image: np.ndarray, task: EditTask, world: shapes.WorldConfig
) -> tuple[bool, float | None]:
  """(edit succeeded, share of kept objects preserved, None if the task keeps none)."""
  found = _found(image, world)
  e = task.edited
  success = ((e.row, e.col), e.shape, e.color) in found
  kept = [((o.row, o.col), o.shape, o.color) in found for o in task.kept]
  return success, float(np.mean(kept)) if kept else None


def score_reconstruction(
  image: np.ndarray, scene: shapes.Scene, world: shapes.WorldConfig
) -> tuple[bool, float]:
  """(the scene is reproduced exactly, share of its objects found unchanged in their cells)."""
  found = _found(image, world)
  want = {((o.row, o.col), o.shape, o.color) for o in scene.objects}
  return found == want, float(np.mean([w in found for w in want]))


def reconstruct(
  config, ctx, params, n: int = 32, seed: int = 0, mask_ratios=RECONSTRUCT_RATIOS
) -> dict[str, dict[str, float]]:
  """The reconstruction control: ``n`` random source scenes under the stage-1 condition, masked
  at each ratio; ``{"r=0.0": {"exact": ., "preservation": .}, ...}``."""
  spec = specs.from_config(config)
  world = pipeline.shapes_world(spec.data)
  rng = np.random.default_rng((seed, 8))
  scenes = [shapes.sample_scene(rng, world) for _ in range(n)]
  sources = np.stack([shapes.render(sc, world) for sc in scenes])
  ids, valid = ctx.conditioner.image_condition()
  ids, valid = np.tile(ids, (n, 1)), np.tile(valid, (n, 1))
  out = {}
  for r in mask_ratios:
    images = inference.sample(
      spec.sample, ctx, params, ids, valid, seed, images=sources, mask_ratio=r
    )
    rs = [score_reconstruction(img, sc, world) for img, sc in zip(images, scenes, strict=True)]
    out[f"r={r}"] = {
      "exact": float(np.mean([e for e, _ in rs])),
      "preservation": float(np.mean([p for _, p in rs])),
    }
  return out


def task_keys(tasks: list[EditTask], seed: int):
  """One noise key per task: ``iomm-edit``'s for the task's position in an edit list (so the
  CLI, given these tasks as files, draws the images this scorer scores)."""
  items = [benchmark_format.Item(str(i), t.instruction, i) for i, t in enumerate(tasks)]
  return benchmark_format.sample_keys(seed, [(it, 0) for it in items])


def evaluate(
  config, ctx, params, per_kind: int = 32, seed: int = 0, reconstruction: bool = True
) -> dict[str, Any]:
  """Zero-shot editing scores of a loaded generator, overall and per kind, plus (unless
  ``reconstruction`` is False) the reconstruction control on ``per_kind`` scenes."""
  world = pipeline.shapes_world(specs.from_config(config).data)
  tasks = make_tasks(world, per_kind, seed)
  sources = np.stack([shapes.render(t.source, world) for t in tasks])
  images = edit_lib.edit(config, ctx, params, sources, [t.instruction for t in tasks],
                         task_keys(tasks, seed))  # fmt: skip
  out = summarise([score(img, t, world) for img, t in zip(images, tasks, strict=True)], tasks)
  if reconstruction:
    out["reconstruction"] = reconstruct(config, ctx, params, per_kind, seed)
  return out


def _preservation(results: list[tuple[bool, float | None]]) -> float:
  kept = [p for _, p in results if p is not None]
  return float(np.mean(kept)) if kept else float("nan")


def summarise(results: list[tuple[bool, float | None]], tasks: list[EditTask]) -> dict[str, Any]:
  """Success rate and mean preservation (over tasks that keep objects), overall and per kind."""
  out: dict[str, Any] = {"num_tasks": len(tasks), "kinds": {}}
  for kind in KINDS:
    rs = [r for r, t in zip(results, tasks, strict=True) if t.kind == kind]
    if rs:
      out["kinds"][kind] = {
        "success": float(np.mean([s for s, _ in rs])),
        "preservation": _preservation(rs),
      }
  out["success"] = float(np.mean([s for s, _ in results]))
  out["preservation"] = _preservation(results)
  return out
