"""Runs stage loops on fake CPU devices for the sharding tests (a separate process, because the
device count is fixed when JAX starts).

  python tests/sharding/worker.py --devices 8 --out DIR RUN [RUN ...]

Each RUN is ``name:stage:mesh:steps[:key=value,...]`` (mesh as ``2x4x1``, ``-`` = the default);
keys ``mllm_from``, ``init_from`` take run names (their workdirs), resolved under ``DIR`` or
``--base``. Each run trains without sample grids in ``DIR/<name>`` (resuming if it holds a
checkpoint) and writes ``params.npz`` (path -> array) and ``specs.json`` (path -> PartitionSpec)
there (from process 0), and ``result_<process>_<start step>.json`` (last metrics). Multi-process:
``--coordinator ADDR --num_processes N --process_id I``; the results then also hold a digest of
every training image the process read.

``--sample NAME --prompts FILE [--batch B]`` (after the runs, if any): samples run NAME on every
device of every process as ``iomm-sample`` and ``iomm-eval`` do (see ``sample``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXP = os.path.join(ROOT, "experiments", "shapes")


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser()
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--out", required=True)
  p.add_argument("--base", default="", help="where runs named in mllm_from/init_from may live")
  p.add_argument("--coordinator", default="")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--samples", action="store_true", help="keep the end-of-run sample grid")
  p.add_argument("--sample", default="", help="a run to sample on every device (see sample())")
  p.add_argument("--prompts", default="", help="--sample: a GenEval evaluation_metadata.jsonl")
  p.add_argument("--batch", type=int, default=2, help="--sample: images per device per call")
  p.add_argument("runs", nargs="*")
  return p.parse_args(argv)


def main(argv=None) -> None:
  """Sets the device count, then trains each run in order."""
  a = _args(argv)
  import jax

  jax.config.update("jax_num_cpu_devices", a.devices)
  jax.config.update("jax_platforms", "cpu")
  from iomm_jax import runtime

  runtime.outside_absl(cache=False)

  runtime.initialize_distributed(
    a.coordinator or None,
    a.num_processes if a.coordinator else None,
    a.process_id if a.coordinator else None,
  )
  runtime.enable_compilation_cache()
  for spec in a.runs:
    train(spec, a)
  if a.sample:
    sample(a.sample, a)


def _workdir(name: str, a: argparse.Namespace) -> str:
  for root in (a.out, a.base):
    if root and os.path.isdir(os.path.join(root, name)):
      return os.path.join(root, name)
  raise FileNotFoundError(f"run {name!r} not found under {a.out!r} or {a.base!r}")


def train(spec: str, a: argparse.Namespace) -> None:
  """Trains one ``name:stage:mesh:steps[:k=v,...]`` run and records its parameters."""
  import jax
  import numpy as np

  from iomm_jax import sharding
  from iomm_jax.configs.loading import load_config, parse_value
  from iomm_jax.train import finetune, loop, mllm, pretrain

  name, stage, mesh, steps, *rest = spec.split(":")
  extra = dict(kv.split("=", 1) for kv in (rest[0].split(",") if rest else []))
  over = {
    "train.num_steps": int(steps),
    "train.log_every": 1,
    "train.ckpt_every": 100,
    "optim.warmup_steps": 0,  # every step updates
    # Adam turns a gradient of roundoff size (the zero-initialised gates keep the condition path's
    # gradients near 0 for the first steps) into a full +-lr step whose sign depends on the
    # summation order; a larger epsilon scales such steps down, so runs on different meshes stay
    # comparable to ~1e-6 while the real gradients (~1e-3 and up) still train.
    "optim.eps": 1e-3,
  }
  if mesh != "-":
    over["sharding.mesh"] = tuple(int(s) for s in mesh.split("x"))
  if stage != "mllm":
    # A constant schedule: runs of different lengths share one compiled step (and a resumed run
    # follows the straight one exactly).
    over["optim.schedule"] = "constant"
  for key, cfg_key in (("mllm_from", "model.mllm_from"), ("init_from", "train.init_from")):
    if key in extra:
      over[cfg_key] = _workdir(extra.pop(key), a)
  for k, v in extra.items():  # numbers as numbers
    over[k] = parse_value(v)
  c = load_config(os.path.join(EXP, f"{stage}.py:quick"), over)
  wd = os.path.join(a.out, name)
  setup = {"mllm": mllm.setup, "pretrain": pretrain.setup, "finetune": finetune.setup}[stage]
  run = setup(c, wd)
  if not a.samples:
    run.sample_fn = None
  digests = _read_like(c, wd, run.start_step) if a.num_processes > 1 else None
  last = loop.run(run)
  pid = jax.process_index()
  result = {"last": last, "start_step": run.start_step, "process_count": jax.process_count()}
  if digests is not None:  # the run's iterator stands where the copy read to: same batches
    result["images"], copy_state = digests
    result["same_iterator_state"] = copy_state == run.data_iter.get_state()
  with open(os.path.join(wd, f"result_{pid}_{run.start_step}.json"), "w") as f:
    json.dump(result, f)
  flat = jax.tree_util.tree_flatten_with_path(run.state.params)[0]
  host = {_key(p): sharding.to_host(x) for p, x in flat}  # every process takes part in gathers
  if pid == 0:
    np.savez(os.path.join(wd, "params.npz"), **host)
    spec = lambda tree: sharding.describe(jax.tree_util.tree_map(lambda x: x.sharding, tree))
    specs = {"params": spec(run.state.params), "opt_state": spec(run.state.opt_state)}
    specs["frozen"] = spec(run.frozen) if run.frozen is not None else {}
    with open(os.path.join(wd, "specs.json"), "w") as f:
      json.dump(specs, f)


def sample(name: str, a: argparse.Namespace) -> None:
  """Run ``name`` sampled on ``sharding.sampling_mesh()`` (every device of every process):

  * the GenEval layout of ``--prompts`` (3 images per prompt) in ``DIR/geneval``, as
    ``iomm-sample --prompts-file ... --format geneval`` makes it, in two parts: the first 2
    prompts, then all of them (resuming: the first 2 are skipped);
  * ``iomm-eval``'s ``run`` (2 images per category) on a copy of the workdir
    (``DIR/eval_workdir``, so parallel workers do not share its eval files), its images saved
    as ``DIR/eval_images.npz``.

  Writes ``DIR/sample_<process>.json``: each part's counts, the report, device and process
  counts (files other than these only from process 0, as the commands write them), and with one
  process on several devices ``float_gap`` (``_float_gap``).
  """
  import shutil

  import jax
  import numpy as np

  from iomm_jax import inference, runtime, sharding
  from iomm_jax.cli import evaluate
  from iomm_jax.configs import specs
  from iomm_jax.data import benchmark_format
  from iomm_jax.eval import shapes_geneval

  src, pid = _workdir(name, a), jax.process_index()
  wd = os.path.join(a.out, "eval_workdir")
  if pid == 0 and not os.path.isdir(wd):
    shutil.copytree(src, wd)
  runtime.barrier("worker copied the workdir")
  mesh = sharding.sampling_mesh()
  config, ctx, params = inference.load_generator(src, mesh=mesh)
  items = benchmark_format.read_prompts(a.prompts, "geneval")
  writer = benchmark_format.Writer("geneval", os.path.join(a.out, "geneval"), 3)
  fn = lambda prompts, keys: inference.sample_prompts(
    specs.from_config(config).sample, ctx, params, prompts, keys, batch_size=a.batch, mesh=mesh
  )
  counts = [
    benchmark_format.generate(fn, part, writer, 0, a.batch, False, mesh.size)
    for part in (items[:2], items)
  ]
  seen = {}
  evaluate_images = shapes_geneval.evaluate

  def keep_images(*args, **kw):  # the images iomm-eval scores, to compare them too
    seen["ev"] = evaluate_images(*args, **kw)
    return seen["ev"]

  shapes_geneval.evaluate = keep_images
  report = evaluate.run(wd, per_category=2, batch=a.batch, mesh=mesh)
  if pid == 0:
    np.savez(os.path.join(a.out, "eval_images.npz"), images=seen["ev"].images)
  result = {
    "counts": counts,
    "report": report,
    "devices": jax.device_count(),
    "process_count": jax.process_count(),
  }
  if jax.process_count() == 1 and jax.device_count() > 1:
    prompts = [m["prompt"] for m in seen["ev"].metas]
    result["float_gap"] = _float_gap(config, ctx, params, prompts, mesh, a.batch)
  with open(os.path.join(a.out, f"sample_{pid}.json"), "w") as f:
    json.dump(result, f)


def _float_gap(config, ctx, params, prompts, mesh, batch: int) -> float:
  """The largest |difference| between the float images (before rounding to uint8) of
  ``prompts`` generated on ``mesh`` and on one device: 0.0 when splitting over devices leaves
  the numerics alone, not only the rounded pixels."""
  import jax
  import numpy as np

  from iomm_jax import generate, inference
  from iomm_jax.configs import specs
  from iomm_jax.eval import shapes_geneval
  from iomm_jax.models import codec

  rounding = codec.unit_to_images

  def retrace():  # the compiled samplers round; trace them again
    jax.clear_caches()
    generate._sharded_sampler.cache_clear()

  codec.unit_to_images, keys = (lambda x: x), shapes_geneval.image_keys(0, len(prompts))
  retrace()
  try:
    on_mesh = inference.sample_prompts(
      specs.from_config(config).sample, ctx, params, prompts, keys, batch_size=batch, mesh=mesh
    )
    one = jax.devices()[0]
    ctx.frozen, params = jax.device_put((ctx.frozen, params), one)
    alone = inference.sample_prompts(
      specs.from_config(config).sample, ctx, params, prompts, keys, batch_size=batch
    )
  finally:
    codec.unit_to_images = rounding
    retrace()
  assert on_mesh.dtype == alone.dtype == np.float32
  return float(np.abs(on_mesh - alone).max())


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _read_like(config, wd: str, start_step: int) -> tuple[list[list[str]], dict]:
  """SHA-1 digests of the images of each batch this process reads in steps start_step+1 ..
  num_steps, from a fresh copy of the run's pipeline (same process shard), and the copy's
  iterator state after them (the run's iterator must end in the same state)."""
  from iomm_jax.configs import specs
  from iomm_jax.data import pipeline
  from iomm_jax.data.tokenizer import Tokenizer
  from iomm_jax.models import mllm as mllm_lib
  from iomm_jax.train import mllm

  tokenizer = Tokenizer.load(os.path.join(wd, "tokenizer.model"))
  n_img = mllm_lib.get_mllm_config(config.model.mllm).num_image_tokens
  conditioner = pipeline.Conditioner(
    tokenizer, n_img, config.model.aux_prompt, config.model.max_text_len
  )
  it = iter(
    pipeline.make_dataset(
      specs.from_config(config), conditioner, seq_len=mllm.caption_len(config, n_img)
    )
  )
  seen = []
  for step in range(1, config.train.num_steps + 1):
    batch = next(it)
    if step > start_step:
      seen.append([hashlib.sha1(img.tobytes()).hexdigest() for img in batch["image"]])
  return seen, it.get_state()


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  main()
