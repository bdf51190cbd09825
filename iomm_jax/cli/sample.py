"""``iomm-sample``: generate images for a prompt from a trained workdir.

  iomm-sample --workdir W --prompt "a photo of two red circles" --num 8 --out grid.png \
      [--steps 20] [--cfg 3.0] [--seed 0] [--solver euler|heun] [--no-ema]
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags, logging
from PIL import Image

from iomm_jax import generate, metrics
from iomm_jax.models import iomm
from iomm_jax.train import context, loop

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-1 or stage-2 workdir")
_PROMPT = flags.DEFINE_string("prompt", None, "text prompt")
_NUM = flags.DEFINE_integer("num", 8, "number of images")
_OUT = flags.DEFINE_string("out", "samples.png", "output PNG (a grid of --num images)")
_STEPS = flags.DEFINE_integer("steps", None, "ODE steps (default: the workdir's config)")
_CFG = flags.DEFINE_float("cfg", None, "guidance scale (default: the workdir's config)")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
_SOLVER = flags.DEFINE_enum("solver", None, ["euler", "heun"], "ODE solver")
_EMA = flags.DEFINE_bool("ema", True, "use the EMA parameters")


def load_generator(workdir: str, use_ema: bool = True):
  """(config, GenerationContext, trainable params) of a trained generator workdir."""
  config = loop.load_workdir_config(workdir)
  if config.stage not in ("pretrain", "finetune"):
    raise ValueError(
      f"{workdir!r} is a {config.stage!r} run; sample from a stage-1 or stage-2 workdir"
    )
  ctx = context.build(config)
  boxed = jax.eval_shape(
    lambda: iomm.init_trainable(ctx.model, jax.random.key(0), ctx.conditioner.cond_len)
  )
  params = context.restore_params(workdir, boxed, which="ema" if use_ema else "params")
  return config, ctx, params


def sample_prompts(
  config,
  ctx,
  params,
  prompts: list[str],
  seed: int,
  steps: int | None = None,
  cfg: float | None = None,
  solver: str | None = None,
) -> np.ndarray:
  """uint8 [len(prompts), H, W, 3] images, one per prompt."""
  s = config.sample
  ids, valid = ctx.conditioner.text_conditions(prompts)
  null_ids, null_valid = ctx.conditioner.null_condition()
  return generate.generate(
    ctx.model,
    params,
    ctx.frozen,
    ids,
    valid,
    null_ids,
    null_valid,
    jax.random.key(seed),
    num_steps=steps or s.num_steps,
    solver=solver or s.solver,
    cfg_scale=s.cfg_scale if cfg is None else cfg,
    shift=s.shift,
  )


def _main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  del argv
  config, ctx, params = load_generator(_WORKDIR.value, _EMA.value)
  imgs = sample_prompts(
    config,
    ctx,
    params,
    [_PROMPT.value] * _NUM.value,
    _SEED.value,
    _STEPS.value,
    _CFG.value,
    _SOLVER.value,
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
