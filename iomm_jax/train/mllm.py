"""Stage 0 (embedded default only): pre-train the tiny MLLM for understanding by captioning.

In the paper the frozen MLLM is an off-the-shelf InternVL3-2B; the shapes world has none, so this
loop trains the tiny InternVL-style model on (image, caption) pairs with a next-token loss. Its
workdir then serves as ``config.model.mllm_from`` of stages 1 and 2.
"""

from __future__ import annotations

import ml_collections

from iomm_jax import checkpointing, sharding
from iomm_jax.assembly import context, workdirs
from iomm_jax.configs import specs
from iomm_jax.data import pipeline
from iomm_jax.models import iomm
from iomm_jax.train import loop, steps


def caption_len(config: ml_collections.ConfigDict, num_image_tokens: int) -> int:
  """Length of a captioning sequence: [BOS] <img> image tokens </img> caption (+ EOS)."""
  return num_image_tokens + 3 + config.model.max_text_len + 1


def setup(config: ml_collections.ConfigDict, workdir: str) -> loop.Run:
  """Stage 0's model, data and (restored or fresh) state, sharded over the mesh of
  ``config.sharding``."""
  workdirs.prepare_workdir(config, workdir)
  spec = specs.from_config(config)  # what the model, data and optimiser read
  tokenizer = context.Tokenizer.load(context.ensure_tokenizer(config, workdir))
  model = iomm.build(spec.model, tokenizer.vocab_size, tokenizer.img_context_id)
  conditioner = pipeline.Conditioner(
    tokenizer, model.num_image_tokens, spec.model.aux_prompt, spec.model.max_text_len
  )
  seq_len = caption_len(config, model.num_image_tokens)
  data_iter = iter(pipeline.make_dataset(spec, conditioner, seq_len=seq_len))
  mesh, rules = workdirs.mesh_and_rules(config)
  optimizer, step = loop.make_train_step(steps.caption_loss_fn(model), spec, spec.train.num_steps)
  state, state_sh, ckpt, start = loop.restore_or_init(
    config,
    workdir,
    lambda: iomm.init_mllm(model, config.seed + context.MLLM_SEED),
    optimizer,
    data_iter,
    mesh,
    rules,
  )
  meta = {"stage": config.stage, "model": checkpointing.model_signature(config)}
  train_step = sharding.jit_step(step, mesh, rules, state_sh, None)
  return loop.Run(
    config, workdir, state, None, data_iter, train_step, ckpt, meta, start_step=start, mesh=mesh
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains the MLLM on captions; returns the last logged metrics."""
  return loop.run(setup(config, workdir))
