"""A small SentencePiece tokenizer trained in memory on the shapes-world caption corpus.

Special ids are fixed: pad 0, unk 1, bos 2, eos 3, then the user-defined symbols ``<img>`` 4,
``</img>`` 5 and ``<IMG_CONTEXT>`` 6 (the image-context placeholder). The model is BPE with a soft
vocabulary limit (``hard_vocab_limit=False``), so a tiny corpus trains in well under a second and
frequent words become whole pieces.

``Tokenizer`` keeps the serialized model proto and re-creates the processor when unpickled, so it
can travel into grain worker processes.
"""

from __future__ import annotations

import abc
import io
import os
import string
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
USER_SYMBOLS = (IMG_START, IMG_END, IMG_CONTEXT)


class TextTokenizer(abc.ABC):
  """The interface every tokenizer of the project has (the data pipeline, the sampler and
  ``iomm_jax.chat`` use only this): ``Tokenizer`` here and ``data.hf_tokenizer.HFTokenizer``.

  A subclass gives the special ids (``pad_id``, ``bos_id``, ``eos_id``, ``unk_id``), the image
  tokens (``img_start_id``, ``img_end_id``, ``img_context_id``), ``vocab_size``, ``encode``,
  ``decode``, ``id_to_piece`` and ``unknown_words``; ``encode_padded`` is shared.
  """

  pad_id: int
  bos_id: int
  eos_id: int
  vocab_size: int

  @abc.abstractmethod
  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of ``text``, optionally framed by bos / eos."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The text of ``ids``."""

  def encode_padded(
    self, texts: Sequence[str], max_len: int, *, bos: bool = True, eos: bool = False
  ) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and right-pads ``texts`` to ``max_len``.

    Returns (ids int32 [B, max_len] padded with ``pad_id``, valid bool [B, max_len]).

    Raises:
      ValueError: a prompt is longer than ``max_len`` tokens (the message names the prompt and
        both lengths).
    """
    ids = np.full((len(texts), max_len), self.pad_id, np.int32)
    valid = np.zeros((len(texts), max_len), bool)
    for i, text in enumerate(texts):
      toks = self.encode(text, bos=bos, eos=eos)
      if len(toks) > max_len:
        raise ValueError(f"prompt {text!r} has {len(toks)} tokens, more than max_len={max_len}")
      ids[i, : len(toks)] = toks
      valid[i, : len(toks)] = True
    return ids, valid


class Tokenizer(TextTokenizer):
  """SentencePiece wrapper with fixed special ids."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    for want, piece in zip((4, 5, 6), USER_SYMBOLS, strict=True):
      got = self._sp.piece_to_id(piece)
      if got != want:
        raise ValueError(f"model has {piece!r} at id {got}, expected {want}")
    if (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()) != (
      PAD_ID,
      UNK_ID,
      BOS_ID,
      EOS_ID,
    ):
      raise ValueError("model special ids differ from pad 0, unk 1, bos 2, eos 3")

  @classmethod
  def train(
    cls,
    corpus: Iterable[str],
    vocab_size: int = 192,
    path: str | os.PathLike[str] | None = None,
  ) -> Tokenizer:
    """Trains a BPE model on ``corpus`` in memory; writes it to ``path`` (a .model file) if given.

    ``vocab_size`` is a soft limit: a corpus with fewer possible pieces gives a smaller vocabulary.
    """
    sentences = [s for s in corpus if s]
    if not sentences:
      raise ValueError("corpus is empty")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=buf,
      vocab_size=vocab_size,
      model_type="bpe",
      character_coverage=1.0,
      hard_vocab_limit=False,
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      user_defined_symbols=list(USER_SYMBOLS),
      num_threads=1,
      minloglevel=2,
    )
    tok = cls(buf.getvalue())
    if path is not None:
      tok.save(path)
    return tok

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
    """Loads a .model file written by ``train`` or ``save``."""
    with open(path, "rb") as f:
      return cls(f.read())

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the serialized model to ``path``."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "wb") as f:
      f.write(self._proto)

  @property
  def model_proto(self) -> bytes:
    """The serialized SentencePiece model."""
    return self._proto

  @property
  def vocab_size(self) -> int:
    """Number of pieces, special ones included."""
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def img_start_id(self) -> int:
    """Id of ``<img>``."""
    return self._sp.piece_to_id(IMG_START)

  @property
  def img_end_id(self) -> int:
    """Id of ``</img>``."""
    return self._sp.piece_to_id(IMG_END)

  @property
  def img_context_id(self) -> int:
    """Id of ``<IMG_CONTEXT>``, the image-context placeholder."""
    return self._sp.piece_to_id(IMG_CONTEXT)

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of ``text``, optionally framed by bos / eos."""
    ids = [int(i) for i in self._sp.encode(text)]
    return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of ``ids``; pad, bos and eos are dropped."""
    seq = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._sp.decode([i for i in seq if i not in (PAD_ID, BOS_ID, EOS_ID)])

  def id_to_piece(self, i: int) -> str:
    """The piece string of id ``i``."""
    return self._sp.id_to_piece(int(i))

  def unknown_words(self, text: str) -> list[str]:
    """The out-of-vocabulary words of ``text`` (whitespace-separated, each once, in order).

    A word is out of vocabulary when its pieces hold ``<unk>`` (a character the training text
    never had: "Circle", "circle." without a full stop in any caption), or when the word without
    its surrounding punctuation takes more than one piece and one of them is a single letter or
    digit ("dog" -> "▁d o g", "sneaker" -> "▁s ne a <unk> er", "redd" -> "▁red d"). BPE merges
    the character pairs of its training text, so the words of the training captions end up as
    one piece each (every word of the shapes grammar) or, rarer ones, as a few pieces of several
    characters; a word broken down to single characters is one it did not see (often enough)
    to learn.
    """
    out = []
    for word in dict.fromkeys(text.split()):
      unknown = UNK_ID in self._sp.encode(word)
      core = word.strip(string.punctuation)
      if core and not unknown:
        pieces = [p.lstrip("\u2581") for p in self._sp.encode(core, out_type=str)]
        pieces = [p for p in pieces if p]
        unknown = len(pieces) > 1 and any(len(p) == 1 and p.isalnum() for p in pieces)
      if unknown:
        out.append(word)
    return out

  def __getstate__(self) -> dict[str, Any]:
    return {"model_proto": self._proto}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["model_proto"])

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size})"
