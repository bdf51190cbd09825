"""Training on real data: ``config.data.source`` "array_record" (an ``iomm-prepare`` folder) or
"tfds" (a tensorflow-datasets dataset already on disk, read with ``download=False``).

Elements match the shapes pipeline's: ``image`` uint8 [S, S, 3] (S = ``config.model.image_size``;
resized with ``decode.load_image`` if the prepared resolution differs), ``cond_ids``,
``cond_valid``, ``is_image_only``, plus ``data_skipped`` (int32): how many undecodable records
were dropped just before this one. A batch carries one count per row; the train loop pops and
sums them before the jitted step and logs the running total as ``data_skipped``.

With ``config.data.features`` (a folder of ``iomm-cache-features``, format in ``data.features``)
the records are cached features instead: elements carry ``vision``, ``latent_mean`` (and
``latent_std``) in place of ``image``, everything else as above, in the same order and with the
same draws as the prepared folder they were encoded from (``data.source`` / ``data.path`` are
then not read).

Stage 1 ("pretrain") uses every record image-only (captions unused). Stage 2 ("finetune") makes
a captioned record an image-only sample with probability ``config.diffusion.mix_ratio`` and a
caption-conditioned one otherwise; a record without a caption is always image-only (so with
sparse captions the image-only share is above lambda). Captions longer than
``config.model.max_text_len`` tokens are cut to it. Stage 0 ("mllm") captions the captioned
records (next-token loss; a record without a caption is skipped and counted in ``data_skipped``).

Held out: the last ``config.data.holdout_records`` records of the source (by index, before any
shuffle) are never trained on; ``heldout`` reads them for the sample grids, ``iomm-eval`` and
``benchmarks/condition_use.py``, and ``caption_corpus`` (the run's tokenizer) reads the others.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import numpy as np

from iomm_jax.configs import specs
from iomm_jax.data import decode, features, inputs, records

BAD = "_undecodable"  # key of the marker element a record that failed to decode becomes
MAX_BAD_IN_A_ROW = 1000  # more consecutive undecodable records than this is an error
SOURCES = ("shapes", "array_record", "tfds")


def decode_element(
  element: Any,
  image_size: int,
  kind: str = "array_record",
  image_key: str = "image",
  caption_key: str = "caption",
) -> tuple[np.ndarray, str | None]:
  """(image uint8 [S, S, 3], cleaned caption or None) of one stored record (``kind``: msgpack
  record bytes, "array_record", or a dict of decoded "tfds" features); ``decode.BadRecord`` if
  it does not decode (``iomm-cache-features`` encodes records through this too)."""
  policy = decode.ImagePolicy(resolution=image_size, min_size=0)
  try:
    if kind == "array_record":
      rec = records.decode_record(element)
      image, caption = rec["image"], rec.get("caption")
    else:
      image, caption = element[image_key], element.get(caption_key)
    image = decode.load_image(image, policy)
  except decode.BadRecord:
    raise
  except (ValueError, KeyError, TypeError) as e:
    raise decode.BadRecord(type(e).__name__, str(e)) from None
  return image, decode.clean_caption(caption)


def condition_fields(
  conditioner, stage: str, mix_ratio: float, caption: str | None, draw: float
) -> dict[str, Any]:
  """cond_ids, cond_valid, is_image_only of a record of ``stage`` (module docstring): image-only
  in stage 1, without a caption, or when ``draw`` < ``mix_ratio``; else its caption."""
  if stage == "pretrain" or caption is None or draw < mix_ratio:
    ids, valid = conditioner.image_condition()
    only = True
  else:
    ids, valid = conditioner.truncated_text_condition(caption)
    only = False
  return {"cond_ids": ids, "cond_valid": valid, "is_image_only": np.bool_(only)}


@dataclasses.dataclass(frozen=True)
class RecordSample(grain.transforms.RandomMap):
  """A stored record -> a training sample of ``stage`` (or a ``BAD`` marker; module docstring).

  ``kind``: "array_record" (msgpack record bytes) or "tfds" (a dict of decoded features).
  """

  conditioner: object  # pipeline.Conditioner (not imported: pipeline imports this module)
  image_size: int
  stage: str
  mix_ratio: float
  kind: str = "array_record"
  image_key: str = "image"
  caption_key: str = "caption"
  captioning: Any = None  # stage 0: a pipeline.Captioning that makes the sequence of a caption

  def random_map(self, element, rng: np.random.Generator):
    draw = rng.random()  # drawn first, whatever the record, so the stream is deterministic
    try:
      image, caption = decode_element(
        element, self.image_size, self.kind, self.image_key, self.caption_key
      )
    except decode.BadRecord as e:
      return {BAD: e.reason}
    if self.captioning is not None:  # stage 0
      if caption is None:
        return {BAD: "no caption"}
      return self.captioning.map({"image": image, "caption": caption})
    return {
      "image": image,
      **condition_fields(self.conditioner, self.stage, self.mix_ratio, caption, draw),
    }


@dataclasses.dataclass(frozen=True)
class FeatureSample(grain.transforms.RandomMap):
  """A cached-feature record (``data.features``) -> a training sample of ``stage``: its arrays
  (vision, latent_mean[, latent_std]) in place of the image, the condition as ``RecordSample``
  makes it (the same draw, so a features run sees the samples of an online one)."""

  conditioner: object
  stage: str
  mix_ratio: float
  specs: features.Specs

  def random_map(self, element, rng: np.random.Generator):
    draw = rng.random()  # as RecordSample: first, whatever the record
    try:
      rec = features.decode_record(element, self.specs)
    except ValueError as e:
      return {BAD: type(e).__name__}
    if "bad" in rec:
      return {BAD: rec["bad"]}
    arrays = {name: rec[name] for name, _, _ in self.specs}
    return {
      **arrays,
      **condition_fields(self.conditioner, self.stage, self.mix_ratio, rec["caption"], draw),
    }


class SkipUndecodable(grain.IterDataset):
  """Drops ``BAD`` markers; the next element's ``data_skipped`` counts those dropped."""

  def __init__(self, parent: grain.IterDataset, where: str = ""):
    super().__init__(parent)
    self.where = where

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipIterator(self._parent.__iter__(), self.where)


