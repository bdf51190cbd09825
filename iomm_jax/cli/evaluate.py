"""``iomm-eval``: the shapes-world GenEval of a trained generator workdir.

  iomm-eval --workdir W [--step N] [--per_category 64] [--seed 0] [--cfg 3] [--steps 20]
      [--no-ema]

Generates ``--per_category`` images per GenEval category from the world's held-out prompts and
scores them with the deterministic detector (``shapes_geneval.evaluate``: the same protocol as
``iomm-demo``, the recipe study and ``benchmarks/shapes_score.py``, so a checkpoint has one
score), then writes ``W/eval/shapes_geneval.json`` (``{"overall", "overall_se", "categories",
"category_se", "empty", "num_images", "step", ...}``) and ``W/eval/shapes_geneval_failures.png``
(failed images, one row per prompt); prints the table. Sampler settings default to the
workdir's config.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from PIL import Image

from iomm_jax import checkpointing, inference, runtime
from iomm_jax.cli import absl_argv
from iomm_jax.eval import shapes_geneval

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-1 or stage-2 workdir")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_NUM = flags.DEFINE_integer(
  "per_category", shapes_geneval.PER_CATEGORY, "images per GenEval category"
)
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
_CFG = flags.DEFINE_float("cfg", None, "guidance scale (default: the workdir's config)")
_STEPS = flags.DEFINE_integer("steps", None, "ODE steps (default: the workdir's config)")
_EMA = flags.DEFINE_bool("ema", True, "use the EMA parameters")


def run(
  workdir: str,
  step: int | None = None,
  per_category: int = shapes_geneval.PER_CATEGORY,
  seed: int = 0,
  cfg: float | None = None,
  steps: int | None = None,
  use_ema: bool = True,
) -> dict:
  """Evaluates ``workdir`` and writes its eval files; returns the JSON report."""
  if per_category < 1:
    raise ValueError(f"--per_category must be >= 1, got {per_category}")
  if step is None:  # record which checkpoint was scored
    saved = checkpointing.saved_steps(workdir)
    step = saved[-1] if saved else None
  config, ctx, params = inference.load_generator(workdir, use_ema, step)
  config.unlock()
  if cfg is not None:
    config.sample.cfg_scale = cfg
  if steps is not None:
    config.sample.num_steps = steps
  config.lock()
  ev = shapes_geneval.evaluate(config, ctx, params, per_category=per_category, seed=seed)
  report = {**ev.report, "step": step, "weights": "ema" if use_ema else "params"}
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  checkpointing.save_json(os.path.join(out, "shapes_geneval.json"), report)
  grid = shapes_geneval.failure_grid(ev)
  png = os.path.join(out, "shapes_geneval_failures.png")
  if grid is not None:
    tmp = png + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, png)
  elif os.path.exists(png):  # a stale grid from an earlier, worse checkpoint
    os.remove(png)
  return report


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  runtime.enable_compilation_cache()
  report = run(
    _WORKDIR.value, _STEP.value, _NUM.value, _SEED.value, _CFG.value, _STEPS.value, _EMA.value
  )
  print(shapes_geneval.markdown_table({f"{_WORKDIR.value} @ {report['step']}": report}))
  print(f"wrote {os.path.join(_WORKDIR.value, 'eval', 'shapes_geneval.json')}")
  print(json.dumps(report))


def main():
  flags.mark_flags_as_required(["workdir"])
  app.run(_main, argv=absl_argv())


if __name__ == "__main__":
  main()
