"""Library functions shared by the stage loops: workdir set-up, restore-or-init, the step loop.

Each stage module (``mllm``, ``pretrain``, ``finetune``) has its own ``train_and_evaluate``
that builds its model, data, loss and frozen inputs and then calls these functions.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from iomm_jax import PREEMPTED_EXIT_CODE, checkpointing, metrics, optim, perf, sharding
from iomm_jax.assembly import workdirs
from iomm_jax.configs import specs
from iomm_jax.train import steps


@dataclasses.dataclass
class Run:
  """What the step loop needs: the jitted step, state, frozen inputs, data and outputs.

  ``mesh``: where the state lives; batches are split over its ("data", "fsdp") axes (None: this
  process's first device).
  """

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
  mesh: Mesh | None = None


def abstract_state(
  init_fn: Callable[[], Any], optimizer, mesh: Mesh, rules: sharding.Rules, ema: bool = True
) -> tuple[Any, Any]:
  """(boxed abstract train state, its shardings on ``mesh``): ``jax.eval_shape`` of the state
  that ``init_fn``'s parameters and ``optimizer`` make (with an EMA copy iff ``ema``); nothing
  is computed or allocated."""
  boxed_state = jax.eval_shape(lambda: steps.create_state(init_fn(), optimizer, ema))
  return boxed_state, sharding.logical_shardings(boxed_state, mesh, rules)


def restore_or_init(
  config: ml_collections.ConfigDict,
  workdir: str,
  init_fn: Callable[[], Any],
  optimizer,
  data_iter: Any,
  mesh: Mesh,
  rules: sharding.Rules,
  init_from: Callable[[Any], Any] | None = None,
) -> tuple[steps.TrainState, Any, checkpointing.Checkpointer, int]:
  """Resume ``workdir`` > initialise from an earlier stage (``init_from``) > fresh, each landing
  directly in the state's shards on ``mesh`` (placed by the parameters' logical axes, ``rules``).

  Args:
    init_fn: returns freshly initialised, boxed (logically annotated) trainable parameters;
      only called for a fresh start (otherwise only its shapes are traced).
    init_from: maps the abstract boxed parameters to those loaded from an earlier stage (run
      with ``mesh`` and ``rules`` bound, so ``context.restore_params`` restores them sharded).
  Returns:
    state, its shardings, the workdir's checkpointer and the step to start from.
  """
  boxed_state, shardings = abstract_state(
    init_fn, optimizer, mesh, rules, workdirs.keeps_ema(config)
  )
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints, writer=True)
  if ckpt.latest_step() is not None:  # a checkpoint saved on any mesh restores onto this one
    check = lambda meta: checkpointing.check_model_signature(meta["model"], config, workdir)
    saved_ema = ckpt.saved_ema()  # the layout on disk, whatever this config keeps
    saved_state, saved_sh = (
      (boxed_state, shardings)
      if saved_ema == workdirs.keeps_ema(config)
      else abstract_state(init_fn, optimizer, mesh, rules, saved_ema)
    )
    target = sharding.abstract_target(saved_state, saved_sh)
    state, _ = ckpt.restore(target, data_iter, check_meta=check)  # the newest that restores
    state = _match_ema(state, workdirs.keeps_ema(config), shardings)
    print(f"resuming {workdir} at step {int(state.step)}", flush=True)
    return state, shardings, ckpt, int(state.step)
  create = functools.partial(
    steps.create_state, optimizer=optimizer, ema=workdirs.keeps_ema(config)
  )
  if init_from is not None:
    with sharding.placing_on(mesh, rules):
      params = init_from(jax.eval_shape(init_fn))
    state = jax.jit(create, out_shardings=shardings)(params)
  else:
    state = jax.jit(lambda: create(nn.meta.unbox(init_fn())), out_shardings=shardings)()
  return state, shardings, ckpt, 0


def _match_ema(state: steps.TrainState, ema: bool, shardings: Any) -> steps.TrainState:
  """``state`` with an EMA copy iff ``ema``: a saved copy this run does not keep is dropped
  (``train.ema_decay`` set to 0, or a checkpoint of an older version that kept one anyway); a
  run that now keeps one starts it from the parameters."""
  if ema == (state.ema is not None):
    return state
  if not ema:
    return state.replace(ema=None)
  copy = jax.jit(
    lambda p: jax.tree_util.tree_map(lambda x: x.copy(), p), out_shardings=shardings.ema
  )
  return state.replace(ema=copy(state.params))


def make_train_step(loss_fn, spec: specs.RunSpec, num_steps: int):
  """(optimizer, pure train_step) for the run's ``optim`` / ``train`` specs (gradient
  accumulation over ``train.grad_accum`` micro-batches); jit it with ``sharding.jit_step``."""
  optimizer, schedule = optim.make_optimizer(spec.optim, num_steps)
  t = spec.train
  step = steps.make_train_step(
    loss_fn, optimizer, schedule, t.ema_decay, t.ema_warmup, t.grad_accum
  )
  return optimizer, step


def make_jitted_step(loss_fn, spec: specs.RunSpec, num_steps: int):
  """(optimizer, jitted train_step) on one device, state donated (benchmarks)."""
  optimizer, step = make_train_step(loss_fn, spec, num_steps)
  return optimizer, jax.jit(step, donate_argnums=(0,))


class Preempted(Exception):
  """Raised by ``run`` after a SIGTERM, once the step it stopped at is saved.

  Not a failure, but not a finished run either: whatever comes next (the next stage of the
  recipe, the next point of a sweep, the next arm of the study) must not start from this
  workdir. The CLIs turn it into exit status ``PREEMPTED_EXIT_CODE`` (75); the same command
  resumes.
  """

  exit_code = PREEMPTED_EXIT_CODE

  def __init__(self, step: int, workdir: str):
    super().__init__(f"SIGTERM: saved step {step} in {workdir}; run the same command to resume")
    self.step, self.workdir = step, workdir


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


def _sum_over_processes(count: int) -> int:
  """``count`` summed over all processes (every process logs at the same steps)."""
  if jax.process_count() == 1:
    return count
  from jax.experimental import multihost_utils

  return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def run(run_: Run) -> dict[str, float]:
  """The step loop: train, log, checkpoint, sample; returns the last logged metrics.

  ``data_skipped`` (logged when the pipeline provides it): records dropped as undecodable since
  this process started, summed over processes.

  Faults:
    * SIGTERM (preemption): checkpoint at the next step boundary and raise ``Preempted``
      (``iomm-train`` exits ``PREEMPTED_EXIT_CODE`` = 75); the same command resumes there. A
      stopped run never returns as if finished, so no caller goes on to the next stage.
    * ``config.train.max_nonfinite`` non-finite updates in a row (each skipped by the step):
      ``FloatingPointError``, before anything later is saved; the last checkpoint is the last
      good state.
    * A checkpoint write that fails (e.g. disk full): ``checkpointing.CheckpointWriteError`` at
      the next log step, save or the end; earlier checkpoints are intact.
  """
  c, start_step = run_.config, run_.start_step
  total = c.train.num_steps
  logger = metrics.MetricsLogger(
    run_.workdir,
    total,
    first_step=start_step,
    batch_size=c.train.batch_size,
    peak_tflops=perf.peak_tflops(jax.devices()[0].device_kind, c.train.peak_tflops),
  )
  mesh = run_.mesh or sharding.single_device_mesh()
  rng = jax.jit(lambda: jax.random.key(c.seed), out_shardings=sharding.replicated(mesh))()
  state, last, prev = run_.state, {}, None
  preempt = _Preemption()
  skipped = None  # undecodable records dropped by a real-data pipeline (data.sources)
  stopped = None  # the step SIGTERM stopped the run at (saved)
  try:
    for step in range(start_step + 1, total + 1):
      local = next(run_.data_iter)
      if "data_skipped" in local:  # host-side count, kept out of the jitted step
        skipped = (skipped or 0) + int(np.sum(local.pop("data_skipped")))
      batch = sharding.global_batch(local, mesh, c.train.batch_size)
      state, m = run_.train_step(state, batch, run_.frozen, rng)
      if step == start_step + 1:  # XLA's FLOP count of the step just compiled (cached: free)
        logger.set_step_flops(perf.step_flops(run_.train_step, state, batch, run_.frozen, rng))
      if prev is not None:  # the previous step's counter: by now (nearly) computed, so reading
        _stop_if_nonfinite(run_, logger, *prev)  # it does not stall the step just dispatched
      prev = (step, m, False)
      if step % c.train.log_every == 0 or step == total or step == start_step + 1:
        if skipped is not None:
          m = {**m, "data_skipped": _sum_over_processes(skipped)}
        last = logger.log(step, m)
        prev = (step, m, True)
        run_.checkpointer.poll()
      save = step % c.train.ckpt_every == 0 or step == total or preempt.requested
      sample = run_.sample_fn is not None and (
        step == total or (c.train.sample_every and step % c.train.sample_every == 0)
      )
      if save or sample:  # never save or sample a state past the limit
        _stop_if_nonfinite(run_, logger, *prev)
      if save:
        run_.checkpointer.save(step, state, run_.data_iter, run_.meta)
      if sample:
        logger.write_image(step, "samples", run_.sample_fn(state))
      if preempt.requested:
        print(f"SIGTERM: saved step {step}, exiting", flush=True)
        stopped = step
        break
  finally:
    preempt.restore()
    run_.checkpointer.close()  # waits for the last save
    logger.close()
  run_.state = state
  if stopped is not None:
    if jax.process_count() > 1:  # no process exits while another still writes its part
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("iomm_preempted")
    raise Preempted(stopped, run_.workdir)
  return last


def _stop_if_nonfinite(run_: Run, logger: metrics.MetricsLogger, step: int, m, logged: bool):
  """Raises FloatingPointError once ``m["nonfinite"]`` (consecutive skipped updates up to
  ``step``) reaches ``config.train.max_nonfinite``, after logging ``step``'s metrics.

  One scalar fetch per step; the loop reads the previous step's counter, so on an accelerator
  the host still queues the next step while the current one runs.
  """
  limit = run_.config.train.max_nonfinite
  n = int(m["nonfinite"])
  if n < limit:
    return
  if not logged:
    logger.log(step, m)
  raise FloatingPointError(
    f"{n} non-finite updates in a row at step {step} (config.train.max_nonfinite={limit}); "
    f"each update was skipped (the parameters are the last finite ones) and nothing was saved "
    f"past the limit: the last checkpoint in {run_.workdir} is intact"
  )
