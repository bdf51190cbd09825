"""Linear probes of a frozen shapes MLLM: how well its features separate colour, shape, count and
position, for images (what stage 1 conditions on) and for prompts (what stage 2 conditions on).

  python benchmarks/mllm_probe.py --mllm runs/demo/mllm [--random] [--train 3000] [--test 1000]

Features (each a fixed vector per image or prompt; a softmax-regression probe is fitted on the
training split and scored on the test split):

* images: ``vision`` = the ViT + projector tokens [P, D] of a scene, flattened (the condition's
  image tokens before masking), and ``vision_masked`` = the same with 85 % of the tokens zeroed
  (stage 1's condition); ``image_hidden`` = the frozen decoder's last hidden states at those
  token positions of the image condition (aux prompt + image), flattened;
* prompts: ``embeddings`` = the input token embeddings per position, concatenated (what the RQA
  cross-attends to, with order); ``embeddings_mean`` = their mean (a bag of words: what the
  RQA sees without positions); ``hidden`` = the decoder's last hidden states per position,
  concatenated; ``hidden_mean`` = their mean over the prompt's tokens.

Targets: for scenes, the number of objects and, per cell, its content's colour and shape
("empty" included); for prompts, the category, the first and second object's colour and shape
(in the order the prompt names them), the count and the relation. Prompts (every category prompt
of the world) are split at random 75 / 25, so a probe is scored on combinations it was not
fitted on; each category gives at most 224 prompts (color_attr has 1680). ``--random`` probes a
randomly initialised MLLM of the same architecture instead (the baseline: what a network that
never learnt captions gives). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iomm_jax import runtime
from iomm_jax.assembly import context
from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config
from iomm_jax.data import pipeline, shapes
from iomm_jax.diffusion import masking
from iomm_jax.models import iomm
from iomm_jax.models import mllm as mllm_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS_PER_CATEGORY = 224


def fit_probe(
  x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, steps=400
) -> float:
  """Test accuracy of a softmax-regression probe (standardised features, small L2, Adam)."""
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
  k = int(max(y_train.max(), y_test.max())) + 1
  w = jnp.zeros((xtr.shape[1], k))
  b = jnp.zeros((k,))
  opt = optax.adam(1e-2)
  params = (w, b)
  state = opt.init(params)
  xtr_j, ytr_j = jnp.asarray(xtr), jnp.asarray(y_train)

  def loss(p):
    logits = xtr_j @ p[0] + p[1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ytr_j).mean()
    return ce + 1e-3 * jnp.sum(p[0] ** 2)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  pred = np.asarray(jnp.argmax(jnp.asarray(xte) @ params[0] + params[1], -1))
  return float(np.mean(pred == y_test))


def _majority(y_train: np.ndarray, y_test: np.ndarray) -> float:
  """Accuracy of always answering the training split's most frequent label."""
  return float(np.mean(y_test == np.bincount(y_train).argmax()))


def image_features(ctx, scenes, world, seed: int = 0) -> dict[str, np.ndarray]:
  """Per-scene feature vectors (see the module docstring)."""
  model, mp = ctx.model, ctx.frozen["mllm"]
  images = np.stack([shapes.render(s, world) for s in scenes])
  ids, valid = ctx.conditioner.image_condition()
  img_pos = np.nonzero(ids == ctx.tokenizer.img_context_id)[0]

  @jax.jit
  def feats(imgs, key):
    vis = iomm.vision_tokens(model, mp, imgs)
    keep = masking.token_keep_mask(key, vis.shape[:2], 0.85)
    b = imgs.shape[0]
    i = jnp.broadcast_to(jnp.asarray(ids), (b, len(ids)))
    v = jnp.broadcast_to(jnp.asarray(valid), (b, len(valid)))
    emb = model.mllm.apply({"params": mp}, i, method=mllm_lib.InternVLModel.embed)
    emb = iomm.merge_image_tokens_per_row(emb, i, vis, model.mllm_config.image_token_id)
    mask, pos = iomm.query_attention(v, 0)
    hid = model.mllm.apply({"params": mp}, emb, pos, mask, method=mllm_lib.InternVLModel.decode)
    return vis, masking.mask_tokens(vis, keep), hid[:, img_pos]

  out = {"vision": [], "vision_masked": [], "image_hidden": []}
  for s in range(0, len(images), 256):
    r = feats(jnp.asarray(images[s : s + 256]), jax.random.key(seed + s))
    for name, f in zip(out, r, strict=True):
      out[name].append(np.asarray(f).reshape(f.shape[0], -1))
  return {k: np.concatenate(v) for k, v in out.items()}


def image_targets(scenes, world) -> dict[str, np.ndarray]:
  """Number of objects, and per cell (row-major) colour / shape index with 0 = empty."""
  out: dict[str, list] = {"objects": []}
  for s in scenes:
    out["objects"].append(len(s.objects))
    by_cell = {(o.row, o.col): o for o in s.objects}
    for r in range(world.grid):
      for c in range(world.grid):
        o = by_cell.get((r, c))
        out.setdefault(f"cell {r},{c} colour", []).append(
          0 if o is None else 1 + world.colors.index(o.color)
        )
        out.setdefault(f"cell {r},{c} shape", []).append(
          0 if o is None else 1 + world.shapes.index(o.shape)
        )
  return {k: np.asarray(v) for k, v in out.items()}


