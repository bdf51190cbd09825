"""``iomm-plan``: the per-device memory of a stage's train step on a mesh, without the hardware.

  iomm-plan --config experiments/iomm_b/pretrain.py --mesh data=2,fsdp=4,tensor=1 \
      [--batch 1024] [--grad-accum 4] [--stage pretrain|finetune] [--remat none|block|dots] \
      [--device-memory-gib 80] [--devices 8] [--json] [--no-compile] [--full-compile] \
      [--config.KEY=VALUE ...]

Lowers and compiles the real train step (``iomm_jax.train.plan``) from abstract shapes on fake
CPU devices (as many as the mesh has; the process re-executes itself with
``--xla_force_host_platform_device_count`` when JAX already runs with fewer) and prints parameter
counts, per-device bytes of parameters, optimiser state, frozen weights, batch and XLA's
temporaries, and whether the total fits ``--device-memory-gib``. The temporaries are those of
XLA's CPU backend, an estimate of a GPU's or TPU's (compiled with remat's optimisation barriers
kept, see ``KEEP_REMAT_FLAGS``); ``--no-compile`` prints only the exact bytes of the shardings in
seconds. Paper configs need no paths to plan; docs/SCALING.md has their figures.
Bad flags exit with status 2 and name the flag.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys

MESH_AXES = ("data", "fsdp", "tensor")  # = sharding.MESH_AXES (not imported: keeps start-up light)
REMAT = ("none", "block", "dots")  # = layers.REMAT_POLICIES (checked in tests)
_CHILD_ENV = "IOMM_PLAN_DEVICES"  # set in the re-executed process
# The step is compiled, never run: skip LLVM's expensive passes (the buffer sizes XLA reports
# come from its HLO passes and buffer assignment, which these flags leave alone; measured equal).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# XLA's CPU pipeline drops jax.checkpoint's optimisation barriers early, and CSE then merges the
# recomputation with the forward pass: remat would change nothing in a CPU plan (measured: the
# same temporaries with and without). Keeping the barriers makes the plan honour the remat policy.
KEEP_REMAT_FLAGS = "--xla_disable_hlo_passes=cse_barrier_expander"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="iomm-plan",
    description="Per-device memory of a stage's train step on a mesh, compiled on fake CPU "
    "devices. Extra --config.KEY=VALUE items override config keys.",
  )
  p.add_argument("--config", required=True, help="experiment file[:arg]")
  p.add_argument("--mesh", required=True, help="mesh sizes, e.g. data=2,fsdp=4,tensor=1 (unset=1)")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
  p.add_argument(
    "--grad-accum",
    type=int,
    default=None,
    help="config.train.grad_accum: micro-batches per update (activations of one live at once)",
  )
  p.add_argument("--stage", choices=("pretrain", "finetune"), default=None)
  p.add_argument("--remat", choices=REMAT, default=None, help="config.model.remat")
  p.add_argument("--device-memory-gib", type=float, default=80.0, help="budget per device")
  p.add_argument("--devices", type=int, default=None, help="device count the mesh must use")
  p.add_argument("--json", action="store_true", help="print the report as one JSON object")
  p.add_argument(
    "--no-compile", action="store_true", help="only the bytes of the shardings (no XLA figures)"
  )
  p.add_argument(
    "--full-compile",
    action="store_true",
    help=f"compile with XLA's default backend optimisation (default adds {FAST_COMPILE_FLAGS})",
  )
  return p


def parse_mesh(p: argparse.ArgumentParser, text: str) -> tuple[int, int, int]:
  """``data=2,fsdp=4`` -> (2, 4, 1); errors (exit 2) name ``--mesh``."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  for part in filter(None, text.split(",")):
    name, eq, value = part.partition("=")
    name = name.strip()
    if name not in MESH_AXES:
      p.error(f"argument --mesh: unknown mesh axis {name!r}; the axes are {', '.join(MESH_AXES)}")
    try:
      sizes[name] = int(value)
    except ValueError:
      p.error(f"argument --mesh: {part!r} is not AXIS=SIZE with an integer size")
    if sizes[name] <= 0:
      p.error(f"argument --mesh: {name}={sizes[name]} must be a positive size")
  return tuple(sizes[a] for a in MESH_AXES)  # type: ignore[return-value]


def _cast(old, raw: str):
  """``raw`` as the type of the config's current value ``old``."""
  if isinstance(old, bool):
    if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
      raise ValueError(f"{raw!r} is not a boolean")
    return raw.lower() in ("true", "1", "yes")
  if isinstance(old, int):
    return int(raw)
  if isinstance(old, float):
    return float(raw)
  if isinstance(old, (tuple, list)):
    return type(old)(ast.literal_eval(raw))
  return raw


def _overrides(p: argparse.ArgumentParser, extra: list[str]) -> list[tuple[str, str]]:
  out = []
  for arg in extra:
    if not arg.startswith("--config.") or "=" not in arg:
      p.error(f"unrecognized arguments: {arg} (config overrides are --config.KEY=VALUE)")
    key, _, value = arg[len("--config.") :].partition("=")
    out.append((key, value))
  return out


