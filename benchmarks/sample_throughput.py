"""Sampling throughput of the generator: images/s of the guided ODE at 512 px, ours and diffusers'.

  python benchmarks/sample_throughput.py [--size B] [--batch 8] [--steps 28] [--cfg 4.0] \
      [--backend jax torch] [--attention cudnn xla] [--repeats 3]

Both backends integrate the same thing: ``--steps`` Euler steps of the MM-DiT (``--size``, the
generator of IOMM-B by default: 1024 packed latent tokens of 64 values at 512 px, 256 condition
tokens), each step one forward over the conditional and the unconditional batch together (CFG,
2 x ``--batch`` rows), bf16 matmuls over float32 weights. The frozen MLLM's conditioning (once
per image) and the VAE decode are left out of both, so the figure is the generator's.

* ``jax``: ``sampling.sample`` around ``MMDiT.apply`` under one ``jax.jit`` (the integration
  loop is a ``fori_loop`` on the device), with ``--attention`` cudnn (GPU) and/or xla.
* ``torch``: diffusers' ``FluxTransformer2DModel`` (the model of
  ../shared/bench/flux_torch_baseline.py) under ``torch.autocast(bfloat16)`` and
  ``torch.inference_mode``, a Python loop of ``--steps`` forwards with the same guidance
  arithmetic; flash / memory-efficient SDPA.

Prints one JSON line per configuration and a markdown table (images/s, seconds per image).
``--size tiny --batch 2 --steps 2`` checks the script on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

TORCH_CONFIGS = {  # FluxTransformer2DModel kwargs of our MMDIT_VARIANTS (flux_torch_baseline.py)
  "B": dict(
    num_layers=12, num_single_layers=16, attention_head_dim=128, num_attention_heads=12,
    joint_attention_dim=1536, pooled_projection_dim=1536, axes_dims_rope=(16, 56, 56),
  ),
  "tiny": dict(
    num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=128, pooled_projection_dim=128, axes_dims_rope=(8, 12, 12),
  ),
}  # fmt: skip


def bench_jax(size: str, attention: str, batch: int, side: int, txt_len: int, steps: int,
              cfg: float, repeats: int) -> dict:  # fmt: skip
  """Seconds of one guided sampling call of ``batch`` images with our MM-DiT."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  from iomm_jax.diffusion import sampling
  from iomm_jax.models import mmdit

  c = dataclasses.replace(mmdit.MMDIT_VARIANTS[size], attention=attention)
  model = mmdit.MMDiT(c, dtype=jnp.bfloat16)
  k = jax.random.split(jax.random.key(0), 4)
  n = side * side
  txt = jax.random.normal(k[0], (2 * batch, txt_len, c.joint_attention_dim))
  pooled = jax.random.normal(k[1], (2 * batch, c.pooled_projection_dim))
  x = {
    "img": jnp.zeros((1, n, c.in_channels)),
    "img_ids": mmdit.image_ids(1, side, side),
    "txt": txt[:1],
    "txt_ids": mmdit.text_ids(1, txt_len),
    "pooled": pooled[:1],
    "timestep": jnp.zeros((1,)),
  }
  params = jax.jit(lambda r: model.init(r, **x)["params"])(k[2])
  params = jax.tree_util.tree_map(lambda p: getattr(p, "value", p), params)
  img_ids, txt_ids = mmdit.image_ids(2 * batch, side, side), mmdit.text_ids(2 * batch, txt_len)

  @jax.jit
  def run(params, noise, txt, pooled):
    def v_fn(z, t):
      zz, tt = jnp.concatenate([z, z]), jnp.concatenate([t, t])
      v = model.apply({"params": params}, zz, img_ids, txt, txt_ids, pooled, tt)
      v = v.astype(jnp.float32)
      return v[batch:] + cfg * (v[:batch] - v[batch:])

    return sampling.sample(v_fn, noise, steps, "euler", 1.0)

  noise = jax.random.normal(k[3], (batch, n, c.in_channels), jnp.float32)
  t0 = time.perf_counter()
  run(params, noise, txt, pooled).block_until_ready()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run(params, noise, txt, pooled).block_until_ready()
    times.append(time.perf_counter() - t0)
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  return _row(f"iomm_jax-{attention}", size, batch, steps, statistics.median(times),
              dev.device_kind, stats.get("peak_bytes_in_use"), compile_s)  # fmt: skip


