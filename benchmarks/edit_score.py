"""Zero-shot editing scores of trained shapes-world generators, through ``iomm-edit``.

  python benchmarks/edit_score.py --workdir runs/demo/pretrain --workdir runs/demo/finetune \
      [--per-kind 64] [--seed 0] [--out runs/edit_score]

Writes the study's editing tasks (``eval.shapes_editing.make_tasks``: recolour and add) as an
ImgEdit-Bench-style JSON and source PNGs, runs the ``iomm-edit`` command line on them for each
workdir (ImgEdit's layout, ``D/<id>.png``), then scores its output images with the study's
detector-based scorer (``shapes_editing.score``): edit success per kind with its standard error,
and the preservation of the objects an edit must keep. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

BIN = os.path.dirname(sys.executable)


def write_tasks(tasks, world, out: str) -> str:
  """Sources ``out/sources/<i>.png`` and ``out/edits.json``; returns the JSON's path."""
  from iomm_jax.data import shapes

  os.makedirs(os.path.join(out, "sources"), exist_ok=True)
  table = {}
  for i, t in enumerate(tasks):
    Image.fromarray(shapes.render(t.source, world)).save(os.path.join(out, "sources", f"{i}.png"))
    table[f"{i:05d}"] = {"id": f"{i}.png", "prompt": t.instruction, "edit_type": t.kind}
  path = os.path.join(out, "edits.json")
  with open(path, "w") as f:
    json.dump(table, f, indent=1)
  return path


def score_folder(folder: str, tasks, world) -> dict:
  """Success (mean, SE) per kind and overall, and mean preservation, of ``folder/<id>.png``."""
  from iomm_jax.eval import shapes_editing

  results = [
    shapes_editing.score(np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png"))), t, world)
    for i, t in enumerate(tasks)
  ]
  out = {}
  for kind in (*shapes_editing.KINDS, "overall"):
    rs = [r for r, t in zip(results, tasks, strict=True) if kind in ("overall", t.kind)]
    s = np.array([ok for ok, _ in rs], float)
    kept = [p for _, p in rs if p is not None]
    out[kind] = {
      "success": float(s.mean()),
      "se": float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("nan"),
      "preservation": float(np.mean(kept)) if kept else float("nan"),
      "n": len(rs),
    }
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", action="append", required=True, help="a stage-1 or -2 workdir")
  p.add_argument("--per-kind", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/edit_score")
  a = p.parse_args()
  from iomm_jax.assembly import workdirs
  from iomm_jax.configs import specs
  from iomm_jax.data import pipeline
  from iomm_jax.eval import shapes_editing

  config = workdirs.load_workdir_config(a.workdir[0])
  world = pipeline.shapes_world(specs.from_config(config).data)
  tasks = shapes_editing.make_tasks(world, a.per_kind, a.seed)
  edits = write_tasks(tasks, world, a.out)
  rows = []
  for wd in a.workdir:
    folder = os.path.join(a.out, os.path.basename(os.path.normpath(wd)))
    t = time.time()
    cmd = [os.path.join(BIN, "iomm-edit"), "--workdir", wd, "--edits", edits,
           "--image_root", os.path.join(a.out, "sources"), "--outdir", folder,
           "--seed", str(a.seed), "--batch", "32", "--progress=false"]  # fmt: skip
    subprocess.run(cmd, check=True)
    rows.append((wd, score_folder(folder, tasks, world), time.time() - t))
  print(
    f"\n{len(tasks)} tasks ({a.per_kind} per kind), seed {a.seed}; success ± SE (preservation)\n"
  )
  print("| workdir | recolor | add | overall | s |")
  print("|---|---|---|---|---|")
  for wd, r, secs in rows:
    cells = " | ".join(
      f"{r[k]['success']:.3f} ± {r[k]['se']:.3f} ({r[k]['preservation']:.2f})"
      for k in ("recolor", "add", "overall")
    )
    print(f"| {wd} | {cells} | {secs:.0f} |")


if __name__ == "__main__":
  main()
