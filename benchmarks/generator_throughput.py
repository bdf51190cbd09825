"""Training-step throughput of the IOMM generator (MM-DiT) alone, at the size and inputs of the
PyTorch baseline in ../shared/bench/flux_torch_baseline.py, so the two can be run side by side.

  python benchmarks/generator_throughput.py [--size B] [--batch 8] [--attention cudnn xla]

Times our real train step (``steps.make_train_step``: value_and_grad, global-norm clip 1.0,
AdamW (0.9, 0.95) from ``optim.make_optimizer``, the non-finite guard and the EMA update, which
the baseline does not do) on the velocity MSE of ``MMDiT`` with bf16 matmuls over float32
parameters: 512 px -> 32x32 = 1024 packed latent tokens of 64 features, 256 condition tokens.
Inputs are random and stay on the device, so this is the generator's ceiling, without the frozen
MLLM, adapter or data pipeline.

FLOPs per sample are counted analytically (matmuls and attention, forward + 2x backward), the
same quantity the baseline counts with torch's FlopCounterMode (6.94 TFLOP for B). Prints a
markdown table and one JSON line per configuration. ``--size tiny --batch 2`` checks the script
on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from iomm_jax.configs import specs
from iomm_jax.configs.base import get_base_config
from iomm_jax.models import mmdit
from iomm_jax.optim import make_optimizer
from iomm_jax.train import steps


def flops_per_sample(c: mmdit.MMDiTConfig, img_len: int, txt_len: int) -> float:
  """Forward + backward matmul and attention FLOPs of one sample (3x the forward)."""
  d, f, length = c.inner_dim, c.mlp_dim, img_len + txt_len
  per_token = 2 * (4 * d * d + 2 * d * f)  # qkv + out + 2 MLP matmuls (double and single alike)
  attention = 4 * length * length * d  # QK^T and PV
  blocks = (c.num_layers + c.num_single_layers) * (per_token * length + attention)
  io = (
    2 * d * (c.in_channels * img_len + c.joint_attention_dim * txt_len + c.out_features * img_len)
  )
  return 3.0 * (blocks + io)


def bench(size: str, attention: str, batch: int, side: int, txt_len: int, n: int, warmup: int):
  """One configuration: returns a dict of results (or the error that stopped it)."""
  cfg = dataclasses.replace(mmdit.MMDIT_VARIANTS[size], attention=attention)
  model = mmdit.MMDiT(cfg, dtype=jnp.bfloat16)
  img_len = side * side
  k = jax.random.split(jax.random.key(0), 6)
  x = {
    "img": jax.random.normal(k[0], (batch, img_len, cfg.in_channels)),
    "img_ids": mmdit.image_ids(batch, side, side),
    "txt": jax.random.normal(k[1], (batch, txt_len, cfg.joint_attention_dim)),
    "txt_ids": mmdit.text_ids(batch, txt_len),
    "pooled": jax.random.normal(k[2], (batch, cfg.pooled_projection_dim)),
    "timestep": jax.random.uniform(k[3], (batch,)),
  }
  target = jax.random.normal(k[4], (batch, img_len, cfg.out_features))
  params = jax.jit(lambda r: model.init(r, **x)["params"])(k[5])
  params = jax.tree_util.tree_map(lambda p: getattr(p, "value", p), params)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))

  def loss_fn(p, frozen, b, rng):
    del frozen, rng
    v = model.apply({"params": p}, **b["x"])
    return jnp.mean(jnp.square(v - b["target"])), {}

  opt_cfg = specs.from_config(get_base_config()).optim  # AdamW (0.9, 0.95), lr 1e-4, clip 1.0
  optimizer, schedule = make_optimizer(opt_cfg, 1000)
  train_step = steps.make_train_step(loss_fn, optimizer, schedule, 0.999, False)
  step = jax.jit(train_step, donate_argnums=(0,))
  state = steps.create_state(params, optimizer)
  batch_ = {"x": x, "target": target}
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  state, m = step(state, batch_, None, rng)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    state, m = step(state, batch_, None, rng)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(n):
    state, m = step(state, batch_, None, rng)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / n
  flops = flops_per_sample(cfg, img_len, txt_len)
  out = dict(
    impl=f"iomm_jax-{attention}",
    size=size,
    params_M=round(n_params / 1e6, 1),
    batch=batch,
    step_s=round(dt, 4),
    samples_per_s=round(batch / dt, 2),
    model_tflops_per_s=round(flops * batch / dt / 1e12, 1),
    flops_per_sample_T=round(flops / 1e12, 3),
    compile_s=round(compile_s, 1),
    loss=float(m["loss"]),
    device=str(jax.devices()[0].device_kind),
  )
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_mem_GiB"] = round(stats["peak_bytes_in_use"] / 2**30, 1)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="B", choices=sorted(mmdit.MMDIT_VARIANTS))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--side", type=int, default=32, help="packed tokens per side (512 px: 32)")
  p.add_argument("--txt-len", type=int, default=256)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--attention", nargs="+", default=["cudnn", "xla"])
  a = p.parse_args()
  print(f"{platform.node()}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
  rows = []
  for attn in a.attention:
    try:
      r = bench(a.size, attn, a.batch, a.side, a.txt_len, a.steps, a.warmup)
    except Exception as e:  # report e.g. out-of-memory for one arm and go on with the next
      r = dict(impl=f"iomm_jax-{attn}", size=a.size, batch=a.batch, error=repr(e)[:300])
    print(json.dumps(r), flush=True)
    rows.append(r)
  print("| impl | size | batch | step s | samples/s | model TFLOP/s | peak GiB | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['impl']} | {r['size']} | {r['batch']} | failed: {r['error'][:60]} |")
      continue
    print(
      f"| {r['impl']} | {r['size']} | {r['batch']} | {r['step_s']} | {r['samples_per_s']} "
      f"| {r['model_tflops_per_s']} | {r.get('peak_mem_GiB', '-')} | {r['compile_s']} |"
    )


if __name__ == "__main__":
  main()
