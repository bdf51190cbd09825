"""``iomm-sample``: generate images for a prompt from a trained workdir.

  iomm-sample --workdir W --prompt "a photo of two red circles" --num 8 --out grid.png \
      [--steps 20] [--cfg 3.0] [--seed 0] [--solver euler|heun] [--no-ema]
"""

from __future__ import annotations

import numpy as np
from absl import app, flags, logging
from PIL import Image

from iomm_jax import inference, metrics, runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-1 or stage-2 workdir")
_PROMPT = flags.DEFINE_string("prompt", None, "text prompt")
_NUM = flags.DEFINE_integer("num", 8, "number of images")
_OUT = flags.DEFINE_string("out", "samples.png", "output PNG (a grid of --num images)")
_STEPS = flags.DEFINE_integer("steps", None, "ODE steps (default: the workdir's config)")
_CFG = flags.DEFINE_float("cfg", None, "guidance scale (default: the workdir's config)")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
_SOLVER = flags.DEFINE_enum("solver", None, ["euler", "heun"], "ODE solver")
_EMA = flags.DEFINE_bool("ema", True, "use the EMA parameters")


def _main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  runtime.enable_compilation_cache()
  del argv
  config, ctx, params = inference.load_generator(_WORKDIR.value, _EMA.value)
  imgs = inference.sample_prompts(
    config,
    ctx,
    params,
    [_PROMPT.value] * _NUM.value,
    _SEED.value,
    steps=_STEPS.value,
    cfg=_CFG.value,
    solver=_SOLVER.value,
  )
  grid = metrics.image_grid(imgs, rows=max(1, int(np.sqrt(len(imgs)))))
  Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(
    _OUT.value
  )
  print(f"wrote {_OUT.value} ({len(imgs)} images for {_PROMPT.value!r})")


def main():
  flags.mark_flags_as_required(["workdir", "prompt"])
  app.run(_main)


if __name__ == "__main__":
  main()
