"""``iomm-prepare``'s library: a source (``inputs``) -> ArrayRecord shards + manifest (``records``).

Item ``i`` of the source goes to shard ``i // records_per_shard`` (a shard holds at most that
many records: skipped items leave gaps), so the shard layout depends only on the source and the
settings. With ``num_processes`` N, process ``p`` writes shards ``p, p + N, p + 2N, ...``:
disjoint, and any process count can resume any other's work.

Each shard is written to ``<name>.tmp-<pid>``, its report ``shard-...json`` is written, then the
shard is renamed into place: a shard is finished iff its final file exists, and a rerun with the
same arguments skips finished shards (and removes stale temporaries of unfinished ones). The
settings are recorded in ``prepare.json``; a rerun with different settings is refused.

The manifest is written by whichever process finds every shard finished after its own work
(its content depends only on the shards' reports, so two processes finishing together write the
same bytes, each through a rename). If a process ends while others still work, rerunning any
process's command later (all its shards are finished, so it only merges) writes it.

That machinery (``check_process_split``, ``check_settings``, ``unfinished_shards``,
``write_shard``, ``shard_reports``) also writes ``iomm-cache-features``' shards (train/cache.py).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from iomm_jax import files
from iomm_jax.data import decode, records
from iomm_jax.data.inputs import InputError

SETTINGS = "prepare.json"
SKIPPED = "skipped.jsonl"


@dataclasses.dataclass(frozen=True)
class Options:
  """How records are written (all but the process split must match when resuming)."""

  resolution: int = 512  # output side (shorter side resized, centre square kept)
  min_size: int = 128  # shorter sides below this are skipped (``too_small``)
  max_aspect: float = 4.0  # longer / shorter side above this is skipped
  max_pixels: int = 64_000_000  # images with more pixels are refused before decoding
  captions: str = "keep"  # "keep" or "drop"
  max_caption_chars: int = 2000  # longer captions are cut at a word boundary
  records_per_shard: int = 1000  # items per shard (skipped ones leave a shard shorter)
  jpeg_quality: int = records.JPEG_QUALITY  # quality of the stored JPEGs

  def policy(self) -> decode.ImagePolicy:
    return decode.ImagePolicy(self.resolution, self.min_size, self.max_aspect, self.max_pixels)

  def check(self) -> None:
    """InputError naming the flag of the first bad value, or the two flags of settings under
    which no image at all could be kept."""
    for flag, ok in (
      ("--resolution", self.resolution > 0),
      ("--min-size", self.min_size >= 0),
      ("--max-aspect", self.max_aspect >= 1.0),
      ("--max-pixels", self.max_pixels > 0),
      ("--captions", self.captions in ("keep", "drop")),
      ("--max-caption-chars", self.max_caption_chars > 0),
      ("--records-per-shard", self.records_per_shard > 0),
      ("--jpeg-quality", 1 <= self.jpeg_quality <= 100),
    ):
      if not ok:
        value = getattr(self, flag[2:].replace("-", "_"))
        raise InputError(f"{flag} {value!r} is out of range")
    if self.min_size**2 > self.max_pixels:
      raise InputError(
        f"--max-pixels {self.max_pixels} is below --min-size {self.min_size} squared: every image "
        "would be skipped (too_small or too_many_pixels)"
      )


def check_process_split(num_processes: int, process_index: int) -> None:
  """InputError naming ``--process-index`` unless it lies in [0, ``num_processes``)."""
  if num_processes < 1 or not 0 <= process_index < num_processes:
    raise InputError(
      f"--process-index {process_index} must lie in [0, --num-processes {num_processes})"
    )


def check_settings(out_dir: str, settings: dict[str, Any], filename: str = SETTINGS) -> None:
  """Records ``settings`` in ``out_dir/filename``, or refuses (InputError naming ``--out`` and the
  differing keys) if the folder already holds work done with other settings."""
  path = os.path.join(out_dir, filename)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != settings:
      diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
      raise InputError(
        f"--out {out_dir!r} holds a preparation with other settings ({', '.join(diff)} differ; "
        f"see {path}); use a new --out folder or the original arguments"
      )
  else:
    records.write_json_atomic(path, settings)


def unfinished_shards(
  out_dir: str, num_shards: int, num_processes: int = 1, process_index: int = 0
) -> list[int]:
  """This process's shards (``process_index``, ``+ num_processes``, ...) not yet finished."""
  return [
    s
    for s in range(process_index, num_shards, num_processes)
    if not os.path.exists(os.path.join(out_dir, records.shard_name(s, num_shards)))
  ]


def _report_path(shard_path: str) -> str:
  """``shard-...json`` beside ``shard-....array_record``."""
  return shard_path[: -len(".array_record")] + ".json"


def write_shard(
  out_dir: str, shard: int, num_shards: int, fill: Callable[[Any], dict[str, Any]]
) -> None:
  """Writes one shard so that it is never seen half-written: ``fill(writer)`` writes its records
  to an ArrayRecordWriter on ``<name>.tmp-<pid>`` and returns the shard's report, which is saved
  as ``shard-...json`` before the temporary is renamed into place (stale temporaries of an
  earlier, interrupted attempt are removed first)."""
  from array_record.python.array_record_module import ArrayRecordWriter

  final = os.path.join(out_dir, records.shard_name(shard, num_shards))
  for stale in glob.glob(glob.escape(final) + ".tmp-*"):
    os.remove(stale)
  tmp = f"{final}.tmp-{os.getpid()}"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  try:
    report = fill(writer)
  finally:
    writer.close()
  records.write_json_atomic(_report_path(final), report)
  os.replace(tmp, final)  # the shard is finished from here on


