#!/usr/bin/env python3
r"""Sweeps: an experiment file's ``get_sweep()`` -> one iomm-train run per point, and a table.

  python launch/sweep.py --config experiments/shapes/pretrain.py --workdir runs/sweeps/pretrain \
      --config.model.mllm_from=runs/shapes/mllm [--quick] [--mode local|slurm|tpu] [--dry-run]
  python launch/sweep.py --config experiments/shapes/pretrain.py --workdir runs/sweeps/pretrain \
      --report

``get_sweep()`` returns a list of override dicts (``[{"optim.lr": 1e-3}, {"optim.lr": 3e-4}]``);
point i runs in ``ROOT/<slug>`` (``ROOT/lr=0.001``). Every point's config is loaded and checked
first: a bad ``get_sweep`` (not a list of dicts, an unknown key, a bad value) is an error naming
the point and key before anything runs. Further ``--config.KEY=VALUE`` flags apply to every point.

Modes: ``local`` runs the points one after another on this host (finished runs are skipped,
unfinished ones resume; each run's output is also appended to ``ROOT/<slug>/train.log``), then
writes the report; ``--in-process`` trains in this process instead of an iomm-train per point
(imports and JAX's op-by-op compilations are paid once: many short runs on CPU). ``slurm``
writes ``ROOT/sweep.sbatch``, a job array with one task per unfinished point
(``SLURM_ARRAY_TASK_ID`` picks its overrides), and submits it. ``tpu`` runs the points on the
pods of ``--name a,b`` (round-robin; each pod runs its points in turn).
``--report`` writes ``ROOT/sweep.md`` and ``ROOT/sweep.json``: each run's status, last logged
step and loss, and the shapes GenEval overall (``eval/shapes_geneval.json``) where present.
``--quick`` uses the experiment's ``:quick`` variant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``launch`` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iomm_jax import PREEMPTED_EXIT_CODE  # noqa: E402
from launch import common, slurm, tpu  # noqa: E402


@dataclasses.dataclass
class Point:
  """One run of a sweep: its overrides, workdir and step count."""

  index: int
  slug: str
  workdir: str
  overrides: dict[str, Any]
  num_steps: int


def load_sweep(path: str) -> list[dict[str, Any]]:
  """``get_sweep()`` of the experiment file at ``path``, checked to be a list of override dicts."""
  module = common.load_module(path)
  if not hasattr(module, "get_sweep"):
    raise common.LaunchError(f"{path} defines no get_sweep()")
  points = module.get_sweep()
  if not isinstance(points, list) or not points:
    raise common.LaunchError(
      f"{path}: get_sweep() must return a non-empty list of override dicts, got {points!r}"
    )
  for i, point in enumerate(points):
    if not isinstance(point, dict) or not all(isinstance(k, str) for k in point):
      raise common.LaunchError(
        f"{path}: get_sweep() point {i} is {point!r}, not a dict of 'dotted.key': value overrides"
      )
  return points


def _short_names(keys: Sequence[str]) -> dict[str, str]:
  """Each key's last component, or the whole key where two keys share the last component."""
  last = [k.split(".")[-1] for k in keys]
  return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def _value(v: Any) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


def slug(overrides: dict[str, Any], names: dict[str, str]) -> str:
  """A readable folder name: ``{"optim.lr": 3e-4}`` -> ``lr=0.0003`` (``base`` for no overrides)."""
  if not overrides:
    return "base"
  parts = (f"{names[k]}={_value(v)}" for k, v in overrides.items())
  return ",".join(re.sub(r"[^A-Za-z0-9._=+-]+", "_", p) for p in parts)


def keys_of(points: Sequence[dict[str, Any]]) -> list[str]:
  """The swept keys, in order of first appearance."""
  return list(dict.fromkeys(k for p in points for k in p))


def plan(
  spec: str, root: str, flags: Sequence[tuple[str, str]], validate: bool = True
) -> list[Point]:
  """The sweep's runs; every point's config is loaded and validated here, before anything runs
  (a report, not launching anything, checks only keys and types)."""
  raw = load_sweep(spec.partition(":")[0])
  names = _short_names(keys_of(raw))
  out, seen = [], {}
  for i, over in enumerate(raw):
    try:
      config = common.check_config(spec, over, flags, validate)
    except common.LaunchError as e:
      raise common.LaunchError(f"get_sweep() point {i} {over!r}: {e}") from None
    name = slug(over, names)
    if name in seen:
      raise common.LaunchError(f"get_sweep() points {seen[name]} and {i} are the same run ({name})")
    seen[name] = i
    out.append(Point(i, name, os.path.join(root, name), dict(over), config.train.num_steps))
  return out


# ------------------------------------------------------------------------------- run state


def _saved_steps(workdir: str) -> list[int]:
  # iomm_jax.checkpointing.saved_steps without importing orbax/JAX: finished saves are the
  # step-numbered folders (orbax renames a step's folder to its number once it is complete).
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _num_steps(point: Point) -> int:
  """The step count the run was started with (its config.json), else the planned one."""
  path = os.path.join(point.workdir, "config.json")
  if os.path.exists(path):
    return int(_read_json(path)["train"]["num_steps"])
  return point.num_steps