def prompt_features(ctx, prompts: list[str]) -> dict[str, np.ndarray]:
  """Per-prompt feature vectors (see the module docstring)."""
  model, mp = ctx.model, ctx.frozen["mllm"]
  ids, valid = ctx.conditioner.text_conditions(prompts)
  length = int(valid.sum(1).max())
  ids, valid = ids[:, :length], valid[:, :length]

  @jax.jit
  def feats(i, v):
    emb = model.mllm.apply({"params": mp}, i, method=mllm_lib.InternVLModel.embed)
    mask, pos = iomm.query_attention(v, 0)
    hid = model.mllm.apply({"params": mp}, emb, pos, mask, method=mllm_lib.InternVLModel.decode)
    w = v[..., None].astype(jnp.float32)
    mean = lambda x: jnp.sum(x * w, 1) / jnp.sum(w, 1)
    return emb * w, mean(emb), hid * w, mean(hid)

  names = ("embeddings", "embeddings_mean", "hidden", "hidden_mean")
  r = feats(jnp.asarray(ids), jnp.asarray(valid))
  return {n: np.asarray(f).reshape(len(prompts), -1) for n, f in zip(names, r, strict=True)}


def prompt_targets(metas, world) -> dict[str, np.ndarray]:
  """Category, first/second colour and shape (0 = none), count, relation (0 = none)."""
  out: dict[str, list] = {k: [] for k in ("category", "colour 1", "colour 2", "shape 1",
                                          "shape 2", "count", "relation")}  # fmt: skip
  for m in metas:
    inc = m["include"]
    if m["tag"] == "position":  # A (include[1]) is named first in the prompt
      inc = [inc[1], inc[0]]
    out["category"].append(shapes.CATEGORIES.index(m["tag"]))
    for j in (0, 1):
      req = inc[j] if j < len(inc) else {}
      out[f"colour {j + 1}"].append(1 + world.colors.index(req["color"]) if "color" in req else 0)
      out[f"shape {j + 1}"].append(1 + world.shapes.index(req["class"]) if req else 0)
    out["count"].append(inc[0]["count"])
    rel = inc[0].get("position") or (inc[1].get("position") if len(inc) > 1 else None)
    out["relation"].append(1 + shapes.RELATIONS.index(rel[0]) if rel else 0)
  return {f"prompt {k}": np.asarray(v) for k, v in out.items()}


def run(mllm: str, random_init: bool, n_train: int, n_test: int, seed: int = 0) -> dict:
  """Probe accuracies {feature: {target: acc}} plus chance rates."""
  overrides = {"model.mllm_from": mllm} if not random_init else {"model.mllm_init": "random"}
  config = load_config(os.path.join(ROOT, "experiments", "shapes", "pretrain.py"), overrides)
  ctx = context.build(config)
  world = pipeline.shapes_world(specs.from_config(config).data)
  rng = np.random.default_rng(seed)
  scenes = [shapes.sample_scene(rng, world) for _ in range(n_train + n_test)]
  feats, targets = image_features(ctx, scenes, world, seed), image_targets(scenes, world)
  results: dict[str, dict[str, float]] = {}

  def probe(feats, targets, n_tr):
    for fname, x in feats.items():
      for tname, y in targets.items():
        if len(np.unique(y)) < 2:
          continue
        acc = fit_probe(x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:])
        results.setdefault(fname, {})[tname] = acc
        results.setdefault("chance", {})[tname] = _majority(y[:n_tr], y[n_tr:])

  probe(feats, targets, n_train)
  # prompts: the category prompts of the world (held-out ones included: no generator is trained
  # here), shuffled and split 75 / 25
  metas = []
  for c in shapes.CATEGORIES:  # at most PROMPTS_PER_CATEGORY of each, so none dominates
    ms = shapes.category_prompts(world, c)
    metas += [ms[i] for i in rng.permutation(len(ms))[:PROMPTS_PER_CATEGORY]]
  order = rng.permutation(len(metas))
  metas = [metas[i] for i in order]
  n_tr = int(0.75 * len(metas))
  probe(prompt_features(ctx, [m["prompt"] for m in metas]), prompt_targets(metas, world), n_tr)
  return results


def markdown(results: dict) -> str:
  targets = list(results["chance"])
  lines = ["| feature | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
  for fname, accs in results.items():
    cells = " | ".join(f"{accs[t]:.2f}" if t in accs else "" for t in targets)
    lines.append(f"| {fname} | {cells} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mllm", default="runs/demo/mllm", help="a stage-0 workdir")
  p.add_argument("--random", action="store_true", help="probe a random-init MLLM instead")
  p.add_argument("--train", type=int, default=3000, help="training scenes")
  p.add_argument("--test", type=int, default=1000, help="test scenes")
  a = p.parse_args()
  runtime.outside_absl(quiet=True)
  print(f"{platform.node()} {os.cpu_count()} CPUs, jax {jax.__version__}")
  results = run(a.mllm, a.random, a.train, a.test)
  print(f"{'random-init MLLM' if a.random else a.mllm}: probe test accuracy")
  print(markdown(results))
  print(json.dumps(results))


if __name__ == "__main__":
  main()
