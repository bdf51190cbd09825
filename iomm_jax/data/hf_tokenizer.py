"""A transformers-format tokenizer (``tokenizer.json``) behind the interface of ``data.tokenizer``.

``HFTokenizer`` wraps a ``tokenizers.Tokenizer`` built verbatim from ``tokenizer.json`` (the Qwen2
byte-level BPE of InternVL3), reads the special tokens from ``tokenizer_config.json`` (and, for
older directories without ``added_tokens_decoder``, ``special_tokens_map.json``), and renders the
chat template (``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``) with
jinja2 in the sandbox and with the globals transformers' ``apply_chat_template`` uses.

Ids the generator pipeline needs (``Conditioner``, ``Captioning``):

* ``pad_id``: ``pad_token`` (Qwen: ``<|endoftext|>``). The conditioner drops pad ids from encoded
  prompts, so ``pad_id`` must differ from ``bos_id``.
* ``bos_id``: ``bos_token`` if the tokenizer has one; Qwen tokenizers have none, and then
  ``<|im_start|>`` (the opening token of every InternVL chat turn) stands in, so that a
  condition always starts with a token that is neither padding nor text. ``encode(bos=True)``
  prepends it; nothing is ever added implicitly (Qwen's tokenizer adds no special tokens either).
* ``eos_id``: ``eos_token`` (InternVL3 chat: ``<|im_end|>``).
* ``img_start_id`` / ``img_end_id`` / ``img_context_id``: ``<img>``, ``</img>``, ``<IMG_CONTEXT>``.

transformers 5 rebuilds a ``Qwen2Tokenizer``'s pre-tokenizer, normaliser and decoder from its own
definition and takes only the vocabulary, merges and added tokens from ``tokenizer.json``; Qwen's
own ``tokenizer.json`` holds exactly that pipeline, so the ids agree (tests/convert check it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import tokenizers

from iomm_jax import files
from iomm_jax.data.tokenizer import TextTokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Files of a transformers tokenizer directory that are copied along with it (those present).
TOKENIZER_FILES = (
  TOKENIZER_JSON,
  TOKENIZER_CONFIG,
  SPECIAL_TOKENS_MAP,
  CHAT_TEMPLATE_FILE,
  "chat_template.json",
  "added_tokens.json",
  "vocab.json",
  "merges.txt",
)
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
CHAT_TURN_START = "<|im_start|>"
# The named special tokens transformers passes to a chat template (``special_tokens_map``).
SPECIAL_TOKEN_NAMES = (
  "bos_token",
  "eos_token",
  "unk_token",
  "sep_token",
  "pad_token",
  "cls_token",
  "mask_token",
)
# Class defaults of transformers' Qwen2Tokenizer, used where tokenizer_config.json omits a token.
QWEN2_DEFAULTS = {
  "unk_token": "<|endoftext|>",
  "eos_token": "<|endoftext|>",
  "pad_token": "<|endoftext|>",
}


def _token_str(value: Any) -> str | None:
  """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
  if value is None:
    return None
  if isinstance(value, Mapping):
    return value.get("content")
  return str(value)


def _plain(value: Any) -> Any:
  """A copy of chat data made of JSON types only (what transformers lets a template see)."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if isinstance(value, np.generic):
    return _plain(value.item())
  for kind in (str, int, float):
    if isinstance(value, kind):
      return kind(value)
  return f"<{type(value).__name__}>"


def _compile_template(source: str):
  """The chat template compiled in transformers' environment (sandboxed, trim/lstrip blocks,
  ``tojson`` without HTML escaping, ``raise_exception``, ``strftime_now``, loop controls, and
  ``{% generation %}`` blocks rendered as their body)."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders the body (no assistant mask here)."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  return env.from_string(source)


