r"""``iomm-edit``: zero-shot image editing with a trained generator (``iomm_jax.edit``).

One image:
  iomm-edit --workdir W --image src.png --instruction "make the circle red" --out edited.png

A folder (every image, recursively, by one instruction; the output mirrors its layout):
  iomm-edit --workdir W --images photos/ --instruction "add a blue square" --outdir edited/

An ImgEdit-Bench-style JSON (``{id: {"id": file, "prompt": instruction, ...}}``, files relative
to ``--image_root``, default the JSON's folder), one ``D/<id>.png`` per id, the layout ImgEdit's
``basic_bench.py --result_img_folder D`` reads:
  iomm-edit --workdir W --edits basic_edit.json --image_root singleturn/ --outdir D

Options: ``--mask_ratio`` (share of the source's vision tokens zeroed, default 0), ``--cfg``,
``--steps``, ``--solver`` (default: the workdir's sampling settings), ``--seed``, ``--batch``
(images per device per call), ``--no-ema``, ``--step``. Folder and JSON modes resume: outputs
that exist are skipped, and each edit's noise depends only on ``--seed`` and its position, so a
resumed run writes the images an uninterrupted one would (byte for byte with the same
``--batch``). Every device of every process samples (like ``iomm-sample``); process 0 writes.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import app, flags, logging

from iomm_jax import edit, inference, runtime, sharding
from iomm_jax.cli import define_distributed_flags, run, warn_unknown_words
from iomm_jax.data import benchmark_format

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-1 or stage-2 workdir")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_IMAGE = flags.DEFINE_string("image", None, "one source image (with --instruction and --out)")
_IMAGES = flags.DEFINE_string("images", None, "a folder of source images (with --instruction)")
_EDITS = flags.DEFINE_string("edits", None, 'ImgEdit-style JSON {id: {"id": file, "prompt": ...}}')
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "--edits: folder of the source files")
_INSTRUCTION = flags.DEFINE_string("instruction", None, "the edit (--image and --images modes)")
_OUT = flags.DEFINE_string("out", "edited.png", "--image mode: output PNG")
_OUTDIR = flags.DEFINE_string("outdir", None, "--images / --edits modes: output folder")
_MASK = flags.DEFINE_float("mask_ratio", 0.0, "share of the source's vision tokens zeroed")
_STEPS = flags.DEFINE_integer("steps", None, "ODE steps (default: the workdir's config)")
_CFG = flags.DEFINE_float("cfg", None, "guidance scale (default: the workdir's config)")
_SOLVER = flags.DEFINE_enum("solver", None, ["euler", "heun"], "ODE solver")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
_BATCH = flags.DEFINE_integer("batch", 16, "images per device per sampler call")
_EMA = flags.DEFINE_bool("ema", True, "use the EMA parameters")
_PROGRESS = flags.DEFINE_bool("progress", True, "folder / JSON modes: show a progress bar")
_JOIN = define_distributed_flags()


def _items() -> list[benchmark_format.Item]:
  """The edits the flags ask for, checked before any model is loaded."""
  modes = [m for m in (_IMAGE.value, _IMAGES.value, _EDITS.value) if m is not None]
  if len(modes) != 1:
    raise app.UsageError("give exactly one of --image, --images and --edits")
  if _EDITS.value is None and not (_INSTRUCTION.value or "").strip():
    raise app.UsageError("--image and --images need --instruction")
  if _EDITS.value is not None and _INSTRUCTION.value is not None:
    raise app.UsageError("--edits carries its instructions: leave out --instruction")
  if _IMAGE.value is None and _OUTDIR.value is None:
    raise app.UsageError("--images and --edits need --outdir")
  if _BATCH.value < 1:
    raise app.UsageError(f"--batch must be >= 1, got {_BATCH.value}")
  if not 0.0 <= _MASK.value < 1.0:
    raise app.UsageError(f"--mask_ratio must be in [0, 1), got {_MASK.value}")
  if _IMAGE.value is not None:
    items = [benchmark_format.Item("edited", _INSTRUCTION.value.strip(), 0, _IMAGE.value)]
  elif _IMAGES.value is not None:
    items = edit.folder_edits(_IMAGES.value, _INSTRUCTION.value.strip())
  else:
    items = edit.read_edits(_EDITS.value, _IMAGE_ROOT.value)
  edit.check_sources(items)
  return items


def _main(argv):
  del argv
  try:
    items = _items()
  except ValueError as e:  # a missing file, a malformed JSON: one line
    raise app.UsageError(str(e)) from None
  _JOIN()  # a multi-process run: before anything touches a backend
  logging.set_verbosity(logging.WARNING)
  runtime.enable_compilation_cache()
  mesh = sharding.sampling_mesh()
  config, ctx, params = inference.load_generator(_WORKDIR.value, _EMA.value, _STEP.value, mesh=mesh)
  size = config.model.image_size
  warn_unknown_words("iomm-edit", ctx.tokenizer, [it.prompt for it in items])
  edit.edit_conditions(ctx.conditioner, [it.prompt for it in items])  # each fits, or say which
  kw = dict(steps=_STEPS.value, cfg=_CFG.value, solver=_SOLVER.value, batch_size=_BATCH.value)

  def sample_fn(chunk, keys):
    try:
      sources = np.stack([edit.load_source(it.line, size) for it in chunk])
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    return edit.edit(config, ctx, params, sources, [it.prompt for it in chunk], keys,
                     mask_ratio=_MASK.value, mesh=mesh, **kw)  # fmt: skip

  if _IMAGE.value is not None:
    (img,) = sample_fn(items, benchmark_format.sample_keys(_SEED.value, [(items[0], 0)]))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
      benchmark_format.save_png(_OUT.value, img)
      print(f"wrote {_OUT.value} ({_INSTRUCTION.value!r} on {_IMAGE.value})")
    return
  writer = benchmark_format.Writer(benchmark_format.EDIT_FORMAT, _OUTDIR.value, 1)
  counts = benchmark_format.generate(
    sample_fn, items, writer, _SEED.value, _BATCH.value, _PROGRESS.value, mesh.size,
    pass_items=True,
  )  # fmt: skip
  print(f"wrote edits to {_OUTDIR.value}: {json.dumps(counts)}")


def main():
  """Entry point of ``iomm-edit``."""
  run(_main, "iomm-edit", __name__, required=["workdir"])


if __name__ == "__main__":
  main()
