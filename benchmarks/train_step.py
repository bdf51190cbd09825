"""Time of the real stage-1 and stage-2 train steps (frozen MLLM + RQA + connector + generator).

  python benchmarks/train_step.py [--size tiny|B|L] [--batch 4] [--steps 10] [--warmup 3] \
      [--features online cached] [--max-batch 256] [--stages pretrain finetune] [--set k=v ...]

``tiny`` is the embedded shapes model (experiments/shapes/*.py; runs on a CPU in a minute);
``B`` / ``L`` are the paper-size configs (experiments/iomm_{b,l}/*.py: InternVL3-2B-size MLLM in
bf16, FLUX VAE, 1.6 B / 2.7 B MM-DiT at 512 px) for a GPU. The frozen MLLM is randomly initialised
(``model.mllm_init=random``: same shapes and FLOPs as InternVL3-2B except its vocabulary, which
the condition path never multiplies by), and batches are synthetic of the right shape: what is
timed is the whole jitted step the training loop runs (``loop.make_jitted_step``), median of
``--steps`` timed steps after ``--warmup``.

``--features``: ``online`` batches carry images (ViT + projector, masked self-conditioning, RQA,
MLLM decoder, connector, VAE encode, MM-DiT forward/backward, AdamW, EMA); ``cached`` batches
carry what ``iomm-cache-features`` stores (unmasked vision tokens, VAE mean and std, bf16), so
the ViT and the VAE encoder leave the step (``config.data.features``).

Columns: samples/s; model TFLOP/s from XLA's own FLOP count of the compiled step
(``cost_analysis``, per device: ``perf.step_flops``); MFU against the card's bf16 datasheet
peak (``perf.peak_tflops``: the table in docs/PERF.md) and the share of the bf16 matmul peak
measured in the same run (one large matmul); peak device memory (``memory_stats``; n/a on a
CPU). ``--max-batch N``: after the timed batch, the largest batch up to N (doubling, then halving
the gap) whose step compiles and runs without running out of memory. Prints a markdown table and
one JSON line per stage. Extra ``--set key=value`` items override both stages' configs (e.g.
``--set model.attention=cudnn model.remat=block``).
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

from iomm_jax import perf, runtime
from iomm_jax.assembly import context, workdirs
from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config, parse_overrides
from iomm_jax.models import iomm
from iomm_jax.train import cache, loop, steps

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


def cached_batch(ctx, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
  """``batch`` with the arrays of cached features (bf16, ``cache.feature_specs``) in place of
  its images: what a ``config.data.features`` run's pipeline yields."""
  out = {k: v for k, v in batch.items() if k != "image"}
  n = len(batch["image"])
  for name, shape, dtype in cache.feature_specs(ctx.model, "bfloat16"):
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    out[name] = jnp.asarray(np.abs(x) if name == "latent_std" else x, jnp.dtype(dtype))
  return out


def _config(spec: str, batch: int, overrides: dict):
  return load_config(
    os.path.join(ROOT, spec),
    {
      "model.mllm_init": "random",
      "train.batch_size": batch,
      **({"train.init_from": "scratch"} if "finetune" in spec else {}),
      **overrides,
    },
  )


def _step_and_inputs(ctx, config, batch: int, features: str):
  """(jitted step, state, batch) of a stage at ``batch`` rows, online or cached features."""
  null_ids, null_valid = ctx.conditioner.null_condition()
  loss_fn = steps.generator_loss_fn(
    ctx.model, specs.from_config(config), jnp.asarray(null_ids), jnp.asarray(null_valid)
  )
  cond_len = ctx.conditioner.cond_len
  params = jax.jit(lambda: nn.meta.unbox(iomm.init_trainable(ctx.model, 0, cond_len)))()
  optimizer, step = loop.make_jitted_step(loss_fn, specs.from_config(config), 1000)
  state = steps.create_state(params, optimizer, workdirs.keeps_ema(config))
  rng = np.random.default_rng(0)
  host = synthetic_batch(ctx, config, batch, rng)
  data = {k: jnp.asarray(v) for k, v in host.items()}
  if features == "cached":
    data = cached_batch(ctx, host, rng)
  return step, state, data, params


