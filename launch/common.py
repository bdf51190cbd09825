"""What the launchers share: the iomm-train command line, ``--config.KEY=VALUE`` flags, and the
config check that runs before anything is launched (an unknown key or a bad value is an error
naming the key, raised here rather than on a cluster node an hour later)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "iomm-train"
_PREFIX = "--config."


class LaunchError(ValueError):
  """A launcher's input is wrong; the message names what (printed as ``error: ...``)."""


def local_train_bin() -> str:
  """The ``iomm-train`` of the running Python environment (no activated venv needed), else the
  one on PATH."""
  exe = os.path.join(os.path.dirname(sys.executable), TRAIN)
  return exe if os.path.exists(exe) else TRAIN


def format_value(value: Any) -> str:
  """A Python value as ``config_flags`` parses it back (floats keep their full precision)."""
  return repr(value) if isinstance(value, float) else str(value)


def override_flag(key: str, value: Any) -> str:
  """``("optim.lr", 3e-4)`` -> ``"--config.optim.lr=0.0003"``."""
  return f"{_PREFIX}{key}={format_value(value)}"


def parse_config_flags(extra: Sequence[str]) -> list[tuple[str, str]]:
  """``["--config.optim.lr=3e-4"]`` -> ``[("optim.lr", "3e-4")]``; any other argument is an
  error (launcher typos must not travel to a cluster as iomm-train flags)."""
  out = []
  for arg in extra:
    key, eq, value = arg.partition("=")
    if not key.startswith(_PREFIX) or not eq or key == _PREFIX:
      raise LaunchError(
        f"unexpected argument {arg!r}: config overrides are passed as --config.KEY=VALUE"
      )
    out.append((key[len(_PREFIX) :], value))
  return out


def with_quick(spec: str, quick: bool) -> str:
  """``path[:arg]`` with ``quick`` added to the experiment argument when asked."""
  if not quick:
    return spec
  path, _, arg = spec.partition(":")
  parts = [p for p in arg.split(",") if p]
  return f"{path}:{','.join(parts + ['quick'] if 'quick' not in parts else parts)}"


def repo_spec(spec: str, repo: str = ROOT) -> str:
  """``path[:arg]`` as the job sees it from the repository's root: relative to ``repo`` when the
  file lies inside it (a copy of the repository has it there too), else absolute."""
  path, colon, arg = spec.partition(":")
  full = os.path.abspath(path)
  if os.path.commonpath([full, os.path.abspath(repo)]) == os.path.abspath(repo):
    path = os.path.relpath(full, repo)
  else:
    path = full
  return path + colon + arg


def load_module(path: str):
  """Imports an experiment file as a module (for ``get_sweep``)."""
  if not os.path.isfile(path):
    raise LaunchError(f"experiment file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("_iomm_launch_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _get_dotted(config, key: str) -> Any:
  node = config
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      raise LaunchError(f"unknown config key {'.'.join(parts[: i + 1])!r}")
    node = node[part]
  return node


def parse_typed(current: Any, text: str, key: str) -> Any:
  """``text`` as the type of the key's current value, as ``--config.KEY=text`` would be read."""
  try:
    if isinstance(current, bool):
      low = text.lower()
      if low not in ("true", "t", "1", "yes", "false", "f", "0", "no"):
        raise ValueError(text)
      return low in ("true", "t", "1", "yes")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
  except ValueError:
    raise LaunchError(
      f"--config.{key}={text!r} is not a {type(current).__name__} (the key's type)"
    ) from None
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def check_config(
  spec: str, overrides: dict[str, Any], flags: Sequence[tuple[str, str]], validate: bool = True
):
  """Loads ``spec``, applies the sweep ``overrides`` and the ``--config`` ``flags``, validates
  (unless not ``validate``: then only keys and types are checked); returns the config. Errors
  (unknown key, wrong type, bad value) name the key."""
  try:
    from iomm_jax.configs import loading  # ml_collections only: no JAX import
  except ImportError as e:
    raise LaunchError(
      f"{e}: run the launchers with the project's Python (an activated venv, or "
      ".venv/bin/python launch/...)"
    ) from None

  try:
    config = loading.load_config(spec)
  except FileNotFoundError as e:
    raise LaunchError(str(e)) from None
  clash = sorted(set(overrides) & {k for k, _ in flags})
  if clash:
    raise LaunchError(f"config key {clash[0]!r} is set both by the sweep and by a --config flag")
  typed = list(overrides.items())
  typed += [(k, parse_typed(_get_dotted(config, k), t, k)) for k, t in flags]
  for key, value in typed:
    _get_dotted(config, key)
    try:
      loading.set_dotted(config, key, value)
    except (TypeError, KeyError) as e:
      raise LaunchError(f"config.{key}={value!r}: {e.args[0] if e.args else e}") from None
  if not validate:
    return config
  try:
    loading.validate(config, num_devices=1)
  except ValueError as e:
    raise LaunchError(str(e)) from None
  return config


def train_argv(
  spec: str,
  workdir: str,
  overrides: dict[str, Any] | None = None,
  flags: Sequence[str] = (),
  exe: str = TRAIN,
) -> list[str]:
  """The iomm-train command: experiment, workdir, sweep overrides, then the ``--config`` flags."""
  out = [exe, "--config", spec, "--workdir", workdir]
  out += [override_flag(k, v) for k, v in (overrides or {}).items()]
  return out + list(flags)


def shell(argv: Sequence[str]) -> str:
  """One shell line that runs ``argv`` (arguments with spaces or quotes are quoted)."""
  return shlex.join(argv)


def parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
  """An argument parser with the launchers' common ``--config``/``--workdir``/``--dry-run``;
  other ``--config.KEY=VALUE`` arguments are collected by :func:`parse`."""
  p = argparse.ArgumentParser(
    prog=prog,
    description=description,
    allow_abbrev=False,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="Any further --config.KEY=VALUE arguments are passed to iomm-train.",
  )
  p.add_argument("--config", required=True, help="experiment file[:arg], as iomm-train takes it")
  p.add_argument("--workdir", required=True, help="the run's workdir (sweeps: the root folder)")
  p.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")
  return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None):
  """``(args, flags)``: the launcher's arguments and the pass-through ``--config.K=V`` list."""
  args, extra = p.parse_known_args(argv)
  try:
    args.config_flags = parse_config_flags(extra)
  except LaunchError as e:
    p.error(str(e))
  args.flags = list(extra)
  return args


def run_main(fn: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
  """Runs a launcher's ``fn(argv)``; a :class:`LaunchError` is printed as ``error: ...``."""
  try:
    return fn(argv)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
