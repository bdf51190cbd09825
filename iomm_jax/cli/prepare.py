"""``iomm-prepare``: images, WebDataset tars, parquet or a tfds dataset -> training shards.

  iomm-prepare --images DIR [--captions-jsonl FILE] --out OUT [--resolution 512]
  iomm-prepare --tar SHARDS... --out OUT
  iomm-prepare --parquet FILES... [--image-column image] [--caption-column caption] --out OUT
  iomm-prepare --tfds-dir BUILDER_DIR | --tfds-name NAME [--tfds-data-dir DIR] [--split train]
      --out OUT

Options: ``--captions keep|drop``, ``--records-per-shard``, ``--min-size`` (shorter sides below
it are skipped; default 128 or ``--resolution`` if smaller, anything between it and
``--resolution`` is upscaled), ``--max-aspect`` (default 4), ``--max-pixels``,
``--max-caption-chars``, ``--max-file-bytes`` (larger files are skipped unread; default 256 MiB).
Only regular files are read: FIFOs, devices and unreadable paths are skipped with their reason.
Several processes (machines or local processes) split the work with ``--num-processes N
--process-index I``; rerunning the same command resumes (finished shards are kept). Train on the
result with ``--config.data.source=array_record --config.data.path=OUT``. The record format
and the decoding policy are documented in ``iomm_jax/data/records.py`` and
``iomm_jax/data/decode.py``.

Exit codes: 0 this process's shards are done (and the manifest written, if every process is
done: the last one to finish writes it), 2 bad arguments or input files (the message names the
flag or file), or every input was skipped (the report is printed, then one line naming the flags
that skipped them).
"""

from __future__ import annotations

import argparse
import os
import sys

from iomm_jax.data import inputs, prepare


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="iomm-prepare", description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--images", metavar="DIR", help="a folder of images (recursive)")
  src.add_argument("--tar", nargs="+", metavar="TAR", help="WebDataset .tar files or folders")
  src.add_argument("--parquet", nargs="+", metavar="FILE", help="parquet files or folders")
  src.add_argument("--tfds-dir", metavar="DIR", help="a tfds builder directory on disk")
  src.add_argument("--tfds-name", metavar="NAME", help="a tfds dataset name (on disk only)")
  p.add_argument("--captions-jsonl", metavar="FILE", help="--images: captions as jsonl lines")
  p.add_argument("--image-column", default="image", help="parquet column / tfds feature")
  p.add_argument("--caption-column", default="caption", help="parquet column / tfds feature")
  p.add_argument("--tfds-data-dir", default="", help="--tfds-name: its data_dir")
  p.add_argument("--split", default="train", help="tfds split")
  p.add_argument("--out", required=True, help="output folder (resumes if it exists)")
  d = prepare.Options()
  p.add_argument("--resolution", type=int, default=d.resolution, help="output side in pixels")
  p.add_argument("--captions", default=d.captions, choices=("keep", "drop"))
  p.add_argument("--records-per-shard", type=int, default=d.records_per_shard)
  p.add_argument(
    "--min-size",
    type=int,
    help=f"skip shorter sides below it (default {d.min_size}, or --resolution if smaller)",
  )
  p.add_argument("--max-aspect", type=float, default=d.max_aspect, help="skip longer/shorter > it")
  p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="refuse larger images")
  p.add_argument("--max-caption-chars", type=int, default=d.max_caption_chars)
  p.add_argument(
    "--max-file-bytes",
    type=int,
    default=inputs.MAX_FILE_BYTES,
    help="skip (unread) files larger than this",
  )
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-index", type=int, default=0)
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def make_source(a: argparse.Namespace):
  """The ``inputs`` source the arguments name."""
  if a.captions_jsonl and not a.images:
    raise inputs.InputError("--captions-jsonl needs --images")
  if a.images:
    return inputs.FolderSource(a.images, a.captions_jsonl, a.max_file_bytes)
  if a.tar:
    return inputs.TarSource(a.tar, a.max_file_bytes)
  if a.parquet:
    return inputs.ParquetSource(a.parquet, a.image_column, a.caption_column)
  return inputs.TfdsSource(
    a.tfds_dir or "", a.tfds_name or "", a.tfds_data_dir, a.split, a.image_column, a.caption_column
  )


def summary(manifest: dict, out: str) -> str:
  """The closing report: records written, skipped by reason, caption fixes."""
  lines = [
    f"wrote {manifest['num_records']} records ({manifest['num_captioned']} captioned) in "
    f"{len(manifest['shards'])} shards at {manifest['resolution']} px to {out}",
    f"skipped {manifest['num_skipped']} of {manifest['num_items']} inputs"
    + (f" (each listed in {os.path.join(out, prepare.SKIPPED)}):" if manifest["skipped"] else ""),
  ]
  lines += [f"  {reason}: {n}" for reason, n in manifest["skipped"].items()]
  if manifest["caption_fixes"]:
    lines.append(
      "caption fixes: " + ", ".join(f"{k}={v}" for k, v in manifest["caption_fixes"].items())
    )
  return "\n".join(lines)


def nothing_written(manifest: dict, opts: prepare.Options) -> str:
  """The one-line error of a preparation that kept no record: the reasons, and the flags behind
  the size-related ones."""
  reasons = ", ".join(f"{r}: {n}" for r, n in manifest["skipped"].items()) or "no inputs"
  hints = {
    "too_small": f"--min-size {opts.min_size} skips shorter sides below it (--resolution "
    f"{opts.resolution}; smaller images are upscaled if you lower --min-size)",
    "too_many_pixels": f"--max-pixels {opts.max_pixels}",
    "extreme_aspect": f"--max-aspect {opts.max_aspect:g}",
    "too_large": "--max-file-bytes",
  }
  hint = "; ".join(h for r, h in hints.items() if r in manifest["skipped"])
  return f"wrote no records: every input was skipped ({reasons})" + (f"; {hint}" if hint else "")


def main(argv: list[str] | None = None) -> int:
  """Entry point of ``iomm-prepare``; returns (and exits with) the exit code."""
  parser = _parser()
  a = parser.parse_args(sys.argv[1:] if argv is None else argv)
  d = prepare.Options()
  opts = prepare.Options(
    resolution=a.resolution,
    min_size=a.min_size if a.min_size is not None else min(d.min_size, max(a.resolution, 0)),
    max_aspect=a.max_aspect,
    max_pixels=a.max_pixels,
    captions=a.captions,
    max_caption_chars=a.max_caption_chars,
    records_per_shard=a.records_per_shard,
  )
  try:
    source = make_source(a)
    manifest = prepare.prepare(
      source, a.out, opts, a.num_processes, a.process_index, progress=not a.no_progress
    )
  except (inputs.InputError, OSError) as e:  # OSError: an unreadable input, an unusable --out
    parser.error(str(e))  # exit code 2
  if manifest is None:
    print(prepare.waiting_message(a.process_index))
    return 0
  print(summary(manifest, a.out))
  if not manifest["num_records"]:
    print(f"{parser.prog}: error: {nothing_written(manifest, opts)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
