"""A user's own captioned folder through every stage's data path: held-out records never
trained on, a tokenizer from the folder's captions (or a given one), stage 0 on captioned
records, grids and the held-out evaluation from the folder's own records."""

from __future__ import annotations

import os

import numpy as np
import pytest

from iomm_jax.assembly import context
from iomm_jax.configs import specs
from iomm_jax.configs.loading import load_config
from iomm_jax.data import example_folder, inputs, pipeline, prepare, records, sources
from iomm_jax.eval import heldout
from iomm_jax.train import generator, mllm
from tests.conftest import ROOT

N, HOLD = 24, 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
  src = str(tmp_path_factory.mktemp("own") / "images")
  example_folder.write_folder(src, N, seed=3, uncaptioned=0.2)
  out = str(tmp_path_factory.mktemp("own") / "prepared")
  prepare.prepare(inputs.FolderSource(src), out, prepare.Options(resolution=32, min_size=16),
                  progress=False)  # fmt: skip
  return out


def cfg(folder: str, stage: str = "pretrain", **overrides):
  spec = os.path.join(ROOT, "experiments", "folder", f"{stage}.py:data={folder},quick")
  return load_config(spec, {"data.holdout_records": HOLD, **overrides})


def test_example_folder_is_deterministic_and_captioned(tmp_path):
  a, cap = example_folder.make_image(5, seed=1)
  b, cap_b = example_folder.make_image(5, seed=1)
  assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and cap == cap_b
  assert cap.split()[1] in example_folder.COLOURS and np.ptp(a) > 60  # a scene, not a flat image
  example_folder.write_folder(str(tmp_path), 10, uncaptioned=0.3)
  names = sorted(os.listdir(tmp_path))
  assert (
    sum(n.endswith(".png") for n in names) == 10 and 0 < sum(n.endswith(".txt") for n in names) < 10
  )


def test_heldout_records_are_the_last_and_never_trained_on(folder):
  c = cfg(folder)
  src, where = sources.training_source(specs.from_config(c))
  assert len(src) == N - HOLD and "6 held out" in where
  full, _ = sources.open_source(specs.from_config(c))
  keys = lambda s, idx: {records.decode_record(s[i])["key"] for i in idx}  # noqa: E731
  assert keys(src, range(len(src))) == keys(full, range(N - HOLD))
  held = sources.heldout(specs.from_config(c), 100, captioned=False)
  assert len(held) == HOLD and all(img.shape == (24, 24, 3) for img, _ in held)
  captioned = sources.heldout(specs.from_config(c), 100)
  assert 0 < len(captioned) <= HOLD and all(cap for _, cap in captioned)
  with pytest.raises(ValueError, match=r"config.data.holdout_records=0: .* no held-out records"):
    sources.heldout(specs.from_config(cfg(folder, **{"data.holdout_records": 0})), 4)
  # grids of a run that holds nothing out show (labelled) training records instead of failing
  assert len(generator.grid_prompts(cfg(folder, **{"data.holdout_records": 0}))) == 2
  with pytest.raises(ValueError, match=r"config.data.holdout_records=24: .* holds 24 records"):
    sources.training_source(specs.from_config(cfg(folder, **{"data.holdout_records": N})))


def test_the_tokenizer_is_trained_on_the_folders_training_captions(folder, tmp_path):
  c = cfg(folder, "mllm")
  corpus = sources.caption_corpus(specs.from_config(c))
  held = {cap for _, cap in sources.heldout(specs.from_config(c), 100)}
  assert corpus and len(corpus) < N and all(cap.startswith("a ") for cap in corpus)
  tok = context.train_tokenizer(c, str(tmp_path / "tokenizer.model"))
  words = "a red ball on the grass in a room".split()
  pieces = [tok._sp.id_to_piece(i) for i in tok.encode(" ".join(words))]
  assert tok.unk_id not in tok.encode(" ".join(words)) and len(pieces) <= len(words) + 2
  assert held  # the held-out captions exist (and were not read for the corpus: same words here)
  # or a given one, copied: from a file or from a workdir that holds one
  given = context.train_tokenizer(
    cfg(folder, "mllm", **{"model.tokenizer_from": str(tmp_path)}), str(tmp_path / "copy.model")
  )
  assert given.model_proto == tok.model_proto
  with pytest.raises(FileNotFoundError, match="config.model.tokenizer_from='/nowhere'"):
    context.train_tokenizer(cfg(folder, "mllm", **{"model.tokenizer_from": "/nowhere"}), "")


def test_stage0_captions_the_captioned_records(folder):
  c = cfg(folder, "mllm")
  tok = context.train_tokenizer(c, "")
  cond = pipeline.Conditioner(tok, 16, c.model.aux_prompt, c.model.max_text_len)
  it = iter(pipeline.make_dataset(specs.from_config(c), cond, seq_len=mllm.caption_len(c, 16)))
  batch = next(it)
  assert batch["ids"].shape == (c.train.batch_size, mllm.caption_len(c, 16))
  assert batch["image"].shape[1:] == (24, 24, 3) and batch["loss_mask"].any(axis=1).all()
  text = tok.decode([int(i) for i in batch["ids"][0][batch["loss_mask"][0]] if i != tok.eos_id])
  assert text.startswith("a ")  # a caption of the folder


def test_stage0_refuses_a_folder_without_captions(tmp_path):
  src = str(tmp_path / "images")
  example_folder.write_folder(src, 6, uncaptioned=1.0)
  out = str(tmp_path / "prepared")
  prepare.prepare(inputs.FolderSource(src), out, prepare.Options(resolution=32, min_size=16),
                  progress=False)  # fmt: skip
  c = cfg(out, "mllm", **{"data.holdout_records": 0})
  with pytest.raises(ValueError, match="no captioned training record"):
    context.train_tokenizer(c, "")
  cond = pipeline.Conditioner(context.train_tokenizer(cfg(out, "mllm", **{
    "data.source": "shapes"}), ""), 16, c.model.aux_prompt, 24)  # fmt: skip
  with pytest.raises(ValueError, match="holds no captioned record: stage 0"):
    pipeline.make_dataset(specs.from_config(c), cond, seq_len=64)


def test_heldout_score_counts_caption_matches_against_chance():
  caps = ["a red ball", "a red ball", "a blue box", "a green cup"]
  real = np.eye(4)
  gen = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]], float)
  imgs = np.zeros((4, 8, 8, 3), np.uint8)
  imgs[:3, 0, 0] = 255  # the last image is flat: empty
  r = heldout.score(caps, imgs, real, gen)
  # 0 -> real 1 (same caption), 1 -> 0 (same), 2 -> 3 (other), 3 -> 3 (own)
  assert r["correct"] == [True, True, False, True] and r["caption_match"] == 0.75
  assert r["chance"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
  assert r["caption_match_se"] == pytest.approx(np.sqrt(0.75 * 0.25 / 4))
  assert r["distinct_captions"] == 3 and r["empty"] == 0.25 and r["num_images"] == 4
  x = np.random.default_rng(0).normal(size=(200, 3))
  assert heldout.frechet(x, x) == pytest.approx(0.0, abs=1e-9)
  assert heldout.frechet(x, x + 2.0) == pytest.approx(12.0, rel=1e-6)
