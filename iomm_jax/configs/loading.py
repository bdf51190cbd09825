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

from iomm_jax.configs import mesh as mesh_lib
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
# (assembly.workdirs.prepare_workdir) and loading one finds them again if it moved (locate_paths).
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
  data, fsdp, _ = mesh_lib.mesh_shape(config.sharding.mesh, num_devices)
  if b % k or (b // k) % (data * fsdp):
    raise ValueError(
      f"config.train.batch_size={b} with config.train.grad_accum={k}: each micro-batch "
      f"(batch_size / grad_accum) must be a whole number of rows that divides over the "
      f"{data * fsdp} data x fsdp batch shards of config.sharding.mesh="
      f"{tuple(config.sharding.mesh)}"
    )


class ConfigError(ValueError):
  """A config value ``validate`` refuses; its one line names the keys. The absl commands
  (``iomm_jax.cli.run``) print it as a usage error, without a traceback."""


def validate(
  config: ml_collections.ConfigDict,
  num_devices: int,
  num_processes: int = 1,
  require_inputs: bool = True,
) -> None:
  """Checks values that would otherwise fail late or silently; errors (``ConfigError``, a
  ValueError) name the key.

  ``num_devices`` / ``num_processes``: of the whole (possibly multi-process) run; the mesh
  (``config.sharding.mesh``) must fit the devices and the batch must split over its data x fsdp
  shards and over the processes. ``require_inputs=False`` (planning from abstract shapes) skips
  the checks of the weights a run reads (``model.mllm_from``, ``train.init_from``). The image
  sizes of a generator stage: ``check_image_size``.
  """
  try:
    _validate(config, num_devices, num_processes, require_inputs)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _validate(
  config: ml_collections.ConfigDict, num_devices: int, num_processes: int, require_inputs: bool
) -> None:
  d, t = config.diffusion, config.train
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} unknown; choose from {STAGES}")
  check_image_size(config)  # first: the sizes are what the other values are for
  if not 0.0 <= d.mask_ratio < 1.0:
    raise ValueError(f"config.diffusion.mask_ratio={d.mask_ratio} must be in [0, 1)")
  if not 0.0 <= d.mix_ratio <= 1.0:
    raise ValueError(f"config.diffusion.mix_ratio={d.mix_ratio} must be in [0, 1]")
  if not 0.0 <= d.cond_dropout < 1.0:
    raise ValueError(f"config.diffusion.cond_dropout={d.cond_dropout} must be in [0, 1)")
  mesh_lib.axis_rules(config)
  mesh_lib.check_batch(config, num_devices, num_processes)
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
  check_lora(config)


def check_lora(config: ml_collections.ConfigDict) -> None:
  """``model.lora``: rank 0 (off) or a valid ``mmdit.LoRAConfig`` (rank, alpha, targets), and
  then only for a stage-2 run that starts from an existing generator (``train.init_from`` a
  stage-1 workdir or a FLUX-format directory): adapters on a random base would learn nothing
  the full model could not, and the base weights are reloaded from there at every start."""
  from iomm_jax.models import mmdit as mmdit_lib  # dataclass fields only: no JAX work

  lo = config.model.lora
  if not isinstance(lo.rank, int) or isinstance(lo.rank, bool) or lo.rank < 0:
    raise ValueError(f"config.model.lora.rank={lo.rank!r} must be an integer >= 0 (0 = off)")
  if lo.rank == 0:
    return
  mmdit_lib.LoRAConfig(
    rank=lo.rank, alpha=float(lo.alpha), targets=tuple(lo.targets), trainable=tuple(lo.trainable)
  )
  if config.stage != "finetune" or config.train.init_from == "scratch":
    raise ValueError(
      f"config.model.lora.rank={lo.rank} needs config.stage='finetune' with "
      f"config.train.init_from a stage-1 workdir or a FLUX-format directory (got stage "
      f"{config.stage!r}, init_from {config.train.init_from!r}): LoRA adapts an existing "
      "generator"
    )


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


def _multiples(size: int, q: int) -> str:
  """The multiples of ``q`` nearest ``size``: "28 or 32" (just ``q`` below it)."""
  below = size // q * q
  return f"{below} or {below + q}" if below > 0 else str(q)


