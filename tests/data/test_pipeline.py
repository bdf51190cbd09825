"""Tests of the grain input pipelines: condition layouts, the stage-2 pair set (dense captions),
the mix of image-only and captioned samples, and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config
from iomm_jax.data import pipeline
from iomm_jax.data import shapes as S
from iomm_jax.data.tokenizer import Tokenizer

WORLD = S.WorldConfig(canvas=24, grid=2, shapes=S.V2_SHAPES, holdout="v2")  # the demo's world
AUX = "Generate an image that is identical to the reference image:"


@pytest.fixture(scope="module")
def conditioner() -> pipeline.Conditioner:
  tok = Tokenizer.train(S.all_caption_corpus(WORLD) + [AUX], 256, None)
  return pipeline.Conditioner(tok, num_image_tokens=16, aux_prompt=AUX, max_text_len=24)


def test_condition_layouts(conditioner):
  c, t = conditioner, conditioner.tokenizer
  ids, valid = c.image_condition()
  n_aux = len(t.encode(AUX, bos=True))
  assert ids.shape == valid.shape == (c.cond_len,)
  assert c.cond_len == max(n_aux + 2 + 16, 24)
  assert ids[0] == t.bos_id and ids[n_aux] == t.img_start_id
  assert (ids[n_aux + 1 : n_aux + 17] == t.img_context_id).all() and ids[n_aux + 17] == t.img_end_id
  assert valid.sum() == n_aux + 18 and not valid[n_aux + 18 :].any()
  tids, tvalid = c.text_conditions(["a photo of a red circle", "a photo of two squares"])
  assert tids.shape == (2, c.cond_len) and (tids[:, 0] == t.bos_id).all()
  assert t.decode([int(i) for i, v in zip(tids[0], tvalid[0]) if v]) == "a photo of a red circle"
  nids, nvalid = c.null_condition()
  assert nids[0] == t.bos_id and nvalid.sum() == 1


def test_aux_prompt_is_encoded_once(conditioner, monkeypatch):
  c = pipeline.Conditioner(conditioner.tokenizer, 16, AUX, 24)
  calls = []
  encode = c.tokenizer.encode
  monkeypatch.setattr(c.tokenizer, "encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
  for _ in range(5):
    c.image_condition()
  assert len(calls) == 1


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_pair_set_dense_caption_share(share):
  ps = pipeline.PairSet(WORLD, 400, seed=3, dense_captions=share)
  pairs = S.make_pair_set(WORLD, 400, 3)
  dense = [cap == S.describe(scene) for cap, (scene, _, _) in zip(ps.captions, pairs)]
  short = [cap == prompt for cap, (_, prompt, _) in zip(ps.captions, pairs)]
  assert all(d or s for d, s in zip(dense, short))
  assert abs(np.mean(dense) - share) < 0.08
  if share == 0.0:
    assert ps.captions == [p for _, p, _ in pairs]
  # the images are those of the scenes, whatever the caption
  assert (ps.images[7] == S.render(pairs[7][0], WORLD)).all()
  # no evaluation prompt appears verbatim among the pairs
  assert not set(ps.captions) & {m["prompt"] for m in S.eval_prompts(WORLD, per_category=None)}


def test_dense_captions_fit_the_text_limit(conditioner):
  ps = pipeline.PairSet(WORLD, 500, seed=0, dense_captions=1.0)
  longest = max(len(conditioner.tokenizer.encode(c, bos=True)) for c in ps.captions)
  assert longest <= 24  # the conditioner's max_text_len
  ids, valid = conditioner.text_conditions(ps.captions)  # raises if any caption is too long
  assert ids.shape == (500, conditioner.cond_len) and valid.sum(axis=1).max() == longest


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_pair_set_rejects_bad_share(share):
  with pytest.raises(ValueError, match="dense_captions"):
    pipeline.PairSet(WORLD, 10, seed=0, dense_captions=share)


def _finetune_config(**overrides):
  base = {"model.mllm_init": "random", "train.init_from": "unused", "train.batch_size": 16}
  return load_config("experiments/shapes/finetune.py", {**base, **overrides})


def test_finetune_batches_mix_and_replay(conditioner, monkeypatch):
  monkeypatch.chdir(pipeline.__file__.rsplit("/iomm_jax/", 1)[0])
  cfg = _finetune_config(**{"diffusion.mix_ratio": 0.5, "data.num_pairs": 64})
  it = iter(pipeline.make_dataset(specs.from_config(cfg), conditioner))
  batches = [next(it) for _ in range(8)]
  b = batches[0]
  assert b["image"].shape == (16, cfg.data.canvas, cfg.data.canvas, 3)
  assert b["cond_ids"].shape == (16, conditioner.cond_len)
  share = np.mean([x["is_image_only"].mean() for x in batches])
  assert 0.35 < share < 0.65
  # image-only rows carry the image condition, captioned rows a text prompt
  img_ids, _ = conditioner.image_condition()
  for ids, only in zip(b["cond_ids"], b["is_image_only"]):
    assert (ids == img_ids).all() == bool(only)
  again = iter(pipeline.make_dataset(specs.from_config(cfg), conditioner))
  for x in batches:
    y = next(again)
    assert all((x[k] == y[k]).all() for k in x)
