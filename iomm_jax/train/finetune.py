"""Stage 2: mixed fine-tuning (paper §3.2): a share lambda of image-only samples as in stage 1,
the rest text-image pairs conditioned on their captions; initialised from a stage-1 checkpoint.

``config.train.init_from='scratch'`` starts from a random init instead: the study's arms without
image-only pre-training, and pre-training on pairs (lambda = 0) in Table 9's recipes. A diffusers
``FluxTransformer2DModel`` directory there fine-tunes an existing generator (paper Tab. 2): the
generator from it, the RQA and connector from their init (``context.initial_trainable``); with
``config.model.lora`` only low-rank adapters of it train.
"""

from __future__ import annotations

import ml_collections

from iomm_jax import checkpointing
from iomm_jax.assembly import workdirs
from iomm_jax.convert import flux
from iomm_jax.train import generator, loop


def setup(config: ml_collections.ConfigDict, workdir: str) -> loop.Run:
  """Stage 2's model, data and sharded state in ``workdir``: resumed, else the stage-1 EMA
  weights (the ones the paper evaluates) or the FLUX-format generator of
  ``config.train.init_from`` (loaded straight onto this run's mesh), else fresh."""
  if config.stage != "finetune":
    raise ValueError(f"stage-2 loop given config.stage={config.stage!r}")
  src = config.train.init_from
  workdirs.prepare_workdir(config, workdir)  # validates init_from before anything else
  if src == "scratch":
    return generator.setup(config, workdir, sample_kind="text")
  if flux.transformer_dir(src) is None:  # a stage-1 workdir (a FLUX one is checked on reading)
    checkpointing.find_checkpoint_dir(src, "config.train.init_from")
    saved = workdirs.load_workdir_config(src).model.to_dict()
    # stage 1 trains no adapters: a LoRA fine-tune starts from its plain generator
    checkpointing.check_model_signature(saved, config, src, ignore=("lora",))
  return generator.setup(config, workdir, from_init=True, sample_kind="text")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs stage 2 in ``workdir`` (resuming if it has a checkpoint); returns the last metrics."""
  return loop.run(setup(config, workdir))
