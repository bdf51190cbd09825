"""``HFTokenizer`` against transformers' own tokenizer on a tiny Qwen2-style tokenizer.

The tokenizer is trained here (byte-level BPE with Qwen2's pre-tokenizer regex and NFC
normaliser, the InternVL special tokens added), wrapped in transformers and saved with
``save_pretrained``; ids, decoding, special ids and the rendered chat template must equal what
``AutoTokenizer`` gives.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import transformers
from tokenizers import (
  AddedToken,
  Regex,
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  trainers,
)

from iomm_jax.data import pipeline
from iomm_jax.data.hf_tokenizer import HFTokenizer

QWEN2_PRETOKENIZE = (
  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
  r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
CORPUS = [
  "a red circle left of a blue square",
  "the quick brown fox jumps over the lazy dog",
  "Héllo wörld, ünïcode! 123 4567 中文",
  "tabs\tand\nnewlines  and  spaces",
  "it's what they'll say, don't you think?",
] * 3
# InternVL3 / Qwen2.5 style: a default system turn, role checks, generation prompt.
CHAT_TEMPLATE = (
  "{%- for message in messages -%}"
  "{%- if loop.first and message['role'] != 'system' -%}"
  "{{ '<|im_start|>system\\n你是书生·万象 (InternVL).<|im_end|>\\n' }}"
  "{%- endif -%}"
  "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
  "{{ raise_exception('unknown role ' + message['role']) }}"
  "{%- endif -%}"
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
  "{%- endfor -%}"
  "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
  "{%- if eos_token is defined and not add_generation_prompt %}{{ '' }}{% endif %}"
)
TEXTS = [
  "",
  " ",
  "a red circle",
  "  two  leading spaces and trailing  ",
  "tabs\tand\nnewlines\r\n\n",
  "Héllo wörld ünïcode 中文 😀 ñ ☃ ∑",
  "e\u0301 (combining) vs \u00e9",  # NFC normalisation
  "x<img><IMG_CONTEXT><IMG_CONTEXT></img>y",
  "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
  "it's 12345, don't WE'LL?",
]


def make_tokenizer(path: str, tokenizer_class: str = "Qwen2Tokenizer") -> str:
  """Trains the tiny tokenizer and saves it with transformers to ``path``; returns ``path``."""
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
  )
  tok.train_from_iterator(CORPUS, trainer)
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
  hf = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    chat_template=CHAT_TEMPLATE,
  )
  hf.save_pretrained(path)
  with open(f"{path}/tokenizer_config.json") as f:
    cfg = json.load(f)
  cfg["tokenizer_class"] = tokenizer_class
  with open(f"{path}/tokenizer_config.json", "w") as f:
    json.dump(cfg, f)
  return path


@pytest.fixture(scope="module", params=["Qwen2Tokenizer", "TokenizersBackend"])
def pair(request, tmp_path_factory):
  path = make_tokenizer(str(tmp_path_factory.mktemp(request.param)), request.param)
  return HFTokenizer.load(path), transformers.AutoTokenizer.from_pretrained(path)


def test_ids_match_transformers(pair):
  ours, ref = pair
  for text in TEXTS:
    want = ref(text)["input_ids"]
    assert ours.encode(text, bos=False) == want, text
    assert ref.encode(text, add_special_tokens=False) == want, text


def test_decode_and_pieces_match_transformers(pair):
  ours, ref = pair
  drop = {ours.pad_id, ours.bos_id, ours.eos_id}
  for text in TEXTS:
    ids = ref(text)["input_ids"]
    assert ours.decode(ids) == ref.decode([i for i in ids if i not in drop]), text
    assert [ours.id_to_piece(i) for i in ids] == ref.convert_ids_to_tokens(ids)
  ids = ours.encode("a red circle left of a blue square")
  assert ours.decode(ids) == "a red circle left of a blue square"


def test_special_ids(pair):
  ours, ref = pair
  assert ours.vocab_size == len(ref) == len(ours)
  assert ours.pad_id == ref.pad_token_id == ref.convert_tokens_to_ids("<|endoftext|>")
  assert ours.eos_id == ref.eos_token_id == ref.convert_tokens_to_ids("<|im_end|>")
  assert ref.bos_token is None and ours.bos_id == ref.convert_tokens_to_ids("<|im_start|>")
  for got, token in (
    (ours.img_start_id, "<img>"),
    (ours.img_end_id, "</img>"),
    (ours.img_context_id, "<IMG_CONTEXT>"),
  ):
    assert got == ref.convert_tokens_to_ids(token)
  assert ours.encode("hi", bos=True, eos=True) == [
    ours.bos_id,
    *ours.encode("hi", bos=False),
    ours.eos_id,
  ]


def test_chat_template_renders_like_transformers(pair):
  ours, ref = pair
  chats = [
    [{"role": "user", "content": "<img><IMG_CONTEXT></img>\nDescribe  the image. "}],
    [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Héllo 中文"},
      {"role": "assistant", "content": "ok"},
    ],
  ]
  for chat in chats:
    for gen in (False, True):
      want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
      assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want
      assert ours.encode(want, bos=False) == ref.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=gen, return_dict=False
      )
  with pytest.raises(Exception, match="unknown role tool"):
    ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_padding_pickling_and_save(pair, tmp_path):
  ours, _ = pair
  ids, valid = ours.encode_padded(["a red circle", ""], 16)
  assert ids.shape == (2, 16) and ids.dtype == np.int32
  assert valid.sum(1).tolist() == [len(ours.encode("a red circle")), 1]
  assert (ids[~valid] == ours.pad_id).all()
  with pytest.raises(ValueError, match="more than max_len=2"):
    ours.encode_padded(["a red circle left of a blue square"], 2)
  again = pickle.loads(pickle.dumps(ours))
  assert again.encode(TEXTS[5]) == ours.encode(TEXTS[5]) and again.eos_id == ours.eos_id
  ours.save(tmp_path / "saved")
  saved = HFTokenizer.load(tmp_path / "saved")
  chat = [{"role": "user", "content": "hi"}]
  assert saved.apply_chat_template(chat) == ours.apply_chat_template(chat)
  assert [saved.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]


def test_conditioner_uses_it(pair):
  ours, _ = pair
  cond = pipeline.Conditioner(ours, num_image_tokens=4, aux_prompt="a red circle", max_text_len=24)
  ids, valid = cond.image_condition()
  want = ours.encode("a red circle") + [ours.img_start_id] + [ours.img_context_id] * 4
  assert ids[: valid.sum()].tolist() == want + [ours.img_end_id]
  ids, valid = cond.text_conditions(["a blue square", "the lazy dog"])
  assert ids[0, : valid[0].sum()].tolist() == ours.encode("a blue square")
  assert cond.null_condition()[0][0] == ours.bos_id


def test_missing_file_and_bad_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    HFTokenizer.load(tmp_path)
  path = make_tokenizer(str(tmp_path / "t"))
  with open(f"{path}/tokenizer_config.json") as f:
    cfg = json.load(f)
  with open(f"{path}/tokenizer.json") as f:
    text = f.read()
  with pytest.raises(ValueError, match="pad and bos"):
    HFTokenizer(text, {**cfg, "bos_token": "<|endoftext|>"})
  with pytest.raises(ValueError, match="not in the vocabulary"):
    HFTokenizer(text, {**cfg, "eos_token": "<nope>"})


def test_chat_template_from_tokenizer_config(pair):
  """Older directories keep the template in tokenizer_config.json (no chat_template.jinja)."""
  ours, _ = pair
  state = ours.__getstate__()
  config = {**state["config"], "chat_template": CHAT_TEMPLATE}
  legacy = HFTokenizer(state["tokenizer_json"], config)
  chat = [{"role": "user", "content": "hi"}]
  assert legacy.apply_chat_template(chat, True) == ours.apply_chat_template(chat, True)
  named = {**config, "chat_template": [{"name": "default", "template": CHAT_TEMPLATE}]}
  assert HFTokenizer(state["tokenizer_json"], named).chat_template == CHAT_TEMPLATE
  with pytest.raises(ValueError, match="no chat template"):
    HFTokenizer(state["tokenizer_json"], state["config"]).apply_chat_template(chat)


def test_byte_level_bpe_has_no_out_of_vocabulary_words(pair):
  """Byte-level BPE covers any text with known tokens; only its unk_token (Qwen2Tokenizer's
  default <|endoftext|>, which plain words never produce) counts, so no prompt warns."""
  ours, _ = pair
  assert ours.unknown_words("a photo of a sneaker, ÜBER-weird 中文 xyzzy!") == []
  unk = [] if ours.unk_id is None else ["<|endoftext|>"]
  assert ours.unknown_words("a photo of <|endoftext|> <|endoftext|>") == unk
