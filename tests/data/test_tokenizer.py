"""Tests of the in-memory SentencePiece tokenizer for shapes-world captions."""

import pickle
import time

import numpy as np
import pytest

from iomm_jax.data import shapes as S
from iomm_jax.data.tokenizer import Tokenizer

CORPUS = S.all_caption_corpus(S.WorldConfig())


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.train(CORPUS)


def test_trains_fast_and_writes_model(tmp_path):
  path = tmp_path / "sub" / "shapes.model"
  start = time.perf_counter()
  tok = Tokenizer.train(CORPUS, vocab_size=192, path=path)
  assert time.perf_counter() - start < 1.0
  assert path.exists()
  loaded = Tokenizer.load(path)
  assert loaded.vocab_size == tok.vocab_size
  assert loaded.encode(S.AUX_PROMPT) == tok.encode(S.AUX_PROMPT)


def test_round_trips_captions_without_unk(tok):
  texts = CORPUS + [m["prompt"] for m in S.eval_prompts(per_category=None)]
  for text in texts:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.unk_id not in ids
    assert tok.decode(ids) == text
  # Grammar words are whole pieces: a prompt is one token per word (plus bos).
  prompt = "a photo of an orange circle left of a square"
  assert len(tok.encode(prompt)) == 1 + len(prompt.split())


def test_special_ids_distinct_and_stable(tok):
  ids = (
    tok.pad_id,
    tok.unk_id,
    tok.bos_id,
    tok.eos_id,
    tok.img_start_id,
    tok.img_end_id,
    tok.img_context_id,
  )
  assert ids == (0, 1, 2, 3, 4, 5, 6)
  other = Tokenizer.train(["a tiny different corpus", "with other words"], vocab_size=40)
  assert (
    other.pad_id,
    other.unk_id,
    other.bos_id,
    other.eos_id,
    other.img_start_id,
    other.img_end_id,
    other.img_context_id,
  ) == ids
  assert tok.id_to_piece(tok.img_context_id) == "<IMG_CONTEXT>"
  seq = tok.encode("<img><IMG_CONTEXT><IMG_CONTEXT></img> a red circle", bos=False)
  assert seq.count(tok.img_context_id) == 2
  assert seq.index(tok.img_start_id) < seq.index(tok.img_context_id) < seq.index(tok.img_end_id)


def test_bos_eos_flags(tok):
  body = tok.encode("a red circle", bos=False)
  assert tok.encode("a red circle") == [tok.bos_id] + body
  assert tok.encode("a red circle", eos=True) == [tok.bos_id] + body + [tok.eos_id]
  assert tok.decode(np.asarray([tok.bos_id] + body + [tok.eos_id, 0, 0])) == "a red circle"


def test_encode_padded(tok):
  texts = ["a photo of a circle", "a photo of two squares", "a red circle"]
  ids, valid = tok.encode_padded(texts, 8)
  assert ids.shape == valid.shape == (3, 8) and ids.dtype == np.int32 and valid.dtype == bool
  for row, v, text in zip(ids, valid, texts, strict=True):
    n = len(tok.encode(text))
    assert v.sum() == n and v[:n].all()
    assert list(row[:n]) == tok.encode(text) and (row[n:] == tok.pad_id).all()


def test_too_long_prompt_error_names_lengths(tok):
  text = "a photo of a red circle and a blue square"
  n = len(tok.encode(text))
  with pytest.raises(ValueError) as err:
    tok.encode_padded(["a red circle", text], 5)
  msg = str(err.value)
  assert repr(text) in msg and str(n) in msg and "max_len=5" in msg


def test_pickle_round_trip(tok):
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.vocab_size == tok.vocab_size and clone.model_proto == tok.model_proto
  for text in CORPUS[:50]:
    assert clone.encode(text, eos=True) == tok.encode(text, eos=True)
