"""What the generator stages and the samplers share: tokenizer, model, frozen MLLM, conditioner.

The frozen MLLM comes from ``config.model.mllm_from`` (a stage-0 workdir: its tokenizer and
latest parameters) or, for the ablation ``mllm_init='random'``, from a seeded random init.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from iomm_jax import checkpointing, optim, runtime, sharding
from iomm_jax.data import pipeline, shapes
from iomm_jax.data.tokenizer import Tokenizer
from iomm_jax.models import iomm
from iomm_jax.train import loop, steps

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_VOCAB = 256  # soft limit: the grammar's words and the aux prompt's become whole pieces
MLLM_SEED = 17  # offset of the MLLM's init seed from config.seed


@dataclasses.dataclass
class GenerationContext:
  """Static model + tokenizer + frozen parameters of a generator run."""

  model: iomm.IOMM
  tokenizer: Tokenizer
  conditioner: pipeline.Conditioner
  frozen: dict[str, Any]


def train_tokenizer(config: ml_collections.ConfigDict, path: str) -> Tokenizer:
  """A sentencepiece tokenizer over the shapes caption grammar and the auxiliary prompt."""
  corpus = shapes.all_caption_corpus(pipeline.world_from_config(config))
  return Tokenizer.train(corpus + [config.model.aux_prompt], TOKENIZER_VOCAB, path or None)


def ensure_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``<workdir>/tokenizer.model``, trained there first if missing. Process 0 alone trains and
  writes it; every process waits for it, so none reads a half-written file."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if jax.process_index() == 0 and not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    train_tokenizer(config, path)
  runtime.barrier(f"iomm_jax tokenizer {os.path.abspath(path)}")
  return path


def restore_params(
  workdir: str, boxed_params: Any, which: str = "params", step: int | None = None
) -> Any:
  """``params`` (or ``ema``) at ``step`` (default: the latest) of a run in ``workdir``, shaped
  like the (boxed) template.

  The run's optimiser is rebuilt from its ``config.json`` so the saved state can be matched.
  Arrays land directly in their shards on the mesh of ``sharding.placing_on`` (placed by the
  template's logical axes), else on this process's first device, whatever mesh saved them.
  """
  checkpointing.find_checkpoint_dir(workdir, "restore")
  cfg = loop.load_workdir_config(workdir)
  optimizer, _ = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
  boxed_state = jax.eval_shape(lambda p: steps.create_state(p, optimizer), boxed_params)
  mesh, rules = sharding.placement() or (sharding.single_device_mesh(), ())
  target = sharding.abstract_target(
    boxed_state, sharding.logical_shardings(boxed_state, mesh, rules)
  )
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    saved = sorted(ckpt.manager.all_steps())
    if step is not None and step not in saved:
      raise FileNotFoundError(f"{workdir!r} has no checkpoint at step {step}; saved steps: {saved}")
    state, _ = ckpt.restore(target, step=step)
  finally:
    ckpt.close()
  return getattr(state, which)


def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> GenerationContext:
  """Tokenizer, model and frozen parameters for a stage-1/2 run or for sampling.

  With ``workdir``, the tokenizer is copied there (so the workdir alone can be sampled later).
  """
  m = config.model
  if m.mllm_init == "checkpoint":
    src = checkpointing.find_checkpoint_dir(m.mllm_from, "config.model.mllm_from")
    tok_path = os.path.join(src, TOKENIZER_FILE)
    if not os.path.exists(tok_path):
      raise FileNotFoundError(f"config.model.mllm_from={src!r} has no {TOKENIZER_FILE}")
    tokenizer = Tokenizer.load(tok_path)
  else:
    tok_path = os.path.join(workdir or "", TOKENIZER_FILE)
    tokenizer = (
      Tokenizer.load(tok_path)
      if workdir and os.path.exists(tok_path)
      else train_tokenizer(config, tok_path if workdir else "")
    )
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    dst = os.path.join(workdir, TOKENIZER_FILE)
    if os.path.abspath(tok_path) != os.path.abspath(dst):
      shutil.copyfile(tok_path, dst)
  model = iomm.build(config, tokenizer.vocab_size, tokenizer.img_context_id)
  if m.mllm_init == "checkpoint":  # only the shapes of an init are needed to restore
    mllm = restore_params(m.mllm_from, jax.eval_shape(lambda: iomm.init_mllm(model, MLLM_SEED)))
  else:
    mllm = nn.meta.unbox(iomm.init_mllm(model, config.seed + MLLM_SEED))
  codec = model.codec.init_params(iomm.init_key(config.seed + 23), model.image_size)
  conditioner = pipeline.Conditioner(
    tokenizer, model.num_image_tokens, m.aux_prompt, m.max_text_len
  )
  return GenerationContext(model, tokenizer, conditioner, {"mllm": mllm, "codec": codec})