def shard_reports(out_dir: str, num_shards: int) -> list[tuple[str, dict[str, Any]]] | None:
  """(file name, report) of every shard in order if all are finished, else None."""
  names = [records.shard_name(s, num_shards) for s in range(num_shards)]
  if not all(os.path.exists(os.path.join(out_dir, n)) for n in names):
    return None
  out = []
  for n in names:
    with open(_report_path(os.path.join(out_dir, n))) as f:
      out.append((n, json.load(f)))
  return out


def _fill_shard(source, shard: int, opts: Options, bar) -> Callable[[Any], dict[str, Any]]:
  """The ``write_shard`` filler of prepared shard ``shard``: decoded, resized, re-encoded."""

  def fill(writer) -> dict[str, Any]:
    policy, keep = opts.policy(), opts.captions == "keep"
    start = shard * opts.records_per_shard
    stop = min(start + opts.records_per_shard, len(source))
    skipped, fixes, written, captioned = [], {}, 0, 0
    for raw in source.read(start, stop):
      bar.update(1)
      try:
        if raw.skip:
          raise decode.BadRecord(raw.skip, raw.detail)
        image = decode.load_image(raw.image, policy, raw.name or raw.key)
      except decode.BadRecord as e:
        skipped.append({"index": raw.index, "key": raw.key, "reason": e.reason, "detail": e.detail})
        continue
      for fix in raw.fixes if keep else ():  # caption fields the source could not use
        fixes[fix] = fixes.get(fix, 0) + 1
      cap = decode.clean_caption(raw.caption, opts.max_caption_chars, fixes) if keep else None
      jpeg = records.encode_image(image, opts.jpeg_quality)
      writer.write(records.encode_record(raw.key, jpeg, cap))
      written += 1
      captioned += cap is not None
    return {"records": written, "captioned": captioned, "skipped": skipped, "fixes": fixes}

  return fill


def waiting_message(process_index: int) -> str:
  """What a process says when its shards are finished but other processes' are not."""
  return (
    f"process {process_index}: its shards are finished; waiting for other processes (the last "
    "to finish writes the manifest; rerunning any process's command also does)"
  )


def finalize(out_dir: str, settings: dict[str, Any], num_shards: int) -> dict[str, Any] | None:
  """Writes ``skipped.jsonl`` and the manifest if every shard is finished; returns it or None."""
  reports = shard_reports(out_dir, num_shards)
  if reports is None:
    return None
  shards, skipped, fixes, reasons = [], [], {}, {}
  for n, rep in reports:
    shards.append({"file": n, "records": rep["records"], "captioned": rep["captioned"]})
    skipped += rep["skipped"]
    for k, v in rep["fixes"].items():
      fixes[k] = fixes.get(k, 0) + v
    for s in rep["skipped"]:
      reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
  files.write_text(os.path.join(out_dir, SKIPPED), "".join(json.dumps(s) + "\n" for s in skipped))
  manifest = {
    "format": records.FORMAT,
    "format_version": records.FORMAT_VERSION,
    "record_encoding": "msgpack {key: str, image: JPEG bytes (RGB, square), caption: str|null}",
    "resolution": settings["options"]["resolution"],
    "captions": settings["options"]["captions"],
    "source": settings["source"],
    "options": settings["options"],
    "num_items": settings["num_items"],
    "num_records": sum(s["records"] for s in shards),
    "num_captioned": sum(s["captioned"] for s in shards),
    "shards": shards,
    "skipped": dict(sorted(reasons.items())),
    "num_skipped": len(skipped),
    "caption_fixes": dict(sorted(fixes.items())),
  }
  records.write_json_atomic(os.path.join(out_dir, records.MANIFEST), manifest)
  return manifest


def prepare(
  source,
  out_dir: str,
  opts: Options,
  num_processes: int = 1,
  process_index: int = 0,
  progress: bool = True,
  after_shard: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:
  """Writes this process's unfinished shards of ``source`` to ``out_dir``; returns the manifest
  if every shard is now finished, else None. ``after_shard(s)`` runs after each shard written
  (tests use it to simulate an interruption)."""
  opts.check()
  check_process_split(num_processes, process_index)
  if not len(source):
    raise InputError(f"the input ({source.describe()}) holds no records")
  os.makedirs(out_dir, exist_ok=True)
  settings = {
    "format_version": records.FORMAT_VERSION,
    "source": source.describe(),
    "num_items": len(source),
    "options": dataclasses.asdict(opts),
  }
  check_settings(out_dir, settings)
  num_shards = math.ceil(len(source) / opts.records_per_shard)
  mine = unfinished_shards(out_dir, num_shards, num_processes, process_index)
  todo = sum(
    min((s + 1) * opts.records_per_shard, len(source)) - s * opts.records_per_shard for s in mine
  )
  with tqdm(total=todo, unit="img", disable=not progress, file=sys.stderr) as bar:
    for s in mine:
      write_shard(out_dir, s, num_shards, _fill_shard(source, s, opts, bar))
      if after_shard is not None:
        after_shard(s)
  return finalize(out_dir, settings, num_shards)
