"""Library functions shared by the stage loops: workdir set-up, restore-or-init, the step loop.

Each stage module (``mllm``, ``pretrain``, ``finetune``) has its own ``train_and_evaluate``
that builds its model, data, loss and frozen inputs and then calls these functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iomm_jax import checkpointing, metrics, optim
from iomm_jax.configs import loading
from iomm_jax.train import steps


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Validates the config (before anything compiles) and records it in ``workdir``.

  A workdir that already holds checkpoints of another model config is refused here, before its
  ``config.json`` is touched.
  """
  loading.validate(config, jax.device_count())
  saved = os.path.join(workdir, "config.json")
  if os.path.exists(saved) and os.path.isdir(os.path.join(workdir, "checkpoints")):
    previous = load_workdir_config(workdir).model.to_dict()
    checkpointing.check_model_signature(previous, config, workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    checkpointing.save_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (``<workdir>/config.json``)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir!r} is not an iomm_jax workdir: {path} is missing")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class Run:
  """What the step loop needs: the jitted step, state, frozen inputs, data and outputs."""

  config: ml_collections.ConfigDict
  workdir: str
  state: steps.TrainState
  frozen: Any
  data_iter: Any
  train_step: Callable
  checkpointer: checkpointing.Checkpointer
  meta: dict[str, Any]
  sample_fn: Callable[[steps.TrainState], np.ndarray] | None = None
  start_step: int = 0


def restore_or_init(
  config: ml_collections.ConfigDict,
  workdir: str,
  init_fn: Callable[[], Any],
  optimizer,
  data_iter: Any,
  init_from: Callable[[Any], Any] | None = None,
) -> tuple[steps.TrainState, checkpointing.Checkpointer, int]:
  """Resume ``workdir`` > initialise from an earlier stage (``init_from``) > fresh.

  Args:
    init_fn: returns freshly initialised, boxed (logically annotated) trainable parameters;
      only called for a fresh start (otherwise only its shapes are traced).
    init_from: maps the abstract boxed parameters to those loaded from an earlier stage.
  Returns:
    state, the workdir's checkpointer and the step to start from.
  """
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    checkpointing.check_model_signature(ckpt.read_meta(latest)["model"], config, workdir)
    abstract = jax.eval_shape(lambda: steps.create_state(nn.meta.unbox(init_fn()), optimizer))
    state, _ = ckpt.restore(jax.tree_util.tree_map(_abstract, abstract), data_iter, latest)
    print(f"resuming {workdir} at step {int(state.step)}", flush=True)
    return state, ckpt, int(state.step)
  if init_from is not None:
    params = init_from(jax.eval_shape(init_fn))
  else:
    params = nn.meta.unbox(init_fn())
  return steps.create_state(params, optimizer), ckpt, 0


def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def make_jitted_step(loss_fn, config: ml_collections.ConfigDict, num_steps: int):
  """(optimizer, jitted train_step) for ``config.optim`` / ``config.train``; state donated."""
  optimizer, schedule = optim.make_optimizer(config.optim, num_steps)
  step = steps.make_train_step(
    loss_fn, optimizer, schedule, config.train.ema_decay, config.train.ema_warmup
  )
  return optimizer, jax.jit(step, donate_argnums=(0,))


def _host_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in batch.items()}


class _Preemption:
  """Turns SIGTERM into a request to checkpoint at the next step boundary and exit."""

  def __init__(self):
    self.requested = False
    try:
      self._prev = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._prev = None

  def _handle(self, *_):
    self.requested = True

  def restore(self):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


def run(run_: Run) -> dict[str, float]:
  """The step loop: train, log, checkpoint, sample; returns the last logged metrics."""
  c, start_step = run_.config, run_.start_step
  total = c.train.num_steps
  logger = metrics.MetricsLogger(run_.workdir, total, first_step=start_step)
  rng = jax.random.key(c.seed)
  state, last = run_.state, {}
  preempt = _Preemption()
  try:
    for step in range(start_step + 1, total + 1):
      batch = _host_batch(next(run_.data_iter))
      state, m = run_.train_step(state, batch, run_.frozen, rng)
      if step % c.train.log_every == 0 or step == total or step == start_step + 1:
        last = logger.log(step, m)
        if last["nonfinite"] >= c.train.max_nonfinite:
          raise FloatingPointError(
            f"{int(last['nonfinite'])} non-finite updates in a row at step {step} "
            f"(config.train.max_nonfinite={c.train.max_nonfinite}); the last checkpoint in "
            f"{run_.workdir} is intact"
          )
      if step % c.train.ckpt_every == 0 or step == total or preempt.requested:
        run_.checkpointer.save(step, state, run_.data_iter, run_.meta)
      if run_.sample_fn is not None and (
        step == total or (c.train.sample_every and step % c.train.sample_every == 0)
      ):
        logger.write_image(step, "samples", run_.sample_fn(state))
      if preempt.requested:
        print(f"SIGTERM: saved step {step}, exiting", flush=True)
        break
  finally:
    preempt.restore()
    run_.checkpointer.close()
    logger.close()
  run_.state = state
  return last
