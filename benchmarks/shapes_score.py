"""Scores a trained shapes-world generator: detector scores per GenEval category and two coarser
diagnostics that tell *why* a model fails (the measurement behind docs/RESULTS.md's demo tables).

  python benchmarks/shapes_score.py --workdir runs/demo/finetune [--cfg 3] [--steps 20]
      [--per-category 64] [--raw] [--seed 0]

* scores: the shapes GenEval (``shapes_geneval.evaluate``, the protocol of ``iomm-eval``,
  ``iomm-demo`` and the study: with the defaults, the same number they give the checkpoint);
* colour match: for "a photo of a {colour} {shape}" over every colour and shape (4 images each),
  the share whose dominant foreground colour is the prompt's (chance: 1 / number of colours);
* empty: the share of those images with no foreground pixel at all (the world has no empty
  scenes); recognised: the share with at least one object the detector can name.

Sampler settings default to the workdir's config; ``--raw`` samples the raw (non-EMA) weights.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from iomm_jax import inference, runtime
from iomm_jax.configs import specs
from iomm_jax.data import pipeline, shapes
from iomm_jax.eval import shapes_detector, shapes_geneval


def colour_diagnostics(config, ctx, params, seed: int) -> dict[str, float]:
  """Colour match, empty and recognised shares over single-object colour prompts."""
  world = pipeline.shapes_world(specs.from_config(config).data)
  prompts = [
    f"a photo of {shapes.article(c)} {c} {s}" for c in world.colors for s in world.shapes
    for _ in range(4)
  ]  # fmt: skip
  imgs = inference.sample_prompts(specs.from_config(config).sample, ctx, params, prompts, seed)
  match = empty = named = 0
  for prompt, img in zip(prompts, imgs):
    seg = shapes_detector.segment(img, world)
    fg = seg[seg >= 0]
    if fg.size == 0:
      empty += 1
      continue
    dominant = world.colors[int(np.bincount(fg, minlength=len(world.colors)).argmax())]
    match += dominant in prompt.split()
    named += any(d.shape is not None for d in shapes_detector.detect(img, world))
  n = len(prompts)
  return {
    "colour_match": match / n,
    "colour_chance": 1 / len(world.colors),
    "empty": empty / n,
    "recognised": named / n,
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: config's)")
  p.add_argument("--steps", type=int, default=None, help="sampler steps (default: config's)")
  p.add_argument("--per-category", type=int, default=shapes_geneval.PER_CATEGORY)
  p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  runtime.outside_absl(quiet=True)
  config, ctx, params = inference.load_generator(a.workdir, use_ema=not a.raw)
  config.unlock()
  if a.cfg is not None:
    config.sample.cfg_scale = a.cfg
  if a.steps is not None:
    config.sample.num_steps = a.steps
  config.lock()
  scores = shapes_geneval.evaluate(
    config, ctx, params, per_category=a.per_category, seed=a.seed
  ).report
  diag = colour_diagnostics(config, ctx, params, a.seed + 3)
  print(
    f"{a.workdir}: cfg {config.sample.cfg_scale}, {config.sample.num_steps} steps, "
    f"{'raw' if a.raw else 'EMA'} weights, {scores['num_images']} images"
  )
  print(shapes_geneval.markdown_table({a.workdir: scores}))
  print(
    f"colour match {diag['colour_match']:.2f} (chance {diag['colour_chance']:.2f}), "
    f"no foreground {diag['empty']:.2f}, recognised {diag['recognised']:.2f}"
  )
  print(json.dumps({"scores": scores, "diagnostics": diag}))


if __name__ == "__main__":
  main()
