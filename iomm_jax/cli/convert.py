"""``iomm-convert``: real checkpoints in, PyTorch out.

  iomm-convert import-internvl --hf-dir DIR --out CKPT [--dtype float32|bfloat16]
      [--tokenizer-dir DIR]
  iomm-convert import-vae --diffusers-dir DIR --out CKPT [--dtype float32|bfloat16]
  iomm-convert export-torch --workdir W [--step N] [--no-ema] --out DIR [--dtype ...]

* ``import-internvl``: an InternVL3 checkpoint in transformers' format (``config.json`` +
  ``*.safetensors`` + ``tokenizer.json``, e.g. InternVL3-2B-hf) -> a directory that
  ``config.model.mllm_from`` accepts (``iomm_jax.convert.internvl``).
* ``import-vae``: a diffusers ``AutoencoderKL`` (the FLUX VAE; a pipeline folder with a ``vae/``
  subfolder also works) -> a directory that ``config.model.vae_checkpoint`` accepts
  (``iomm_jax.convert.vae``).
* ``export-torch``: a trained stage-1/2 workdir -> ``DIR/transformer`` (a diffusers
  ``FluxTransformer2DModel``), ``DIR/adapter.safetensors`` + ``DIR/connector.safetensors`` +
  ``DIR/iomm.json`` (loaded by ``iomm_jax.convert.torch_port``), ``DIR/mllm`` (the frozen MLLM
  as a transformers InternVL directory) and, for the VAE codec, ``DIR/vae``. In PyTorch:
  ``iomm_jax.convert.torch_port.IOMMPipeline.from_pretrained(DIR).generate(...)``.
  It exports the EMA weights, as ``iomm-sample`` and ``iomm-eval`` sample them by default
  (``--no-ema``: the raw parameters, as ``iomm-sample --no-ema``; a run without an EMA copy,
  ``train.ema_decay=0``, gives its parameters either way); ``DIR/source.json`` records which. A
  LoRA run (``config.model.lora``) exports a plain transformer: each adapter folded into its kernel
  (W + alpha / r * A @ B) over the base weights of its ``config.train.init_from``.

Only safetensors are read; errors name the file, parameter and shapes at fault.
"""

from __future__ import annotations

import argparse
import os
import sys

from iomm_jax import dtypes

DTYPES = dtypes.STORAGE  # --dtype choices


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="iomm-convert", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  a = sub.add_parser("import-internvl", help="transformers InternVL3 -> config.model.mllm_from")
  a.add_argument("--hf-dir", required=True, help="InternVL3 directory in transformers' format")
  a.add_argument("--out", required=True, help="output directory")
  a.add_argument("--dtype", default="float32", choices=DTYPES)
  a.add_argument("--tokenizer-dir", default=None, help="tokenizer files (default: --hf-dir)")
  v = sub.add_parser("import-vae", help="diffusers AutoencoderKL -> config.model.vae_checkpoint")
  v.add_argument("--diffusers-dir", required=True, help="AutoencoderKL directory (or its pipeline)")
  v.add_argument("--out", required=True, help="output directory")
  v.add_argument("--dtype", default="float32", choices=DTYPES)
  e = sub.add_parser("export-torch", help="trained workdir -> diffusers + PyTorch directory")
  e.add_argument("--workdir", required=True, help="a stage-1 or stage-2 workdir")
  e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  e.add_argument(
    "--ema",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="export the EMA weights, the ones iomm-sample and iomm-eval use by default (default: "
    "on; --no-ema exports the raw parameters, as iomm-sample --no-ema samples them)",
  )
  e.add_argument("--out", required=True, help="output directory")
  e.add_argument("--dtype", default=None, choices=DTYPES, help="storage dtype (default: as is)")
  return p


def export_torch(
  workdir: str, out: str, step: int | None = None, ema: bool = True, dtype: str | None = None
) -> dict:
  """Exports a trained workdir (see the module docstring), its EMA weights unless ``ema`` is
  False (``inference.load_generator``'s default); returns ``iomm.json``'s contents."""
  from iomm_jax import checkpointing, files, inference
  from iomm_jax.convert import flux

  if step is None:
    saved = checkpointing.saved_steps(workdir)
    step = saved[-1] if saved else None
  if os.path.abspath(out) == os.path.abspath(workdir):
    raise ValueError(f"--out {out!r} must not be the workdir")
  config, ctx, params = inference.load_generator(workdir, use_ema=ema, step=step)
  meta = flux.export_generator(ctx.model, params, out, frozen=ctx.frozen, dtype=dtype)
  # ema_decay = 0: no EMA is kept (one saved by an older version equals the parameters)
  weights = "ema" if ema and config.train.ema_decay > 0 else "params"
  provenance = {"workdir": os.path.abspath(workdir), "step": step, "weights": weights}
  files.write_json(os.path.join(out, "source.json"), provenance, sort_keys=False)
  return meta


def main(argv: list[str] | None = None) -> int:
  """Entry point of ``iomm-convert``."""
  a = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  from iomm_jax.convert import internvl, tensors, vae

  try:
    if a.command == "import-internvl":
      cfg = internvl.import_internvl(a.hf_dir, a.out, a.dtype, a.tokenizer_dir)
      print(
        f"imported InternVL ({cfg.text.num_layers} text layers, width {cfg.text.width}; "
        f"{cfg.vision.num_layers} ViT layers) into {a.out}; use --config.model.mllm_from={a.out}"
      )
    elif a.command == "import-vae":
      vae.import_vae(a.diffusers_dir, a.out, a.dtype)
      print(f"imported the VAE into {a.out}; use --config.model.vae_checkpoint={a.out}")
    else:
      export_torch(a.workdir, a.out, a.step, a.ema, a.dtype)
      print(
        f"exported {a.workdir} ({'EMA' if a.ema else 'params'}) to {a.out}: "
        "transformer/ (diffusers FluxTransformer2DModel), adapter/connector safetensors, "
        "iomm.json, mllm/; load with iomm_jax.convert.torch_port.IOMMPipeline.from_pretrained"
      )
  except (tensors.ConversionError, FileNotFoundError, ValueError) as e:
    print(f"iomm-convert {a.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
