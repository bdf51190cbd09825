"""Time of the real stage-1 and stage-2 train steps (frozen MLLM + RQA + connector + generator).

  python benchmarks/train_step.py [--size tiny|B|L] [--batch 4] [--steps 10] [--warmup 3]

``tiny`` is the embedded shapes model (experiments/shapes/*.py; runs on a CPU in a minute);
``B`` / ``L`` are the paper-size configs (experiments/iomm_{b,l}/*.py: InternVL3-2B-size MLLM in
bf16, FLUX VAE, 1.6 B / 2.7 B MM-DiT at 512 px) for a GPU. The frozen MLLM is randomly initialised
(``model.mllm_init=random``: same shapes and FLOPs as InternVL3-2B except its vocabulary, which
the condition path never multiplies by), and batches are synthetic images of the right shape:
what is timed is the whole jitted step the training loop runs (``loop.make_jitted_step``: ViT +
masked self-conditioning + RQA + MLLM decoder + connector + VAE encode + MM-DiT forward/backward
+ AdamW + EMA), median of ``--steps`` timed steps after ``--warmup``.

Columns: samples/s; model TFLOP/s from XLA's own FLOP count of the compiled step
(``cost_analysis``), and its share of the bf16 matmul peak measured in the same run (one large
matmul); peak device memory (``memory_stats``; n/a on a CPU). Prints a markdown table and one
JSON line per stage. Extra ``--set key=value`` items override both stages' configs (e.g.
``--set model.attention=cudnn``).
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
from absl import flags, logging

from iomm_jax import runtime
from iomm_jax.configs.loading import load_config, parse_overrides
from iomm_jax.models import iomm
from iomm_jax.train import context, loop, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = {
  "tiny": ("experiments/shapes/pretrain.py", "experiments/shapes/finetune.py"),
  "B": ("experiments/iomm_b/pretrain.py", "experiments/iomm_b/finetune.py"),
  "L": ("experiments/iomm_l/pretrain.py", "experiments/iomm_l/finetune.py"),
}


def matmul_peak(n: int, reps: int = 5) -> float:
  """Measured bf16 matmul FLOP/s of one n x n x n product (median of ``reps``)."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times)


def synthetic_batch(ctx, config, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Images of the run's size; image-only conditions for a share ``mix_ratio`` of the rows
  (stage 1: all), short text conditions for the rest."""
  size = config.model.image_size
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  share = 1.0 if config.stage == "pretrain" else config.diffusion.mix_ratio
  n_img = int(round(share * batch))
  img_ids, img_valid = ctx.conditioner.image_condition()
  txt_ids, txt_valid = ctx.conditioner.text_conditions(["a photo of a red circle"] * batch)
  ids = np.where(np.arange(batch)[:, None] < n_img, img_ids[None], txt_ids)
  valid = np.where(np.arange(batch)[:, None] < n_img, img_valid[None], txt_valid)
  return {
    "image": images,
    "cond_ids": ids.astype(np.int32),
    "cond_valid": valid,
    "is_image_only": np.arange(batch) < n_img,
  }


def bench_stage(spec: str, batch: int, n: int, warmup: int, overrides: dict) -> dict:
  """Times one stage's train step; returns the row's figures."""
  config = load_config(
    os.path.join(ROOT, spec),
    {
      "model.mllm_init": "random",
      "train.batch_size": batch,
      **({"train.init_from": "scratch"} if "finetune" in spec else {}),
      **overrides,
    },
  )
  ctx = context.build(config)
  null_ids, null_valid = ctx.conditioner.null_condition()
  null = jnp.asarray(null_ids), jnp.asarray(null_valid)
  loss_fn = steps.generator_loss_fn(ctx.model, config, *null)
  cond_len = ctx.conditioner.cond_len
  params = jax.jit(lambda: nn.meta.unbox(iomm.init_trainable(ctx.model, 0, cond_len)))()
  optimizer, step = loop.make_jitted_step(loss_fn, config, 1000)
  state = steps.create_state(params, optimizer)
  host = synthetic_batch(ctx, config, batch, np.random.default_rng(0))
  data = {k: jnp.asarray(v) for k, v in host.items()}
  rng = jax.random.key(0)
  compiled = step.lower(state, data, ctx.frozen, rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  times = []
  for i in range(warmup + n):
    t = time.perf_counter()
    state, m = step(state, data, ctx.frozen, rng)
    jax.block_until_ready(m)
    if i >= warmup:
      times.append(time.perf_counter() - t)
  sec = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  trainable = sum(x.size for x in jax.tree_util.tree_leaves(params))
  frozen = sum(x.size for x in jax.tree_util.tree_leaves(ctx.frozen["mllm"]))
  return {
    "stage": config.stage,
    "batch": batch,
    "s_per_step": sec,
    "samples_per_s": batch / sec,
    "flops_per_step": flops,
    "tflops_per_s": flops / sec / 1e12,
    "peak_bytes": stats.get("peak_bytes_in_use"),
    "trainable_params": int(trainable),
    "frozen_mllm_params": int(frozen),
    "loss": float(m["loss"]),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="tiny", choices=sorted(EXPERIMENTS))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--matmul", type=int, default=0, help="peak matmul side (0: 8192 GPU, 1024 CPU)")
  p.add_argument("--set", nargs="*", default=[], help="key=value config overrides")
  a = p.parse_args()
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  runtime.enable_compilation_cache()
  dev = jax.devices()[0]
  overrides = parse_overrides(a.set)
  peak = matmul_peak(a.matmul or (8192 if dev.platform == "gpu" else 1024))
  print(f"{platform.node()} {os.cpu_count()} CPUs, jax {jax.__version__}, {dev.device_kind}; "
        f"measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s")  # fmt: skip
  print("| stage | size | batch | s / step | samples / s | TFLOP/s (XLA count) "
        "| share of bf16 peak | peak memory GiB |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|")
  for spec in EXPERIMENTS[a.size]:
    r = bench_stage(spec, a.batch, a.steps, a.warmup, overrides)
    mem = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "n/a"
    print(f"| {r['stage']} | {a.size} | {a.batch} | {r['s_per_step']:.4f} | "
          f"{r['samples_per_s']:.1f} | {r['tflops_per_s']:.3f} | "
          f"{100 * r['tflops_per_s'] * 1e12 / peak:.0f} % | {mem} |", flush=True)  # fmt: skip
    print(json.dumps({"size": a.size, "device": dev.device_kind, "peak_flops": peak, **r}))


if __name__ == "__main__":
  main()
