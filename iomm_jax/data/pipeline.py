"""grain input pipelines of the three stages, over the embedded shapes world (real data:
``config.data.source`` "array_record" or "tfds", or cached features ``config.data.features``,
built by ``iomm_jax.data.sources``). Both read the run's typed spec (``configs.specs.RunSpec``,
built once at the stage's entry), never the ConfigDict; errors name the config key.

Every element is a dict of numpy arrays; batches add a leading axis. Per-element randomness comes
from grain's seeded ``random_map`` or from the element index, so an iterator restored from a
checkpoint replays exactly. Each process reads a disjoint slice (``process_index::process_count``).

Condition sequences (paper §2.2), right-padded to one length ``cond_len``:
  image-only: [BOS] aux-prompt <img> <IMG_CONTEXT> x P </img>
  text:       [BOS] caption
  null:       [BOS]                        (the unconditional input of guidance)
Captioning (stage 0): [BOS] <img> <IMG_CONTEXT> x P </img> caption [EOS], loss on caption + EOS.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import jax
import numpy as np

from iomm_jax.configs import specs
from iomm_jax.data import shapes, sources
from iomm_jax.data.tokenizer import Tokenizer


def shapes_world(data: specs.DataSpec) -> shapes.WorldConfig:
  """The shapes world of the data spec (``config.data``'s canvas, grid, shapes and hold-out
  version; an old workdir's config got the first world's in ``specs.upgrade``)."""
  try:
    return shapes.WorldConfig(
      canvas=data.canvas, grid=data.grid, shapes=data.shapes, holdout=data.holdout
    )
  except ValueError as e:  # name the config key, not the dataclass field
    raise ValueError(str(e).replace("WorldConfig.", "config.data.")) from None


def condition_length(aux_len: int, num_image_tokens: int, max_text_len: int) -> int:
  """Length of every padded condition sequence: the longer of [BOS] + the auxiliary prompt
  (``aux_len`` ids) + <img> + the image tokens + </img>, and a prompt of ``max_text_len``."""
  return max(aux_len + 2 + num_image_tokens, max_text_len)


@dataclasses.dataclass(frozen=True)
class Conditioner:
  """Builds padded condition-id sequences; picklable, so it can run in grain workers."""

  tokenizer: Tokenizer
  num_image_tokens: int
  aux_prompt: str
  max_text_len: int

  @functools.cached_property
  def aux_ids(self) -> list[int]:
    """[BOS] + the auxiliary prompt's ids (encoded once per conditioner)."""
    return self.tokenizer.encode(self.aux_prompt, bos=True)

  @functools.cached_property
  def cond_len(self) -> int:
    """Length of every padded condition sequence."""
    return condition_length(len(self.aux_ids), self.num_image_tokens, self.max_text_len)

  def _pad(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((self.cond_len,), self.tokenizer.pad_id, np.int32)
    out[: len(ids)] = ids
    return out, np.arange(self.cond_len) < len(ids)

  def image_condition(self) -> tuple[np.ndarray, np.ndarray]:
    t = self.tokenizer
    return self._pad(
      self.aux_ids + [t.img_start_id] + [t.img_context_id] * self.num_image_tokens + [t.img_end_id]
    )

  def text_conditions(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[B, cond_len] ids and validity; a prompt over ``max_text_len`` tokens is a ValueError."""
    ids, _ = self.tokenizer.encode_padded(prompts, self.max_text_len)
    rows = [self._pad([int(i) for i in r if i != self.tokenizer.pad_id]) for r in ids]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  def truncated_text_condition(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """[cond_len] ids and validity of one prompt cut to ``max_text_len`` tokens (real captions:
    a long one is shortened, not an error)."""
    return self._pad(self.tokenizer.encode(prompt, bos=True)[: self.max_text_len])

  def null_condition(self) -> tuple[np.ndarray, np.ndarray]:
    return self._pad([self.tokenizer.bos_id])


# ----------------------------------------------------------------------------- sources


class ShapesStream:
  """An unlimited stream of random scenes: element i is rendered from seed (seed, i)."""

  def __init__(self, world: shapes.WorldConfig, seed: int, length: int = 2**40):
    self.world, self.seed, self.length = world, seed, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int) -> dict[str, Any]:
    rng = np.random.default_rng((self.seed, int(i)))
    scene = shapes.sample_scene(rng, self.world)
    return {"image": shapes.render(scene, self.world), "caption": shapes.describe(scene)}


class PairSet:
  """The fixed, curated text-image pair set of stage 2 (rendered once, held in memory).

  A share ``dense_captions`` of the pairs (chosen by ``seed``) carries the scene's dense
  description (every object's colour and shape, ``shapes.describe``), the rest their category
  prompt, as curated sets mix detailed and short captions.
  """

  def __init__(
    self, world: shapes.WorldConfig, num_pairs: int, seed: int, dense_captions: float = 0.0
  ):
    if not 0.0 <= dense_captions <= 1.0:
      raise ValueError(f"config.data.dense_captions={dense_captions} must lie in [0, 1]")
    pairs = shapes.make_pair_set(world, num_pairs, seed)
    dense = np.random.default_rng((seed, 1)).random(num_pairs) < dense_captions
    self.images = np.stack([shapes.render(scene, world) for scene, _, _ in pairs])
    self.captions = [
      shapes.describe(scene) if d else caption for (scene, caption, _), d in zip(pairs, dense)
    ]

  def __len__(self) -> int:
    return len(self.captions)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"image": self.images[i], "caption": self.captions[i]}


# ----------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class ImageOnly(grain.transforms.Map):
  """Image-only sample: the image conditions on itself (masked later, in the train step)."""

  conditioner: Conditioner

  def map(self, element):
    ids, valid = self.conditioner.image_condition()
    return {
      "image": element["image"],
      "cond_ids": ids,
      "cond_valid": valid,
      "is_image_only": np.bool_(True),
    }


@dataclasses.dataclass(frozen=True)
class TextOnly(grain.transforms.Map):
  """Pair sample: the image conditioned on its caption."""

  conditioner: Conditioner

  def map(self, element):
    ids, valid = self.conditioner.text_conditions([element["caption"]])
    return {
      "image": element["image"],
      "cond_ids": ids[0],
      "cond_valid": valid[0],
      "is_image_only": np.bool_(False),
    }


@dataclasses.dataclass(frozen=True)
class Mixed(grain.transforms.RandomMap):
  """Stage-2 sample: image-only with probability ``mix_ratio`` (lambda), else captioned."""

  conditioner: Conditioner
  mix_ratio: float

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < self.mix_ratio:
      return ImageOnly(self.conditioner).map(element)
    return TextOnly(self.conditioner).map(element)


@dataclasses.dataclass(frozen=True)
class Captioning(grain.transforms.Map):
  """Stage-0 sample: image tokens then the caption, next-token loss on the caption and EOS."""

  tokenizer: Tokenizer
  num_image_tokens: int
  seq_len: int

  def map(self, element):
    t = self.tokenizer
    prefix = (
      [t.bos_id, t.img_start_id] + [t.img_context_id] * self.num_image_tokens + [t.img_end_id]
    )
    cap = t.encode(element["caption"], bos=False, eos=True)
    ids = (prefix + cap)[: self.seq_len]
    out = np.full((self.seq_len,), t.pad_id, np.int32)
    out[: len(ids)] = ids
    mask = np.zeros((self.seq_len,), bool)
    mask[len(prefix) : len(ids)] = True
    return {"image": element["image"], "ids": out, "loss_mask": mask}


# ----------------------------------------------------------------------------- loaders


def local_batch_size(global_batch: int) -> int:
  """Per-process batch: global / process count (``loading.validate`` checks that the global
  batch also splits over the mesh's data x fsdp shards)."""
  n_proc = jax.process_count()
  if global_batch <= 0 or global_batch % n_proc:
    raise ValueError(
      f"config.train.batch_size={global_batch} does not divide over {n_proc} processes"
    )
  return global_batch // n_proc


def _finish(ds: grain.MapDataset, spec: specs.RunSpec) -> grain.IterDataset:
  ds = ds[jax.process_index() :: jax.process_count()]
  ds = ds.batch(local_batch_size(spec.train.batch_size), drop_remainder=True)
  # Elements are whole batches here: grain's default read-ahead (16 threads, 500 elements) would
  # render thousands of images up front and compete with the train step for the CPU.
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=spec.data.read_threads, prefetch_buffer_size=spec.data.prefetch)
  )
  return _prefetch(it, spec)


def _finish_records(ds: grain.MapDataset, where: str, spec: specs.RunSpec) -> grain.IterDataset:
  """Like ``_finish`` for real records: batched after the undecodable ones are dropped."""
  ds = ds[jax.process_index() :: jax.process_count()]
  batch = local_batch_size(spec.train.batch_size)
  it = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=spec.data.read_threads, prefetch_buffer_size=spec.data.prefetch * batch
    )
  )
  it = sources.SkipUndecodable(it, where).batch(batch, drop_remainder=True)
  return _prefetch(it, spec)


