"""Gradient accumulation: ``lax.scan`` inside the step (ours) against ``optax.MultiSteps``.

  python benchmarks/grad_accum.py [--size tiny] [--batch 32] [--k 4] [--updates 5]

One update of ``--batch`` rows of the real stage-1 loss three ways, on the same parameters:

* ``one batch``: ``steps.make_train_step`` with ``grad_accum = 1`` (the reference);
* ``scan``: ``grad_accum = k``, one jitted call per update that scans k micro-batches;
* ``MultiSteps``: ``optax.MultiSteps(every_k_schedule=k)`` around the same optimiser, one
  jitted call per micro-batch of ``batch / k`` rows (the optimiser applies every k-th call;
  its accumulated gradient lives in the optimiser state between calls).

Reports, per update: seconds (median of ``--updates`` after one warm-up), XLA's temporaries of
the compiled call (``memory_analysis``; what the batch's activations cost), the bytes the state
carries between calls, and the loss the update saw. Prints a markdown table.
"""

from __future__ import annotations

import argparse
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
from iomm_jax.configs.loading import load_config
from iomm_jax.models import iomm
from iomm_jax.optim import make_optimizer
from iomm_jax.train import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = {"tiny": "experiments/shapes/pretrain.py", "B": "experiments/iomm_b/pretrain.py"}


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _time(fn, n: int) -> float:
  fn()  # warm-up (compiles)
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="tiny", choices=sorted(SPECS))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--updates", type=int, default=5)
  a = p.parse_args()
  runtime.outside_absl(quiet=True)
  c = load_config(os.path.join(ROOT, SPECS[a.size]), {"model.mllm_init": "random"})
  c.train.batch_size = a.batch
  ctx = context.build(c)
  null = [jnp.asarray(x) for x in ctx.conditioner.null_condition()]
  loss_fn = steps.generator_loss_fn(ctx.model, specs.from_config(c), *null)
  cond_len = ctx.conditioner.cond_len
  params = jax.jit(lambda: nn.meta.unbox(iomm.init_trainable(ctx.model, 0, cond_len)))()
  s, rng = c.model.image_size, np.random.default_rng(0)
  ids, valid = ctx.conditioner.image_condition()
  batch = {
    "image": jnp.asarray(rng.integers(0, 256, (a.batch, s, s, 3), dtype=np.uint8)),
    "cond_ids": jnp.asarray(np.tile(ids, (a.batch, 1))),
    "cond_valid": jnp.asarray(np.tile(valid, (a.batch, 1))),
    "is_image_only": jnp.ones((a.batch,), bool),
  }
  optimizer, schedule = make_optimizer(specs.from_config(c).optim, 1000)
  key = jax.random.key(0)
  rows = []

  def measure(name, step, state, calls):
    """calls: list of (batch) per update; the step is jitted and donates the state."""
    jitted = jax.jit(step, donate_argnums=(0,))
    mem = jitted.lower(state, calls[0], ctx.frozen, key).compile().memory_analysis()
    box = {"state": state, "loss": None}

    def update():
      st = box["state"]
      for b in calls:
        st, m = jitted(st, b, ctx.frozen, key)
      box["state"], box["loss"] = st, m["loss"]
      return m["loss"]

    sec = _time(update, a.updates)
    rows.append((name, len(calls), sec, mem.temp_size_in_bytes, _bytes(box["state"])))

  copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
  one = steps.make_train_step(loss_fn, optimizer, schedule, c.train.ema_decay, True)
  measure("one batch", one, steps.create_state(copy(params), optimizer), [batch])
  scan = steps.make_train_step(loss_fn, optimizer, schedule, c.train.ema_decay, True, a.k)
  measure(f"scan, k={a.k}", scan, steps.create_state(copy(params), optimizer), [batch])
  multi = optax.MultiSteps(optimizer, every_k_schedule=a.k)
  ms = steps.make_train_step(loss_fn, multi, schedule, c.train.ema_decay, True)
  micro = [jax.tree_util.tree_map(lambda x, i=i: x[i :: a.k], batch) for i in range(a.k)]
  measure(f"MultiSteps, k={a.k}", ms, steps.create_state(copy(params), multi), micro)

  print(f"{platform.node()} ({os.cpu_count()} CPUs), jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}; {a.size} stage-1 step, batch {a.batch}")  # fmt: skip
  print("| variant | calls / update | s / update | XLA temporaries MiB | state MiB |")
  print("|---|---|---|---|---|")
  for name, calls, sec, temp, state in rows:
    print(f"| {name} | {calls} | {sec:.3f} | {temp / 2**20:.1f} | {state / 2**20:.2f} |")


if __name__ == "__main__":
  main()
