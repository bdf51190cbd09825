"""Stage 0 (embedded default only): pre-train the tiny MLLM for understanding by captioning.

In the paper the frozen MLLM is an off-the-shelf InternVL3-2B; the shapes world has none, so this
loop trains the tiny InternVL-style model on (image, caption) pairs with a next-token loss. Its
workdir then serves as ``config.model.mllm_from`` of stages 1 and 2.
"""

from __future__ import annotations

import os

import ml_collections

from iomm_jax import checkpointing
from iomm_jax.data import pipeline
from iomm_jax.models import iomm
from iomm_jax.train import context, loop, steps


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains the MLLM on captions; returns the last logged metrics."""
  loop.prepare_workdir(config, workdir)
  tok_path = os.path.join(workdir, context.TOKENIZER_FILE)
  tokenizer = (
    context.Tokenizer.load(tok_path)
    if os.path.exists(tok_path)
    else context.train_tokenizer(config, tok_path)
  )
  model = iomm.build(config, tokenizer.vocab_size, tokenizer.img_context_id)
  conditioner = pipeline.Conditioner(
    tokenizer, model.num_image_tokens, config.model.aux_prompt, config.model.max_text_len
  )
  seq_len = model.num_image_tokens + 3 + config.model.max_text_len + 1
  data_iter = iter(pipeline.make_dataset(config, conditioner, seq_len=seq_len))
  optimizer, train_step = loop.make_jitted_step(
    steps.caption_loss_fn(model), config, config.train.num_steps
  )
  state, ckpt, start = loop.restore_or_init(
    config,
    workdir,
    lambda: iomm.init_mllm(model, config.seed + context.MLLM_SEED),
    optimizer,
    data_iter,
  )
  meta = {"stage": config.stage, "model": checkpointing.model_signature(config)}
  return loop.run(
    loop.Run(config, workdir, state, None, data_iter, train_step, ckpt, meta, start_step=start)
  )
