"""Where a generator train step's time goes: data, frozen ViT, condition path (RQA + frozen MLLM
decoder + connector), MM-DiT, optimiser, and the whole jitted step, for the shapes stages.

  python benchmarks/step_breakdown.py [--stage pretrain finetune] [--batch 16] [--steps 30]
      [--set key=value ...]

Each piece is jitted on its own on the stage's real batch (rendered by the stage's input
pipeline) and timed after warm-up (median of ``--steps`` calls):

* data: ``next(iterator)`` of the stage's grain pipeline (rendering + tokenising on the host);
* ViT + projector: the frozen vision tokens of the batch's images (forward only: no gradient
  flows into the frozen MLLM's vision side);
* condition fwd+bwd: RQA -> frozen MLLM decoder -> connector, forward and the backward pass to the
  adapter and connector parameters (the gradient flows through the frozen decoder);
* generator fwd+bwd: the MM-DiT on the noisy latents given the context, with its gradient;
* optimiser + EMA: clip, AdamW and the EMA update of every trainable parameter;
* whole step: ``loop.make_jitted_step`` (what the loop runs), and the same with data fetching.

The pieces do not add up exactly to the whole step (XLA fuses across them); the table shows
where the time is. Prints a markdown table (ms per call, share of the whole step) and one JSON
line. The frozen MLLM is a random init of the configured size (``model.mllm_init=random``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iomm_jax import runtime
from iomm_jax.assembly import context
from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config, parse_overrides
from iomm_jax.data import pipeline
from iomm_jax.diffusion import flow, masking
from iomm_jax.models import codec as codec_lib
from iomm_jax.models import iomm
from iomm_jax.train import loop, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_time(fn, n: int, warmup: int = 3) -> float:
  """Median seconds of ``fn()`` (which blocks until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def breakdown(stage: str, batch: int, n: int, overrides: dict) -> dict[str, float]:
  """Seconds per call of each piece of ``stage``'s train step (see the module docstring)."""
  spec = os.path.join(ROOT, "experiments", "shapes", f"{stage}.py")
  config = load_config(
    spec,
    {
      "model.mllm_init": "random",
      "train.batch_size": batch,
      **({"train.init_from": "scratch"} if stage == "finetune" else {}),
      **overrides,
    },
  )
  ctx = context.build(config)
  model, frozen = ctx.model, ctx.frozen
  it = iter(pipeline.make_dataset(specs.from_config(config), ctx.conditioner))
  host = next(it)
  data = {k: jnp.asarray(v) for k, v in host.items()}
  null_ids, null_valid = (jnp.asarray(a) for a in ctx.conditioner.null_condition())
  cond_len = ctx.conditioner.cond_len
  params = jax.jit(lambda: nn.meta.unbox(iomm.init_trainable(model, 0, cond_len)))()
  out: dict[str, float] = {}

  out["data"] = _median_time(lambda: next(it), n)

  vit = jax.jit(lambda mp, im: iomm.vision_tokens(model, mp, im))
  out["vit"] = _median_time(lambda: vit(frozen["mllm"], data["image"]).block_until_ready(), n)
  vis = masking.mask_tokens(
    vit(frozen["mllm"], data["image"]),
    masking.token_keep_mask(jax.random.key(1), (batch, model.num_image_tokens), 0.85),
  )

  cond_params = {k: v for k, v in params.items() if k != "generator"}

  def cond_loss(cp, mp, ids, valid, vis, probe):
    ctx_, pooled = iomm.condition(model, cp, mp, ids, valid, vis)
    return jnp.sum(ctx_ * probe) + jnp.sum(pooled)

  ctx0, pooled0 = jax.jit(lambda cp, mp, i, v, x: iomm.condition(model, cp, mp, i, v, x))(
    cond_params, frozen["mllm"], data["cond_ids"], data["cond_valid"], vis
  )
  probe = jnp.ones_like(ctx0)
  cond_grad = jax.jit(jax.grad(cond_loss))
  args = (cond_params, frozen["mllm"], data["cond_ids"], data["cond_valid"], vis, probe)
  out["condition"] = _median_time(lambda: jax.block_until_ready(cond_grad(*args)), n)

  x = model.codec.encode(frozen["codec"], codec_lib.images_to_unit(data["image"]))
  t = flow.sample_timesteps(jax.random.key(2), batch)
  pair = flow.make_training_pair(jax.random.key(3), x, t)

  def gen_loss(gp, x_t, t, c, p, target):
    pred = iomm.velocity(model, gp, x_t, t, c, p)
    return jnp.mean(flow.flow_matching_loss(pred, target))

  gen_grad = jax.jit(jax.grad(gen_loss))
  gargs = (params["generator"], pair["x_t"], t, ctx0, pooled0, pair["target"])
  out["generator"] = _median_time(lambda: jax.block_until_ready(gen_grad(*gargs)), n)

  loss_fn = steps.generator_loss_fn(model, specs.from_config(config), null_ids, null_valid)
  optimizer, step = loop.make_jitted_step(
    loss_fn, specs.from_config(config), config.train.num_steps
  )
  grads = jax.tree_util.tree_map(jnp.ones_like, params)

  @jax.jit
  def opt_only(p, s, e, g):
    upd, s = optimizer.update(g, s, p)
    p = optax.apply_updates(p, upd)
    e = jax.tree_util.tree_map(lambda a, b: 0.99 * a + 0.01 * b, e, p)
    return p, s, e

  opt_state = optimizer.init(params)
  ema = jax.tree_util.tree_map(jnp.copy, params)
  out["optimizer"] = _median_time(
    lambda: jax.block_until_ready(opt_only(params, opt_state, ema, grads)), n
  )

  state = steps.create_state(jax.tree_util.tree_map(jnp.copy, params), optimizer)
  rng = jax.random.key(0)
  holder = {"state": state}

  def whole(fetch: bool):
    b = {k: jnp.asarray(v) for k, v in next(it).items()} if fetch else data
    holder["state"], m = step(holder["state"], b, frozen, rng)
    jax.block_until_ready(m)

  out["step"] = _median_time(lambda: whole(False), n)
  out["step_with_data"] = _median_time(lambda: whole(True), n)
  out["cond_len"] = cond_len
  out["image_tokens"] = int(model.num_image_tokens)
  out["generator_tokens"] = int(np.prod(model.latent_shape[:2])) // (
    model.generator.config.latent_patch**2
  )
  return out


