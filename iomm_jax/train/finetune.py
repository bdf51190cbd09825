"""Stage 2: mixed fine-tuning (paper §3.2): a share lambda of image-only samples as in stage 1,
the rest text-image pairs conditioned on their captions; initialised from a stage-1 checkpoint.

``config.train.init_from='scratch'`` starts from a random init instead: the study's arms without
image-only pre-training, and pre-training on pairs (lambda = 0) in Table 9's recipes.
"""

from __future__ import annotations

import ml_collections

from iomm_jax import checkpointing
from iomm_jax.train import context, generator, loop


def setup(config: ml_collections.ConfigDict, workdir: str) -> loop.Run:
  """Stage 2's model, data and sharded state in ``workdir``: resumed, else the stage-1 EMA
  weights of ``config.train.init_from`` (restored straight onto this run's mesh), else fresh."""
  if config.stage != "finetune":
    raise ValueError(f"stage-2 loop given config.stage={config.stage!r}")
  src = config.train.init_from
  loop.prepare_workdir(config, workdir)  # validates init_from before anything else
  if src == "scratch":
    return generator.setup(config, workdir, sample_kind="text")
  checkpointing.find_checkpoint_dir(src, "config.train.init_from")
  checkpointing.check_model_signature(loop.load_workdir_config(src).model.to_dict(), config, src)

  def init_from(boxed):
    # Stage 2 continues from the stage-1 EMA weights (the ones the paper evaluates).
    return context.restore_params(src, boxed, which="ema")

  return generator.setup(config, workdir, init_from=init_from, sample_kind="text")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs stage 2 in ``workdir`` (resuming if it has a checkpoint); returns the last metrics."""
  return loop.run(setup(config, workdir))
