"""Settings shared by the shapes-world experiments (the embedded default's model and schedule).

Experiment files under ``experiments/shapes/`` call these after ``get_base_config()``.
"""

import ml_collections


def shapes_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The embedded default's model (every stage must agree on it)."""
  c.model.mllm = "shapes"  # the tiny MLLM at 24 px: 36 image tokens (models/mllm.py)
  c.model.generator = "shapes"  # width 192 (models/mmdit.py)
  c.model.num_queries = 16
  c.model.adapter_heads = 4  # tiny MLLM width 128 = 4 heads x 32
  # 24x24 px canvases in a 2x2 grid (objects 7-10 px) -> 12x12x12 latents -> 36 generator tokens
  # of 48 values. 32 px (64 tokens) trained ~1.4x slower per step and learned nothing
  # recognisable in the demo's budget; factor 4 (fewer tokens of 192 values) left a width-128
  # generator's samples speckled (measured, docs/RESULTS.md). The tiny ViT sees the canvas resized
  # to its 32 px, as InternVL resizes to 448.
  c.data.canvas = 24
  c.model.image_size = 24
  c.model.codec_factor = 2
  # the generator outputs the clean image, not the velocity (flow.velocity_from_output): the
  # same stage-2 run scored 0.19 against 0.14 and drew crisper shapes (docs/RESULTS.md)
  c.model.prediction = "x"
  return c


def shapes_generator(
  c: ml_collections.ConfigDict, a: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """Model, schedule and sampling settings of the shapes stage-1 and stage-2 experiments."""
  shapes_model(c)
  # logit-normal training times centred on t = sigmoid(1.0) = 0.73 (noisier than the middle):
  # 0.20 against 0.06 for uniform t; means 0.8 / 1.2 / 1.6 scored 0.21 / 0.23 (0.19 on seed 1) /
  # 0.16 (docs/RESULTS.md)
  c.diffusion.t_sampler = "logit_normal"
  c.diffusion.logit_mean = 1.0
  c.diffusion.logit_std = 0.8
  c.sample.num_steps = 20
  c.sample.cfg_scale = 3.0
  # 2 CPU cores: batch 8 and 16 give the same samples/s, 32 a third less (benchmarks/step_time.py);
  # with minutes to train, more updates learn the prompt conditioning faster.
  c.train.batch_size = 8
  c.train.num_steps = a.steps
  c.train.log_every = 50
  c.train.ckpt_every = 500
  c.optim.lr = 1e-3  # tiny model, few minutes: higher than the paper's 1e-4 for 1.6 B
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.optim.final_lr_fraction = 0.1
  c.train.ema_decay = 0.995
  if a.quick:
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.ckpt_every = 3
    c.train.batch_size = 4
    c.optim.warmup_steps = 2
    c.sample.num_steps = 2
    c.sample.num_grid = 2
    c.sample.per_prompt = 2
    c.data.num_pairs = 64
  return c
