"""``iomm-sample``: generate images from a trained workdir, for one prompt or for a benchmark.

One prompt, a grid PNG:
  iomm-sample --workdir W --prompt "a photo of two red circles" --num 8 --out grid.png \
      [--steps 20] [--cfg 3.0] [--seed 0] [--solver euler|heun] [--no-ema] [--step N]

A benchmark's prompt file, in the folder layout its official evaluator reads
(``iomm_jax.eval.benchmark_format``; resumable: existing images are skipped):
  iomm-sample --workdir W --prompts-file evaluation_metadata.jsonl --format geneval \
      --outdir D [--num-per-prompt 4] [--batch 16] [--seed 0] [--max-text-len 512] [--limit N]

Flags may be spelt with dashes or underscores (``--num-per-prompt`` = ``--num_per_prompt``).
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags, logging
from PIL import Image

from iomm_jax import inference, metrics, runtime
from iomm_jax.cli import absl_argv
from iomm_jax.eval import benchmark_format

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-1 or stage-2 workdir")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_PROMPT = flags.DEFINE_string("prompt", None, "one text prompt (grid mode)")
_NUM = flags.DEFINE_integer("num", 8, "grid mode: number of images")
_OUT = flags.DEFINE_string("out", "samples.png", "grid mode: output PNG (a grid of --num images)")
_PROMPTS_FILE = flags.DEFINE_string(
  "prompts_file", None, "benchmark mode: GenEval metadata .jsonl, WISE .json, or DPG prompts folder"
)
_FORMAT = flags.DEFINE_enum("format", None, list(benchmark_format.FORMATS), "benchmark layout")
_OUTDIR = flags.DEFINE_string("outdir", None, "benchmark mode: output folder")
_NUM_PER_PROMPT = flags.DEFINE_integer(
  "num_per_prompt", None, "benchmark mode: images per prompt (default geneval 4, dpg 4, wise 1)"
)
_LIMIT = flags.DEFINE_integer("limit", None, "benchmark mode: only the first N prompts")
_BATCH = flags.DEFINE_integer("batch", 16, "images per sampler call")
_MAX_TEXT_LEN = flags.DEFINE_integer(
  "max_text_len", None, "prompt token limit (default: the workdir's; raise it for long prompts)"
)
_STEPS = flags.DEFINE_integer("steps", None, "ODE steps (default: the workdir's config)")
_CFG = flags.DEFINE_float("cfg", None, "guidance scale (default: the workdir's config)")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
_SOLVER = flags.DEFINE_enum("solver", None, ["euler", "heun"], "ODE solver")
_EMA = flags.DEFINE_bool("ema", True, "use the EMA parameters")
_PROGRESS = flags.DEFINE_bool("progress", True, "benchmark mode: show a progress bar")

DEFAULT_PER_PROMPT = {"geneval": 4, "dpg": 4, "wise": 1}


def _check_flags() -> None:
  """Flag combinations, checked before any model is loaded."""
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise app.UsageError("give exactly one of --prompt (grid) and --prompts-file (benchmark)")
  if _PROMPTS_FILE.value is not None and (_FORMAT.value is None or _OUTDIR.value is None):
    raise app.UsageError("--prompts-file needs --format {geneval,wise,dpg} and --outdir")
  if _PROMPT.value is not None and (_FORMAT.value or _OUTDIR.value or _NUM_PER_PROMPT.value):
    raise app.UsageError("--format, --outdir and --num-per-prompt go with --prompts-file")


def _main(argv):
  del argv
  _check_flags()
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  runtime.enable_compilation_cache()
  items = writer = None
  if _PROMPTS_FILE.value is not None:  # read and check the prompts before loading the model
    items = benchmark_format.read_prompts(_PROMPTS_FILE.value, _FORMAT.value)
    if _LIMIT.value is not None:
      items = items[: max(_LIMIT.value, 0)]
    n = _NUM_PER_PROMPT.value or DEFAULT_PER_PROMPT[_FORMAT.value]
    writer = benchmark_format.Writer(_FORMAT.value, _OUTDIR.value, n)
  config, ctx, params = inference.load_generator(
    _WORKDIR.value, _EMA.value, _STEP.value, _MAX_TEXT_LEN.value
  )
  kw = dict(steps=_STEPS.value, cfg=_CFG.value, solver=_SOLVER.value)
  if items is not None:
    ctx.conditioner.text_conditions([it.prompt for it in items])  # every prompt fits, or say so
    sample_fn = lambda prompts, keys: inference.sample_prompts(
      config, ctx, params, prompts, keys, **kw
    )
    counts = benchmark_format.generate(
      sample_fn, items, writer, _SEED.value, _BATCH.value, _PROGRESS.value
    )
    print(f"wrote {_FORMAT.value} layout to {_OUTDIR.value}: {json.dumps(counts)}")
    return
  imgs = inference.sample_prompts(
    config, ctx, params, [_PROMPT.value] * _NUM.value, _SEED.value, **kw
  )
  grid = metrics.image_grid(imgs, rows=max(1, int(np.sqrt(len(imgs)))))
  Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(
    _OUT.value
  )
  print(f"wrote {_OUT.value} ({len(imgs)} images for {_PROMPT.value!r})")


def main():
  flags.mark_flags_as_required(["workdir"])
  app.run(_main, argv=absl_argv())


if __name__ == "__main__":
  main()
