"""A tiny random chat InternVL for tests: transformers' ``InternVLForConditionalGeneration`` with
the tiny Qwen2-style tokenizer of ``test_hf_tokenizer`` (chat template, ``<img>`` / ``</img>`` /
``<IMG_CONTEXT>``), saved with ``save_pretrained`` and imported with ``convert.internvl`` (no
network). Shared by the chat tests (tests/models/test_chat.py, tests/cli/test_chat_cli.py)."""

from __future__ import annotations

import dataclasses
import os

import transformers

from iomm_jax.convert import internvl
from iomm_jax.data.hf_tokenizer import HFTokenizer
from tests.convert.test_internvl import Case, hf_config, randomize
from tests.data.test_hf_tokenizer import make_tokenizer

VOCAB = 320  # the tiny tokenizer's ~306 ids, rounded up (as test_internvl's context test)
# GQA 4 q heads / 2 kv heads (head dim 12), 2 text layers, untied head; 56 px / patch 14 -> a 4 x 4
# patch grid -> 4 image tokens after the pixel shuffle.
CHAT_CASE = Case(
  "chat_gqa4x2_56px",
  vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              image_size=56, patch_size=14, attention_bias=True),
  text=dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            num_hidden_layers=2),
  tie=False,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TinyChat:
  """Where the tiny chat model lives: the transformers directory, the imported one, the torch
  model (eval mode) and its ``AutoTokenizer``."""

  hf_dir: str
  imported: str
  model: transformers.InternVLForConditionalGeneration
  hf_tokenizer: transformers.PreTrainedTokenizerBase


def build(root: str, seed: int = 3, case: Case = CHAT_CASE) -> TinyChat:
  """Trains the tokenizer, builds and randomises the transformers model (every parameter
  random, weights scaled so greedy decoding has clear margins), saves both to ``root/hf`` and
  imports them to ``root/imported``."""
  hf_dir, out = os.path.join(root, "hf"), os.path.join(root, "imported")
  make_tokenizer(hf_dir)
  tok = HFTokenizer.load(hf_dir)
  config = hf_config(case)
  config.text_config.vocab_size = VOCAB
  config.image_token_id = tok.img_context_id
  config.pad_token_id = tok.pad_id
  model = transformers.InternVLForConditionalGeneration(config).eval()
  randomize(model, seed)
  model.save_pretrained(hf_dir)
  internvl.import_internvl(hf_dir, out)
  return TinyChat(hf_dir, out, model, transformers.AutoTokenizer.from_pretrained(hf_dir))
