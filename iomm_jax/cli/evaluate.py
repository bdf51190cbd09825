"""``iomm-eval``: the shapes-world GenEval of a trained generator workdir (own data: the
held-out caption retrieval of ``eval.heldout``).

  iomm-eval --workdir W [--step N] [--per_category 64] [--seed 0] [--cfg 3] [--steps 20]
      [--batch 32] [--no-ema]

Generates ``--per_category`` images per GenEval category from the world's held-out prompts and
scores them with the deterministic detector (``shapes_geneval.evaluate``: the same protocol as
``iomm-demo``, the recipe study and ``benchmarks/shapes_score.py``, so a checkpoint has one
score), then writes ``W/eval/shapes_geneval.json`` (``{"overall", "overall_se", "categories",
"category_se", "empty", "num_images", "step", ...}``) and ``W/eval/shapes_geneval_failures.png``
(failed images, one row per prompt); prints the table. Sampler settings default to the
workdir's config.

The images are generated on every device of every process (``sharding.sampling_mesh``;
parameters replicated), ``--batch`` per device per sampler call; they, and so the report, are
byte-identical to a one-device run's with the same ``--batch``. Several processes: start the same
command in each with ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or
``$IOMM_COORDINATOR``, ``$IOMM_NUM_PROCESSES``, ``$IOMM_PROCESS_ID``; SLURM ``srun`` needs
none); every process scores the gathered images, process 0 writes the files.

A run on its own data (``data.source`` "array_record" or "tfds") is scored on up to
``--per_category`` x 6 of its held-out records' captions instead (``eval.heldout``: does the
sample's nearest held-out image in the frozen ViT's space carry its caption; the chance level
and a feature Fréchet distance beside it): ``W/eval/heldout.json`` and ``W/eval/heldout.png``
(caption, sample marked right or wrong, the real held-out image).
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from jax.sharding import Mesh

from iomm_jax import checkpointing, cli, inference, metrics, runtime, sharding
from iomm_jax.configs import specs
from iomm_jax.data import benchmark_format, pipeline, shapes
from iomm_jax.eval import heldout, shapes_geneval

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-1 or stage-2 workdir")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_NUM = flags.DEFINE_integer(
  "per_category", shapes_geneval.PER_CATEGORY, "images per GenEval category"
)
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
_CFG = flags.DEFINE_float("cfg", None, "guidance scale (default: the workdir's config)")
_STEPS = flags.DEFINE_integer("steps", None, "ODE steps (default: the workdir's config)")
_EMA = flags.DEFINE_bool("ema", True, "use the EMA parameters")
_BATCH = flags.DEFINE_integer(
  "batch", 32, "images per device per sampler call (x the devices of all processes per call)"
)
_JOIN = cli.define_distributed_flags()


def run(
  workdir: str,
  step: int | None = None,
  per_category: int = shapes_geneval.PER_CATEGORY,
  seed: int = 0,
  cfg: float | None = None,
  steps: int | None = None,
  use_ema: bool = True,
  batch: int = 32,
  mesh: Mesh | None = None,
) -> dict:
  """Evaluates ``workdir`` on ``mesh`` (default: every device, ``sharding.sampling_mesh``) and
  writes its eval files (process 0); returns the JSON report (on every process)."""
  if per_category < 1:
    raise ValueError(f"--per_category must be >= 1, got {per_category}")
  if batch < 1:
    raise ValueError(f"--batch must be >= 1, got {batch}")
  if step is None:  # record which checkpoint was scored
    saved = checkpointing.saved_steps(workdir)
    step = saved[-1] if saved else None
  mesh = sharding.sampling_mesh() if mesh is None else mesh
  config, ctx, params = inference.load_generator(workdir, use_ema, step, mesh=mesh)
  config.unlock()
  if cfg is not None:
    config.sample.cfg_scale = cfg
  if steps is not None:
    config.sample.num_steps = steps
  config.lock()
  if config.data.source != "shapes":  # own data: its held-out records
    return _own_data(workdir, config, ctx, params, per_category * len(shapes.CATEGORIES),
                     seed, batch, mesh, step, use_ema)  # fmt: skip
  world = pipeline.shapes_world(specs.from_config(config).data)
  prompts = [m["prompt"] for m in shapes_geneval.select_prompts(world, per_category)]
  cli.warn_unknown_words("iomm-eval", ctx.tokenizer, prompts)
  ev = shapes_geneval.evaluate(
    config, ctx, params, per_category=per_category, seed=seed, batch_size=batch, mesh=mesh
  )
  report = {**ev.report, "step": step, "weights": "ema" if use_ema else "params"}
  if jax.process_index() == 0:
    _write(workdir, report, ev)
  runtime.barrier("iomm_jax eval files written")  # every process returns after the files
  return report


def _own_data(workdir, config, ctx, params, num, seed, batch, mesh, step, use_ema) -> dict:
  """``eval.heldout`` of a run on its own data: ``W/eval/heldout.json`` and ``heldout.png``."""
  report, gen, real = heldout.evaluate(config, ctx, params, num, seed, batch, mesh)
  report = {**report, "step": step, "weights": "ema" if use_ema else "params"}
  if jax.process_index() == 0:
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    checkpointing.save_json(os.path.join(out, "heldout.json"), report)
    rows = [(c, [g, r], [ok, None]) for c, g, r, ok in
            zip(report["prompts"], gen, real, report["correct"], strict=True)][:32]  # fmt: skip
    grid = metrics.labelled_grid(
      rows, header=["sample", "held-out image"], legend="held-out captions (first 32)"
    )
    benchmark_format.save_png(os.path.join(out, "heldout.png"), grid)
  runtime.barrier("iomm_jax eval files written")
  return report


def _write(workdir: str, report: dict, ev: shapes_geneval.Evaluation) -> None:
  """``W/eval/shapes_geneval.json`` and the failure grid (or no stale one)."""
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  checkpointing.save_json(os.path.join(out, "shapes_geneval.json"), report)
  grid = shapes_geneval.failure_grid(ev)
  png = os.path.join(out, "shapes_geneval_failures.png")
  if grid is not None:
    benchmark_format.save_png(png, grid)
  elif os.path.exists(png):  # a stale grid from an earlier, worse checkpoint
    os.remove(png)


def _main(argv):
  del argv
  for flag, value in (("--per_category", _NUM.value), ("--batch", _BATCH.value)):
    if value < 1:
      raise app.UsageError(f"{flag} must be >= 1, got {value}")
  _JOIN()  # a multi-process run: before anything touches a backend
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  runtime.enable_compilation_cache()
  report = run(
    _WORKDIR.value, _STEP.value, _NUM.value, _SEED.value, _CFG.value, _STEPS.value, _EMA.value,
    _BATCH.value,
  )  # fmt: skip
  if "caption_match" in report:  # own data
    print(
      f"{_WORKDIR.value} @ {report['step']}: held-out caption match "
      f"{report['caption_match']:.3f} ± {report['caption_match_se']:.3f} "
      f"(chance {report['chance']:.3f}; {report['num_images']} images, "
      f"{report['distinct_captions']} distinct captions), feature FD {report['feature_fd']:.4f} "
      f"(real halves {report['real_split_fd']:.4f}), empty {report['empty']:.3f}"
    )
    name = "heldout.json"
  else:
    print(shapes_geneval.markdown_table({f"{_WORKDIR.value} @ {report['step']}": report}))
    name = "shapes_geneval.json"
  if jax.process_index() == 0:
    print(f"wrote {os.path.join(_WORKDIR.value, 'eval', name)}")
  print(json.dumps(report))


def main():
  """Entry point of ``iomm-eval``."""
  cli.run(_main, "iomm-eval", __name__, required=["workdir"])


if __name__ == "__main__":
  main()
