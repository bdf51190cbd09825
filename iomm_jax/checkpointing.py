"""Orbax checkpoints of a training run: train state, grain iterator and run metadata together.

Layout: ``<workdir>/checkpoints/<step>/{state,data,meta}``, written asynchronously, the newest
``keep`` kept. ``meta`` records the stage and the model config, so that a workdir is never resumed
with parameters of another model.

Restore order (``restore_or_init`` in the loops):
  1. resume: the workdir has a checkpoint -> restore state + data iterator of the newest one that
     restores, continue at its step;
  2. initialise from an earlier stage: ``config.train.init_from`` (stage 2) -> its latest
     trainable parameters (and EMA) into a fresh optimiser state, step 0;
  3. fresh: newly initialised parameters.

Faults (a training run's ``Checkpointer(..., writer=True)``):
  * a save interrupted by a crash leaves ``<step>.orbax-checkpoint-tmp*``, never ``<step>``
    (Orbax renames the folder only once every file is written): it is ignored, reported and
    removed when the run restarts;
  * a finished-looking step that does not restore (a missing or truncated file) while an older
    one does is moved aside to ``<step>.corrupt-<time>`` (with a warning; nothing is deleted)
    and the older one is used; if none restores, a RuntimeError says so and nothing moves;
  * a failed write (disk full: ENOSPC, file-size limit: EFBIG) is raised as a
    ``CheckpointWriteError`` naming the directory and the OS error at the next save, ``poll``,
    ``wait`` or ``close`` (saves are asynchronous); a save that would not fit in the free disk
    space (judged by the newest checkpoint's size) is refused before anything is written.
    Earlier checkpoints are untouched either way.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from iomm_jax import files, runtime

# Keys of config.model that change parameter shapes or meaning; a resumed or initialising run
# must agree with the checkpoint on each.
MODEL_KEYS = (
  "mllm",
  "generator",
  "generator_overrides",
  "pooled",
  "condition",
  "num_queries",
  "adapter_heads",
  "adapter_layers",
  "adapter_mlp_ratio",
  "connector",
  "connector_layers",
  "connector_heads",
  "codec",
  "codec_factor",
  "vae",
  "image_size",
  "prediction",
  "lora",
)
MODEL_KEY_DEFAULTS = {
  "prediction": "velocity",
  "generator_overrides": "",
  "pooled": "mean",
  "lora": None,
}
"""Values of model keys added after checkpoints were made (what those checkpoints were)."""


def _lora_signature(lora: Any) -> dict[str, Any] | None:
  """``config.model.lora`` as JSON-comparable data; None when off (rank 0 or absent)."""
  if lora is None:
    return None
  lora = dict(lora)
  if not lora.get("rank"):
    return None
  return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in sorted(lora.items())}


def model_signature(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The parts of ``config.model`` a checkpoint must match."""
  out = {k: config.model.get(k, MODEL_KEY_DEFAULTS.get(k)) for k in MODEL_KEYS}
  out["lora"] = _lora_signature(out["lora"])
  return out


def check_model_signature(
  saved: dict[str, Any],
  config: ml_collections.ConfigDict,
  where: str,
  ignore: tuple[str, ...] = (),
) -> None:
  """Raises a ValueError naming every model key on which ``saved`` and ``config`` differ
  (``ignore``: keys not compared, e.g. "lora" when a LoRA fine-tune starts from a plain run)."""
  want = model_signature(config)
  saved = {**saved, "lora": _lora_signature(saved.get("lora"))}
  diff = [
    f"config.model.{k}: checkpoint has {saved.get(k, MODEL_KEY_DEFAULTS.get(k))!r}, "
    f"config has {want[k]!r}"
    for k in MODEL_KEYS
    if k not in ignore and saved.get(k, MODEL_KEY_DEFAULTS.get(k)) != want[k]
  ]
  if diff:
    raise ValueError(
      f"checkpoint in {where} was made with another model config:\n  " + "\n  ".join(diff)
    )


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, file too large, ...); ``errno`` is the OS
  error's where known. Earlier checkpoints are intact."""


