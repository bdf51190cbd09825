"""Training metrics: ``<workdir>/metrics.jsonl``, TensorBoard through clu, console progress.

Only process 0 writes. Values are pulled to the host only at log steps (the caller passes device
arrays; ``jax.device_get`` happens here).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from iomm_jax import perf

BORDER = (150, 150, 150)
"""Grey between and around grid images (a white sample on white would vanish otherwise)."""
RIGHT, WRONG = (30, 160, 60), (220, 40, 40)
"""Frame colours of images scored right / wrong."""


def _tensorboard_writer(workdir: str):
  """clu's TensorBoard writer under ``<workdir>/tensorboard``, or None (with a warning) where
  TensorFlow, which clu.metric_writers imports, is not installed."""
  try:
    from clu import metric_writers  # imports TensorFlow: only when writing event files
  except ImportError as e:
    print(f"TensorBoard events disabled ({e}); metrics.jsonl is still written", file=sys.stderr)
    return None
  return metric_writers.create_default_writer(
    os.path.join(workdir, "tensorboard"), just_logging=False, asynchronous=True
  )


class MetricsLogger:
  """Writes scalars to metrics.jsonl + TensorBoard and prints a progress line with ETA."""

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    first_step: int = 0,
    tensorboard: bool = True,
    stream=None,
    batch_size: int | None = None,
    peak_tflops: float | None = None,
  ):
    """``batch_size`` (global samples per step) adds ``samples_per_s`` to every record; with
    ``set_step_flops`` also ``tflops_per_device``, and ``mfu`` against ``peak_tflops``."""
    self.workdir = workdir
    self.batch_size, self.peak_tflops = batch_size, peak_tflops
    self.step_flops: float | None = None
    self.total = total_steps
    self.is_main = jax.process_index() == 0
    self.stream = stream or sys.stdout
    self._t0 = time.perf_counter()
    self._last_t = self._t0
    self._last_step = first_step
    self._writer = None
    if self.is_main:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        self._writer = _tensorboard_writer(workdir)

  def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    """Records ``metrics`` (device or host scalars) at ``step``; returns the host values."""
    now = time.perf_counter()
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    rate = (step - self._last_step) / max(now - self._last_t, 1e-9)
    self._last_t, self._last_step = now, step
    host["steps_per_s"] = rate
    if self.batch_size:
      host.update(perf.throughput(rate, self.batch_size, self.step_flops, self.peak_tflops))
    host["eta_s"] = (self.total - step) / rate if rate > 0 else float("nan")
    host["elapsed_s"] = now - self._t0
    if self.is_main:
      with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **host}) + "\n")
      if self._writer is not None:
        self._writer.write_scalars(step, host)
      print(self.progress_line(step, host), file=self.stream, flush=True)
    return host

  def set_step_flops(self, flops: float | None) -> None:
    """FLOPs per device of one train step (``perf.step_flops``), for TFLOP/s and MFU."""
    self.step_flops = flops

  def progress_line(self, step: int, host: dict[str, float]) -> str:
    eta = host["eta_s"]
    eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if np.isfinite(eta) else "?"
    keys = ("loss", "lr", "grad_norm", "data_skipped")
    extra = " ".join(f"{k}={host[k]:.4g}" for k in keys if k in host)
    speed = f"{host['steps_per_s']:.2f} steps/s"
    if "samples_per_s" in host:
      speed += f" {host['samples_per_s']:.1f} samples/s"
    if "mfu" in host:
      speed += f" MFU {100 * host['mfu']:.1f}%"
    return (
      f"[{os.path.basename(self.workdir.rstrip('/'))}] step {step}/{self.total} "
      f"({100 * step / max(self.total, 1):.0f}%) {extra} {speed} ETA {eta_s}"
    )

  def write_image(self, step: int, name: str, image: np.ndarray) -> str:
    """Saves a uint8 [H, W, 3] image as ``<workdir>/<name>_<step>.png`` and to TensorBoard."""
    path = os.path.join(self.workdir, f"{name}_{step:07d}.png")
    if self.is_main:
      Image.fromarray(image).save(path)
      if self._writer is not None:
        self._writer.write_images(step, {name: image[None]})
    return path

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """All records of ``<workdir>/metrics.jsonl`` (empty list if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def image_grid(images: np.ndarray, rows: int, pad: int = 2, value: int = BORDER[0]) -> np.ndarray:
  """Tiles uint8 images [N, H, W, 3] into a grid with ``rows`` rows, ``pad`` pixels of grey
  ``value`` between and around them."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), value, np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w
    ] = images[i]
  return grid


def labelled_grid(
  rows: list[tuple[str, list[np.ndarray], list[bool | None] | None]],
  scale: int = 3,
  label_width: int | None = None,
  header: list[str] | None = None,
  legend: str | None = None,
) -> np.ndarray:
  """A PNG-ready uint8 canvas: one row per (label, images, marks), the label on the left, each
  image upscaled ``scale`` times inside a 2-pixel frame: green where its mark is True (scored
  right), red where False, grey where None (or ``marks`` None). ``header`` labels the columns
  (e.g. "source" over a stage-1 row's condition image); ``legend`` is a line on top."""
  font = ImageFont.load_default(size=13)
  canvas_probe = Image.new("RGB", (1, 1))
  h, w = rows[0][1][0].shape[:2]
  per_row = max(len(imgs) for _, imgs, _ in rows)
  cell_h, cell_w = h * scale + 6, w * scale + 6
  if label_width is None:
    widths = [ImageDraw.Draw(canvas_probe).textlength(r[0], font=font) for r in rows]
    label_width = int(max(widths)) + 12
  top = (18 if legend else 0) + (18 if header else 0)
  width = label_width + per_row * cell_w + 4
  if legend:  # the canvas widens to the legend's line rather than cut it
    width = max(width, int(ImageDraw.Draw(canvas_probe).textlength(legend, font=font)) + 8)
  canvas = Image.new("RGB", (width, top + len(rows) * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  if legend:
    draw.text((4, 2), legend, fill="black", font=font)
  if header:
    for k, text in enumerate(header):
      draw.text((label_width + k * cell_w + 2, top - 16), text, fill="black", font=font)
  for r, (label, imgs, marks) in enumerate(rows):
    y = top + r * cell_h
    draw.text((4, y + cell_h // 2 - 7), label, fill="black", font=font)
    for k, img in enumerate(imgs):
      x = label_width + k * cell_w
      mark = None if marks is None else marks[k]
      colour = BORDER if mark is None else (RIGHT if mark else WRONG)
      draw.rectangle((x + 1, y + 1, x + cell_w - 2, y + cell_h - 2), fill=colour)
      tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
      canvas.paste(tile, (x + 3, y + 3))
  return np.asarray(canvas)