def finished(point: Point) -> bool:
  """Whether the run saved its last step."""
  return _num_steps(point) in _saved_steps(point.workdir)


def row(point: Point, failed: bool = False) -> dict[str, Any]:
  """A run's report: status, last logged step and loss, GenEval overall where present."""
  wd = point.workdir
  recs = []
  path = os.path.join(wd, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      recs = [json.loads(line) for line in f if line.strip()]
  last = recs[-1] if recs else {}
  total = _num_steps(point)
  if total in _saved_steps(wd):
    status = "done"
  elif failed:
    status = "failed"
  elif recs or _saved_steps(wd):
    status = "unfinished"
  else:
    status = "not started"
  geneval = os.path.join(wd, "eval", "shapes_geneval.json")
  return {
    "run": point.slug,
    "workdir": wd,
    "overrides": point.overrides,
    "status": status,
    "step": last.get("step"),
    "num_steps": total,
    "loss": last.get("loss"),
    "geneval_overall": _read_json(geneval).get("overall") if os.path.exists(geneval) else None,
  }


def _cell(v: Any, fmt: str = "{:.4g}") -> str:
  if v is None:
    return "-"
  return fmt.format(v) if isinstance(v, float) else str(v)


def markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
  """The report table; unfinished runs are marked in the status column."""
  head = ["run", *keys, "status", "step", "loss", "geneval overall"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["run"], *(_cell(r["overrides"].get(k)) for k in keys)]
    status = r["status"] if r["status"] == "done" else f"**{r['status']}**"
    step = f"{_cell(r['step'])}/{r['num_steps']}"
    cells += [status, step, _cell(r["loss"]), _cell(r["geneval_overall"], "{:.3f}")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def report(spec: str, root: str, points: Sequence[Point], failed: Sequence[str] = ()) -> str:
  """Writes ``ROOT/sweep.md`` and ``ROOT/sweep.json``; returns (and prints) the table."""
  rows = [row(p, p.slug in failed) for p in points]
  table = markdown(rows, keys_of([p.overrides for p in points]))
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "sweep.md"), "w") as f:
    f.write(f"Sweep of `{spec}` under `{root}`.\n\n{table}")
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump({"config": spec, "root": root, "runs": rows}, f, indent=2)
  print(table, end="", flush=True)
  print(f"wrote {os.path.join(root, 'sweep.md')} and sweep.json", flush=True)
  return table


# ------------------------------------------------------------------------------------ modes


def _run_logged(cmd: Sequence[str], log: str) -> int:
  """Runs ``cmd``, echoing its output and appending it to ``log``; returns the exit status."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, "a") as f:
    f.write(f"$ {common.shell(cmd)}\n")
    proc = subprocess.Popen(
      list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    with _forward_sigterm(proc):  # the run checkpoints and exits PREEMPTED_EXIT_CODE
      for line in proc.stdout:
        sys.stdout.write(line)
        f.write(line)
      return proc.wait()


@contextlib.contextmanager
def _forward_sigterm(proc: subprocess.Popen):
  """While inside, a SIGTERM to the sweep is passed on to the running ``iomm-train``."""
  try:
    prev = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
  except ValueError:  # not the main thread: signals stay as they are
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, prev)


class _Tee(io.TextIOBase):
  """A text stream writing to several (the console and a run's train.log)."""

  def __init__(self, *streams):
    self.streams = streams

  def write(self, s: str) -> int:
    for st in self.streams:
      st.write(s)
    return len(s)

  def flush(self) -> None:
    for st in self.streams:
      st.flush()


def _run_in_process(spec, point: Point, config_flags, log: str) -> int:
  """Trains ``point`` in this process (what iomm-train would run); returns 0, 1 on an error
  (its traceback goes to the console and ``log``) or ``PREEMPTED_EXIT_CODE`` after a SIGTERM
  (the run saved a checkpoint)."""

  from iomm_jax import runtime
  from iomm_jax.train import finetune, loop, mllm, pretrain

  runtime.outside_absl()
  loops = {"mllm": mllm, "pretrain": pretrain, "finetune": finetune}
  config = common.check_config(spec, point.overrides, config_flags)
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, "a") as f:
    f.write(f"# in process: {spec} {point.overrides} {list(config_flags)}\n")
    tee_out, tee_err = _Tee(sys.stdout, f), _Tee(sys.stderr, f)
    with contextlib.redirect_stdout(tee_out), contextlib.redirect_stderr(tee_err):
      try:
        loops[config.stage].train_and_evaluate(config, point.workdir)
      except loop.Preempted as e:  # saved; the sweep stops (a rerun resumes this point)
        print(e, file=sys.stderr)
        return e.exit_code
      except Exception:  # a failed run is reported; the sweep goes on
        traceback.print_exc()
        return 1
  return 0


