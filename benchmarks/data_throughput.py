"""Data preparation and loading throughput at 512 px, on synthetic photo-like JPEGs.

  python benchmarks/data_throughput.py [--images 200] [--resolution 512] [--workers 0 1 2]
      [--batch 16] [--batches 20]

(a) ``iomm-prepare``'s library on a folder of ``--images`` 1024x768 JPEGs (q90, smooth colour
fields plus texture, written to a temporary folder first), in this one process: images per
second of wall time and per CPU-second (one core). (b) The training loader
(``config.data.source='array_record'``, stage 1) over the resulting shards with 0, 1 and 2 grain
worker processes: sustained images/s after two warm-up batches. Prints a markdown table with
the machine, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from iomm_jax import runtime
from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config
from iomm_jax.data import inputs, pipeline, prepare
from iomm_jax.data import shapes as S
from iomm_jax.data.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUX = "Generate an image that is identical to the reference image:"


def photo_like(seed: int, w: int = 1024, h: int = 768) -> Image.Image:
  """Smooth random colour fields (bicubic-upsampled noise) plus fine texture: compresses and
  decodes like a photo, unlike flat colour or white noise."""
  rng = np.random.default_rng(seed)
  coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), np.uint8)).resize((w, h), Image.BICUBIC)
  a = np.asarray(coarse, np.float32) + rng.normal(0, 12, (h, w, 3))
  return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_sources(folder: str, n: int) -> float:
  """Writes ``n`` JPEGs; returns their mean size in KiB."""
  os.makedirs(folder)
  sizes = []
  for i in range(n):
    path = os.path.join(folder, f"{i:05d}.jpg")
    photo_like(i).save(path, "JPEG", quality=90)
    with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
      f.write(f"a synthetic photo number {i}")
    sizes.append(os.path.getsize(path) / 1024)
  return float(np.mean(sizes))


def bench_prepare(src: str, out: str, resolution: int) -> tuple[float, float, dict]:
  """(images/s wall, images per CPU-second, manifest)."""
  opts = prepare.Options(resolution=resolution, records_per_shard=100)
  source = inputs.FolderSource(src)
  t, c = time.perf_counter(), time.process_time()
  m = prepare.prepare(source, out, opts, progress=False)
  wall, cpu = time.perf_counter() - t, time.process_time() - c
  return len(source) / wall, len(source) / cpu, m


def bench_loader(out: str, resolution: int, workers: int, batch: int, n: int) -> float:
  """Sustained images/s of the stage-1 loader over ``out`` with ``workers`` processes."""
  over = {
    "data.source": "array_record",
    "data.path": out,
    "model.image_size": resolution,
    "train.batch_size": batch,
    "data.num_workers": workers,
  }
  c = load_config(os.path.join(ROOT, "experiments/shapes/pretrain.py:quick"), over)
  world = S.WorldConfig(canvas=24, grid=2)
  tok = Tokenizer.train(S.all_caption_corpus(world) + [AUX], 256, None)
  cond = pipeline.Conditioner(tok, num_image_tokens=16, aux_prompt=AUX, max_text_len=24)
  it = iter(pipeline.make_dataset(specs.from_config(c), cond))
  for _ in range(2):  # worker start-up and the first reads
    next(it)
  t = time.perf_counter()
  for _ in range(n):
    b = next(it)
  assert b["image"].shape == (batch, resolution, resolution, 3)
  return n * batch / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--resolution", type=int, default=512)
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--batches", type=int, default=20)
  a = p.parse_args()
  runtime.outside_absl(cache=False)  # grain workers read absl flags (docs: ecosystem notes)
  load0 = os.getloadavg()[0]
  tmp = tempfile.mkdtemp(prefix="iomm_data_bench_")
  try:
    kib = make_sources(os.path.join(tmp, "src"), a.images)
    wall, per_cpu, m = bench_prepare(
      os.path.join(tmp, "src"), os.path.join(tmp, "out"), a.resolution
    )
    shard_bytes = sum(
      os.path.getsize(os.path.join(tmp, "out", s["file"])) for s in m["shards"]
    ) / max(m["num_records"], 1)
    rows = [
      f"| prepare: 1024x768 JPEG ({kib:.0f} KiB) -> {a.resolution} px record "
      f"({shard_bytes / 1024:.0f} KiB), 1 process | {wall:.1f} | {per_cpu:.1f} |"
    ]
    for w in a.workers:
      rate = bench_loader(os.path.join(tmp, "out"), a.resolution, w, a.batch, a.batches)
      rows.append(
        f"| training loader, stage 1, {w} worker process(es), batch {a.batch} | {rate:.1f} | |"
      )
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(
    f"machine: {platform.machine()}, {os.cpu_count()} cores, 1-min load average "
    f"{load0:.1f} before / {os.getloadavg()[0]:.1f} after; python {platform.python_version()}"
  )
  print(f"date: {datetime.date.today().isoformat()}")
  print(f"command: python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}")
  print()
  print("| what | images/s (wall) | images per CPU-second |")
  print("|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
