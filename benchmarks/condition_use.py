"""Does a trained generator use its image condition? (stage-1 masked self-conditioning)

  python benchmarks/condition_use.py --workdir runs/demo/pretrain [W2@STEP ...] [--num-images 64]
      [--draws 8] [--reconstruct]

The stage-1 flow-matching loss (``steps.generator_loss_fn``, no condition dropout) on fresh
shapes-world scenes (a run on its own data: its held-out records), with the same timesteps and
noise under four conditions:

* own image, every token kept (r = 0), and masked at r = 0.85 (training's default);
* another scene's image (the batch rolled by one), r = 0;
* the null condition (no image, no text).

A generator that reads its vision tokens has a much lower loss with its own image than with
another's; with r = 0 it could copy the target, and the loss would fall toward zero. Equal losses
mean the condition is ignored. ``--reconstruct`` adds the sampled reconstruction control
(``shapes_editing.reconstruct``): the share of a scene's objects found in their cells when the
scene is its own condition, unmasked and masked at 0.85.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from iomm_jax import checkpointing, inference, runtime
from iomm_jax.configs import specs
from iomm_jax.data import pipeline, shapes, sources
from iomm_jax.eval import shapes_editing
from iomm_jax.train import steps

RATIOS = (0.0, 0.85)


def loss_fns(config, ctx) -> dict[float, Callable]:
  """The jitted stage-1 loss without condition dropout, per mask ratio in ``RATIOS``."""
  null = [jnp.asarray(a) for a in ctx.conditioner.null_condition()]
  out = {}
  for ratio in RATIOS:
    c = config.copy_and_resolve_references()
    c.diffusion.mask_ratio, c.diffusion.cond_dropout = ratio, 0.0
    out[ratio] = jax.jit(steps.generator_loss_fn(ctx.model, specs.from_config(c), *null))
  return out


def probe_images(config, num_images: int, seed: int = 0) -> np.ndarray:
  """uint8 [N, S, S, 3]: fresh shapes-world scenes, or (a run on its own data) up to
  ``num_images`` of its held-out records (``data.holdout_records``; never trained on)."""
  if config.data.source != "shapes":
    return np.stack(
      [
        image
        for image, _ in sources.heldout(specs.from_config(config), num_images, captioned=False)
      ]
    )
  world = pipeline.shapes_world(specs.from_config(config).data)
  rng = np.random.default_rng(seed)
  return np.stack(
    [shapes.render(shapes.sample_scene(rng, world), world) for _ in range(num_images)]
  )


def losses(
  config, ctx, params, num_images: int, draws: int, seed: int = 0, fns=None
) -> dict[str, float]:
  """Mean loss per condition (see the module docstring) over ``draws`` timestep/noise draws;
  ``fns``: ``loss_fns(config, ctx)``, to reuse their compilations."""
  fns = fns or loss_fns(config, ctx)
  images = probe_images(config, num_images, seed)
  num_images = len(images)
  ids, valid = ctx.conditioner.image_condition()
  null_ids, null_valid = ctx.conditioner.null_condition()
  tile = lambda a: np.tile(a[None], (num_images, 1))
  # every case passes cond_image, so that the four share one batch structure (one compilation)
  own = {"image": images, "cond_image": images, "cond_ids": tile(ids), "cond_valid": tile(valid),
         "is_image_only": np.ones(num_images, bool)}  # fmt: skip
  cases = {
    "own image, r = 0": (own, 0.0),
    "own image, r = 0.85": (own, 0.85),
    "another image, r = 0": ({**own, "cond_image": np.roll(images, 1, axis=0)}, 0.0),
    "null condition": ({**own, "cond_ids": tile(null_ids), "cond_valid": tile(null_valid)}, 0.0),
  }
  out = {}
  for name, (batch, ratio) in cases.items():
    vals = [
      float(fns[ratio](params, ctx.frozen, batch, jax.random.key(k))[0]) for k in range(draws)
    ]
    out[name] = float(np.mean(vals))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--workdir", nargs="+", required=True, help="stage-1 (or stage-2) workdirs, WORKDIR[@STEP]"
  )
  p.add_argument("--num-images", type=int, default=64)
  p.add_argument("--draws", type=int, default=8)
  p.add_argument(
    "--reconstruct",
    action="store_true",
    help="also sample the reconstruction control (shapes_editing.reconstruct) of as many scenes",
  )
  a = p.parse_args()
  runtime.outside_absl()
  rows = []
  for spec in a.workdir:
    wd, _, step = spec.partition("@")
    step = int(step) if step else max(checkpointing.saved_steps(wd), default=None)
    config, ctx, params = inference.load_generator(wd, step=step)
    out = losses(config, ctx, params, a.num_images, a.draws)
    if a.reconstruct and config.data.source != "shapes":
      raise SystemExit("--reconstruct needs the shapes world's detector; this run is on own data")
    if a.reconstruct:  # sampled: share of each scene's objects reproduced in their cells
      rec = shapes_editing.reconstruct(config, ctx, params, a.num_images, seed=0)
      out.update({f"reconstruction {k}": v["preservation"] for k, v in rec.items()})
    rows.append((wd, step, config.diffusion.mask_ratio, out))
  names = list(rows[0][3])
  print("| run | step | trained r | " + " | ".join(names) + " |")
  print("|---" * (len(names) + 3) + "|")
  for wd, step, r, out in rows:
    print(f"| {wd} | {step} | {r} | " + " | ".join(f"{out[n]:.4f}" for n in names) + " |")


if __name__ == "__main__":
  main()