class HFTokenizer(TextTokenizer):
  """A ``tokenizer.json`` tokenizer with the interface of ``data.tokenizer.TextTokenizer``.

  Args:
    tokenizer_json: the text of ``tokenizer.json``.
    config: the parsed ``tokenizer_config.json`` (special tokens, ``chat_template``), or None.
    chat_template: a jinja chat template overriding ``config``'s, or None.
    special_tokens_map: the parsed legacy ``special_tokens_map.json``, or None.

  Picklable (the JSON text travels), so it can go into grain worker processes.
  """

  def __init__(
    self,
    tokenizer_json: str,
    config: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
    special_tokens_map: Mapping[str, Any] | None = None,
  ):
    self._json = tokenizer_json
    self._config = dict(config or {})
    self._special_map = dict(special_tokens_map or {})
    self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    self._template_source = chat_template
    self._template = None
    cls = str(self._config.get("tokenizer_class") or "")
    tokens = dict(QWEN2_DEFAULTS) if cls.startswith("Qwen2") else {}
    for name in SPECIAL_TOKEN_NAMES:
      if name in self._config:
        tokens[name] = _token_str(self._config[name])
    if "added_tokens_decoder" not in self._config:  # legacy directories, as transformers
      for name in SPECIAL_TOKEN_NAMES:
        if name in self._special_map:
          tokens[name] = _token_str(self._special_map[name])
    self._special_tokens = {k: v for k, v in tokens.items() if v is not None}
    for name, token in self._special_tokens.items():
      if self._tok.token_to_id(token) is None:
        raise ValueError(f"{name}={token!r} of the tokenizer config is not in the vocabulary")
    if self.pad_id == self.bos_id:
      raise ValueError(
        f"pad and bos are the same token {self.id_to_piece(self.pad_id)!r}: the conditioner "
        "drops pad ids from prompts, so they must differ"
      )

  # --------------------------------------------------------------------------- loading

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> HFTokenizer:
    """Loads a transformers tokenizer directory (``tokenizer.json`` required)."""
    path = os.fspath(path)
    file = os.path.join(path, TOKENIZER_JSON)
    if not os.path.exists(file):
      raise FileNotFoundError(f"{path!r} has no {TOKENIZER_JSON} (a transformers tokenizer)")
    with open(file, encoding="utf-8") as f:
      text = f.read()

    def read_json(name: str) -> dict[str, Any] | None:
      p = os.path.join(path, name)
      if not os.path.exists(p):
        return None
      with open(p, encoding="utf-8") as f:
        return json.load(f)

    template = None
    jinja_file = os.path.join(path, CHAT_TEMPLATE_FILE)
    if os.path.exists(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        template = f.read()
    return cls(text, read_json(TOKENIZER_CONFIG), template, read_json(SPECIAL_TOKENS_MAP))

  @staticmethod
  def copy_files(src: str, dst: str) -> list[str]:
    """Copies the tokenizer files of directory ``src`` that exist into ``dst``; returns them."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
      p = os.path.join(src, name)
      if os.path.exists(p):
        if os.path.abspath(p) != os.path.abspath(os.path.join(dst, name)):
          shutil.copyfile(p, os.path.join(dst, name))
        copied.append(name)
    return copied

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` (+ the chat template) to ``path``."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, TOKENIZER_JSON), "w", encoding="utf-8") as f:
      f.write(self._json)
    json_kw = dict(sort_keys=False, ensure_ascii=False)
    files.write_json(os.path.join(path, TOKENIZER_CONFIG), self._config, **json_kw)
    if self._special_map:
      files.write_json(os.path.join(path, SPECIAL_TOKENS_MAP), self._special_map, **json_kw)
    if self._template_source is not None:
      with open(os.path.join(path, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
        f.write(self._template_source)

  # --------------------------------------------------------------------------- ids

  def _id(self, token: str, what: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"the tokenizer has no {what} token {token!r}")
    return int(i)

  def token_to_id(self, token: str) -> int | None:
    """Id of a token string (None if absent)."""
    return self._tok.token_to_id(token)

  @property
  def special_tokens(self) -> dict[str, str]:
    """The named special tokens that are set (``bos_token``, ``eos_token``, ...)."""
    return dict(self._special_tokens)

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (``len`` of the transformers tokenizer)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    """Id of ``pad_token``."""
    if "pad_token" not in self._special_tokens:
      raise ValueError("the tokenizer config sets no pad_token")
    return self._id(self._special_tokens["pad_token"], "pad")

  @property
  def unk_id(self) -> int | None:
    """Id of ``unk_token`` (None without one; byte-level BPE never produces it)."""
    tok = self._special_tokens.get("unk_token")
    return None if tok is None else self._id(tok, "unk")

  @property
  def bos_id(self) -> int:
    """Id of ``bos_token``, else of ``<|im_start|>`` (see the module docstring)."""
    return self._id(self._special_tokens.get("bos_token", CHAT_TURN_START), "bos")

  @property
  def eos_id(self) -> int:
    """Id of ``eos_token``."""
    if "eos_token" not in self._special_tokens:
      raise ValueError("the tokenizer config sets no eos_token")
    return self._id(self._special_tokens["eos_token"], "eos")

  @property
  def img_start_id(self) -> int:
    """Id of ``<img>``."""
    return self._id(IMG_START, "image-start")

  @property
  def img_end_id(self) -> int:
    """Id of ``</img>``."""
    return self._id(IMG_END, "image-end")

  @property
  def img_context_id(self) -> int:
    """Id of ``<IMG_CONTEXT>``, the image-context placeholder."""
    return self._id(IMG_CONTEXT, "image-context")

  # --------------------------------------------------------------------------- text

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of ``text`` (special tokens in the text become their ids), optionally framed
    by bos / eos."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if bos else []) + list(ids) + ([self.eos_id] if eos else [])

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of ``ids``; pad, bos and eos are dropped, other special tokens are kept."""
    drop = {self.pad_id, self.bos_id, self.eos_id}
    seq = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in drop]
    return self._tok.decode(seq, skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    """The token string of id ``i`` (byte-level BPE: bytes shown as printable characters)."""
    return self._tok.id_to_token(int(i))

  def unknown_words(self, text: str) -> list[str]:
    """The words of ``text`` (whitespace-separated, each once) whose encoding holds
    ``unk_token``. Byte-level BPE (InternVL3's Qwen2 tokenizer) encodes any text into known
    tokens, and the MLLM learnt its subword splits on a web-scale corpus, so for it nothing is
    out of vocabulary (unlike ``data.tokenizer.Tokenizer.unknown_words``, which also counts words
    broken into single characters); a tokenizer with an ``unk_token`` it can produce reports the
    words that hit it."""
    unk = self.unk_id
    if unk is None:
      return []
    return [w for w in dict.fromkeys(text.split()) if unk in self.encode(w, bos=False)]

  # --------------------------------------------------------------------------- chat

  @property
  def chat_template(self) -> str | None:
    """The jinja chat template (None if the tokenizer has none)."""
    if self._template_source is not None:
      return self._template_source
    t = self._config.get("chat_template")
    if isinstance(t, list):  # named templates, as transformers saves several
      t = {x["name"]: x["template"] for x in t}.get("default")
    return t

  def apply_chat_template(
    self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **kwargs
  ) -> str:
    """The chat rendered as text, as transformers' ``apply_chat_template(..., tokenize=False)``.

    The template sees ``messages``, ``tools`` / ``documents`` (None), ``add_generation_prompt``,
    the named special tokens (``bos_token``, ``eos_token``, ...) and ``kwargs``.
    """
    source = self.chat_template
    if source is None:
      raise ValueError("the tokenizer has no chat template")
    if self._template is None:
      self._template = _compile_template(source)
    messages = _plain(list(messages))
    for m in messages:
      if not isinstance(m, dict):
        raise TypeError(f"chat messages must be dicts, got {m!r}")
    variables = _plain({**self._special_tokens, **kwargs})
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    return self._template.render(
      messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )

  # --------------------------------------------------------------------------- pickling

  def __getstate__(self) -> dict[str, Any]:
    return {
      "tokenizer_json": self._json,
      "config": self._config,
      "chat_template": self._template_source,
      "special_tokens_map": self._special_map,
    }

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(**state)

  def __len__(self) -> int:
    return self.vocab_size

  def __repr__(self) -> str:
    return f"HFTokenizer(vocab_size={self.vocab_size})"
