"""Optimisers and learning-rate schedules from the paper (§3.1): AdamW (0.9, 0.95), lr 1e-4,
global-norm clip 1.0, weight decay 0; Muon as an option (IOMM-XL); warmup + constant/cosine."""

from __future__ import annotations

import optax

from iomm_jax.configs import specs

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "muon")


def make_schedule(cfg: specs.OptimSpec, num_steps: int) -> optax.Schedule:
  """Linear warmup for ``cfg.warmup_steps``, then constant, cosine or linear decay to
  ``cfg.lr * cfg.final_lr_fraction`` at ``num_steps``."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={cfg.schedule!r} unknown; choose from {SCHEDULES}")
  warm = max(int(cfg.warmup_steps), 0)
  decay_steps = max(num_steps - warm, 1)
  end = cfg.lr * cfg.final_lr_fraction
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_fraction)
  else:
    main = optax.linear_schedule(cfg.lr, end, decay_steps)
  if warm == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), main], [warm])


def make_optimizer(
  cfg: specs.OptimSpec, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser chain (clip, then AdamW or Muon) and its schedule, from the spec of
  ``config.optim``."""
  schedule = make_schedule(cfg, num_steps)
  if cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  elif cfg.name == "muon":
    # Muon orthogonalises 2-D weight updates; other parameters fall back to Adam inside optax.
    opt = optax.contrib.muon(
      schedule,
      beta=cfg.b2,
      weight_decay=cfg.weight_decay,
      adam_b1=cfg.b1,
      adam_b2=cfg.b2,
      adam_weight_decay=cfg.weight_decay,
    )
  else:
    raise ValueError(f"config.optim.name={cfg.name!r} unknown; choose from {OPTIMIZERS}")
  chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  return optax.chain(*chain, opt), schedule
