"""Training-step time of the stage-1 shapes model on this machine, over batch sizes and codec
factors: the measurement behind the demo's pixel-codec factor 2 choice.

  python benchmarks/step_time.py [--batch 8 16 32] [--factor 2 4] [--steps 20] [--canvas 32]

Prints a markdown table (ms per step after warm-up, samples/s). Uses a randomly initialised
frozen MLLM, so no stage-0 run is needed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from iomm_jax import runtime
from iomm_jax.assembly import context
from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config
from iomm_jax.data import pipeline
from iomm_jax.models import iomm
from iomm_jax.train import loop, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_step(batch: int, factor: int, n: int, canvas: int = 0) -> tuple[float, int]:
  """(seconds per stage-1 train step, data included, after 10 warm-up steps; image tokens)."""
  c = load_config(
    os.path.join(ROOT, "experiments/shapes/pretrain.py"),
    {
      "model.mllm_init": "random",
      "train.batch_size": batch,
      "model.codec_factor": factor,
      **({"data.canvas": canvas, "model.image_size": canvas} if canvas else {}),
    },
  )
  ctx = context.build(c)
  it = iter(pipeline.make_dataset(specs.from_config(c), ctx.conditioner))
  null_ids, null_valid = ctx.conditioner.null_condition()
  loss_fn = steps.generator_loss_fn(
    ctx.model, specs.from_config(c), jnp.asarray(null_ids), jnp.asarray(null_valid)
  )
  params = nn.meta.unbox(iomm.init_trainable(ctx.model, 0, ctx.conditioner.cond_len))
  opt, step = loop.make_jitted_step(loss_fn, specs.from_config(c), 1000)
  state, rng = steps.create_state(params, opt), jax.random.key(0)

  def run(k):
    nonlocal state
    for _ in range(k):
      state, m = step(state, {k_: jnp.asarray(v) for k_, v in next(it).items()}, ctx.frozen, rng)
    jax.block_until_ready(m)

  run(10)
  t = time.perf_counter()
  run(n)
  tokens = (c.model.image_size // factor // ctx.model.generator.config.latent_patch) ** 2
  return (time.perf_counter() - t) / n, tokens


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
  p.add_argument("--factor", type=int, nargs="+", default=[2, 4])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--canvas", type=int, default=0, help="canvas side in px (0: the config's)")
  a = p.parse_args()
  runtime.outside_absl()
  print(f"{platform.node()} {os.cpu_count()} CPUs, jax {jax.__version__}, {jax.devices()[0]}")
  print("| codec factor | image tokens | batch | ms / step | samples / s |")
  print("|---|---|---|---|---|")
  for f, b in itertools.product(a.factor, a.batch):
    s, tokens = time_step(b, f, a.steps, a.canvas)
    print(f"| {f} | {tokens} | {b} | {1000 * s:.0f} | {b / s:.0f} |", flush=True)


if __name__ == "__main__":
  main()
