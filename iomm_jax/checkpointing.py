"""Orbax checkpoints of a training run: train state, grain iterator and run metadata together.

Layout: ``<workdir>/checkpoints/<step>/{state,data,meta}``, written asynchronously, the newest
``keep`` kept. ``meta`` records the stage and the model config, so that a workdir is never resumed
with parameters of another model.

Restore order (``restore_or_init`` in the loops):
  1. resume: the workdir has a checkpoint -> restore state + data iterator, continue at its step;
  2. initialise from an earlier stage: ``config.train.init_from`` (stage 2) -> its latest
     trainable parameters (and EMA) into a fresh optimiser state, step 0;
  3. fresh: newly initialised parameters.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

# Keys of config.model that change parameter shapes or meaning; a resumed or initialising run
# must agree with the checkpoint on each.
MODEL_KEYS = (
  "mllm",
  "generator",
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
)


def model_signature(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The parts of ``config.model`` a checkpoint must match."""
  return {k: config.model[k] for k in MODEL_KEYS}


def check_model_signature(
  saved: dict[str, Any], config: ml_collections.ConfigDict, where: str
) -> None:
  """Raises a ValueError naming every model key on which ``saved`` and ``config`` differ."""
  want = model_signature(config)
  diff = [
    f"config.model.{k}: checkpoint has {saved.get(k)!r}, config has {want[k]!r}"
    for k in MODEL_KEYS
    if saved.get(k) != want[k]
  ]
  if diff:
    raise ValueError(
      f"checkpoint in {where} was made with another model config:\n  " + "\n  ".join(diff)
    )


class Checkpointer:
  """A thin wrapper of ``ocp.CheckpointManager`` for one workdir."""

  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
      ),
      item_handlers=handlers,
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any | None, meta: dict[str, Any]) -> None:
    """Starts an (asynchronous) save of state, iterator and metadata at ``step``."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(
    self, abstract_state: Any, data_iter: Any | None = None, step: int | None = None
  ) -> tuple[Any, dict[str, Any]]:
    """Restores the state (onto ``abstract_state``'s shapes and shardings) and the iterator."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], out["meta"]

  def restore_partial(self, abstract_tree: Any, step: int | None = None) -> Any:
    """Restores only the ``state`` entries present in ``abstract_tree`` (e.g. params, ema)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    args = ocp.args.PyTreeRestore(
      item=abstract_tree,
      restore_args=jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(), abstract_tree),
      partial_restore=True,
    )
    handler = ocp.PyTreeCheckpointer()
    return handler.restore(os.path.join(self.directory, str(step), "state"), args=args)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename), so a crash never leaves half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


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
