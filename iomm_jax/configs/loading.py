"""Loading experiment files and validating configs before anything compiles.

An experiment file is a Python file with ``get_config(arg: str | None)``; ``path:arg`` passes
``arg`` (e.g. ``experiments/shapes/pretrain.py:quick``). ``parse_arg`` reads
``"quick,grid=3"``-style strings into typed values, as big_vision's configs do.
"""

from __future__ import annotations

import difflib
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
  """``set_dotted(c, "optim.lr", 3e-4)``; an unknown key is a KeyError whose one argument is
  ``unknown_key_message``'s line (the full key and the nearest valid one)."""
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise KeyError(unknown_key_message(config, key))
    node = node[p]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise KeyError(unknown_key_message(config, key))
  node[leaf] = value


def get_dotted(config: ml_collections.ConfigDict, key: str) -> Any:
  """``get_dotted(c, "optim.lr")``; an unknown key is a KeyError as in ``set_dotted``."""
  node = config
  for p in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise KeyError(unknown_key_message(config, key))
    node = node[p]
  return node


def dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every key of ``config``, sections and leaves, dotted (``optim``, ``optim.lr``, ...)."""
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out += dotted_keys(v, f"{prefix}{k}.")
  return out


def nearest_key(config: ml_collections.ConfigDict, key: str) -> str | None:
  """The valid key nearest to ``key`` (difflib): each part that is not in its section replaced
  by the closest of the section's keys (``optimm.lrr`` -> ``optim.lr``), else the key anywhere
  in the config whose last part is closest to ``key``'s (``train.lr`` -> ``optim.lr``); None
  when nothing is close."""
  node, parts = config, []
  for p in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      break
    close = [p] if p in node else difflib.get_close_matches(p, list(node.keys()), n=1)
    if not close:
      break
    parts.append(close[0])
    node = node[close[0]]
  else:
    return ".".join(parts)
  everywhere = dotted_keys(config)
  last = difflib.get_close_matches(
    key.rsplit(".", 1)[-1], {k.rsplit(".", 1)[-1] for k in everywhere}, n=1
  )
  if not last:
    return None
  same = [k for k in everywhere if k.rsplit(".", 1)[-1] == last[0]]
  return difflib.get_close_matches(key, same, n=1, cutoff=0.0)[0]


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
  """One line for a key that is not in ``config``: the full key, the first part that is not
  there, and the nearest valid key (or the keys of the deepest section that exists)."""
  parts, node, i = key.split("."), config, 0
  while i < len(parts) and isinstance(node, ml_collections.ConfigDict) and parts[i] in node:
    node, i = node[parts[i]], i + 1
  where = "" if i == len(parts) - 1 else f" (no {'.'.join(parts[: i + 1])!r})"
  near = nearest_key(config, key)
  if near is not None:
    return f"unknown config key {key!r}{where}; did you mean {near!r}?"
  section = ".".join(parts[:i])
  if not isinstance(node, ml_collections.ConfigDict):  # a key below a value
    return f"unknown config key {key!r}: {section!r} is a value, not a section"
  known = ", ".join(sorted(node.keys()))
  return f"unknown config key {key!r}{where}; {f'{section!r} has' if section else 'keys:'} {known}"


# Keys that name a file or directory a run reads. A workdir's config.json stores them absolute
# (train.loop.prepare_workdir) and loading one finds them again if it moved (locate_paths).
PATH_KEYS = (
  "model.mllm_from",
  "model.vae_checkpoint",
  "train.init_from",
  "data.path",
  "data.features",
)
NOT_PATHS = {"train.init_from": ("scratch",)}  # values of a path key that name no path


def _path_values(config: Any) -> list[tuple[Any, str, str]]:
  """(section, leaf, value) of each ``PATH_KEYS`` entry of a config (or its JSON dict) that holds
  a local path: set, not a ``NOT_PATHS`` word, not a URL (``gs://...``); a key an older config
  lacks is left out."""
  out = []
  for key in PATH_KEYS:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p] if p in node else None
      if node is None:
        break
    value = node.get(leaf) if node is not None else None
    if isinstance(value, str) and value and value not in NOT_PATHS.get(key, ()):
      if "://" not in value:
        out.append((node, leaf, value))
  return out


def absolute_paths(config: Any) -> None:
  """Makes every path of ``PATH_KEYS`` in ``config`` (a ConfigDict or its JSON dict) absolute,
  from the current directory, in place."""
  for node, leaf, value in _path_values(config):
    node[leaf] = os.path.abspath(value)


def locate_paths(config: Any, workdir: str) -> None:
  """Points each path of ``PATH_KEYS`` that does not exist (from the current directory) at where
  it now is, in place: a workdir written before paths were stored absolute holds them relative
  to the directory its training ran in, and a moved or copied tree moves them all. The path, then
  its trailing parts (at least two, longest first), is looked for in ``workdir`` and in each
  directory above it, nearest first; the first that exists wins. A path found nowhere is kept
  as it is, for the error that names it."""
  anchors, d = [], os.path.abspath(workdir)
  while True:
    anchors.append(d)
    if os.path.dirname(d) == d:
      break
    d = os.path.dirname(d)
  for node, leaf, value in _path_values(config):
    if os.path.exists(value):
      continue
    parts = [p for p in os.path.normpath(value).split(os.sep) if p]
    tails = [os.path.join(*parts[-n:]) for n in range(len(parts), min(2, len(parts)) - 1, -1)]
    found = (os.path.normpath(os.path.join(a, t)) for t in tails for a in anchors)
    node[leaf] = next((c for c in found if os.path.exists(c)), value)


def check_grad_accum(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """``train.grad_accum`` k >= 1 micro-batches of ``batch_size / k`` rows, each of which must
  still split over the data x fsdp batch shards; errors name the keys."""
  t = config.train
  k, b = t.grad_accum, t.batch_size
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"config.train.grad_accum={k!r} must be an integer >= 1")
  data, fsdp, _ = sharding.mesh_shape(config.sharding.mesh, num_devices)
  if b % k or (b // k) % (data * fsdp):
    raise ValueError(
      f"config.train.batch_size={b} with config.train.grad_accum={k}: each micro-batch "
      f"(batch_size / grad_accum) must be a whole number of rows that divides over the "
      f"{data * fsdp} data x fsdp batch shards of config.sharding.mesh="
      f"{tuple(config.sharding.mesh)}"
    )


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
  check_grad_accum(config, num_devices)
  if t.peak_tflops < 0:
    raise ValueError(f"config.train.peak_tflops={t.peak_tflops} must be >= 0 (0: look it up)")
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
  check_features(config)


def check_features(config: ml_collections.ConfigDict) -> None:
  """``data.features`` serves the generator stages; ``data.vae_latent`` is "mean" or "sample"."""
  d = config.data
  if d.vae_latent not in ("mean", "sample"):
    raise ValueError(f"config.data.vae_latent={d.vae_latent!r} must be 'mean' or 'sample'")
  if d.features and config.stage not in ("pretrain", "finetune"):
    raise ValueError(
      f"config.data.features={d.features!r}: cached features serve config.stage 'pretrain' and "
      f"'finetune', not {config.stage!r}"
    )
