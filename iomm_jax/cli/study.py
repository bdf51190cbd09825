"""The paper's recipe study in miniature, on the shapes world (paper.md §4; issue 3).

A *question* is a list of ``Arm``s; every arm trains a stage-1-like run and a stage-2 run from
the shapes experiment files at one ``Scale`` (equal steps across arms), for several seeds, then
scores the stage-2 model with the shapes GenEval (``eval.shapes_geneval``). ``run_question``
returns per-arm means and spreads; ``main`` is the command line of the scripts under
``experiments/shapes/study/``, which also writes the table into docs/RESULTS.md and a PNG plot.

Work is cached and resumable: one stage-0 MLLM serves the whole study (it stands in for the
off-the-shelf InternVL3), a stage-1 run is shared by every arm (and question) that asks for the
same one (overrides equal to the experiment file's defaults do not make a new run), a stage-2
arm whose config equals a finished arm of another question links to it, and finished runs and
evaluations are reused when a script is re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import time
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from iomm_jax import checkpointing, files, inference
from iomm_jax.configs import loading
from iomm_jax.eval import shapes_editing, shapes_geneval
from iomm_jax.train import finetune, mllm, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repository
EXPERIMENTS = os.path.join(ROOT, "experiments", "shapes")


@dataclasses.dataclass(frozen=True)
class Scale:
  """How big every arm is: stage-0, stage-1 and stage-2 steps, and evaluation images."""

  name: str
  mllm_steps: int
  pretrain_steps: int
  finetune_steps: int
  eval_per_category: int  # images per GenEval category (``shapes_geneval.evaluate``)
  edits_per_kind: int  # zero-shot editing tasks per kind (question 7)
  quick: bool = False  # the experiment files' ``:quick`` variants (CI miniature)


SCALES = {
  "quick": Scale("quick", 6, 6, 6, 2, 2, quick=True),
  "small": Scale("small", 300, 600, 600, 32, 32),
  "study": Scale("study", 300, 1800, 1800, 64, 64),
  "demo": Scale("demo", 300, 1800, 3300, 64, 64),
}


@dataclasses.dataclass(frozen=True)
class Arm:
  """One point of a question.

  pretrain: "image" (stage 1: image-only, masked self-conditioning), "pair" (the stage-2 loop
    on text-image pairs only, lambda = 0, from scratch, stage-1 steps and batch) or None (no
    pre-training: stage 2 starts from a random init).
  both / pretrain_overrides / finetune_overrides: dotted config overrides of both stages / one.
  """

  name: str
  pretrain: str | None = "image"
  both: tuple[tuple[str, Any], ...] = ()
  pretrain_overrides: tuple[tuple[str, Any], ...] = ()
  finetune_overrides: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.pretrain not in ("image", "pair", None):
      raise ValueError(f"Arm {self.name!r}: pretrain={self.pretrain!r} not 'image', 'pair' or None")


def _spec(name: str, scale: Scale, steps: int) -> str:
  path = os.path.join(EXPERIMENTS, f"{name}.py")
  return f"{path}:quick" if scale.quick else f"{path}:steps={steps}"


def _slug(items: tuple[tuple[str, Any], ...]) -> str:
  return "-".join(re.sub(r"[^A-Za-z0-9.]+", "_", f"{k.split('.')[-1]}={v}") for k, v in items)


def _config(name: str, scale: Scale, steps: int, overrides: dict[str, Any] | None = None):
  """One run's config at ``scale`` (the CI miniature samples no training-time grids: the study
  reads only the evaluation)."""
  extra = {"sample.num_grid": 0} if scale.quick else {}
  return loading.load_config(_spec(name, scale, steps), {**(overrides or {}), **extra})


def _finished(workdir: str, num_steps: int) -> bool:
  return num_steps in checkpointing.saved_steps(workdir)


def _train(stage_fn, config, workdir: str) -> None:
  if not _finished(workdir, config.train.num_steps):
    stage_fn(config, workdir)


def _non_default(spec: str, items: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
  """The overrides that change the experiment file's config (a run asked for with a default
  value is the same run as one asked for without it, and is shared)."""
  base = loading.load_config(spec)
  out = []
  for key, value in items:
    node = base
    for part in key.split("."):
      node = node[part]
    if node != value:
      out.append((key, value))
  return tuple(out)


def _with_defaults(saved: dict, defaults: dict) -> dict:
  """A saved config with the keys it lacks (added to the project after it ran) at ``defaults``."""
  out = dict(defaults)
  for k, v in saved.items():
    out[k] = (
      _with_defaults(v, defaults[k])
      if isinstance(v, dict) and isinstance(defaults.get(k), dict)
      else v
    )
  return out


def _same_run(root: str, wd: str, config, defaults) -> str | None:
  """A finished stage-2 run elsewhere under ``root`` with exactly this config (another
  question's arm that is the same experiment), or None. A config key added to the project since
  that run counts as equal when this config leaves it at ``defaults`` (the experiment file's)."""
  want, base = json.loads(config.to_json()), json.loads(defaults.to_json())
  loading.absolute_paths(want)  # workdirs store their paths absolute (workdirs.prepare_workdir)
  for question in sorted(os.listdir(root)):
    qdir = os.path.join(root, question)
    if not os.path.isdir(qdir) or question in ("mllm", "pretrain"):
      continue
    for name in sorted(os.listdir(qdir)):
      other = os.path.join(qdir, name)
      path = os.path.join(other, "config.json")
      if other == wd or os.path.islink(other) or not os.path.exists(path):
        continue
      with open(path) as f:
        saved = json.load(f)
      loading.absolute_paths(saved)  # older workdirs: relative to where their study ran
      if _with_defaults(saved, base) == want and _finished(other, config.train.num_steps):
        return other
  return None


def mllm_dir(root: str, scale: Scale, train: bool = True) -> str:
  """Trains (once) the study's frozen stage-0 MLLM; returns its workdir."""
  wd = os.path.join(root, "mllm")
  if train:
    _train(mllm.train_and_evaluate, _config("mllm", scale, scale.mllm_steps), wd)
  return wd


def _pretrain_run(arm: Arm, seed: int, scale: Scale, root: str, mllm_from: str):
  """The arm's pre-training run: ``(workdir, config, stage entry point)``, None if it has none."""
  if arm.pretrain is None:
    return None
  spec = _spec("pretrain" if arm.pretrain == "image" else "finetune", scale, scale.pretrain_steps)
  items = _non_default(spec, arm.both + arm.pretrain_overrides)
  wd = os.path.join(
    root, "pretrain", "-".join(filter(None, [arm.pretrain, _slug(items)])) + f"-s{seed}"
  )
  common = {"seed": seed, "model.mllm_from": mllm_from, **dict(items)}
  if arm.pretrain == "image":
    return wd, _config("pretrain", scale, scale.pretrain_steps, common), pretrain.train_and_evaluate
  # pairs only: the stage-2 loop with lambda = 0, at stage 1's steps and batch
  batch = loading.load_config(_spec("pretrain", scale, scale.pretrain_steps)).train.batch_size
  c = _config(
    "finetune",
    scale,
    scale.pretrain_steps,
    {**common, "diffusion.mix_ratio": 0.0, "train.init_from": "scratch", "train.batch_size": batch},
  )
  return wd, c, finetune.train_and_evaluate


def pretrain_dir(arm: Arm, seed: int, scale: Scale, root: str, mllm_from: str) -> str | None:
  """Trains (or reuses) the arm's pre-training run; None if the arm has none."""
  run = _pretrain_run(arm, seed, scale, root, mllm_from)
  if run is None:
    return None
  wd, config, stage_fn = run
  _train(stage_fn, config, wd)
  return wd


def _finetune_run(arm: Arm, seed: int, scale: Scale, root: str, question: str, mllm_from, src):
  """The arm's stage-2 run: ``(workdir, config)``."""
  wd = os.path.join(root, question, f"{_slug((('arm', arm.name),))}-s{seed}")
  overrides = {
    "seed": seed,
    "model.mllm_from": mllm_from,
    "train.init_from": src or "scratch",
    **dict(arm.both + arm.finetune_overrides),
  }
  return wd, _config("finetune", scale, scale.finetune_steps, overrides)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Everything that decides an arm's result for one seed: the resolved configs of its stage 0,
  stage 1 and stage 2 (run paths replaced by fixed placeholders) and the metric's protocol,
  with the experiment files' defaults of each stage. A ledger entry counts only while its
  recipe matches the current one: a change to an experiment file, the scale or an arm makes
  old results stale instead of silently mixed in, while a config key added to the project
  since counts as equal when the current config leaves it at the experiment file's default
  (the rule of ``_same_run``)."""

  configs: dict[str, Any]
  defaults: tuple[dict, ...]

  def matches(self, saved: dict[str, Any]) -> bool:
    mine, theirs = self.configs, saved
    if {k: v for k, v in mine.items() if k != "stages"} != {
      k: v for k, v in theirs.items() if k != "stages"
    } or len(mine["stages"]) != len(theirs["stages"]):
      return False
    return all(
      _with_defaults(t, d) == m
      for m, t, d in zip(mine["stages"], theirs["stages"], self.defaults, strict=True)
    )


def recipe(arm: Arm, seed: int, scale: Scale, metric: str) -> Recipe:
  """The ``Recipe`` of ``arm`` at ``seed`` (configs built, nothing trained)."""
  root = "/ledger"
  mllm_from = mllm_dir(root, scale, train=False)
  as_dict = lambda c: json.loads(c.to_json())  # noqa: E731
  m = as_dict(_config("mllm", scale, scale.mllm_steps))
  stages, defaults = [m], [m]
  pre = _pretrain_run(arm, seed, scale, root, mllm_from)
  if pre is not None:
    stages.append(as_dict(pre[1]))
    name = "pretrain" if arm.pretrain == "image" else "finetune"
    defaults.append(as_dict(_config(name, scale, scale.pretrain_steps, {})))
  if metric != "reconstruction":
    src = pre[0] if pre is not None else None
    stages.append(as_dict(_finetune_run(arm, seed, scale, root, "q", mllm_from, src)[1]))
    defaults.append(as_dict(_config("finetune", scale, scale.finetune_steps, {})))
  n = scale.eval_per_category if metric == "geneval" else scale.edits_per_kind
  v = 3 if metric == "editing" else 1  # the protocol's version (editing: v3, noise per task)
  return Recipe({"stages": stages, "metric": metric, "n": n, "v": v}, tuple(defaults))


METRICS = ("geneval", "editing", "reconstruction")
# what each metric's headline number is (the tables' second column)
HEADLINES = {
  "geneval": "overall",
  "editing": "edit success",
  "reconstruction": "stage-1 reconstruction at r = 0",
}


def _evaluate(wd: str, scale: Scale, metric: str) -> dict[str, Any]:
  """A finished run's report (cached in its eval/ folder): ``overall`` plus a flat
  ``categories`` dict, for the shapes GenEval or zero-shot editing (of a stage-2 run) or the
  reconstruction control (of a stage-1 run: preservation of the source's objects when it is
  its own condition, unmasked or masked)."""
  n = scale.eval_per_category if metric == "geneval" else scale.edits_per_kind
  # v2 of the editing report adds the reconstruction control (v3: noise per task, that of
  # iomm-edit), "pc" the per-category GenEval
  # protocol of shapes_geneval.evaluate (older caches are recomputed)
  name = {
    "geneval": f"study_geneval_pc{n}.json",
    "editing": f"study_editing_v3_{n}.json",
    "reconstruction": f"study_reconstruction_{n}.json",
  }[metric]
  path = os.path.join(wd, "eval", name)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config, ctx, params = inference.load_generator(wd)
  if metric == "geneval":  # the score iomm-eval gives (per_category n, seed 0), with verdicts
    ev = shapes_geneval.evaluate(config, ctx, params, per_category=n, seed=0)
    report = {**ev.report, "correct": [bool(c) for c in ev.correct],
              "tags": [m["tag"] for m in ev.metas],
              "prompts": [m["prompt"] for m in ev.metas]}  # fmt: skip
  elif metric == "reconstruction":
    r = shapes_editing.reconstruct(config, ctx, params, n, seed=0)
    cats = {f"{k} {m}": v[m] for k, v in r.items() for m in ("preservation", "exact")}
    report = {"overall": r["r=0.0"]["preservation"], "categories": cats, "raw": r}
  else:
    r = shapes_editing.evaluate(config, ctx, params, per_kind=n, seed=0)
    cats = {f"{k} success": v["success"] for k, v in r["kinds"].items()}
    cats.update({f"{k} preservation": v["preservation"] for k, v in r["kinds"].items()})
    cats.update({f"reconstruct {k}": v["preservation"] for k, v in r["reconstruction"].items()})
    report = {"overall": r["success"], "categories": cats, "raw": r}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  checkpointing.save_json(path, report)
  return report


def run_arm(
  arm: Arm, seed: int, scale: Scale, root: str, question: str, metric: str = "geneval"
) -> dict[str, Any]:
  """Trains an arm's two stages for one seed (runs live under ``root/question``) and returns
  the stage-2 model's report for ``metric`` (for ``reconstruction``, the stage-1 model's: no
  stage 2 is trained)."""
  mllm_from = mllm_dir(root, scale)
  src = pretrain_dir(arm, seed, scale, root, mllm_from)
  if metric == "reconstruction":
    if src is None or arm.pretrain != "image":
      raise ValueError(f"arm {arm.name!r}: the reconstruction metric needs an image-only stage 1")
    return _evaluate(src, scale, metric)
  wd, c = _finetune_run(arm, seed, scale, root, question, mllm_from, src)
  if not os.path.exists(wd) and (
    same := _same_run(root, wd, c, _config("finetune", scale, scale.finetune_steps, {}))
  ):
    os.makedirs(os.path.dirname(wd), exist_ok=True)
    os.symlink(os.path.relpath(same, os.path.dirname(wd)), wd)  # one run, two questions
  _train(finetune.train_and_evaluate, c, wd)
  return _evaluate(wd, scale, metric)


class Ledger:
  """The results a study has measured, kept in the repository (``docs/study/ledger/``, one
  JSON per question and scale) so that a question's table can grow over several sessions: one
  entry per arm and seed, holding the report (with its per-image verdicts, which the paired
  contrasts need), the run's ``Recipe`` configs, and where and when it was measured. An entry
  whose recipe does not match the current one is stale: it is neither reused nor tabulated. An
  entry of another question with a matching recipe is the same experiment (Q2's r = 0.85 is
  Q1's Image->Mix) and is reused."""

  def __init__(self, directory: str, name: str):
    self.directory, self.path = directory, os.path.join(directory, f"{name}.json")
    self.entries: dict[str, dict[str, dict[str, Any]]] = self._load(self.path)

  @staticmethod
  def _load(path: str) -> dict:
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return json.load(f)

  def get(self, arm: str, seed: int, r: Recipe) -> dict[str, Any] | None:
    e = self.entries.get(arm, {}).get(str(seed))
    if e is not None and r.matches(e["recipe"]):
      return e["report"]
    others = (
      sorted(f for f in os.listdir(self.directory) if f.endswith(".json"))
      if os.path.isdir(self.directory)
      else []
    )
    for f in others:
      for by_seed in self._load(os.path.join(self.directory, f)).values():
        for e in by_seed.values():
          if r.matches(e["recipe"]):
            self.put(arm, seed, r, e["report"], e)
            return e["report"]
    return None

  def put(self, arm: str, seed: int, r: Recipe, report: dict[str, Any], source=None) -> None:
    """Records a result (``source``: the entry of another question it was taken from)."""
    where = source or {
      "date": str(datetime.date.today()),
      "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
      "commit": _commit(),
    }
    self.entries.setdefault(arm, {})[str(seed)] = {
      **{k: where[k] for k in ("date", "host", "commit")},
      "recipe": r.configs,
      "report": report,
    }
    os.makedirs(self.directory, exist_ok=True)
    checkpointing.save_json(self.path, self.entries)

  def current(self, arms: list[Arm], scale: Scale, metric: str) -> dict[str, dict[int, dict]]:
    """arm name -> seed -> entry, for the entries that are not stale, in ``arms``' order."""
    out = {}
    for arm in arms:
      seeds = {}
      for seed, e in sorted(self.entries.get(arm.name, {}).items(), key=lambda kv: int(kv[0])):
        if recipe(arm, int(seed), scale, metric).matches(e["recipe"]):
          seeds[int(seed)] = e
      if seeds:
        out[arm.name] = seeds
    return out


def _commit() -> str:
  """The checkout's commit (with ``+`` when it has uncommitted changes), or "unknown"."""
  try:
    run = lambda *a: subprocess.run(
      ["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    return run("rev-parse", "--short", "HEAD") + ("+" if run("status", "--porcelain") else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def summarise(reports: list[dict[str, Any]], seeds: list[int] | None = None) -> dict[str, Any]:
  """Mean and standard deviation (over seeds) of the overall and per-category scores; with the
  per-image verdicts of the GenEval reports also their ``correct`` lists (one per seed, in the
  order of ``seed_ids``)."""
  overall = np.array([r["overall"] for r in reports])
  cats = list(reports[0]["categories"])
  out = {
    "overall_mean": float(overall.mean()),
    "overall_std": float(overall.std(ddof=1)) if len(overall) > 1 else 0.0,
    "overall": overall.tolist(),
    "categories": {c: float(np.mean([r["categories"][c] for r in reports])) for c in cats},
    "seeds": len(reports),
    "seed_ids": list(seeds) if seeds is not None else list(range(len(reports))),
  }
  if all("correct" in r for r in reports):
    out["correct"] = [r["correct"] for r in reports]
    out["tags"] = reports[0]["tags"]
    if all("prompts" in r for r in reports):
      out["prompts"] = reports[0]["prompts"]
    if all("empty" in r for r in reports):
      out["empty"] = float(np.mean([r["empty"] for r in reports]))
  return out


@dataclasses.dataclass(frozen=True)
class Contrast:
  """One of the paper's comparisons: arm ``a`` minus arm ``b`` (overall GenEval)."""

  name: str
  a: str
  b: str


def contrast(results: dict[str, dict[str, Any]], c: Contrast) -> dict[str, Any]:
  """``c.a`` minus ``c.b`` as a paired difference: each seed's two models are scored on the same
  prompts and noise, so per seed the difference and its paired standard error over images
  (``shapes_geneval``'s category-mean rule) are exact; over seeds the mean difference carries the
  larger of two errors, the spread of the per-seed differences (training randomness and image
  noise together, from few seeds) and the pooled image-level error (image noise alone)."""
  ra, rb = results[c.a], results[c.b]
  if "correct" not in ra or "correct" not in rb:
    raise ValueError(f"contrast {c.name!r}: both arms need per-image verdicts (GenEval reports)")
  if ra["tags"] != rb["tags"]:
    raise ValueError(f"contrast {c.name!r}: the arms were scored on different categories")
  # the prompts, where both reports carry them (caches from before the key: the tags alone)
  pa, pb = ra.get("prompts"), rb.get("prompts")
  if pa is None or pb is None:
    pa = pb = ra["tags"]
  metas_a = [{"tag": t, "prompt": p} for t, p in zip(ra["tags"], pa, strict=True)]
  metas_b = [{"tag": t, "prompt": p} for t, p in zip(rb["tags"], pb, strict=True)]
  # the seeds both arms ran (a ledger may hold more seeds of one arm than of the other)
  ia, ib = (
    ra.get("seed_ids", range(len(ra["correct"]))),
    rb.get("seed_ids", range(len(rb["correct"]))),
  )
  common = [s for s in ia if s in set(ib)]
  if not common:
    raise ValueError(f"contrast {c.name!r}: the arms share no seed")
  pairs = [(ra["correct"][list(ia).index(s)], rb["correct"][list(ib).index(s)]) for s in common]
  per_seed, image_se = [], []
  for ca, cb in pairs:
    d = shapes_geneval.compare(
      shapes_geneval.Evaluation({}, None, metas_b, cb),
      shapes_geneval.Evaluation({}, None, metas_a, ca),
    )
    per_seed.append(d["difference"])
    image_se.append(d["se"])
  n = len(per_seed)
  mean = float(np.mean(per_seed))
  seed_se = float(np.std(per_seed, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
  pooled_se = float(np.sqrt(np.sum(np.square(image_se))) / n)
  se = pooled_se if not np.isfinite(seed_se) else max(seed_se, pooled_se)
  return {
    "name": c.name,
    "a": c.a,
    "b": c.b,
    "difference": mean,
    "se": se,
    "z": mean / se if se > 0 else float("nan"),
    "seed_se": seed_se,
    "image_se": pooled_se,
    "per_seed": per_seed,
    "per_seed_image_se": image_se,
    "seeds": common,
  }


def contrast_table(results: dict[str, dict[str, Any]], contrasts: list[Contrast]) -> str:
  """Markdown: each contrast's paired difference, its error, z and the per-seed differences."""
  lines = [
    "| contrast | difference ± SE | z | per seed (± paired image SE) |",
    "|---|---|---|---|",
  ]
  for c in contrasts:
    r = contrast(results, c)
    seeds = ", ".join(
      f"{d:+.3f} ± {e:.3f}" for d, e in zip(r["per_seed"], r["per_seed_image_se"], strict=True)
    )
    lines.append(
      f"| {c.name}: {c.a} − {c.b} | {r['difference']:+.3f} ± {r['se']:.3f} | "
      f"{r['z']:.1f} | {seeds} |"
    )
  return "\n".join(lines)


def run_question(
  question: str,
  arms: list[Arm],
  seeds: list[int],
  scale: Scale,
  root: str,
  log=print,
  metric: str = "geneval",
  runs: str | None = None,
  ledger: Ledger | None = None,
) -> dict[str, dict[str, Any]]:
  """Every arm x seed; returns arm name -> ``summarise`` of its seeds. ``runs``: the question
  whose trained runs to use (default: this one; question 7 scores question 1's models).
  ``ledger``: results measured before are taken from it (nothing is trained for them) and new
  ones are added to it as each finishes."""
  if metric not in METRICS:
    raise ValueError(f"metric {metric!r} not one of {METRICS}")
  names = [a.name for a in arms]
  if len(set(names)) != len(names):
    raise ValueError(f"{question}: arm names repeat: {names}")
  out = {}
  for arm in arms:
    reports = []
    for seed in seeds:
      t = time.time()
      r = recipe(arm, seed, scale, metric) if ledger is not None else None
      report = ledger.get(arm.name, seed, r) if ledger is not None else None
      if report is None:
        report = run_arm(arm, seed, scale, root, runs or question, metric)
        if ledger is not None:
          ledger.put(arm.name, seed, r, report)
        where = f"{time.time() - t:.0f} s"
      else:
        where = "from the ledger"
      reports.append(report)
      log(f"[{question}] {arm.name} seed {seed}: overall {report['overall']:.3f} ({where})")
    out[arm.name] = summarise(reports, seeds)
  return out


def markdown(results: dict[str, dict[str, Any]], overall: str = "overall") -> str:
  """The question's table: overall mean +- sd over seeds, then the per-category means."""
  cats = list(next(iter(results.values()))["categories"])
  lines = [
    f"| arm | {overall} (mean ± sd) | seeds | " + " | ".join(cats) + " |",
    "|---" * (len(cats) + 3) + "|",
  ]
  for name, r in results.items():
    cells = " | ".join(f"{r['categories'][c]:.3f}" for c in cats)
    lines.append(
      f"| {name} | {r['overall_mean']:.3f} ± {r['overall_std']:.3f} | {r['seeds']} | {cells} |"
    )
  return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], title: str, path: str) -> None:
  """Horizontal bars of the overall score per arm, whiskers +- one sd, seeds as dots."""
  names = list(results)
  font = ImageFont.load_default(size=14)
  left, bar_w, row_h, top = 230, 420, 30, 40
  hi = max(0.05, max(r["overall_mean"] + r["overall_std"] for r in results.values())) * 1.15
  img = Image.new("RGB", (left + bar_w + 80, top + row_h * len(names) + 40), "white")
  d = ImageDraw.Draw(img)
  d.text((10, 10), title, fill="black", font=font)
  x = lambda v: left + int(bar_w * v / hi)
  for i, n in enumerate(names):
    r, y = results[n], top + i * row_h
    d.text((10, y + 6), n, fill="black", font=font)
    d.rectangle((left, y + 5, x(r["overall_mean"]), y + row_h - 5), fill=(90, 130, 200))
    lo_, hi_ = r["overall_mean"] - r["overall_std"], r["overall_mean"] + r["overall_std"]
    d.line((x(max(lo_, 0)), y + row_h // 2, x(hi_), y + row_h // 2), fill="black", width=2)
    for v in r["overall"]:
      d.ellipse((x(v) - 3, y + row_h // 2 - 3, x(v) + 3, y + row_h // 2 + 3), fill=(220, 80, 40))
    d.text((x(hi_) + 6, y + 6), f"{r['overall_mean']:.3f}", fill="black", font=font)
  y = top + row_h * len(names) + 8
  d.line((left, y, left + bar_w, y), fill="black")
  for k in range(5):
    v = hi * k / 4
    d.text((x(v) - 10, y + 4), f"{v:.2f}", fill="black", font=font)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  img.save(path)


def write_docs(doc: str, question: str, section: str) -> None:
  """Replaces (or appends) the ``<!-- study:<question> -->`` section of ``doc``."""
  begin, end = f"<!-- study:{question} begin -->", f"<!-- study:{question} end -->"
  text = open(doc).read() if os.path.exists(doc) else ""
  block = f"{begin}\n{section.strip()}\n{end}"
  if begin in text and end in text:
    text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  files.write_text(doc, text)


def main(
  question: str,
  title: str,
  arms: list[Arm],
  script: str,
  argv=None,
  metric: str = "geneval",
  runs: str | None = None,
  contrasts: tuple[Contrast, ...] = (),
) -> dict:
  """Command line of a study script: trains, evaluates, prints (with the question's paired
  ``contrasts`` when every arm ran) and optionally documents."""
  p = argparse.ArgumentParser(description=title)
  p.add_argument("--scale", default="small", choices=sorted(SCALES))
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--root", default="runs/study", help="workdirs (shared by every question)")
  p.add_argument("--arms", nargs="*", help="only these arms (default: all)")
  p.add_argument("--write-docs", action="store_true", help="table into docs/RESULTS.md + plot")
  p.add_argument(
    "--plot-dir",
    default="",
    help="also draw this call's table into <plot-dir>/<question>_<scale>.png (RESULTS untouched)",
  )
  p.add_argument(
    "--ledger",
    help="folder of measured results (<question>_<scale>.json), reused and added to (default "
    "with --write-docs: docs/study/ledger, whose every current entry the table shows)",
  )
  a = p.parse_args(argv)
  from iomm_jax import runtime

  runtime.outside_absl(quiet=True)
  chosen = [x for x in arms if not a.arms or x.name in a.arms]
  if a.arms and len(chosen) != len(a.arms):
    raise SystemExit(f"unknown arm in {a.arms}; arms: {[x.name for x in arms]}")
  scale = SCALES[a.scale]
  t0 = time.time()
  from iomm_jax.cli import exit_on_preemption

  directory = a.ledger or (os.path.join(ROOT, "docs", "study", "ledger") if a.write_docs else None)
  ledger = Ledger(directory, f"{question}_{scale.name}") if directory else None
  with exit_on_preemption():  # SIGTERM: the run is saved; no later arm may start from it
    results = run_question(
      question, chosen, a.seeds, scale, a.root, metric=metric, runs=runs, ledger=ledger
    )
  wall = time.time() - t0
  provenance = ""
  if a.write_docs:  # the table shows every arm and seed the ledger holds, not only this call's
    held = ledger.current(arms, scale, metric)
    results = {
      name: summarise([e["report"] for e in by_seed.values()], list(by_seed))
      for name, by_seed in held.items()
    }
    provenance = (
      "Measured (from the ledger `"
      + os.path.relpath(ledger.path, ROOT)
      + "`): "
      + "; ".join(
        f"{name} seeds {', '.join(map(str, by_seed))} ("
        + ", ".join(sorted({f"{e['date']}, {e['commit']}, {e['host']}" for e in by_seed.values()}))
        + ")"
        for name, by_seed in held.items()
      )
      + ".\n\n"
    )
  table = markdown(results, HEADLINES[metric])
  usable = [c for c in contrasts if c.a in results and c.b in results]
  if usable:
    table += "\n\nPaired differences (same prompts and noise within a seed):\n\n"
    table += contrast_table(results, usable)
  print(table)
  out = os.path.join(a.root, question)
  os.makedirs(out, exist_ok=True)
  checkpointing.save_json(os.path.join(out, f"results_{scale.name}.json"), results)
  seeds = sorted({s for r in results.values() for s in r["seed_ids"]})
  caption = f"{title} ({scale.name} scale, seeds {', '.join(map(str, seeds))})"
  if a.plot_dir:
    os.makedirs(a.plot_dir, exist_ok=True)
    plot(results, caption, os.path.join(a.plot_dir, f"{question}_{scale.name}.png"))
  if a.write_docs:
    png = os.path.join(ROOT, "docs", "study", f"{question}_{scale.name}.png")
    plot(results, caption, png)
    # the command that measures (or, with the ledger, re-tabulates) exactly this table
    cmd = f"python {script} --scale {scale.name} --seeds {' '.join(map(str, seeds))}"
    if len(results) < len(arms):
      cmd += " --arms " + " ".join(f'"{x}"' for x in results)
    cmd += " --write-docs"
    section = (
      f"### {title}\n\n"
      f"Scale `{scale.name}`: stage 1 {scale.pretrain_steps} steps"
      + ("" if metric == "reconstruction" else f", stage 2 {scale.finetune_steps} steps")
      + " per arm; "
      + {
        "geneval": f"shapes GenEval ({scale.eval_per_category} images per category, "
        "the protocol of `iomm-eval`)",
        "editing": f"{scale.edits_per_kind} zero-shot edits per kind",
        "reconstruction": f"the stage-1 models only, each given {scale.edits_per_kind} random "
        "scenes as its own condition (unmasked, and masked at 0.85): share of the scene's "
        "objects reproduced in their cells (preservation) and of scenes reproduced whole (exact)",
      }[metric]
      + f"; seeds {seeds}. Last written on {platform.node()} ({os.cpu_count()} CPUs), "
      f"{datetime.date.today()}, {wall / 60:.0f} min for that invocation.\n\n"
      f"{provenance}`{cmd}`\n\n{table}\n\n![{question}](study/{os.path.basename(png)})\n"
    )
    write_docs(os.path.join(ROOT, "docs", "RESULTS.md"), f"{question}_{scale.name}", section)
  return results
