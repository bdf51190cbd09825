"""``iomm_jax.chat``: KV-cache decoding against full recomputation and against transformers.

The model is the tiny random chat InternVL of ``tests/convert/tiny_internvl.py`` (transformers'
``InternVLForConditionalGeneration`` + the tiny Qwen2-style tokenizer, imported with our
converter). Our greedy tokens must equal ``generate(do_sample=False)``'s, batched (left-padded,
as the InternVL processor pads) and one prompt at a time; each step's cached logits must equal a
plain ``decode`` over the whole prefix; rows stop independently; sampling is a function of the
seed and of the row's own key only.

Speed: one module fixture builds the model (~10 s); the greedy batch-of-6 compilation is shared
by the tests that use it (stop ids, pad id and sampling settings are traced, not static).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from iomm_jax import chat
from iomm_jax.data import pipeline
from iomm_jax.data.tokenizer import Tokenizer
from iomm_jax.models import mllm as mllm_lib
from tests.convert import tiny_internvl

QUESTIONS = (None, "what colour is the circle left of the square?")  # None: the caption question
NUM_IMAGES = 3
N = 10  # new tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(TinyChat, ChatModel, NCHW pixels [3, 3, S, S]) of the tiny random chat InternVL."""
  tc = tiny_internvl.build(str(tmp_path_factory.mktemp("tiny_chat")))
  cm = chat.load(tc.imported)
  s = cm.image_size
  pix = np.random.default_rng(0).standard_normal((NUM_IMAGES, 3, s, s)).astype(np.float32)
  return tc, cm, pix


def rows(pix: np.ndarray):
  """The 6 (image, question) rows: every image with every question, image-major."""
  return [(i, q) for i in range(len(pix)) for q in QUESTIONS]


def hf_prompt_text(tc, cm, question: str | None) -> str:
  """The prompt built with transformers' own pieces: its tokenizer's chat template and
  ``InternVLProcessor.replace_image_token`` (one tile) for the placeholder."""
  q = chat.CAPTION_QUESTION if question is None else question
  text = tc.hf_tokenizer.apply_chat_template(
    [{"role": "user", "content": f"<IMG_CONTEXT>\n{q}"}], tokenize=False, add_generation_prompt=True
  )
  proc = types.SimpleNamespace(  # the attributes replace_image_token reads
    start_image_token="<img>",
    end_image_token="</img>",
    image_token="<IMG_CONTEXT>",
    image_seq_length=cm.num_image_tokens,
  )
  expanded = transformers.InternVLProcessor.replace_image_token(proc, {"num_patches": [1]}, 0)
  return text.replace("<IMG_CONTEXT>", expanded)


def hf_generate(tc, ids, mask, pix, **kw) -> np.ndarray:
  """transformers' greedy generate; the new tokens [B, <= N]."""
  with torch.no_grad():
    out = tc.model.generate(
      input_ids=torch.as_tensor(ids),
      attention_mask=torch.as_tensor(mask),
      pixel_values=torch.as_tensor(pix),
      do_sample=False,
      max_new_tokens=N,
      **kw,
    )
  return out[:, ids.shape[1] :].numpy()


def ours(cm, seqs, pix_nchw, side="left", length=None, **kw) -> chat.Generation:
  """Our ``generate`` on the prompts ``seqs`` and NCHW pixels."""
  ids, valid = chat.pad_batch(seqs, cm.tokenizer.pad_id, side, length)
  return chat.generate(
    cm.model,
    cm.params,
    ids,
    valid,
    jnp.transpose(jnp.asarray(pix_nchw), (0, 2, 3, 1)),
    max_new_tokens=N,
    pad_id=cm.tokenizer.pad_id,
    **kw,
  )


def test_prompt_ids_match_transformers(tiny):
  tc, cm, _ = tiny
  for q in QUESTIONS:
    want = tc.hf_tokenizer(hf_prompt_text(tc, cm, q))["input_ids"]
    got = chat.prompt_ids(cm, q)
    assert got == want, q
    assert got.count(cm.config.image_token_id) == cm.num_image_tokens
  assert cm.stop_ids == (tc.hf_tokenizer.convert_tokens_to_ids("<|im_end|>"),)  # = its EOS
  with pytest.raises(ValueError, match="image token"):
    chat.prompt_ids(cm, "look: <IMG_CONTEXT>")


@pytest.fixture(scope="module")
def hf_greedy(tiny):
  """transformers' greedy tokens [6, N] for the 6 rows, batched and left-padded."""
  tc, cm, pix = tiny
  rs = rows(pix)
  texts = [hf_prompt_text(tc, cm, q) for _, q in rs]
  enc = tc.hf_tokenizer(texts, padding=True, padding_side="left", return_tensors="np")
  px = pix[[i for i, _ in rs]]
  ref = hf_generate(
    tc, enc["input_ids"], enc["attention_mask"], px, pad_token_id=cm.tokenizer.pad_id
  )
  assert ref.shape == (6, N)
  assert len({tuple(x) for x in ref}) == 6  # every row differs: images and prompts matter
  return texts, ref