class Checkpointer:
  """A thin wrapper of ``ocp.CheckpointManager`` for one workdir.

  ``writer``: the training run that owns the workdir. Only a writer removes unfinished saves
  (a reader, e.g. sampling while training runs, might see one in flight) and moves corrupt steps
  aside; a reader just falls back to an older step.
  """

  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True, writer: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.writer = writer
    self._pending: int | None = None  # step of the save that may still be running
    self._failed: int | None = None  # step of a save whose failure was already raised
    if writer:
      _report_unfinished(self.directory)
    handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=writer,
      ),
      item_handlers=handlers,
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any | None, meta: dict[str, Any]) -> None:
    """Starts an (asynchronous) save of state, iterator and metadata at ``step``.

    Raises ``CheckpointWriteError`` if the previous save failed, or if this one would not fit
    on the disk (then nothing is written).
    """
    self._settle()
    self._check_free_space(step)
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # a synchronous part of the write failed
      self._failed = step
      raise self._write_error(step, e) from e
    self._pending = step

  def poll(self) -> None:
    """Raises a finished save's failure now, without waiting for a save still running."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._settle()

  def saved_ema(self, step: int | None = None) -> bool:
    """Whether the state saved at ``step`` (default: the latest) holds an EMA copy (runs with
    ``train.ema_decay = 0`` keep none; those saved before that existed kept one anyway)."""
    step = self.latest_step() if step is None else step
    try:
      tree = self.manager.item_metadata(step)["state"]
      tree = getattr(tree, "tree", tree)
      return bool(jax.tree_util.tree_leaves(tree.get("ema")))
    except Exception:  # unreadable metadata: assume the layout of the code that wrote most runs
      return True

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(
    self,
    abstract_state: Any,
    data_iter: Any | None = None,
    step: int | None = None,
    check_meta: Callable[[dict[str, Any]], None] | None = None,
  ) -> tuple[Any, dict[str, Any]]:
    """Restores the state (onto ``abstract_state``'s shapes and shardings) and the iterator.

    ``step``: that step only; None: the newest step that restores, newest first (see the module
    docstring for what happens to those that do not). ``check_meta(meta)`` runs before a step's
    state is read; what it raises (e.g. a config mismatch) propagates at once.
    """

    def read(s: int, meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      return self.manager.restore(s, args=ocp.args.Composite(**items))["state"], meta

    return self._newest_restorable(step, read, check_meta)

  def restore_partial(self, abstract_tree: dict[str, Any], step: int | None = None) -> Any:
    """Only the ``state`` entries named by ``abstract_tree`` (e.g. ``{"ema": ...}``: no
    optimiser state is read), onto its shapes and shardings (``jax.ShapeDtypeStruct`` leaves,
    ``sharding.abstract_target``), from ``step`` or, with None, the newest step that restores
    (as ``restore``)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_tree)
    args = ocp.args.PyTreeRestore(
      item=abstract_tree, restore_args=restore_args, partial_restore=True
    )

    def read(s: int, meta: dict[str, Any]) -> Any:
      path = os.path.join(self.directory, str(s), "state")
      with ocp.PyTreeCheckpointer() as handler:
        return handler.restore(path, args=args)

    return self._newest_restorable(step, read)

  def _newest_restorable(
    self,
    step: int | None,
    read: Callable[[int, dict[str, Any]], Any],
    check_meta: Callable[[dict[str, Any]], None] | None = None,
  ) -> Any:
    """``read(step, meta)``, or with ``step`` None that of the newest step that restores,
    newest first: a step whose metadata or state fails to read is reported (and, by the writer,
    set aside once an older one restored); what ``check_meta(meta)`` raises propagates at once."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures: list[tuple[int, Exception]] = []
    for s in steps:
      try:
        meta = self.read_meta(s)
      except Exception as e:  # a damaged checkpoint can fail in any library's way
        failures.append((s, _warn_unrestorable(self.directory, s, e, s != steps[-1])))
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        out = read(s, meta)
      except Exception as e:
        failures.append((s, _warn_unrestorable(self.directory, s, e, s != steps[-1])))
        continue
      if failures and self.writer:
        self._set_aside([f for f, _ in failures], s)
      return out
    if step is not None:
      raise failures[0][1]
    raise RuntimeError(
      f"no checkpoint in {self.directory} restores (tried steps {steps}; the errors are printed "
      f"above). Nothing was moved or deleted. If the config changed since they were saved, that "
      f"is the likely cause; otherwise they are damaged."
    ) from failures[0][1]

  def wait(self) -> None:
    self._settle()

  def close(self) -> None:
    """Waits for the last save (raising its failure) and releases the manager."""
    try:
      self._settle()
    finally:
      try:
        self.manager.close()
      except Exception:
        if self._failed is None:  # Orbax re-raises a failure already reported: once is enough
          raise

  # ---------------------------------------------------------------- faults

  def _settle(self) -> None:
    """Waits for the pending save; its failure becomes a ``CheckpointWriteError``."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._failed = step
      raise self._write_error(step, e) from e

  def _write_error(self, step: int, e: BaseException) -> CheckpointWriteError:
    code = _os_error_code(e)
    what = f"[{errno.errorcode.get(code, code)}: {os.strerror(code)}] " if code else ""
    kept = sorted(self.manager.all_steps())
    msg = (
      f"could not write the checkpoint of step {step} in {self.directory}: {what}"
      f"{_first_line(e, 1000)}\n"
      f"Earlier checkpoints are intact (saved steps: {kept}). Free disk space (or raise the "
      f"file-size limit) and rerun the same command: it resumes from the newest of them."
    )
    return CheckpointWriteError(code, msg) if code else CheckpointWriteError(msg)

  def _check_free_space(self, step: int) -> None:
    """Refuses a save the disk cannot hold: free space below the newest checkpoint's size.

    Local single-process runs only (a remote path has no local free space, and one process
    refusing alone would leave the others waiting in the save).
    """
    if "://" in self.directory or jax.process_count() > 1:
      return
    saved = [s for s in self.manager.all_steps() if s != step]
    if not saved:
      return
    need = _tree_bytes(os.path.join(self.directory, str(max(saved))))
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise CheckpointWriteError(
        errno.ENOSPC,
        f"not saving the checkpoint of step {step} in {self.directory}: {free / 2**20:.1f} MiB "
        f"free, the last checkpoint (step {max(saved)}) took {need / 2**20:.1f} MiB. Nothing was "
        f"written; earlier checkpoints are intact. Free disk space and rerun the same command.",
      )

  def _set_aside(self, bad: list[int], used: int) -> None:
    """Renames unrestorable steps newer than ``used`` to ``<step>.corrupt-<time>`` (process 0)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for s in bad:
      src = os.path.join(self.directory, str(s))
      dst = f"{src}.corrupt-{stamp}"
      if jax.process_index() == 0 and os.path.isdir(src):
        os.rename(src, dst)
      print(
        f"WARNING: checkpoint step {s} in {self.directory} does not restore; moved it to {dst} "
        f"(delete it yourself once inspected) and resumed from step {used}",
        file=sys.stderr,
        flush=True,
      )
    runtime.barrier(f"iomm_jax set aside {self.directory}")
    self.manager.reload()


def _first_line(e: BaseException, limit: int = 300) -> str:
  """``Type: message`` cut to its first line (tensorstore errors append kilobytes of spec)."""
  msg = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def _warn_unrestorable(directory: str, step: int, e: Exception, older: bool) -> Exception:
  print(
    f"WARNING: checkpoint {os.path.join(directory, str(step))} failed to restore "
    f"({_first_line(e)})" + ("; trying an older one" if older else ""),
    file=sys.stderr,
    flush=True,
  )
  return e


def _report_unfinished(directory: str) -> None:
  """Names the saves a crash interrupted (Orbax removes them: they were never complete)."""
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  for d in sorted(os.listdir(directory)):
    if ".orbax-checkpoint-tmp" in d:
      print(
        f"removing {os.path.join(directory, d)}: an unfinished checkpoint write (interrupted "
        f"save); finished checkpoints are kept",
        file=sys.stderr,
        flush=True,
      )


def _os_error_code(e: BaseException | None) -> int | None:
  """The errno of ``e`` or of what caused it; tensorstore reports it as ``os_error_code='N'``."""
  while e is not None:
    if isinstance(e, OSError) and e.errno:
      return e.errno
    m = re.search(r"os_error_code='?(\d+)", str(e))
    if m:
      return int(m.group(1))
    e = e.__cause__ or e.__context__
  return None


def _tree_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
  )


def save_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (``files.write_json``: indent 2, sorted keys)."""
  files.write_json(path, obj)


def saved_steps(workdir: str) -> list[int]:
  """Sorted steps of the finished checkpoints in ``<workdir>/checkpoints`` (orbax renames a
  step's folder to its number only once the save is complete)."""
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def find_checkpoint_dir(workdir: str, what: str) -> str:
  """Returns ``workdir`` if it holds at least one finished checkpoint, else a clear error."""
  ckpt = os.path.join(workdir, "checkpoints") if workdir else ""
  steps = [d for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
  if not steps:
    raise FileNotFoundError(
      f"{what}: {workdir!r} holds no checkpoint (expected "
      f"{ckpt or '<workdir>/checkpoints'}/<step>/); run the earlier stage "
      "first or fix the path"
    )
  return workdir
