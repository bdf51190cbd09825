"""A run's workdir: its recorded config, validated and written at the start of a stage, read
back (paths found again) by everything that resumes, samples, evaluates or exports it, and the
mesh and axis rules it names.

Training and sampling both import this module; it imports neither.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from jax.sharding import Mesh

from iomm_jax import checkpointing, sharding
from iomm_jax.configs import loading, specs


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Validates the config (before anything compiles) and records it in ``workdir``.

  A workdir that already holds checkpoints of another model config is refused here, before its
  ``config.json`` is touched. ``config.json`` stores the paths the run reads
  (``loading.PATH_KEYS``: ``model.mllm_from``, ``train.init_from``, ...) absolute, so the workdir
  loads from any directory; the model check compares no paths, so a resume may pass them
  relative or absolute.
  """
  loading.validate(config, jax.device_count(), jax.process_count())
  saved = os.path.join(workdir, "config.json")
  if os.path.exists(saved) and os.path.isdir(os.path.join(workdir, "checkpoints")):
    previous = load_workdir_config(workdir).model.to_dict()
    checkpointing.check_model_signature(previous, config, workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    record = json.loads(config.to_json())
    loading.absolute_paths(record)
    checkpointing.save_json(os.path.join(workdir, "config.json"), record)


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (``<workdir>/config.json``), brought up to date
  (``specs.upgrade``: the keys an earlier version did not write, with the values that reproduce
  that run), its paths found again if they are not where it says (``loading.locate_paths``:
  relative ones of workdirs written before they were stored absolute, or a moved tree)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir!r} is not an iomm_jax workdir: {path} is missing")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  specs.upgrade(config)
  loading.locate_paths(config, workdir)
  return config


def keeps_ema(config: ml_collections.ConfigDict) -> bool:
  """Whether a run keeps an EMA copy of its parameters (not with ``train.ema_decay = 0``)."""
  return config.train.ema_decay > 0


def mesh_and_rules(config: ml_collections.ConfigDict) -> tuple[Mesh, sharding.Rules]:
  """The device mesh of ``config.sharding.mesh`` (over every process's devices) and the logical
  axis rules of ``config.sharding.logical_axis_rules``."""
  return sharding.make_mesh(config), sharding.axis_rules(config)
