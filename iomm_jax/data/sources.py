"""Training on real data: ``config.data.source`` "array_record" (an ``iomm-prepare`` folder) or
"tfds" (a tensorflow-datasets dataset already on disk, read with ``download=False``).

Elements match the shapes pipeline's: ``image`` uint8 [S, S, 3] (S = ``config.model.image_size``;
resized with ``decode.load_image`` if the prepared resolution differs), ``cond_ids``,
``cond_valid``, ``is_image_only``, plus ``data_skipped`` (int32): how many undecodable records
were dropped just before this one. A batch carries one count per row; the train loop pops and
sums them before the jitted step and logs the running total as ``data_skipped``.

Stage 1 ("pretrain") uses every record image-only (captions unused). Stage 2 ("finetune") makes
a captioned record an image-only sample with probability ``config.diffusion.mix_ratio`` and a
caption-conditioned one otherwise; a record without a caption is always image-only (so with
sparse captions the image-only share is above lambda). Captions longer than
``config.model.max_text_len`` tokens are cut to it. Stage 0 ("mllm") trains on shapes only.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import ml_collections
import numpy as np

from iomm_jax.data import decode, inputs, records

BAD = "_undecodable"  # key of the marker element a record that failed to decode becomes
MAX_BAD_IN_A_ROW = 1000  # more consecutive undecodable records than this is an error
SOURCES = ("shapes", "array_record", "tfds")


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

  def random_map(self, element, rng: np.random.Generator):
    draw = rng.random()  # drawn first, whatever the record, so the stream is deterministic
    policy = decode.ImagePolicy(resolution=self.image_size, min_size=0)
    try:
      if self.kind == "array_record":
        rec = records.decode_record(element)
        image, caption = rec["image"], rec.get("caption")
      else:
        image, caption = element[self.image_key], element.get(self.caption_key)
      image = decode.load_image(image, policy)
    except decode.BadRecord as e:
      return {BAD: e.reason}
    except (ValueError, KeyError, TypeError) as e:
      return {BAD: type(e).__name__}
    caption = decode.clean_caption(caption)
    c = self.conditioner
    if self.stage == "pretrain" or caption is None or draw < self.mix_ratio:
      ids, valid = c.image_condition()
      only = True
    else:
      ids, valid = c.truncated_text_condition(caption)
      only = False
    return {"image": image, "cond_ids": ids, "cond_valid": valid, "is_image_only": np.bool_(only)}


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


def open_source(config: ml_collections.ConfigDict) -> tuple[object, str]:
  """The random-access source of ``config.data`` and a description of where it is."""
  d = config.data
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


def record_dataset(config: ml_collections.ConfigDict, conditioner) -> tuple[grain.MapDataset, str]:
  """Shuffled, repeated, per-process samples of ``config.data`` (``BAD`` markers included)."""
  if config.stage not in ("pretrain", "finetune"):
    raise ValueError(
      f"config.stage={config.stage!r} trains on the shapes world only; "
      f"config.data.source={config.data.source!r} serves stages 'pretrain' and 'finetune'"
    )
  if config.stage == "finetune" and config.data.image_only_source != "pairs":
    raise ValueError(
      f"config.data.image_only_source={config.data.image_only_source!r}: with "
      f"config.data.source={config.data.source!r} image-only samples come from the same records; "
      "set it to 'pairs'"
    )
  src, where = open_source(config)
  sample = RecordSample(
    conditioner,
    config.model.image_size,
    config.stage,
    config.diffusion.mix_ratio,
    config.data.source,
    config.data.image_key,
    config.data.caption_key,
  )
  ds = grain.MapDataset.source(src).shuffle(seed=config.seed + 7).repeat(None)
  return ds.random_map(sample, seed=config.seed + 8), where