def _prefetch(it: grain.IterDataset, spec: specs.RunSpec) -> grain.IterDataset:
  if spec.data.num_workers > 0:
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=spec.data.num_workers, per_worker_buffer_size=spec.data.prefetch
      )
    )
  return it


def make_dataset(
  spec: specs.RunSpec, conditioner: Conditioner, seq_len: int = 0
) -> grain.IterDataset:
  """The batched training dataset of ``config.stage`` over ``config.data.source``."""
  world, seed = shapes_world(spec.data), spec.seed
  if spec.data.source != "shapes" or spec.data.features:  # real data (data.sources)
    captioning = (
      Captioning(conditioner.tokenizer, conditioner.num_image_tokens, seq_len)
      if spec.stage == "mllm"
      else None
    )
    return _finish_records(*sources.record_dataset(spec, conditioner, captioning), spec)
  if spec.stage == "mllm":
    ds = grain.MapDataset.source(ShapesStream(world, seed + 1))
    return _finish(
      ds.map(Captioning(conditioner.tokenizer, conditioner.num_image_tokens, seq_len)), spec
    )
  if spec.stage == "pretrain":
    return _finish(
      grain.MapDataset.source(ShapesStream(world, seed + 2)).map(ImageOnly(conditioner)), spec
    )
  if spec.stage == "finetune":
    pairs = grain.MapDataset.source(
      PairSet(world, spec.data.num_pairs, seed + 3, spec.data.dense_captions)
    )
    pairs = pairs.shuffle(seed=seed + 4).repeat(None)
    lam = spec.diffusion.mix_ratio
    if spec.data.image_only_source == "pairs":  # the pair images, captions dropped
      return _finish(pairs.random_map(Mixed(conditioner, lam), seed=seed + 5), spec)
    if spec.data.image_only_source == "stream":  # fresh images from the stage-1 stream
      stream = grain.MapDataset.source(ShapesStream(world, seed + 6)).map(ImageOnly(conditioner))
      parts = [d for d, w in ((pairs.map(TextOnly(conditioner)), 1 - lam), (stream, lam)) if w]
      weights = [w for w in (1 - lam, lam) if w]
      return _finish(parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights), spec)
    raise ValueError(
      f"config.data.image_only_source={spec.data.image_only_source!r} unknown; "
      "choose 'pairs' or 'stream'"
    )
  raise ValueError(f"config.stage={spec.stage!r} unknown")