class _SkipIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, where: str):
    super().__init__(parent)
    self._pending, self._where = 0, where

  def __next__(self):
    run = 0
    while True:
      element = next(self._parent)
      if BAD not in element:
        element["data_skipped"] = np.int32(self._pending)
        self._pending = 0
        return element
      self._pending += 1
      run += 1
      if run > MAX_BAD_IN_A_ROW:
        raise ValueError(
          f"{run} undecodable records in a row in {self._where} (last: {element[BAD]}); "
          "is the data corrupt, or config.data.source wrong?"
        )

  def get_state(self):
    return {"parent": self._parent.get_state(), "pending": self._pending}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._pending = int(state["pending"])


def open_source(spec: specs.RunSpec) -> tuple[object, str]:
  """The random-access source of ``config.data`` and a description of where it is."""
  d = spec.data
  if d.source == "array_record":
    m = records.read_manifest(d.path)
    mpath = os.path.join(d.path, records.MANIFEST)
    paths = [os.path.join(d.path, s["file"]) for s in m["shards"] if s["records"]]
    src = grain.sources.ArrayRecordDataSource(paths)
    if len(src) != m["num_records"]:
      raise ValueError(
        f"config.data.path={d.path!r}: the shards hold {len(src)} records but {mpath} lists "
        f"{m['num_records']}; re-run iomm-prepare into a new folder"
      )
    return src, f"config.data.path={d.path!r} ({mpath})"
  if d.source == "tfds":
    where = f"config.data.path={d.path!r}, config.data.tfds_name={d.tfds_name!r}"
    try:
      if d.tfds_name:
        src = inputs.open_tfds(name=d.tfds_name, data_dir=d.path, split=d.tfds_split)
      else:
        src = inputs.open_tfds(builder_dir=d.path, split=d.tfds_split)
    except inputs.InputError as e:
      raise ValueError(f"config.data.source='tfds' ({where}): {e}") from None
    if not len(src):
      raise ValueError(f"config.data.source='tfds' ({where}): split {d.tfds_split!r} is empty")
    return src, where
  raise ValueError(f"config.data.source={d.source!r} unknown; choose from {SOURCES}")


def open_features(spec: specs.RunSpec) -> tuple[object, str, features.Specs]:
  """The random-access source of ``config.data.features``, where it is, and its array specs."""
  path = spec.data.features
  m = features.read_manifest(path)
  mpath = os.path.join(path, features.MANIFEST)
  paths = [os.path.join(path, s["file"]) for s in m["shards"] if s["records"]]
  src = grain.sources.ArrayRecordDataSource(paths)
  if len(src) != m["num_records"]:
    raise ValueError(
      f"config.data.features={path!r}: the shards hold {len(src)} records but {mpath} lists "
      f"{m['num_records']}; re-run iomm-cache-features into a new folder"
    )
  return src, f"config.data.features={path!r} ({mpath})", features.specs_from_json(m["arrays"])


def num_heldout(spec: specs.RunSpec, total: int, where: str) -> int:
  """How many of the source's ``total`` records are held out (``config.data.holdout_records``;
  a workdir config from before the key holds out none). Refused when nothing would be left."""
  n = spec.data.holdout_records
  if n < 0 or n >= total:
    raise ValueError(
      f"config.data.holdout_records={n}: {where} holds {total} records; hold out at least 0 "
      f"and fewer than {total}"
    )
  return n


