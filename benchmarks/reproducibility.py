"""Is training bit-identical, and across what? (issue 16: two ``iomm-demo`` runs "on the same
machine kind" gave different stage-1 losses and scores.)

  python benchmarks/reproducibility.py [--steps 150] [--s0-steps 100] [--root runs/repro] \
      [--variants base repeat cold nocache 1core avx2 sse4_2 ...] [--eval-per-category 0]

Trains the demo's stage 0 (``experiments/shapes/mllm.py``) once for ``--s0-steps``, then the
demo's stage 1 (``experiments/shapes/pretrain.py`` on that MLLM, as ``iomm-demo`` does, with the
grid sample off) for ``--steps`` in one fresh workdir per variant, each in its own subprocess so
that environment variables (``XLA_FLAGS``, the compilation cache, CPU affinity) take effect
before JAX starts. Every ``--log-every`` steps' loss is compared with the ``base`` variant's, and
the final parameters (and EMA and optimiser state) are hashed. ``s0repeat`` trains stage 0 a
second time and compares it with the first.

Variants (``--variants``; ``base`` always runs first):
  base       default environment, the run's own compilation cache (cold for stage 1 the first time)
  repeat     as base, again: same process settings, cache now warm
  cold       a fresh, empty persistent compilation cache directory
  nocache    the persistent compilation cache off (IOMM_COMPILATION_CACHE="")
  1core      pinned to one CPU (``taskset -c 0``): XLA's intra-op thread pool has one thread
  eigen1     XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
  eigen1_1core  eigen1 pinned to one CPU
  noynn      XLA:CPU's YNNPACK dot fusions off; noynn_1core: the same on one CPU
  avx2       XLA_FLAGS=--xla_cpu_max_isa=AVX2 (code generated as for a host without AVX-512)
  sse4_2     XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 (positive control: 128-bit vectors)
  vec128     XLA_FLAGS=--xla_cpu_prefer_vector_width=128
  workers    config.data.num_workers=2 (grain multiprocessing prefetch)
  threads    config.data.read_threads=2 (grain reader threads)
  s0repeat   stage 0 trained again in a new workdir (compared with the first stage 0)

Prints one table: variant | first loss | last loss | max |delta loss| vs base | hashes equal?
| (for a ``<v>_1core`` variant whose ``<v>`` ran) final parameters equal to its 2-CPU twin?
and writes it with every record to ``--root/results.json``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments", "shapes")

NOYNN = "--xla_cpu_experimental_ynn_fusion_type="  # XLA:CPU's YNNPACK fusions (dots) off
ONE_CPU = ["taskset", "-c", "0"]

# name -> (stage, extra environment, command prefix, config overrides)
VARIANTS: dict[str, tuple[int, dict[str, str], list[str], dict]] = {
  "base": (1, {}, [], {}),
  "repeat": (1, {}, [], {}),
  "cold": (1, {"IOMM_COMPILATION_CACHE": "<fresh>"}, [], {}),
  "nocache": (1, {"IOMM_COMPILATION_CACHE": ""}, [], {}),
  "1core": (1, {}, ONE_CPU, {}),
  "1core_cold": (1, {"IOMM_COMPILATION_CACHE": "<fresh>"}, ONE_CPU, {}),
  "eigen1": (1, {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}, [], {}),
  "eigen1_1core": (1, {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}, ONE_CPU, {}),
  "avx2": (1, {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}, [], {}),
  "sse4_2": (1, {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}, [], {}),
  "vec128": (1, {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=128"}, [], {}),
  "noynn": (1, {"XLA_FLAGS": NOYNN}, [], {}),
  "noynn_1core": (1, {"XLA_FLAGS": NOYNN}, ONE_CPU, {}),
  "workers": (1, {}, [], {"data.num_workers": 2}),
  "threads": (1, {}, [], {"data.read_threads": 2}),
  "s0repeat": (0, {}, [], {}),
  "s0_1core": (0, {}, ONE_CPU, {}),
}
DEFAULT_VARIANTS = [
  "base",
  "repeat",
  "cold",
  "nocache",
  "1core",
  "avx2",
  "sse4_2",
  "noynn",
  "noynn_1core",
  "s0repeat",
  "s0_1core",
]


# ----------------------------------------------------------------------------- worker (subprocess)


def tree_hash(tree) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (host copies), in tree order."""
  import jax
  import numpy as np

  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    if jax.dtypes.issubdtype(
      np.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype, jax.dtypes.prng_key
    ):
      leaf = jax.random.key_data(leaf)
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def worker(spec: dict) -> None:
  """Trains one stage in ``spec["workdir"]`` and writes its record to ``spec["out"]``."""

  from iomm_jax import runtime

  runtime.outside_absl(quiet=True, cache=False)
  import jax

  from iomm_jax import metrics, runtime
  from iomm_jax.configs import loading
  from iomm_jax.train import loop, mllm, pretrain

  cache = runtime.enable_compilation_cache()
  cache_before = _count_files(cache)
  config = loading.load_config(
    os.path.join(EXPERIMENTS, f"{spec['experiment']}.py"), spec["overrides"]
  )
  setup = {"mllm": mllm.setup, "pretrain": pretrain.setup}[config.stage]
  t = time.time()
  run = setup(config, spec["workdir"])
  loop.run(run)
  wall = time.time() - t
  state = run.state
  recs = metrics.read_metrics(spec["workdir"])
  record = {
    "losses": [[r["step"], r["loss"]] for r in recs],
    "params": tree_hash(state.params),
    "ema": tree_hash(state.ema) if state.ema is not None else None,
    "opt_state": tree_hash(state.opt_state),
    "wall_s": wall,
    "cpus": len(os.sched_getaffinity(0)),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "cache": cache,
    "cache_files_before": cache_before,
    "cache_files_after": _count_files(cache),
    "jax": jax.__version__,
    "device": str(jax.devices()[0]),
  }
  with open(spec["out"], "w") as f:
    json.dump(record, f)


