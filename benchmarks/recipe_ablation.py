"""One row of the demo's recipe ablation: stage 1 then stage 2 of the shapes experiments with
config overrides, on a given frozen stage-0 MLLM, scored with the shapes GenEval.

  python benchmarks/recipe_ablation.py --name ln10 --mllm runs/demo/mllm \
      [--set KEY=VALUE ...] [--s1 KEY=VALUE ...] [--s2 KEY=VALUE ...] [--init WORKDIR]

``--set`` overrides both stages' configs (``experiments/shapes/pretrain.py`` and
``finetune.py``), ``--s1`` / ``--s2`` one stage's; ``--init`` skips stage 1 and fine-tunes from
an existing stage-1 workdir. Runs live under ``--root/NAME`` (default ``runs/ablation``); a
finished stage is reused. Prints the stage times and the report of ``shapes_geneval.evaluate``
(the score ``iomm-eval`` gives) and appends it to ``--root/results.jsonl``. The rows of
docs/RESULTS.md's "What each change did" table give their overrides relative to today's
experiment files.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from iomm_jax import checkpointing, inference, runtime
from iomm_jax.configs import loading
from iomm_jax.eval import shapes_geneval
from iomm_jax.train import finetune, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _done(workdir: str, config) -> bool:
  return config.train.num_steps in checkpointing.saved_steps(workdir)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--name", required=True)
  p.add_argument("--mllm", required=True, help="a finished stage-0 workdir (e.g. runs/demo/mllm)")
  p.add_argument("--root", default="runs/ablation")
  p.add_argument("--init", default=None, help="fine-tune from this stage-1 workdir")
  p.add_argument("--set", nargs="*", default=[], help="both stages' overrides")
  p.add_argument("--s1", nargs="*", default=[], help="stage-1 overrides")
  p.add_argument("--s2", nargs="*", default=[], help="stage-2 overrides")
  a = p.parse_args()
  runtime.outside_absl(quiet=True)
  both = {"model.mllm_from": a.mllm, "sample.num_grid": 0, **loading.parse_overrides(a.set)}
  root = os.path.join(a.root, a.name)
  times = {}
  s1_dir = a.init or os.path.join(root, "pretrain")
  if a.init is None:
    s1 = loading.parse_overrides(a.s1)
    c1 = loading.load_config(os.path.join(ROOT, "experiments/shapes/pretrain.py"), {**both, **s1})
    t = time.time()
    if not _done(s1_dir, c1):
      pretrain.train_and_evaluate(c1, s1_dir)
    times["stage1_s"] = time.time() - t
  c2 = loading.load_config(
    os.path.join(ROOT, "experiments/shapes/finetune.py"),
    {**both, "train.init_from": s1_dir, **loading.parse_overrides(a.s2)},
  )
  s2_dir = os.path.join(root, "finetune")
  t = time.time()
  if not _done(s2_dir, c2):
    finetune.train_and_evaluate(c2, s2_dir)
  times["stage2_s"] = time.time() - t
  config, ctx, params = inference.load_generator(s2_dir)
  report = shapes_geneval.evaluate(config, ctx, params).report
  print(
    f"{a.name}: "
    + " ".join(f"{k} {v:.0f}" for k, v in times.items())
    + f" overall {report['overall']:.3f} ± {report['overall_se']:.3f}, empty {report['empty']:.2f}"
  )
  print(shapes_geneval.markdown_table({a.name: report}))
  row = {"name": a.name, "set": a.set, "s1": a.s1, "s2": a.s2, "init": a.init, **times, **report}
  os.makedirs(a.root, exist_ok=True)
  with open(os.path.join(a.root, "results.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
