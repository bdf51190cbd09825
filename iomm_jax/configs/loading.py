"""Loading experiment files and validating configs before anything compiles.

An experiment file is a Python file with ``get_config(arg: str | None)``; ``path:arg`` passes
``arg`` (e.g. ``experiments/shapes/pretrain.py:quick``). ``parse_arg`` reads
``"quick,grid=3"``-style strings into typed values, as big_vision's configs do.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

from iomm_jax import sharding
from iomm_jax.configs.base import STAGES


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """``"quick,scale=2"`` -> ConfigDict(quick=True, scale=2) over typed ``defaults``.

  A bare name sets a boolean True; ``k=v`` casts v to the type of the default. Unknown names
  are an error naming them.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for part in filter(None, (arg or "").split(",")):
    key, _, val = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not val:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = val.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(val)
  return out


def parse_value(text: str) -> Any:
  """A command-line override value: int, float, bool, ``(a, b)`` tuple of strings, else the
  string itself (scripts' ``--set KEY=VALUE``)."""
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  if text.startswith("(") and text.endswith(")"):
    return tuple(x.strip().strip("'\"") for x in text[1:-1].split(",") if x.strip())
  return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
  """``["optim.lr=3e-4", "model.generator=shapes"]`` -> dotted overrides for ``load_config``;
  an item without ``=`` is a ValueError naming it."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"override {item!r} is not KEY=VALUE")
    out[key] = parse_value(value)
  return out


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Loads ``path[:arg]``, applies dotted ``overrides`` and returns the locked config."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"experiment file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_iomm_experiment", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.lock()
  for key, value in (overrides or {}).items():
    set_dotted(config, key, value)
  return config


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """``set_dotted(c, "optim.lr", 3e-4)``; an unknown key is an error naming it."""
  *parents, leaf = key.split(".")
  node = config
  for i, p in enumerate(parents):
    if p not in node:
      raise KeyError(f"unknown config key {'.'.join(parents[: i + 1])!r}")
    node = node[p]
  if leaf not in node:
    raise KeyError(f"unknown config key {key!r}")
  node[leaf] = value


def get_dotted(config: ml_collections.ConfigDict, key: str) -> Any:
  """``get_dotted(c, "optim.lr")``; an unknown key is an error naming it."""
  node = config
  parts = key.split(".")
  for i, p in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise KeyError(f"unknown config key {'.'.join(parts[: i + 1])!r}")
    node = node[p]
  return node


def validate(
  config: ml_collections.ConfigDict,
  num_devices: int,
  num_processes: int = 1,
  require_inputs: bool = True,
) -> None:
  """Checks values that would otherwise fail late or silently; errors name the key.

  ``num_devices`` / ``num_processes``: of the whole (possibly multi-process) run; the mesh
  (``config.sharding.mesh``) must fit the devices and the batch must split over its data x fsdp
  shards and over the processes. ``require_inputs=False`` (planning from abstract shapes) skips
  the checks of the weights a run reads (``model.mllm_from``, ``train.init_from``).
  """
  d, t = config.diffusion, config.train
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} unknown; choose from {STAGES}")
  if not 0.0 <= d.mask_ratio < 1.0:
    raise ValueError(f"config.diffusion.mask_ratio={d.mask_ratio} must be in [0, 1)")
  if not 0.0 <= d.mix_ratio <= 1.0:
    raise ValueError(f"config.diffusion.mix_ratio={d.mix_ratio} must be in [0, 1]")
  if not 0.0 <= d.cond_dropout < 1.0:
    raise ValueError(f"config.diffusion.cond_dropout={d.cond_dropout} must be in [0, 1)")
  sharding.axis_rules(config)
  sharding.check_batch(config, num_devices, num_processes)
  if t.num_steps <= 0:
    raise ValueError(f"config.train.num_steps={t.num_steps} must be positive")
  if not 0.0 <= t.ema_decay < 1.0:
    raise ValueError(f"config.train.ema_decay={t.ema_decay} must be in [0, 1)")
  if t.max_nonfinite < 1:
    raise ValueError(f"config.train.max_nonfinite={t.max_nonfinite} must be at least 1")
  if require_inputs and config.stage == "finetune" and not t.init_from:
    raise ValueError(
      "config.train.init_from is empty: a fine-tune (stage 2) starts from a "
      "stage-1 checkpoint; pass --config.train.init_from=<stage-1 workdir> (or 'scratch' "
      "for a randomly initialised ablation)"
    )
  if (
    require_inputs
    and config.stage in ("pretrain", "finetune")
    and config.model.mllm_init == "checkpoint"
    and not config.model.mllm_from
  ):
    raise ValueError(
      "config.model.mllm_from is empty: stages 1-2 condition on a frozen MLLM; "
      "pass the stage-0 workdir (or set config.model.mllm_init='random')"
    )
  if config.model.mllm_init not in ("checkpoint", "random"):
    raise ValueError(
      f"config.model.mllm_init={config.model.mllm_init!r} must be 'checkpoint' or 'random'"
    )