def _xla_flags(current: str, fast: bool, n: int | None = None) -> str:
  """``current`` XLA flags plus the planning ones (and the device count ``n``)."""
  flags = [f for f in current.split() if "device_count" not in f or n is None]
  for extra in (KEEP_REMAT_FLAGS, FAST_COMPILE_FLAGS if fast else ""):
    if extra and extra not in " ".join(flags):
      flags += extra.split()
  if n is not None:
    flags.append(f"--xla_force_host_platform_device_count={n}")
  return " ".join(flags)


def _ensure_devices(n: int, argv: list[str], fast: bool) -> None:
  """Makes JAX start with ``n`` CPU devices and the planning XLA flags; if it already runs
  (with other flags, or fewer devices), re-executes this command in a fresh process whose
  environment asks for them."""
  import jax
  from jax._src import xla_bridge

  started = getattr(xla_bridge, "backends_are_initialized", lambda: False)()
  if not started:  # XLA reads $XLA_FLAGS when its first backend starts
    os.environ["XLA_FLAGS"] = _xla_flags(os.environ.get("XLA_FLAGS", ""), fast)
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    enough = not started and len(jax.devices()) >= n
  except RuntimeError:  # backends already initialised (e.g. called from a running program)
    enough = False
  if enough:
    return
  if os.environ.get(_CHILD_ENV) == str(n):
    raise SystemExit(f"iomm-plan: could not start JAX with {n} CPU devices")
  env = dict(os.environ)
  env["XLA_FLAGS"] = _xla_flags(env.get("XLA_FLAGS", ""), fast, n)
  env["JAX_PLATFORMS"] = "cpu"
  env[_CHILD_ENV] = str(n)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, "-m", "iomm_jax.cli.plan", *argv], env)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  p = _parser()
  a, extra = p.parse_known_args(argv)
  mesh = parse_mesh(p, a.mesh)
  overrides = _overrides(p, extra)
  if a.devices is not None and math.prod(mesh) != a.devices:
    p.error(
      f"argument --mesh: {a.mesh} has {math.prod(mesh)} devices (data x fsdp x tensor), "
      f"not the {a.devices} of --devices"
    )
  if a.batch is not None and a.batch <= 0:
    p.error(f"argument --batch: {a.batch} must be positive")
  if a.batch is not None and a.batch % (mesh[0] * mesh[1]):
    p.error(
      f"argument --batch: {a.batch} does not divide over the {mesh[0] * mesh[1]} batch shards "
      f"(data {mesh[0]} x fsdp {mesh[1]}) of --mesh {a.mesh}"
    )
  if a.grad_accum is not None and a.grad_accum < 1:
    p.error(f"argument --grad-accum: {a.grad_accum} must be >= 1")
  if a.device_memory_gib <= 0:
    p.error(f"argument --device-memory-gib: {a.device_memory_gib} must be positive")

  from iomm_jax.configs import loading

  try:
    config = loading.load_config(a.config)
  except (FileNotFoundError, ValueError) as e:
    p.error(f"argument --config: {e}")
  for key, raw in overrides:
    try:
      old = loading.get_dotted(config, key)
      loading.set_dotted(config, key, _cast(old, raw))
    except KeyError as e:  # the full key and the nearest valid one, as iomm-train says it
      p.error(f"argument --config.{key}: {e.args[0]}")
    except (ValueError, SyntaxError) as e:
      p.error(f"argument --config.{key}: {e}")
  loading.set_dotted(config, "sharding.mesh", mesh)
  if a.batch is not None:
    config.train.batch_size = a.batch
  if a.grad_accum is not None:
    config.train.grad_accum = a.grad_accum
  if a.stage is not None:
    config.stage = a.stage
  if a.remat is not None:
    config.model.remat = a.remat
  if config.stage not in ("pretrain", "finetune"):
    p.error(f"argument --stage: config.stage={config.stage!r}; planning covers pretrain, finetune")
  if config.train.batch_size % (mesh[0] * mesh[1]):
    p.error(
      f"argument --batch: the config's batch {config.train.batch_size} does not divide over the "
      f"{mesh[0] * mesh[1]} batch shards (data x fsdp) of --mesh {a.mesh}; set --batch"
    )
  notes = []
  if config.model.attention != "xla":  # fused GPU kernels do not compile for the CPU backend
    notes.append(
      f"config.model.attention={config.model.attention!r} replaced by 'xla' for the CPU compile "
      "(a fused flash-attention kernel needs far fewer temporaries)"
    )
    config.model.attention = "xla"

  _ensure_devices(math.prod(mesh), argv, not a.full_compile)

  from iomm_jax import runtime

  runtime.outside_absl(quiet=True, cache=False)
  from iomm_jax.train import plan

  try:
    report = plan.plan(config, a.device_memory_gib, compile=not a.no_compile)
  except ValueError as e:  # a config value the checks name (config.<key>)
    p.error(str(e))
  report["config"] = a.config
  report["notes"] += notes
  print(json.dumps(report, indent=1) if a.json else plan.format_report(report), flush=True)


if __name__ == "__main__":
  main()
