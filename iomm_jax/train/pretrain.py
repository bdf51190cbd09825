"""Stage 1: image-only pre-training with masked self-conditioning (paper §3.1, Algorithm 1).

Each image is its own condition: [aux prompt] <img> ViT tokens </img>, each image token zeroed
with probability r; the RQA + frozen MLLM + connector turn it into the generator's context and the
generator learns the rectified-flow velocity of the whole (unmasked) image.
"""

from __future__ import annotations

import ml_collections

from iomm_jax.train import generator, loop


def setup(config: ml_collections.ConfigDict, workdir: str) -> loop.Run:
  """Stage 1's model, data and (restored or fresh) sharded state in ``workdir``."""
  if config.stage != "pretrain":
    raise ValueError(f"stage-1 loop given config.stage={config.stage!r}")
  return generator.setup(config, workdir, sample_kind="image")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs stage 1 in ``workdir`` (resuming if it has a checkpoint); returns the last metrics."""
  return loop.run(setup(config, workdir))