def _without_heldout(spec: specs.RunSpec, src, where: str) -> tuple[grain.MapDataset, str]:
  n = num_heldout(spec, len(src), where)
  ds = grain.MapDataset.source(src)
  return (ds[: len(src) - n], f"{where}, {n} held out") if n else (ds, where)


def training_source(spec: specs.RunSpec) -> tuple[grain.MapDataset, str]:
  """``open_source`` without the held-out records (the last ``data.holdout_records``)."""
  return _without_heldout(spec, *open_source(spec))


def _read(spec: specs.RunSpec, src, i: int) -> tuple[np.ndarray, str | None]:
  d = spec.data
  return decode_element(src[i], spec.model.image_size, d.source, d.image_key, d.caption_key)


def heldout(
  spec: specs.RunSpec, n: int, captioned: bool = True, or_training: bool = False
) -> list[tuple[np.ndarray, str | None]]:
  """Up to ``n`` held-out records as (image uint8 [S, S, 3], caption), in source order (with
  ``captioned``, only those with a caption); undecodable ones are passed over. Without held-out
  records (``data.holdout_records = 0``) it is an error naming the key (an evaluation on
  training images would mislead), unless ``or_training``: then the folder's first records
  (the training-time grids of such a run, labelled as training records)."""
  src, where = open_source(spec)
  k = num_heldout(spec, len(src), where)
  if not k and not or_training:
    raise ValueError(
      f"config.data.holdout_records=0: {where} has no held-out records to evaluate or probe "
      "on; train with it set (e.g. 64), so that they are never trained on"
    )
  out = []
  for i in range(len(src) - k, len(src)) if k else range(len(src)):
    try:
      image, caption = _read(spec, src, i)
    except decode.BadRecord:
      continue
    if caption is not None or not captioned:
      out.append((image, caption))
    if len(out) == n:
      break
  if captioned and not out:
    which = "held-out record" if k else "record"
    raise ValueError(f"config.data.holdout_records={k}: no {which} of {where} is captioned")
  return out


def caption_corpus(spec: specs.RunSpec, limit: int = 200_000) -> list[str]:
  """The captions of the training records (held-out ones excluded), up to ``limit``: what the
  run's tokenizer is trained on. An iomm-prepare folder's are read without decoding images."""
  src, where = training_source(spec)
  d = spec.data
  out = []
  for i in range(len(src)):
    try:
      if d.source == "array_record":
        caption = records.decode_record(src[i]).get("caption")
      else:
        caption = src[i].get(d.caption_key)
    except (ValueError, KeyError, TypeError):
      continue
    caption = decode.clean_caption(caption)
    if caption:
      out.append(caption)
      if len(out) == limit:
        break
  return out


def record_dataset(
  spec: specs.RunSpec, conditioner, captioning=None
) -> tuple[grain.MapDataset, str]:
  """Shuffled, repeated, per-process samples of ``config.data`` (``BAD`` markers included), the
  held-out records left out. Stage 0 ("mllm") needs ``captioning`` (a ``pipeline.Captioning``)."""
  if spec.stage == "mllm":
    if spec.data.features:
      raise ValueError(
        f"config.data.features={spec.data.features!r}: stage 0 trains the MLLM's own "
        "encoder, so it reads images; leave config.data.features empty"
      )
    if spec.data.source == "array_record":
      m = records.read_manifest(spec.data.path)
      if not m.get("num_captioned", 1):
        raise ValueError(
          f"config.data.path={spec.data.path!r} holds no captioned record: stage 0 trains "
          "the MLLM to caption (prepare the folder with caption sidecars or --captions-jsonl)"
        )
  elif spec.stage not in ("pretrain", "finetune"):
    raise ValueError(f"config.stage={spec.stage!r} unknown")
  if spec.stage == "finetune" and spec.data.image_only_source != "pairs":
    raise ValueError(
      f"config.data.image_only_source={spec.data.image_only_source!r}: with "
      f"config.data.source={spec.data.source!r} image-only samples come from the same records; "
      "set it to 'pairs'"
    )
  if spec.data.features:  # cached features instead of records (train/cache.py checks them)
    src, where, arrays = open_features(spec)  # record i is record i of the prepared folder
    src, where = _without_heldout(spec, src, where)
    sample = FeatureSample(conditioner, spec.stage, spec.diffusion.mix_ratio, arrays)
  else:
    src, where = training_source(spec)
    sample = RecordSample(
      conditioner,
      spec.model.image_size,
      spec.stage,
      spec.diffusion.mix_ratio,
      spec.data.source,
      spec.data.image_key,
      spec.data.caption_key,
      captioning,
    )
  ds = src.shuffle(seed=spec.seed + 7).repeat(None)
  return ds.random_map(sample, seed=spec.seed + 8), where