def bench_torch(size: str, batch: int, side: int, txt_len: int, steps: int, cfg: float,
                repeats: int, device: str) -> dict:  # fmt: skip
  """Seconds of the same guided sampling with diffusers' FluxTransformer2DModel."""
  import torch
  from diffusers import FluxTransformer2DModel
  from torch.nn.attention import SDPBackend, sdpa_kernel

  kw = TORCH_CONFIGS[size]
  model = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=False, **kw)
  model = model.to(device).eval()
  n = side * side
  ids = torch.zeros(n, 3, device=device)
  ids[:, 1] = torch.arange(side, device=device).repeat_interleave(side)
  ids[:, 2] = torch.arange(side, device=device).repeat(side)
  txt = torch.randn(2 * batch, txt_len, kw["joint_attention_dim"], device=device)
  pooled = torch.randn(2 * batch, kw["pooled_projection_dim"], device=device)
  txt_ids = torch.zeros(txt_len, 3, device=device)
  backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

  def run():
    z = torch.randn(batch, n, 64, device=device)
    grid = torch.linspace(1.0, 0.0, steps + 1, device=device)
    with torch.inference_mode(), torch.autocast(device, torch.bfloat16), sdpa_kernel(backends):
      for i in range(steps):
        t = grid[i].expand(2 * batch)
        v = model(hidden_states=torch.cat([z, z]), encoder_hidden_states=txt,
                  pooled_projections=pooled, timestep=t, img_ids=ids, txt_ids=txt_ids,
                  return_dict=False)[0].float()  # fmt: skip
        v = v[batch:] + cfg * (v[:batch] - v[batch:])
        z = z + (grid[i + 1] - grid[i]) * v
    if device == "cuda":
      torch.cuda.synchronize()
    return z

  t0 = time.perf_counter()
  run()
  first_s = time.perf_counter() - t0
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  kind = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
  return _row("diffusers-flux", size, batch, steps, statistics.median(times), kind, peak, first_s)


def _row(impl, size, batch, steps, sec, device, peak, first_s) -> dict:
  """One configuration's figures (``peak``: bytes, or None where unknown)."""
  out = dict(impl=impl, size=size, batch=batch, steps=steps, s_per_call=round(sec, 4),
             images_per_s=round(batch / sec, 3), device=str(device),
             first_call_s=round(first_s, 1))  # fmt: skip
  if peak:
    out["peak_mem_GiB"] = round(peak / 2**30, 1)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="B", choices=sorted(TORCH_CONFIGS))
  p.add_argument("--batch", type=int, default=8, help="images per call (CFG doubles the rows)")
  p.add_argument("--side", type=int, default=32, help="packed latent tokens per side (512 px)")
  p.add_argument("--txt-len", type=int, default=256)
  p.add_argument("--steps", type=int, default=28, help="ODE steps")
  p.add_argument("--cfg", type=float, default=4.0)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--backend", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
  p.add_argument("--attention", nargs="+", default=["cudnn", "xla"], help="jax attention kernels")
  p.add_argument("--device", default="cuda", help="torch device")
  a = p.parse_args()
  rows = []
  for backend in a.backend:
    for attn in a.attention if backend == "jax" else ["-"]:
      try:
        if backend == "jax":
          r = bench_jax(a.size, attn, a.batch, a.side, a.txt_len, a.steps, a.cfg, a.repeats)
        else:
          r = bench_torch(a.size, a.batch, a.side, a.txt_len, a.steps, a.cfg, a.repeats, a.device)
      except Exception as e:  # one arm failing (a kernel, out of memory) must not stop the rest
        r = dict(impl=f"{backend}-{attn}", size=a.size, batch=a.batch, error=repr(e)[:300])
      print(json.dumps(r), flush=True)
      rows.append(r)
  print(f"\n{platform.node()}: {a.steps} Euler steps with CFG {a.cfg}, {a.side * 16} px")
  print("| impl | size | batch | s / call | images / s | s / image | peak GiB | first call s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['impl']} | {r['size']} | {r['batch']} | failed: {r['error'][:60]} |||||")
      continue
    print(f"| {r['impl']} | {r['size']} | {r['batch']} | {r['s_per_call']} | "
          f"{r['images_per_s']} | {1 / r['images_per_s']:.3f} | {r.get('peak_mem_GiB', '-')} | "
          f"{r['first_call_s']} |")  # fmt: skip


if __name__ == "__main__":
  main()
