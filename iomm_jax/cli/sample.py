r"""``iomm-sample``: generate images from a trained workdir, for one prompt or for a benchmark.

One prompt, a grid PNG:
  iomm-sample --workdir W --prompt "a photo of two red circles" --num 8 --out grid.png \
      [--steps 20] [--cfg 3.0] [--seed 0] [--solver euler|heun] [--no-ema] [--step N]

A benchmark's prompt file, in the folder layout its official evaluator reads
(``iomm_jax.data.benchmark_format``; resumable: existing images are skipped):
  iomm-sample --workdir W --prompts-file evaluation_metadata.jsonl --format geneval \
      --outdir D [--num-per-prompt 4] [--batch 16] [--seed 0] [--max-text-len 512] [--limit N]

Both modes run on every device of every process (``sharding.sampling_mesh``; parameters
replicated): ``--batch`` is the number of images per device per sampler call, so a call makes
``--batch`` x devices images, and the images are byte-identical to a one-device run with the
same ``--batch`` (keep it when resuming for byte-identical images; another value may move a pixel
by one level). Several processes (one per host, or several on one machine): start the same
command in each with ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or
``$IOMM_COORDINATOR``, ``$IOMM_NUM_PROCESSES``, ``$IOMM_PROCESS_ID``; under SLURM ``srun`` they
find each other); process 0 decides which images are missing and writes every file (the
prompts file and the workdir must be readable by every process, the output only by process 0).

Flags may be spelt with dashes or underscores (``--num-per-prompt`` = ``--num_per_prompt``).
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags, logging
from PIL import Image

from iomm_jax import inference, metrics, runtime, sharding
from iomm_jax.cli import define_distributed_flags, run, warn_unknown_words
from iomm_jax.configs import specs
from iomm_jax.data import benchmark_format

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
_BATCH = flags.DEFINE_integer(
  "batch", 16, "images per device per sampler call (x the devices of all processes per call)"
)
_MAX_TEXT_LEN = flags.DEFINE_integer(
  "max_text_len", None, "prompt token limit (default: the workdir's; raise it for long prompts)"
)
_STEPS = flags.DEFINE_integer("steps", None, "ODE steps (default: the workdir's config)")
_CFG = flags.DEFINE_float("cfg", None, "guidance scale (default: the workdir's config)")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
_SOLVER = flags.DEFINE_enum("solver", None, ["euler", "heun"], "ODE solver")
_EMA = flags.DEFINE_bool("ema", True, "use the EMA parameters")
_PROGRESS = flags.DEFINE_bool("progress", True, "benchmark mode: show a progress bar")
_JOIN = define_distributed_flags()

DEFAULT_PER_PROMPT = {"geneval": 4, "dpg": 4, "wise": 1}


def _check_flags() -> None:
  """Flag combinations, checked before any model is loaded."""
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise app.UsageError("give exactly one of --prompt (grid) and --prompts-file (benchmark)")
  if _PROMPTS_FILE.value is not None and (_FORMAT.value is None or _OUTDIR.value is None):
    raise app.UsageError("--prompts-file needs --format {geneval,wise,dpg} and --outdir")
  if _PROMPT.value is not None and (_FORMAT.value or _OUTDIR.value or _NUM_PER_PROMPT.value):
    raise app.UsageError("--format, --outdir and --num-per-prompt go with --prompts-file")
  for flag, value in (("--batch", _BATCH.value), ("--num", _NUM.value)):
    if value < 1:
      raise app.UsageError(f"{flag} must be >= 1, got {value}")


def _main(argv):
  del argv
  _check_flags()
  _JOIN()  # a multi-process run: before anything touches a backend
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  runtime.enable_compilation_cache()
  items = writer = None
  if _PROMPTS_FILE.value is not None:  # read and check the prompts before loading the model
    items = benchmark_format.read_prompts(_PROMPTS_FILE.value, _FORMAT.value)
    if _LIMIT.value is not None:
      items = items[: max(_LIMIT.value, 0)]
    n = _NUM_PER_PROMPT.value or DEFAULT_PER_PROMPT[_FORMAT.value]
    writer = benchmark_format.Writer(_FORMAT.value, _OUTDIR.value, n)
  mesh = sharding.sampling_mesh()
  config, ctx, params = inference.load_generator(
    _WORKDIR.value, _EMA.value, _STEP.value, _MAX_TEXT_LEN.value, mesh=mesh
  )
  sampler = specs.from_config(config).sample
  kw = dict(steps=_STEPS.value, cfg=_CFG.value, solver=_SOLVER.value)
  kw.update(batch_size=_BATCH.value, mesh=mesh)
  prompts = [_PROMPT.value] if items is None else [it.prompt for it in items]
  warn_unknown_words("iomm-sample", ctx.tokenizer, prompts)  # sampled anyway, once per prompt
  if items is not None:
    ctx.conditioner.text_conditions([it.prompt for it in items])  # every prompt fits, or say so
    sample_fn = lambda prompts, keys: inference.sample_prompts(
      sampler, ctx, params, prompts, keys, **kw
    )
    counts = benchmark_format.generate(
      sample_fn, items, writer, _SEED.value, _BATCH.value, _PROGRESS.value, mesh.size
    )
    print(f"wrote {_FORMAT.value} layout to {_OUTDIR.value}: {json.dumps(counts)}")
    return
  imgs = inference.sample_prompts(
    sampler, ctx, params, [_PROMPT.value] * _NUM.value, _SEED.value, **kw
  )
  if jax.process_index() == 0:
    grid = metrics.image_grid(imgs, rows=max(1, int(np.sqrt(len(imgs)))))
    big = (grid.shape[1] * 4, grid.shape[0] * 4)
    Image.fromarray(grid).resize(big, Image.NEAREST).save(_OUT.value)
    print(f"wrote {_OUT.value} ({len(imgs)} images for {_PROMPT.value!r})")


def main():
  """Entry point of ``iomm-sample``."""
  run(_main, "iomm-sample", __name__, required=["workdir"])


if __name__ == "__main__":
  main()
