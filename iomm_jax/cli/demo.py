"""``iomm-demo``: the whole IOMM recipe on the embedded shapes world, in one command.

  iomm-demo --workdir runs/demo [--quick]

Stage 0 (tiny MLLM captioning) -> stage 1 (image-only, masked self-conditioning) -> stage 2
(mixed fine-tune) -> a labelled sample grid of held-out prompts (``<workdir>/samples.png``) and
detector scores per GenEval category for the stage-1 and the stage-2 model
(``<workdir>/demo_eval.json``). Each stage resumes if its workdir already has checkpoints.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import flags, logging
from PIL import Image

import iomm_jax
from iomm_jax import checkpointing, inference, metrics, runtime
from iomm_jax.cli import exit_on_preemption, run
from iomm_jax.configs import loading
from iomm_jax.eval import shapes_geneval
from iomm_jax.train import finetune, mllm, pretrain

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "output directory")
_QUICK = flags.DEFINE_bool("quick", False, "seconds-long variant (tests)")
_EXPERIMENTS = flags.DEFINE_string(
  "experiments",
  os.path.join(os.path.dirname(os.path.dirname(iomm_jax.__file__)), "experiments", "shapes"),
  "folder of the shapes experiment files",
)
_EVAL_PER_CATEGORY = flags.DEFINE_integer(
  "eval_per_category", shapes_geneval.PER_CATEGORY, "images scored per GenEval category"
)


def _config(name: str, quick: bool, **overrides):
  path = os.path.join(_EXPERIMENTS.value, f"{name}.py")
  return loading.load_config(path + (":quick" if quick else ""), overrides)


def stage_summary(workdir: str) -> dict[str, float]:
  """Steps, first and last logged loss, and mean training speed of a stage's metrics.jsonl."""
  recs = metrics.read_metrics(workdir)
  speeds = [r["steps_per_s"] for r in recs[1:]]  # the first record includes compilation
  return {
    "steps": recs[-1]["step"],
    "first_loss": recs[0]["loss"],
    "last_loss": recs[-1]["loss"],
    "steps_per_s": float(np.mean(speeds)) if speeds else float("nan"),
  }


def markdown_report(report: dict) -> str:
  """The demo's results as the markdown tables of docs/RESULTS.md."""
  lines = [
    "| stage | steps | first loss | last loss | steps/s | wall (s) |",
    "|---|---|---|---|---|---|",
  ]
  for k, st in report["stages"].items():
    lines.append(
      f"| {k} | {st['steps']} | {st['first_loss']:.4f} | {st['last_loss']:.4f} | "
      f"{st['steps_per_s']:.2f} | {report['wall_s'][k]:.0f} |"
    )
  lines += ["", shapes_geneval.markdown_table(report["scores"])]
  if "finetune_minus_pretrain" in report:
    lines += ["", comparison_line(report["finetune_minus_pretrain"])]
  return "\n".join(lines)


def evaluate(workdir: str, per_category: int, seed: int = 0) -> shapes_geneval.Evaluation:
  """The shapes GenEval of a generator workdir (``shapes_geneval.evaluate``, the score
  ``iomm-eval`` gives the same checkpoint; ``.report`` in GenEval's JSON layout)."""
  config, ctx, params = inference.load_generator(workdir)
  return shapes_geneval.evaluate(config, ctx, params, per_category=per_category, seed=seed)


def comparison_line(cmp: dict) -> str:
  """One line: the stage-2 model's score minus the stage-1 model's, with its paired error."""
  z = cmp["difference"] / cmp["se"] if cmp["se"] > 0 else float("nan")
  return (
    f"stage 2 - stage 1, same {cmp['num_images']} prompts and noise: "
    f"{cmp['difference']:+.3f} +- {cmp['se']:.3f} ({z:.1f} standard errors; "
    f"{cmp['only_other']} images right only after stage 2, {cmp['only_base']} only after stage 1)"
  )


def _main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  runtime.enable_compilation_cache()
  del argv
  t0 = time.time()
  root, quick = _WORKDIR.value, _QUICK.value
  dirs = {k: os.path.join(root, k) for k in ("mllm", "pretrain", "finetune")}
  timings = {}
  stages = [
    ("mllm", mllm.train_and_evaluate, {}),
    ("pretrain", pretrain.train_and_evaluate, {"model.mllm_from": dirs["mllm"]}),
    (
      "finetune",
      finetune.train_and_evaluate,
      {"model.mllm_from": dirs["mllm"], "train.init_from": dirs["pretrain"]},
    ),
  ]
  for name, fn, overrides in stages:
    s = time.time()
    print(f"=== stage {name} -> {dirs[name]}", flush=True)
    with exit_on_preemption():  # SIGTERM: saved; the next stage must not start (rerun resumes)
      fn(_config(name, quick, **overrides), dirs[name])
    timings[name] = time.time() - s

  s = time.time()
  config, ctx, params = inference.load_generator(dirs["finetune"])
  shown = shapes_geneval.scored_samples(config, ctx, params, per_prompt=2 if quick else 8)
  grid_path = os.path.join(root, "samples.png")
  Image.fromarray(shapes_geneval.scored_grid(shown)).save(grid_path)
  per_cat = 2 if quick else _EVAL_PER_CATEGORY.value
  evals = {name: evaluate(dirs[name], per_cat) for name in ("pretrain", "finetune")}
  scores = {name: ev.report for name, ev in evals.items()}
  cmp = shapes_geneval.compare(evals["pretrain"], evals["finetune"])
  timings["sample_and_eval"] = time.time() - s
  timings["total"] = time.time() - t0
  report = {
    "scores": scores,
    "finetune_minus_pretrain": cmp,
    "wall_s": timings,
    "grid": grid_path,
    "stages": {k: stage_summary(d) for k, d in dirs.items()},
  }
  checkpointing.save_json(os.path.join(root, "demo_eval.json"), report)
  print(f"wrote {grid_path}")
  print(markdown_report(report))
  print(
    f"demo wall time {timings['total']:.0f} s  "
    + json.dumps({k: round(v) for k, v in timings.items()})
  )


def main():
  """Entry point of ``iomm-demo``."""
  run(_main, "iomm-demo", __name__)


if __name__ == "__main__":
  main()
