"""How much a trained generator's prediction depends on its prompt.

  python benchmarks/condition_sensitivity.py --workdir runs/demo/finetune

Prints the mean absolute difference of the connector outputs between two prompts and between a
prompt and the null prompt, and of the predicted velocities under the two prompts (same noise)
relative to their magnitude at several t. A generator that follows prompts shows velocity
differences far from zero.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from iomm_jax import inference, runtime
from iomm_jax.models import iomm


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument(
    "--prompts", nargs=2, default=["a photo of a red circle", "a photo of a blue square"]
  )
  a = p.parse_args()
  runtime.outside_absl()
  config, ctx, params = inference.load_generator(a.workdir)
  cond = lambda ids, valid: iomm.condition(
    ctx.model, params, ctx.frozen["mllm"], jnp.asarray(ids), jnp.asarray(valid), None
  )
  c, pooled = cond(*ctx.conditioner.text_conditions(a.prompts))
  n_ids, n_valid = ctx.conditioner.null_condition()
  c_null, _ = cond(n_ids[None], n_valid[None])
  print(
    f"connector output |prompt 1 - prompt 2| = {float(jnp.abs(c[0] - c[1]).mean()):.3f}, "
    f"|prompt 1 - null| = {float(jnp.abs(c[0] - c_null[0]).mean()):.3f}"
  )
  h, w, ch = ctx.model.latent_shape
  z = jax.random.normal(jax.random.key(0), (1, h, w, ch))
  print("| t | mean abs velocity difference / mean abs velocity |")
  print("|---|---|")
  for t in (0.9, 0.5, 0.2):
    v = iomm.velocity(
      ctx.model, params["generator"], jnp.concatenate([z, z]), jnp.full((2,), t), c, pooled
    )
    print(f"| {t} | {float(jnp.abs(v[0] - v[1]).mean() / jnp.abs(v).mean()):.3f} |")


if __name__ == "__main__":
  main()
