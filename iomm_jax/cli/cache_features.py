"""``iomm-cache-features``: encode an ``iomm-prepare`` folder once with a run's frozen encoders.

  iomm-cache-features --config EXPERIMENT.py[:arg] [--config.KEY=VALUE ...] --out FEATURES \
      [--data PREPARED] [--dtype bfloat16|float32] [--batch-size 16] \
      [--num-processes N --process-index I] [--no-progress]
  iomm-cache-features --workdir RUN_WORKDIR --out FEATURES ...     (the run's config.json)
  iomm-cache-features --config EXPERIMENT.py[:arg] --shapes-only   (bytes per record, no weights)

Writes, per record, the unmasked vision tokens after the projector and the VAE posterior mean and
std (the pixel codec: its latent) in ``--dtype``; the run's config names the encoders (the
``config.model`` keys of ``iomm-train``) and, unless ``--data`` is given, the prepared folder
(``config.data.path``). Train on the result with ``--config.data.features=FEATURES`` and the same
model config: the ViT and the VAE encoder then leave the train step, and a run whose encoders,
image size or token count differ is refused with an error naming both. The format:
``iomm_jax/data/features.py``; the library: ``iomm_jax/train/cache.py``.

Like ``iomm-prepare``, several processes split the shards with ``--num-processes N
--process-index I`` (each uses its own devices: one process per accelerator, e.g. with
``CUDA_VISIBLE_DEVICES``), a rerun of the same command resumes (finished shards are kept) and the
last process to finish writes the manifest. Exit codes: 0 done (this process's shards), 2 bad
arguments, config keys or input folders (the message names the flag, key or file).
"""

from __future__ import annotations

import argparse
import math
import sys

from iomm_jax.data import features, prepare

BYTES_NOTE = "bytes per record"


def _parser() -> argparse.ArgumentParser:
  """The command's flags (``--config.KEY=VALUE`` overrides are parsed apart)."""
  p = argparse.ArgumentParser(
    prog="iomm-cache-features",
    description="Encode an iomm-prepare folder with a run's frozen ViT + projector and VAE "
    "encoder. Extra --config.KEY=VALUE items override config keys.",
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--config", help="experiment file[:arg], as iomm-train takes it")
  src.add_argument("--workdir", help="a run's workdir: its config.json names the encoders")
  p.add_argument("--data", default=None, help="the prepared folder (default: config.data.path)")
  p.add_argument("--out", default=None, help="output folder (resumes if it exists)")
  p.add_argument("--dtype", default="bfloat16", choices=tuple(features.DTYPES))
  p.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-index", type=int, default=0)
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument(
    "--shapes-only",
    action="store_true",
    help="print the arrays and bytes per record of the config's model (no weights or data read)",
  )
  return p


def _config(p: argparse.ArgumentParser, a: argparse.Namespace, extra: list[str]):
  """The run's config: ``--config`` (+ overrides) or ``--workdir``'s; errors exit 2."""
  from iomm_jax.configs import loading

  items = []
  for arg in extra:
    if not arg.startswith("--config.") or "=" not in arg:
      p.error(f"unrecognized arguments: {arg} (config overrides are --config.KEY=VALUE)")
    items.append(arg[len("--config.") :])
  try:
    overrides = loading.parse_overrides(items)
  except ValueError as e:
    p.error(f"argument --config.KEY=VALUE: {e}")
  try:
    if a.config is not None:
      return loading.load_config(a.config, overrides)
    from iomm_jax.assembly import workdirs

    config = workdirs.load_workdir_config(a.workdir)
    for key, value in overrides.items():
      loading.set_dotted(config, key, value)
    return config
  except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
    flag = "--config" if a.config is not None else "--workdir"
    p.error(f"argument {flag}: {e.args[0] if isinstance(e, KeyError) else e}")


def describe(specs: features.Specs) -> str:
  """``vision 256x1536 bfloat16 (786,432 B), ...``."""
  parts = []
  for name, shape, dtype in specs:
    n = math.prod(shape) * features.DTYPES[dtype].itemsize
    parts.append(f"{name} {'x'.join(map(str, shape))} {dtype} ({n:,} B)")
  return ", ".join(parts)


def summary(manifest: dict, out: str) -> str:
  """The closing report: records, undecodable ones, arrays, bytes per record."""
  specs = features.specs_from_json(manifest["arrays"])
  per = manifest["feature_bytes_per_record"]
  return "\n".join(
    [
      f"wrote features of {manifest['num_records']} records ({manifest['num_bad']} undecodable, "
      f"skipped in training) in {len(manifest['shards'])} shards to {out}",
      f"arrays: {describe(specs)}",
      f"{BYTES_NOTE}: {per:,} of features ({per / 2**20:.3f} MiB), "
      f"{manifest['stored_bytes_per_record']:,} stored",
      f"train on them with --config.data.features={out}",
    ]
  )


def main(argv: list[str] | None = None) -> int:
  """Entry point of ``iomm-cache-features``; returns (and exits with) the exit code."""
  argv = sys.argv[1:] if argv is None else argv
  p = _parser()
  a, extra = p.parse_known_args(argv)
  config = _config(p, a, extra)
  from iomm_jax.data.inputs import InputError
  from iomm_jax.train import cache

  if a.shapes_only:
    try:
      specs = cache.shape_specs(config, a.dtype)
    except (InputError, ValueError) as e:
      p.error(str(e))
    per = features.feature_bytes(specs)
    print(f"arrays: {describe(specs)}")
    print(
      f"{BYTES_NOTE}: {per:,} of features ({per / 2**20:.3f} MiB) at {config.model.image_size} px"
    )
    return 0
  if a.out is None:
    p.error("the following arguments are required: --out")
  data = a.data
  if data is None:
    if config.data.source != "array_record" or not config.data.path:
      p.error(
        f"argument --data: not given, and the config has no prepared folder "
        f"(config.data.source={config.data.source!r}, config.data.path={config.data.path!r})"
      )
    data = config.data.path
  from iomm_jax import runtime

  runtime.enable_compilation_cache()
  try:
    manifest = cache.cache_features(
      config,
      data,
      a.out,
      a.dtype,
      a.batch_size,
      a.num_processes,
      a.process_index,
      progress=not a.no_progress,
    )
  except (InputError, FileNotFoundError, ValueError, OSError) as e:
    p.error(str(e))  # exit code 2
  if manifest is None:
    print(prepare.waiting_message(a.process_index))
    return 0
  print(summary(manifest, a.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