def test_greedy_batch_matches_transformers_generate(tiny, hf_greedy):
  """3 images x 2 prompts in one batch: ours, left- and right-padded, == transformers' batched
  (left-padded) greedy ``generate``, token for token."""
  tc, cm, pix = tiny
  rs = rows(pix)
  _, ref = hf_greedy
  seqs = [chat.prompt_ids(cm, q) for _, q in rs]
  px = pix[[i for i, _ in rs]]
  for side in chat.PADDING_SIDES:
    got = ours(cm, seqs, px, side)
    np.testing.assert_array_equal(np.asarray(got.tokens), ref, err_msg=side)
    assert np.all(np.asarray(got.num_tokens) == N) and not np.asarray(got.stopped).any()


def test_greedy_one_by_one_matches_transformers_generate(tiny, hf_greedy):
  """The same 6 rows one at a time: transformers unpadded and ours (left-padded to the batch
  length, one compilation) == the batched tokens."""
  tc, cm, pix = tiny
  rs = rows(pix)
  texts, ref = hf_greedy
  seqs = [chat.prompt_ids(cm, q) for _, q in rs]
  length = max(map(len, seqs))
  for r, (i, _) in enumerate(rs):
    ids = np.asarray([tc.hf_tokenizer(texts[r])["input_ids"]])
    one = hf_generate(tc, ids, np.ones_like(ids), pix[i : i + 1], pad_token_id=cm.tokenizer.pad_id)
    np.testing.assert_array_equal(one[0], ref[r])
    got = ours(cm, seqs[r : r + 1], pix[i : i + 1], length=length)
    np.testing.assert_array_equal(np.asarray(got.tokens)[0], ref[r])


def test_stop_tokens_end_rows_independently(tiny):
  """A stop id that the rows reach at different steps (or never): each row ends on it, then
  pads; transformers (``eos_token_id``) agrees."""
  tc, cm, pix = tiny
  rs = rows(pix)
  px = pix[[i for i, _ in rs]]
  seqs = [chat.prompt_ids(cm, q) for _, q in rs]
  free = np.asarray(ours(cm, seqs, px).tokens)
  # the generated id whose first occurrence varies most across rows (some rows may lack it)
  first = {
    t: [int(np.argmax(row == t)) if (row == t).any() else N for row in free]
    for t in np.unique(free)
  }
  stop = max(first, key=lambda t: (len(set(first[t])), -sum(first[t])))
  steps = first[stop]
  assert len(set(steps)) >= 2, steps

  pad = cm.tokenizer.pad_id
  got = ours(cm, seqs, px, stop_ids=(int(stop),))
  tokens = np.asarray(got.tokens)
  for r, s in enumerate(steps):
    if s < N:
      np.testing.assert_array_equal(tokens[r, : s + 1], free[r, : s + 1])
      assert (tokens[r, s + 1 :] == pad).all()
      assert bool(got.stopped[r]) and int(got.num_tokens[r]) == s + 1
    else:
      np.testing.assert_array_equal(tokens[r], free[r])
      assert not bool(got.stopped[r]) and int(got.num_tokens[r]) == N

  texts = [hf_prompt_text(tc, cm, q) for _, q in rs]
  enc = tc.hf_tokenizer(texts, padding=True, padding_side="left", return_tensors="np")
  ref = hf_generate(
    tc, enc["input_ids"], enc["attention_mask"], px, pad_token_id=pad, eos_token_id=int(stop)
  )
  np.testing.assert_array_equal(tokens[:, : ref.shape[1]], ref)
  assert (tokens[:, ref.shape[1] :] == pad).all()


def test_cached_logits_equal_full_recomputation(tiny):
  """Each step's logits (prefill + cache) == ``decode`` over the whole prefix without a cache,
  for left- and right-padded batches."""
  tc, cm, pix = tiny
  rs = rows(pix)
  px = jnp.transpose(jnp.asarray(pix[[i for i, _ in rs]]), (0, 2, 3, 1))
  seqs = [chat.prompt_ids(cm, q) for _, q in rs]
  model, v = cm.model, {"params": cm.params}
  m = mllm_lib.InternVLModel
  full_len = max(map(len, seqs)) + N - 1

  @jax.jit
  def last_logits(ids, valid):
    """Logits at the last position of left-padded prefixes, the uncached path."""
    image = model.apply(v, px, method=m.encode_images)
    emb = mllm_lib.merge_image_tokens(
      model.apply(v, ids, method=m.embed), ids, image, cm.config.image_token_id
    )
    pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    hidden = model.apply(v, emb, pos, mllm_lib.causal_mask(valid), method=m.decode)
    return model.apply(v, hidden[:, -1:], method=m.logits)[:, 0]

  for side in chat.PADDING_SIDES:
    got = ours(cm, seqs, np.asarray(pix[[i for i, _ in rs]]), side, return_logits=True)
    tokens, logits = np.asarray(got.tokens), np.asarray(got.logits)
    for t in range(N):
      prefixes = [s + tokens[r, :t].tolist() for r, s in enumerate(seqs)]
      ids, valid = chat.pad_batch(prefixes, cm.tokenizer.pad_id, "left", full_len)
      want = np.asarray(last_logits(ids, valid))
      np.testing.assert_allclose(logits[:, t], want, atol=2e-4, rtol=1e-4, err_msg=f"{side} {t}")
      np.testing.assert_array_equal(tokens[:, t], want.argmax(-1))