ROWS = (
  ("data", "data: render + tokenise one batch (host)"),
  ("vit", "frozen ViT + projector (forward)"),
  ("condition", "RQA + frozen MLLM decoder + connector (fwd + bwd)"),
  ("generator", "MM-DiT (fwd + bwd)"),
  ("optimizer", "clip + AdamW + EMA"),
  ("step", "whole jitted step (batch on device)"),
  ("step_with_data", "whole step + data fetch (what the loop does)"),
)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--stage", nargs="+", default=["pretrain", "finetune"])
  p.add_argument("--batch", type=int, default=0, help="batch (0: the experiment file's)")
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--set", nargs="*", default=[], help="key=value config overrides")
  a = p.parse_args()
  runtime.outside_absl(quiet=True)
  overrides = parse_overrides(a.set)
  print(f"{platform.node()} {os.cpu_count()} CPUs, jax {jax.__version__}, {jax.devices()[0]}")
  results = {}
  for stage in a.stage:
    batch = (
      a.batch
      or load_config(os.path.join(ROOT, "experiments", "shapes", f"{stage}.py")).train.batch_size
    )
    r = breakdown(stage, batch, a.steps, overrides)
    results[stage] = {"batch": batch, **r}
    print(
      f"\n{stage}, batch {batch}: condition {r['cond_len']} tokens + queries, "
      f"{r['image_tokens']} vision tokens, {r['generator_tokens']} generator tokens"
    )
    print("| piece | ms / call | share of the whole step |")
    print("|---|---|---|")
    for key, label in ROWS:
      print(f"| {label} | {1000 * r[key]:.1f} | {100 * r[key] / r['step']:.0f} % |")
    print(f"samples/s (loop): {batch / r['step_with_data']:.0f}", flush=True)
  print(json.dumps({"overrides": overrides, **results}))


if __name__ == "__main__":
  main()
