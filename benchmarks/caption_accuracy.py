"""Caption accuracy of the shapes stage-0 MLLM, decoded greedily through ``iomm_jax.chat``.

  python benchmarks/caption_accuracy.py [--workdir runs/caption_accuracy/mllm]
      [--config experiments/shapes/mllm.py] [--num-images 512] [--batch 64] [--seed 0]

Trains the stage-0 MLLM of ``--config`` into ``--workdir`` (``train.mllm.train_and_evaluate``;
300 steps at the default) unless the workdir already holds its last checkpoint, then captions
``--num-images`` fresh shapes scenes (``shapes.sample_scene`` with no category: 1 to 4 objects of
random shapes, colours and cells, rendered at the training canvas) drawn from
``default_rng((EVAL_STREAM, seed, i))``, a stream disjoint from training's
(``pipeline.ShapesStream``: ``default_rng((config.seed + 1, i))``), with the captioning prompt
(``chat.prompt_ids``: [BOS] <img> image tokens </img>) and greedy decoding up to EOS.

Each caption is scored against the ground truth ``shapes.describe(scene)``:

* exact match: the caption equals the ground truth, word for word;
* parsed: the caption follows the caption grammar ("a red circle", "a red circle left of a blue
  square", "two green triangles and a red circle", ...) so that its objects can be read;
* object count: the number of objects the caption names equals the scene's;
* colour + shape, colour, shape: per image, the share of the scene's objects whose (colour,
  shape) pair / colour / shape the caption names (multisets matched, order free; an unparsed
  caption names none), averaged over images;
* exact match by the scene's object count.

Shares are means over images with their standard errors (sd / sqrt(n)). The scenes' captions
come from the training grammar, so many ground-truth captions also occur in training (the share
that occurs among the ``num_steps x batch_size`` training captions is printed); the images are
new draws (other cells, jitter, sizes). Prints one markdown table with the command, the date and
the wall time.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import shlex
import sys
import time

import numpy as np

from iomm_jax import chat, runtime
from iomm_jax.assembly import workdirs
from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config
from iomm_jax.data import pipeline, shapes
from iomm_jax.train import mllm as mllm_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_STREAM = 20_251_717  # first entropy word of the evaluation scenes' seeds (not config.seed+1)
WORDS = {w: n for n, w in shapes.NUMBER_WORDS.items()} | {"an": 1}


def parse_caption(caption: str, world: shapes.WorldConfig) -> collections.Counter | None:
  """The (colour, shape) multiset a caption of ``shapes.describe``'s grammar names, or None when
  it does not follow the grammar (unknown words, a bad count, a plural that disagrees)."""
  text = caption.strip()
  if text == "an empty image":
    return collections.Counter()
  for rel in (" left of ", " above "):
    text = text.replace(rel, ", ")
  phrases = [p for part in text.split(", ") for p in part.split(" and ")]
  out: collections.Counter = collections.Counter()
  for phrase in phrases:
    words = phrase.split()
    if len(words) != 3 or words[0] not in WORDS or words[1] not in world.colors:
      return None
    count, color, noun = WORDS[words[0]], words[1], words[2]
    shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
    if shape not in world.shapes or shapes.plural(shape, count) != noun:
      return None
    if count == 1 and words[0] != shapes.article(color):
      return None
    out[(color, shape)] += count
  return out


def score(caption: str, scene: shapes.Scene, world: shapes.WorldConfig) -> dict[str, float]:
  """Per-image scores (module docstring) of ``caption`` for ``scene``."""
  truth = shapes.describe(scene)
  pairs = collections.Counter((o.color, o.shape) for o in scene.objects)
  n = len(scene.objects)
  got = parse_caption(caption, world)
  if got is None:
    named_pairs = named_colors = named_shapes = 0
  else:
    named_pairs = sum((pairs & got).values())
    true_c = collections.Counter(c for c, _ in pairs.elements())
    true_s = collections.Counter(s for _, s in pairs.elements())
    named_colors = sum((true_c & collections.Counter(c for c, _ in got.elements())).values())
    named_shapes = sum((true_s & collections.Counter(s for _, s in got.elements())).values())
  return {
    "exact": float(caption.strip() == truth),
    "parsed": float(got is not None),
    "count": float(got is not None and sum(got.values()) == n),
    "pair": named_pairs / n,
    "color": named_colors / n,
    "shape": named_shapes / n,
  }


def ensure_trained(spec: str, workdir: str) -> tuple[object, bool]:
  """(config, trained now?): the stage-0 run of ``spec`` in ``workdir``, trained unless its
  last checkpoint is there already."""
  config = load_config(spec)
  ckpt = os.path.join(workdir, "checkpoints", str(config.train.num_steps))
  if os.path.isdir(ckpt):
    return workdirs.load_workdir_config(workdir), False
  mllm_train.train_and_evaluate(config, workdir)
  return workdirs.load_workdir_config(workdir), True


def mean_se(x) -> tuple[float, float]:
  """Mean and standard error of the mean."""
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def main():
  """Trains or reuses the stage-0 MLLM, captions the held-out scenes, prints the table."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "caption_accuracy", "mllm"))
  p.add_argument("--config", default=os.path.join(ROOT, "experiments", "shapes", "mllm.py"))
  p.add_argument("--num-images", type=int, default=512)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seed", type=int, default=0, help="evaluation scenes' seed")
  p.add_argument("--max-new-tokens", type=int, default=40)
  a = p.parse_args()
  runtime.outside_absl()
  t0 = time.time()
  config, trained = ensure_trained(a.config, a.workdir)
  t_train = time.time() - t0
  world = pipeline.shapes_world(specs.from_config(config).data)
  scenes = [
    shapes.sample_scene(np.random.default_rng((EVAL_STREAM, a.seed, i)), world)
    for i in range(a.num_images)
  ]
  images = np.stack([shapes.render(s, world) for s in scenes])
  t1 = time.time()
  cm = chat.load(a.workdir)
  answers = chat.answer(
    cm, images, None, max_new_tokens=a.max_new_tokens, batch_size=min(a.batch, a.num_images)
  )
  t_caption = time.time() - t1
  rows = [score(ans.text, s, world) for ans, s in zip(answers, scenes, strict=True)]

  train_caps = {
    shapes.describe(shapes.sample_scene(np.random.default_rng((config.seed + 1, i)), world))
    for i in range(config.train.num_steps * config.train.batch_size)
  }
  seen = np.mean([shapes.describe(s) in train_caps for s in scenes])

  cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)
  print(f"\n`{cmd}`  ")
  print(
    f"{datetime.datetime.now().isoformat(timespec='seconds')}, {platform.machine()} "
    f"{os.cpu_count()} CPUs, jax backend {__import__('jax').default_backend()}; stage 0 "
    f"{'trained now' if trained else 'reused'} ({a.workdir}, {config.train.num_steps} steps, "
    f"{t_train:.0f} s); captioning {a.num_images} images {t_caption:.0f} s; wall "
    f"{time.time() - t0:.0f} s  "
  )
  print(
    f"eval scenes: default_rng(({EVAL_STREAM}, {a.seed}, i)); their ground-truth caption "
    f"occurs among the {len(train_caps)} distinct training captions for {seen:.1%} of them  \n"
  )
  print("| metric | share | s.e. | images |")
  print("|---|---|---|---|")
  names = {
    "exact": "exact match",
    "parsed": "caption parses",
    "count": "object count right",
    "pair": "objects: colour + shape named",
    "color": "objects: colour named",
    "shape": "objects: shape named",
  }
  for key, name in names.items():
    m, se = mean_se([r[key] for r in rows])
    print(f"| {name} | {m:.3f} | {se:.3f} | {len(rows)} |")
  for n in sorted({len(s.objects) for s in scenes}):
    sel = [r["exact"] for r, s in zip(rows, scenes, strict=True) if len(s.objects) == n]
    m, se = mean_se(sel)
    print(f"| exact match, {n} object{'s' if n > 1 else ''} | {m:.3f} | {se:.3f} | {len(sel)} |")
  print("\nexamples (caption | ground truth):")
  for ans, s in list(zip(answers, scenes, strict=True))[:8]:
    print(f"  {ans.text!r} | {shapes.describe(s)!r}")


if __name__ == "__main__":
  main()