def test_sampling_depends_on_the_seed_and_the_row_only(tiny):
  tc, cm, pix = tiny
  rs = rows(pix)
  px = pix[[i for i, _ in rs]]
  seqs = [chat.prompt_ids(cm, q) for _, q in rs]
  kw = dict(temperature=1.5, top_p=0.95, top_k=50)
  draw = lambda seed, order=range(6): np.asarray(
    ours(
      cm,
      [seqs[i] for i in order],
      px[list(order)],
      keys=chat.row_keys(seed, list(order)),
      **kw,
    ).tokens
  )
  a, again, other = draw(0), draw(0), draw(1)
  np.testing.assert_array_equal(a, again)
  assert (a != other).any(axis=1).all()  # every row differs under another seed
  greedy = np.asarray(ours(cm, seqs, px).tokens)
  assert (a != greedy).any()
  order = [3, 5, 0, 1, 4, 2]  # the same rows in another batch order: the same draws per row
  np.testing.assert_array_equal(draw(0, order), a[order])
  with pytest.raises(ValueError, match="needs keys"):
    ours(cm, seqs, px, temperature=1.0)


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  inf = lambda x: np.isinf(np.asarray(x))[0].tolist()
  assert inf(chat.filter_logits(logits, 1.0, 0, 1.0)) == [False] * 5
  assert inf(chat.filter_logits(logits, 1.0, 2, 1.0)) == [False, False, True, True, True]
  # smallest set with mass >= 0.8: 0.5 + 0.2 + 0.15
  assert inf(chat.filter_logits(logits, 1.0, 0, 0.8)) == [False, False, False, True, True]
  assert inf(chat.filter_logits(logits, 1.0, 0, 0.1)) == [False, True, True, True, True]
  assert inf(chat.filter_logits(logits, 1.0, 2, 0.9)) == [False, False, True, True, True]
  np.testing.assert_allclose(chat.filter_logits(logits, 2.0, 0, 1.0), logits / 2.0)


def test_stage0_captioner_prompt_is_the_captioning_prefix():
  """A stage-0 (sentencepiece) MLLM is prompted with ``pipeline.Captioning``'s prefix and
  refuses questions; ``answer`` captions a batch (shorter last batch padded)."""
  tok = Tokenizer.train(["a red circle", "two blue squares and a green triangle"], 64)
  cfg = mllm_lib.get_mllm_config(
    "shapes", vocab_size=tok.vocab_size, image_token_id=tok.img_context_id
  )
  model = mllm_lib.InternVLModel(cfg)
  boxed = jax.eval_shape(
    model.init,
    jax.random.key(0),
    jnp.zeros((1, 8), jnp.int32),
    jnp.zeros((1, cfg.image_size, cfg.image_size, 3)),
  )
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype),
    jax.tree.map(lambda b: b.value, boxed["params"], is_leaf=lambda b: hasattr(b, "value")),
  )
  cm = chat.ChatModel(model, params, tok, chat=False, source="stage0")
  sample = pipeline.Captioning(tok, cfg.num_image_tokens, 64).map(
    {"image": None, "caption": "a red circle"}
  )
  prefix = chat.prompt_ids(cm)
  assert sample["ids"][: len(prefix)].tolist() == prefix
  assert not sample["loss_mask"][: len(prefix)].any() and sample["loss_mask"][len(prefix)]
  assert cm.stop_ids == (tok.eos_id,)
  with pytest.raises(chat.CaptionOnlyError, match="stage-0 captioner"):
    chat.prompt_ids(cm, "what is red?")
  images = rng.integers(0, 256, (3, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
  answers = chat.answer(cm, images, max_new_tokens=4, batch_size=2)
  single = chat.answer(cm, images[2:], max_new_tokens=4, batch_size=2)
  assert len(answers) == 3 and answers[2] == single[0]
  for a in answers:
    assert 1 <= len(a.tokens) <= 4 and isinstance(a.text, str)