def _positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def codec_downsampling(config: ml_collections.ConfigDict) -> tuple[int, str]:
  """(f, the keys that set it, for a message): the spatial reduction of ``config.model``'s
  codec, ``model.codec_factor`` ("pixel") or the ``model.vae`` variant's ("vae")."""
  from iomm_jax.models import codec as codec_lib  # dataclass fields only: no JAX work

  m = config.model
  if m.codec == "pixel":
    if not _positive_int(m.codec_factor):
      raise ConfigError(f"config.model.codec_factor={m.codec_factor!r} must be a positive integer")
    return m.codec_factor, f"config.model.codec_factor ({m.codec_factor})"
  if m.codec != "vae":
    raise ConfigError(
      f"config.model.codec={m.codec!r} unknown; choose from {sorted(codec_lib.CODECS)}"
    )
  if m.vae not in codec_lib.VAE_VARIANTS:
    raise ConfigError(
      f"config.model.vae={m.vae!r} unknown; choose from {sorted(codec_lib.VAE_VARIANTS)}"
    )
  f = codec_lib.VAE_VARIANTS[m.vae].downsample
  return f, f"the downsampling of config.model.vae={m.vae!r} ({f})"


def generator_patch(config: ml_collections.ConfigDict) -> tuple[int, str]:
  """(p, the keys that set it, for a message): the side of the latent patch packed into one
  generator token, ``MMDiTConfig.latent_patch`` of ``model.generator`` or of its
  ``model.generator_overrides``."""
  from iomm_jax.models import mmdit as mmdit_lib  # dataclass fields only: no JAX work

  m = config.model
  if m.generator not in mmdit_lib.MMDIT_VARIANTS:
    raise ConfigError(
      f"config.model.generator={m.generator!r} unknown; choose from "
      f"{sorted(mmdit_lib.MMDIT_VARIANTS)}"
    )
  over = m.generator_overrides
  p = mmdit_lib.parse_overrides(over).get("latent_patch")
  if p is None:
    p = mmdit_lib.MMDIT_VARIANTS[m.generator].latent_patch
    where = f"config.model.generator={m.generator!r}"
  else:
    where = f"config.model.generator_overrides={over!r}"
  if not _positive_int(p):
    raise ConfigError(f"{where}: latent_patch={p!r} must be a positive integer")
  return p, f"the latent_patch of {where} ({p})"


def check_image_size(config: ml_collections.ConfigDict) -> None:
  """The image sizes of a generator stage. ``model.image_size`` must be a multiple of the
  codec's downsampling f (``codec_downsampling``) x the generator's latent patch p
  (``generator_patch``): the (image_size / f)^2 latent is packed into whole p x p tokens. On the
  shapes world (``data.source`` "shapes") ``data.canvas`` must equal it: the world renders the
  training images (and the detector scores samples) at the canvas size.

  Stage 0 (``mllm``) trains no generator; its images only reach the ViT, which resizes them to
  its own input (``iomm.vit_pixels``), so any sizes work there (the ViT's own patch grid is
  checked by its ``MLLMConfig``, which no config key resizes)."""
  if config.stage not in ("pretrain", "finetune"):
    return
  s = config.model.image_size
  if not _positive_int(s):
    raise ConfigError(f"config.model.image_size={s!r} must be a positive integer (pixels)")
  f, codec_keys = codec_downsampling(config)
  p, patch_keys = generator_patch(config)
  q = f * p
  if s % q:
    why = (
      f"the image does not split into whole {f}x{f} codec cells ({s} / {f} = {s / f:g})"
      if s % f
      else f"the latent ({s // f}x{s // f}) must split into whole {p}x{p} patches"
    )
    raise ConfigError(
      f"config.model.image_size={s} is not divisible by {codec_keys} x {patch_keys} = {q}: "
      f"{why}; use a multiple of {q} such as {_multiples(s, q)}"
    )
  d = config.data
  if d.source == "shapes" and d.canvas != s:
    fix = f"set config.data.canvas={s}"
    if _positive_int(d.canvas) and d.canvas % q == 0:
      fix += f" or config.model.image_size={d.canvas}"
    raise ConfigError(
      f"config.data.canvas={d.canvas} differs from config.model.image_size={s}: the shapes "
      f"world (config.data.source='shapes') renders its images at data.canvas px and the "
      f"generator trains on and samples model.image_size px, so they must be equal; {fix}"
    )