def bench_stage(spec: str, batch: int, n: int, warmup: int, overrides: dict, features: str) -> dict:
  """Times one stage's train step; returns the row's figures."""
  config = _config(spec, batch, overrides)
  ctx = context.build(config)
  step, state, data, params = _step_and_inputs(ctx, config, batch, features)
  rng = jax.random.key(0)
  flops = perf.step_flops(step, state, data, ctx.frozen, rng) or 0.0
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
    "features": features,
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


def _fits(spec: str, batch: int, overrides: dict, features: str) -> bool:
  """Whether one step at ``batch`` rows compiles and runs (False on running out of memory)."""
  try:
    config = _config(spec, batch, overrides)
    ctx = context.build(config)
    step, state, data, _ = _step_and_inputs(ctx, config, batch, features)
    jax.block_until_ready(step(state, data, ctx.frozen, jax.random.key(0)))
    return True
  except Exception as e:  # XLA's RESOURCE_EXHAUSTED (out of memory) and its relatives
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OOM" in text:
      return False
    raise
  finally:
    jax.clear_caches()


def largest_batch(spec: str, start: int, limit: int, overrides: dict, features: str) -> int:
  """The largest batch in [start, limit] whose step fits (``start`` is known to fit): doubling,
  then bisecting between the last fit and the first failure."""
  lo, hi = start, None
  while hi is None and lo * 2 <= limit:
    if _fits(spec, lo * 2, overrides, features):
      lo *= 2
    else:
      hi = lo * 2
  hi = hi or min(limit, lo * 2)
  while hi - lo > 1 and hi > lo:
    mid = (lo + hi) // 2
    if _fits(spec, mid, overrides, features):
      lo = mid
    else:
      hi = mid
  return lo


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="tiny", choices=sorted(EXPERIMENTS))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument(
    "--features", nargs="+", default=["online", "cached"], choices=["online", "cached"]
  )
  p.add_argument("--stages", nargs="+", default=["pretrain", "finetune"])
  p.add_argument("--max-batch", type=int, default=0, help="search the largest batch up to this")
  p.add_argument("--matmul", type=int, default=0, help="peak matmul side (0: 8192 GPU, 1024 CPU)")
  p.add_argument("--set", nargs="*", default=[], help="key=value config overrides")
  a = p.parse_args()
  runtime.outside_absl(quiet=True)
  dev = jax.devices()[0]
  overrides = parse_overrides(a.set)
  peak = matmul_peak(a.matmul or (8192 if dev.platform == "gpu" else 1024))
  sheet = perf.peak_tflops(dev.device_kind)
  print(f"{platform.node()} {os.cpu_count()} CPUs, jax {jax.__version__}, {dev.device_kind}; "
        f"measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s; datasheet bf16 peak "
        f"{sheet if sheet else 'unknown'} TFLOP/s")  # fmt: skip
  head = (
    "stage",
    "features",
    "size",
    "batch",
    "s / step",
    "samples / s",
    "TFLOP/s (XLA count)",
    "MFU (datasheet)",
    "share of measured peak",
    "peak memory GiB",
    "largest batch",
  )
  print("| " + " | ".join(head) + " |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for spec in EXPERIMENTS[a.size]:
    if not any(stage in spec for stage in a.stages):
      continue
    for features in a.features:
      r = bench_stage(spec, a.batch, a.steps, a.warmup, overrides, features)
      r["mfu"] = r["tflops_per_s"] / sheet if sheet else None
      if a.max_batch > a.batch:
        r["largest_batch"] = largest_batch(spec, a.batch, a.max_batch, overrides, features)
      mem = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "n/a"
      mfu = f"{100 * r['mfu']:.0f} %" if r["mfu"] is not None else "n/a"
      print(f"| {r['stage']} | {features} | {a.size} | {a.batch} | {r['s_per_step']:.4f} | "
            f"{r['samples_per_s']:.1f} | {r['tflops_per_s']:.3f} | {mfu} | "
            f"{100 * r['tflops_per_s'] * 1e12 / peak:.0f} % | {mem} | "
            f"{r.get('largest_batch', '-')} |", flush=True)  # fmt: skip
      print(json.dumps({"size": a.size, "device": dev.device_kind, "peak_flops": peak, **r}))


if __name__ == "__main__":
  main()