def run_local(spec, root, points, flags, dry_run: bool, config_flags=(), in_process=False) -> int:
  """Runs the unfinished points in sequence, then writes the report; 1 if any run failed,
  ``PREEMPTED_EXIT_CODE`` (75) if SIGTERM stopped one (it saved; no later point starts).

  Each point is an iomm-train process, or with ``in_process`` a call in this process (start-up,
  imports and JAX's op-by-op compilations are then paid once: for many short runs on CPU)."""
  failed = []
  for p in points:
    if finished(p):
      print(f"# skip {p.slug}: finished ({_num_steps(p)} steps)", flush=True)
      continue
    cmd = common.train_argv(spec, p.workdir, p.overrides, flags, exe=common.local_train_bin())
    print(common.shell(cmd), flush=True)
    if dry_run:
      continue
    log = os.path.join(p.workdir, "train.log")
    rc = _run_in_process(spec, p, config_flags, log) if in_process else _run_logged(cmd, log)
    if rc == PREEMPTED_EXIT_CODE:  # SIGTERM: the run saved; later points wait for a rerun
      print(
        f"# {p.slug} stopped by SIGTERM (checkpoint saved); the same command resumes the sweep",
        flush=True,
      )
      report(spec, root, points, failed)
      return PREEMPTED_EXIT_CODE
    if rc:
      failed.append(p.slug)
      print(f"# {p.slug} failed (exit {rc}); its output is in {p.workdir}/train.log", flush=True)
  if not dry_run:
    report(spec, root, points, failed)
  return 1 if failed else 0


def array_spec(indices: Sequence[int], max_parallel: int = 0) -> str:
  """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (plus ``%max_parallel``)."""
  parts, i = [], 0
  while i < len(indices):
    j = i
    while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
      j += 1
    parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
    i = j + 1
  return ",".join(parts) + (f"%{max_parallel}" if max_parallel else "")


def run_slurm(args, spec, root, points, flags) -> int:
  """A job array over the unfinished points: printed (--dry-run) or submitted."""
  todo = [p.index for p in points if not finished(p)]
  if not todo:
    print("# every run is finished", flush=True)
    return 0
  runs = [(p.workdir, [common.override_flag(k, v) for k, v in p.overrides.items()]) for p in points]
  text = slurm.script(
    slurm.job_from_args(args),
    spec,
    runs,
    flags,
    output=os.path.join(root, "slurm-%A_%a.out"),
    array=array_spec(todo, args.max_parallel),
  )
  if args.dry_run:
    print(text, end="")
    return 0
  return slurm.submit(text, os.path.join(root, "sweep.sbatch"), root)


def tpu_commands(args, spec, points, flags) -> dict[str, list[list[str]]]:
  """Per pod: set-up (unless --no-setup), then its share of the unfinished points, in turn."""
  pods = tpu.pods_from_args(args)
  out = {pod.name: [] if args.no_setup else tpu.setup_commands(pod) for pod in pods}
  todo = [p for p in points if not finished(p)]
  for i, p in enumerate(todo):
    pod = pods[i % len(pods)]
    train = common.train_argv(common.repo_spec(spec), p.workdir, p.overrides, flags)
    out[pod.name].append(tpu.run_command(pod, train))
  return out


def run_tpu(args, spec, points, flags) -> int:
  """Prints (--dry-run) or runs each pod's commands; pods run side by side."""
  per_pod = tpu_commands(args, spec, points, flags)
  if args.dry_run:
    for name, commands in per_pod.items():
      print(f"# pod {name}")
      print("\n".join(common.shell(c) for c in commands))
    return 0
  codes = {}
  threads = [
    threading.Thread(target=lambda n=n, c=c: codes.__setitem__(n, tpu.execute(c)))
    for n, c in per_pod.items()
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return max(codes.values(), default=0)


def main(argv: Sequence[str] | None = None) -> int:
  """Plans the sweep (checking every point), then runs, submits or reports it."""
  p = common.parser(__doc__, "launch/sweep.py")
  p.add_argument("--quick", action="store_true", help="the experiment's :quick variant")
  p.add_argument("--mode", choices=("local", "slurm", "tpu"), default="local")
  p.add_argument("--report", action="store_true", help="only write the table of the runs")
  p.add_argument(
    "--in-process", action="store_true", help="local: train in this process, not iomm-train"
  )
  p.add_argument("--max-parallel", type=int, default=0, help="SLURM: array tasks at once")
  slurm.add_job_args(p)
  tpu.add_pod_args(p)
  args = common.parse(p, argv)
  spec = common.with_quick(args.config, args.quick)
  # a job runs from the repository (SLURM) or a copy of it (TPU): its workdirs are absolute
  root = args.workdir if args.mode == "local" else os.path.abspath(args.workdir)
  points = plan(spec, root, args.config_flags, validate=not args.report)
  if args.report:
    report(spec, root, points)
    return 0
  done = sum(finished(q) for q in points)
  print(f"# sweep of {spec}: {len(points)} runs under {root} ({done} finished)", flush=True)
  if args.mode == "slurm":
    return run_slurm(args, spec, root, points, args.flags)
  if args.mode == "tpu":
    return run_tpu(args, spec, points, args.flags)
  return run_local(spec, root, points, args.flags, args.dry_run, args.config_flags, args.in_process)


if __name__ == "__main__":
  sys.exit(common.run_main(main))