def _count_files(path: str | None) -> int | None:
  if not path or not os.path.isdir(path):
    return None
  return sum(len(files) for _, _, files in os.walk(path))


# ----------------------------------------------------------------------------- driver


def _spawn(name: str, spec: dict, env_extra: dict, prefix: list[str], log_dir: str) -> dict:
  env = dict(os.environ)
  env.update(env_extra)
  spec_path = os.path.join(log_dir, f"{name}.spec.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  cmd = [*prefix, sys.executable, os.path.abspath(__file__), "--_worker", spec_path]
  t = time.time()
  with open(os.path.join(log_dir, f"{name}.log"), "w") as log:
    rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
  if rc != 0:
    raise RuntimeError(f"variant {name} failed (exit {rc}); see {log_dir}/{name}.log")
  with open(spec["out"]) as f:
    rec = json.load(f)
  rec["process_s"] = time.time() - t
  return rec


def _compare(rec: dict, ref: dict) -> dict:
  ref_l = dict((s, v) for s, v in ref["losses"])
  common = [(s, v) for s, v in rec["losses"] if s in ref_l]
  deltas = [abs(v - ref_l[s]) for s, v in common]
  return {
    "compared_steps": len(common),
    "max_abs_delta": max(deltas) if deltas else float("nan"),
    "first_diff_step": next((s for s, v in common if v != ref_l[s]), None),
    "params_equal": rec["params"] == ref["params"],
    "ema_equal": rec["ema"] == ref["ema"],
    "opt_equal": rec["opt_state"] == ref["opt_state"],
  }


def _evaluate(workdir: str, per_category: int) -> float:
  """Overall shapes-GenEval score of a stage-1 workdir (as the demo scores it, fewer images)."""
  code = (
    "import json,sys\n"
    "from iomm_jax import runtime; runtime.outside_absl()\n"
    "from iomm_jax.cli import demo\n"
    f"ev = demo.evaluate({workdir!r}, {per_category})\n"
    "print('OVERALL', json.dumps(ev.report['overall']))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
  ).stdout
  return json.loads(out.split("OVERALL", 1)[1].strip().splitlines()[0])


def _fmt_overall(v) -> str:
  if isinstance(v, dict):
    v = v.get("mean", v.get("score", v))
  if isinstance(v, (list, tuple)):
    v = v[0]
  return f"{v:.3f}" if isinstance(v, (int, float)) else str(v)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--_worker", help=argparse.SUPPRESS)
  p.add_argument("--steps", type=int, default=150, help="stage-1 steps per variant")
  p.add_argument("--s0-steps", type=int, default=100, help="stage-0 steps (trained once)")
  p.add_argument("--log-every", type=int, default=10)
  p.add_argument("--root", "--workdir", dest="root", default="runs/repro")
  p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
  p.add_argument(
    "--eval-per-category",
    type=int,
    default=0,
    help="also score each stage-1 variant with the shapes GenEval (images per category; 0: off)",
  )
  a = p.parse_args()
  if a._worker:
    with open(a._worker) as f:
      worker(json.load(f))
    return

  root = os.path.abspath(a.root)
  if os.path.exists(root):
    shutil.rmtree(root)
  logs = os.path.join(root, "logs")
  os.makedirs(logs)
  cache = os.path.join(root, "xla_cache")  # this run's own cache: nothing from earlier runs
  base_env = {"IOMM_COMPILATION_CACHE": cache}
  t0 = time.time()

  def spec(name: str, experiment: str, overrides: dict) -> dict:
    return {
      "experiment": experiment,
      "workdir": os.path.join(root, name),
      "out": os.path.join(logs, f"{name}.json"),
      "overrides": overrides,
    }

  s0_over = {"train.num_steps": a.s0_steps, "train.log_every": a.log_every}
  s0 = _spawn("mllm", spec("mllm", "mllm", s0_over), base_env, [], logs)
  print(f"stage 0: {a.s0_steps} steps in {s0['process_s']:.0f} s", flush=True)
  s1_over = {
    "model.mllm_from": os.path.join(root, "mllm"),
    "train.num_steps": a.steps,
    "train.log_every": a.log_every,
    "sample.num_grid": 0,
  }
  variants = ["base"] + [v for v in a.variants if v != "base"]
  recs: dict[str, dict] = {}
  for name in variants:
    stage, env_extra, prefix, over = VARIANTS[name]
    env = {**base_env, **env_extra}
    if env.get("IOMM_COMPILATION_CACHE") == "<fresh>":
      env["IOMM_COMPILATION_CACHE"] = os.path.join(root, f"xla_cache_{name}")
    if stage == 0:  # stage 0 again, compared with the first
      rec = _spawn(name, spec(name, "mllm", {**s0_over, **over}), env, prefix, logs)
      rec["stage"] = 0
      rec.update(_compare(rec, s0))
    else:  # stage 1 on the first stage 0, compared with base
      rec = _spawn(name, spec(name, "pretrain", {**s1_over, **over}), env, prefix, logs)
      rec["stage"] = 1
      rec.update(_compare(rec, recs.get("base", rec)))
      if a.eval_per_category:
        rec["overall"] = _evaluate(os.path.join(root, name), a.eval_per_category)
    recs[name] = rec
    print(f"  {name}: {rec['process_s']:.0f} s", flush=True)

  for name, r in recs.items():  # X_1core against X: does the CPU count matter under X's flags?
    twin = name.removesuffix("_1core")
    if twin != name and twin in recs:
      r["twin"], r["twin_equal"] = twin, r["params"] == recs[twin]["params"]
  header = (
    "| variant | stage | cpus | XLA_FLAGS | cache files before | first loss | last loss | "
    "max abs delta loss vs base | first differing step | params / EMA / opt hash equal | "
    "params equal to the 2-CPU twin |"
  )
  if a.eval_per_category:
    header += " overall score |"
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for name, r in recs.items():
    eq = "/".join("yes" if r[k] else "no" for k in ("params_equal", "ema_equal", "opt_equal"))
    vs = "stage-0 first run" if r["stage"] == 0 else ("(itself)" if name == "base" else "base")
    row = (
      f"| {name} | {r['stage']} | {r['cpus']} | {r['xla_flags'] or '-'} | "
      f"{r['cache_files_before'] if r['cache'] else 'off'} | {r['losses'][0][1]:.6f} | "
      f"{r['losses'][-1][1]:.6f} | {r['max_abs_delta']:.2e} (vs {vs}) | "
      f"{r['first_diff_step'] or '-'} | {eq} | "
      + (f"{'yes' if r['twin_equal'] else 'no'} ({r['twin']}) |" if "twin" in r else "- |")
    )
    if a.eval_per_category:
      row += f" {_fmt_overall(r.get('overall', '-'))} |"
    lines.append(row)
  table = "\n".join(lines)
  info = (
    f"{datetime.date.today()}, {platform.node()}, nproc {os.cpu_count()}, "
    f"{_cpu_model()}, jax {s0['jax']}, stage 0 {a.s0_steps} steps, stage 1 {a.steps} steps, "
    f"losses every {a.log_every} steps, total {time.time() - t0:.0f} s"
  )
  print(info)
  print(table)
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump({"info": info, "table": table, "stage0": s0, "variants": recs}, f, indent=1)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


if __name__ == "__main__":
  main()
