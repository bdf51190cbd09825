"""The frozen MLLM answers a question about an image, or captions it (``iomm-chat``, issue 17).

Two kinds of MLLM (``load``):

* an imported InternVL directory (``convert.internvl.import_internvl``; ``HFTokenizer`` with a
  chat template): the prompt is one user turn holding the image placeholder and the question,
  ``"<IMG_CONTEXT>\\n" + question`` (the text transformers' InternVL chat template renders for an
  image followed by text, and what InternVL's own ``chat`` builds from ``"<image>\\n"``), rendered
  with the template and ``add_generation_prompt=True``; the placeholder is then expanded to
  ``<img>`` + ``<IMG_CONTEXT>`` x P + ``</img>``, as ``InternVLProcessor.replace_image_token``
  does for one tile (no dynamic tiling here: the image is one ``image_size`` tile). Without a
  question the model is asked ``CAPTION_QUESTION``.
* a stage-0 workdir (the shapes captioner, a sentencepiece ``tokenizer.model``): it was trained
  on ``pipeline.Captioning``'s sequences only and never saw a question, so its prompt is that
  prefix, [BOS] ``<img>`` ``<IMG_CONTEXT>`` x P ``</img>``, and it captions; a question is an
  error (``CaptionOnlyError``) rather than silently ignored.

Decoding (``generate``): the prompt is prefilled in one decoder pass with the image tokens
written at the ``<IMG_CONTEXT>`` positions (``mllm.merge_image_tokens``, transformers'
``masked_scatter``), its keys and values stored in a fixed-size cache of L + ``max_new_tokens``
slots (``mllm.InternVLModel.decode_cached``), then one token per step inside a
``jax.lax.while_loop``, jitted once per (batch, prompt length, settings). Rows may be left- or
right-padded: positions count each row's valid tokens (as transformers' ``generate`` derives
them from the attention mask), all rows write their new token into the same cache slot and a
key mask marks the filled slots. Greedy (``temperature`` 0) or sampled (temperature, then top-k
and/or top-p, per-row keys: a row's key does not depend on the batch it is in). A row stops
at its first stop token (``stop_ids``: the tokenizer's EOS, plus ``<|im_end|>`` for a chat
template), emitted, then pads; the loop ends when every row stopped or after
``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iomm_jax.configs import specs
from iomm_jax.convert import internvl
from iomm_jax.data.hf_tokenizer import HFTokenizer
from iomm_jax.data.tokenizer import TextTokenizer, Tokenizer
from iomm_jax.models import iomm
from iomm_jax.models import mllm as mllm_lib

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_END = "<|im_end|>"  # end of a chat turn (Qwen / InternVL chat templates)
CAPTION_QUESTION = "Describe the image."  # what a chat model is asked when no question is given
PADDING_SIDES = ("left", "right")


class CaptionOnlyError(ValueError):
  """A question was given to a captioning-only (stage-0) MLLM."""


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class ChatModel:
  """A frozen MLLM ready to answer: module, parameters, tokenizer and prompt format.

  Attributes:
    model: the ``InternVLModel`` (its ``dtype`` is the compute dtype).
    params: its parameters (unboxed arrays).
    tokenizer: ``HFTokenizer`` (imported InternVL) or sentencepiece ``Tokenizer`` (stage 0).
    chat: True: prompts are rendered with the tokenizer's chat template; False: the stage-0
      captioning prefix (no question).
    source: the directory it was loaded from.
  """

  model: mllm_lib.InternVLModel
  params: Any
  tokenizer: TextTokenizer
  chat: bool
  source: str = ""

  @property
  def config(self) -> mllm_lib.MLLMConfig:
    """The MLLM's config."""
    return self.model.config

  @property
  def image_size(self) -> int:
    """Side of the square image the vision tower takes."""
    return self.config.image_size

  @property
  def num_image_tokens(self) -> int:
    """P, image tokens per image."""
    return self.config.num_image_tokens

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a row: the tokenizer's EOS, plus ``<|im_end|>`` for a chat template."""
    return stop_ids(self.tokenizer, self.chat)


def stop_ids(tokenizer: TextTokenizer, chat: bool) -> tuple[int, ...]:
  """The tokenizer's EOS id, and, when ``chat`` and the vocabulary has it, ``<|im_end|>``'s."""
  ids = [tokenizer.eos_id]
  if chat and isinstance(tokenizer, HFTokenizer):
    im_end = tokenizer.token_to_id(IM_END)
    if im_end is not None:
      ids.append(int(im_end))
  return tuple(dict.fromkeys(int(i) for i in ids))


def kind(path: str) -> str:
  """``"chat"`` for an imported InternVL directory, ``"caption"`` for a stage-0 workdir (a
  ``config.json`` that is not an import), read from ``path``'s config only (no weights).

  Raises:
    FileNotFoundError: ``path`` is neither (the message names it).
  """
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f"--mllm {path!r} is not a directory")
  if internvl.is_imported(path):
    return "chat"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "caption"
  raise FileNotFoundError(
    f"--mllm {path!r} is neither a stage-0 workdir nor an imported InternVL directory "
    "(no config.json)"
  )


def load(path: str) -> ChatModel:
  """The MLLM of ``path`` (``kind``): an imported InternVL directory or a stage-0 workdir (its
  tokenizer and latest parameters).

  Raises:
    FileNotFoundError: ``path`` is neither, or lacks its checkpoint / tokenizer.
    ValueError: an imported directory without a usable tokenizer / chat template, or a workdir of
      another stage.
  """
  return _load_imported(path) if kind(path) == "chat" else _load_stage0(path)


def _load_imported(path: str) -> ChatModel:
  """An imported InternVL directory: its config, parameters (stored dtype = compute dtype) and
  ``HFTokenizer``, which must have a chat template and the model's ``<IMG_CONTEXT>``."""
  cfg, params, tok = internvl.load_internvl(path)
  if tok is None:
    raise ValueError(f"imported MLLM {path!r} has no tokenizer.json")
  if tok.chat_template is None:
    raise ValueError(f"imported MLLM {path!r}: its tokenizer has no chat template")
  for token in (IMG_START, IMG_END, IMG_CONTEXT):
    if tok.token_to_id(token) is None:
      raise ValueError(f"imported MLLM {path!r}: its tokenizer has no {token} token")
  if tok.img_context_id != cfg.image_token_id:
    raise ValueError(
      f"imported MLLM {path!r}: the tokenizer's {IMG_CONTEXT} is id {tok.img_context_id}, "
      f"the model's image_token_id is {cfg.image_token_id}"
    )
  dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
  dtype = jnp.bfloat16 if dtypes == {np.dtype(jnp.bfloat16)} else jnp.float32
  model = mllm_lib.InternVLModel(cfg, dtype=dtype, param_dtype=dtype)
  return ChatModel(model, jax.tree.map(jnp.asarray, params), tok, True, path)


def _load_stage0(path: str) -> ChatModel:
  """A stage-0 (``config.stage = "mllm"``) workdir: its ``tokenizer.model``, the MLLM of its
  config and the latest checkpoint's parameters."""
  from iomm_jax.assembly import context, workdirs

  config = workdirs.load_workdir_config(path)
  if config.stage != "mllm":
    raise ValueError(
      f"--mllm {path!r} is a {config.stage!r} workdir; give a stage-0 (mllm) workdir or an "
      "imported InternVL directory"
    )
  tok_path = os.path.join(path, context.TOKENIZER_FILE)
  if not os.path.isfile(tok_path):
    raise FileNotFoundError(f"--mllm {path!r} has no {context.TOKENIZER_FILE}")
  tok = Tokenizer.load(tok_path)
  built = iomm.build(specs.from_config(config).model, tok.vocab_size, tok.img_context_id)
  boxed = jax.eval_shape(lambda: iomm.init_mllm(built, context.MLLM_SEED))
  params = nn.meta.unbox(context.restore_params(path, boxed))
  return ChatModel(built.mllm.clone(remat="none"), params, tok, False, path)


# ----------------------------------------------------------------------------- prompts


def prompt_ids(cm: ChatModel, question: str | None = None) -> list[int]:
  """Token ids of the prompt for one image (module docstring): the chat template's user turn
  with the expanded image placeholder, or the stage-0 captioning prefix.

  Raises:
    CaptionOnlyError: ``question`` given to a stage-0 MLLM.
    ValueError: the question holds an image token, or the template does not render the
      placeholder exactly once.
  """
  t, p = cm.tokenizer, cm.num_image_tokens
  if not cm.chat:
    if question:
      raise CaptionOnlyError(
        f"{cm.source or 'this MLLM'} is a stage-0 captioner (trained on image captions only, "
        "no questions): leave the prompt out to caption the image"
      )
    return [t.bos_id, t.img_start_id] + [t.img_context_id] * p + [t.img_end_id]
  q = CAPTION_QUESTION if question is None else question
  for token in (IMG_START, IMG_END, IMG_CONTEXT):
    if token in q:
      raise ValueError(f"the question {q!r} holds the image token {token}")
  text = t.apply_chat_template(
    [{"role": "user", "content": f"{IMG_CONTEXT}\n{q}"}], add_generation_prompt=True
  )
  if text.count(IMG_CONTEXT) != 1:
    raise ValueError(
      f"the chat template rendered the image placeholder {text.count(IMG_CONTEXT)} times, not "
      f"once: {text!r}"
    )
  text = text.replace(IMG_CONTEXT, IMG_START + IMG_CONTEXT * p + IMG_END)
  ids = t.encode(text, bos=False)
  if ids.count(t.img_context_id) != p:
    raise ValueError(f"the prompt holds {ids.count(t.img_context_id)} image tokens, not {p}")
  return ids


def pad_batch(
  seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left", length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Token sequences -> (ids int32 [B, L], valid bool [B, L]), padded with ``pad_id`` on the
  ``side`` ("left", as transformers' InternVL processor, or "right") to ``length`` (default: the
  longest)."""
  if side not in PADDING_SIDES:
    raise ValueError(f"padding side {side!r} is not one of {PADDING_SIDES}")
  longest = max(len(s) for s in seqs)
  length = longest if length is None else length
  if length < longest:
    raise ValueError(f"a prompt has {longest} tokens, more than length={length}")
  ids = np.full((len(seqs), length), pad_id, np.int32)
  valid = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
    ids[i, sl], valid[i, sl] = s, True
  return ids, valid


# ----------------------------------------------------------------------------- decoding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
  """What ``generate`` returns.

  Attributes:
    tokens: [B, N] int32 generated ids; a stopped row holds its stop token, then ``pad_id``.
    num_tokens: [B] int32 generated tokens per row, its stop token included.
    stopped: [B] bool, whether the row ended on a stop token (else it hit ``max_new_tokens``).
    logits: [B, N, V] float32 logits each token was chosen from (``return_logits``), else None.
  """

  tokens: jax.Array
  num_tokens: jax.Array
  stopped: jax.Array
  logits: jax.Array | None = None


def row_keys(seed: int, rows: Sequence[int] | np.ndarray) -> jax.Array:
  """One PRNG key per row, ``fold_in(key(seed), row)``: a row's samples depend on the seed and
  its own index only (not on the batch it is decoded in)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(rows, jnp.uint32))


def filter_logits(
  logits: jax.Array,
  temperature: jax.Array | float,
  top_k: jax.Array | int,
  top_p: jax.Array | float,
) -> jax.Array:
  """[B, V] logits -> float32 ``logits / temperature`` with the tokens outside the ``top_k``
  most likely (0: no limit) and outside the smallest set of probability >= ``top_p`` (1: no
  limit) set to -inf; the most likely token always stays. Ties at a cut-off are all kept. The
  three settings may be traced (one compilation serves every value)."""
  x = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  desc = -jnp.sort(-x, axis=-1)  # [B, V] most likely first
  v = x.shape[-1]
  k = jnp.asarray(top_k, jnp.int32)
  kth = jnp.take(desc, jnp.clip(k - 1, 0, v - 1), axis=-1)[:, None]
  x = jnp.where((k > 0) & (x < kth), -jnp.inf, x)
  desc = jnp.where((k > 0) & (desc < kth), -jnp.inf, desc)
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
  keep = (before < jnp.asarray(top_p, jnp.float32)).at[:, 0].set(True)
  cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where((jnp.asarray(top_p) < 1.0) & (x < cutoff), -jnp.inf, x)


def _choose(logits: jax.Array, keys: jax.Array, step: jax.Array, sample: bool, knobs) -> jax.Array:
  """The next token per row: argmax (not ``sample``) or a draw from ``filter_logits(logits,
  *knobs)`` with each row's key folded with ``step``."""
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  x = filter_logits(logits, *knobs)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
  return jax.vmap(jax.random.categorical)(step_keys, x).astype(jnp.int32)


def generate(
  model: mllm_lib.InternVLModel,
  params: Any,
  ids: np.ndarray | jax.Array,
  valid: np.ndarray | jax.Array,
  pixel_values: jax.Array,
  keys: jax.Array | None = None,
  *,
  max_new_tokens: int,
  stop_ids: Sequence[int] = (),
  pad_id: int = 0,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  return_logits: bool = False,
) -> Generation:
  """Incremental decoding with a key/value cache (module docstring).

  Compiled once per (B, L, ``max_new_tokens``, number of stop ids, greedy or sampled,
  ``return_logits``, model); the stop ids, pad id and sampling settings are traced.

  Args:
    model: the MLLM (its ``dtype`` is the compute dtype; the cache takes it too).
    params: its parameters.
    ids: [B, L] prompt ids (left or right padded); each row holds P ``image_token_id`` s.
    valid: [B, L] bool, True at real tokens.
    pixel_values: [B, S, S, 3] the vision tower's input (``iomm.vit_input``), image b for row b.
    keys: [B] PRNG keys (``row_keys``) for sampling; unused when greedy.
    max_new_tokens: N >= 1, the most tokens generated per row.
    stop_ids: ids that end a row (emitted, then ``pad_id``).
    pad_id: what follows a row's stop.
    temperature: 0 greedy, else the softmax temperature of sampling.
    top_k: sample among the k most likely tokens only (0: all).
    top_p: sample from the smallest set of tokens with probability >= top_p (1: all).
    return_logits: also return each step's [B, N, V] logits (tests).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(
      f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}"
    )
  ids, valid = jnp.asarray(ids, jnp.int32), jnp.asarray(valid, bool)
  sample = temperature > 0
  if keys is None:
    if sample:
      raise ValueError("sampling (temperature > 0) needs keys (row_keys)")
    keys = row_keys(0, np.arange(ids.shape[0]))
  stops = jnp.asarray(tuple(int(i) for i in stop_ids) or (-1,), jnp.int32)  # -1: never
  knobs = (
    jnp.float32(temperature if sample else 1.0),
    jnp.int32(top_k),
    jnp.float32(top_p),
  )
  return _generate(
    params,
    ids,
    valid,
    jnp.asarray(pixel_values),
    keys,
    stops,
    jnp.int32(pad_id),
    knobs,
    config=model.config,
    dtype=model.dtype,
    max_new_tokens=int(max_new_tokens),
    sample=bool(sample),
    return_logits=bool(return_logits),
  )


@functools.partial(
  jax.jit, static_argnames=("config", "dtype", "max_new_tokens", "sample", "return_logits")
)
def _generate(
  params: Any,
  ids: jax.Array,
  valid: jax.Array,
  pixel_values: jax.Array,
  keys: jax.Array,
  stops: jax.Array,
  pad_id: jax.Array,
  knobs: tuple[jax.Array, jax.Array, jax.Array],
  *,
  config: mllm_lib.MLLMConfig,
  dtype: Any,
  max_new_tokens: int,
  sample: bool,
  return_logits: bool,
) -> Generation:
  """``generate``'s jitted body: prefill, then a ``while_loop`` of one-token steps."""
  model = mllm_lib.InternVLModel(config, dtype=dtype, param_dtype=dtype)
  v = {"params": params}
  b, length = ids.shape
  n = max_new_tokens
  size = length + n
  m = mllm_lib.InternVLModel
  image = model.apply(v, pixel_values, method=m.encode_images)
  embeds = mllm_lib.merge_image_tokens(
    model.apply(v, ids, method=m.embed), ids, image, config.image_token_id
  )
  count = valid.sum(axis=1).astype(jnp.int32)  # real prompt tokens per row
  positions = jnp.maximum(jnp.cumsum(valid, axis=1).astype(jnp.int32) - 1, 0)
  filled = jnp.zeros((b, size), bool).at[:, :length].set(valid)  # slots holding a real token
  causal = jnp.arange(size)[None, :] <= jnp.arange(length)[:, None]  # [L, S]
  mask = causal[None, None] & filled[:, None, None, :]
  cache = mllm_lib.init_cache(config.text, b, size, dtype)
  hidden, cache = model.apply(v, embeds, positions, mask, cache, 0, method=m.decode_cached)
  last = jnp.max(jnp.where(valid, jnp.arange(length)[None], 0), axis=1)  # last real token
  logits = model.apply(v, hidden[jnp.arange(b), last][:, None], method=m.logits)[:, 0]
  tok = _choose(logits, keys, jnp.uint32(0), sample, knobs)
  tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
  done = jnp.isin(tok, stops)
  all_logits = None
  if return_logits:
    all_logits = jnp.zeros((b, n, config.text.vocab_size), jnp.float32).at[:, 0].set(logits)

  def cond(state):
    t, _, done, *_ = state
    return (t < n) & ~jnp.all(done)

  def body(state):
    t, prev, done, tokens, cache, filled, all_logits = state
    slot = length + t - 1  # where the previous token goes
    filled = filled.at[:, slot].set(True)
    emb = model.apply(v, prev[:, None], method=m.embed)
    pos = (count + t - 1)[:, None]
    hidden, cache = model.apply(
      v, emb, pos, filled[:, None, None, :], cache, slot, method=m.decode_cached
    )
    logits = model.apply(v, hidden, method=m.logits)[:, 0]
    tok = _choose(logits, keys, t.astype(jnp.uint32), sample, knobs)
    tok = jnp.where(done, pad_id, tok)
    tokens = tokens.at[:, t].set(tok)
    if all_logits is not None:
      all_logits = all_logits.at[:, t].set(logits)
    done = done | jnp.isin(tok, stops)
    return t + 1, tok, done, tokens, cache, filled, all_logits

  state = (jnp.int32(1), tok, done, tokens, cache, filled, all_logits)
  _, _, done, tokens, _, _, all_logits = jax.lax.while_loop(cond, body, state)
  # a row's first stop token ends it (pad_id may itself be a stop id: pads come only after)
  is_stop = jnp.isin(tokens, stops)
  stopped = is_stop.any(axis=1)
  num = jnp.where(stopped, jnp.argmax(is_stop, axis=1) + 1, n).astype(jnp.int32)
  return Generation(tokens, num, stopped, all_logits)


# ----------------------------------------------------------------------------- answers


@dataclasses.dataclass(frozen=True)
class Answer:
  """One image's answer: its text (stop token dropped), the generated ids (the stop token last
  when one ended it) and whether a stop token ended it."""

  text: str
  tokens: tuple[int, ...]
  stopped: bool


def answer(
  cm: ChatModel,
  images: np.ndarray,
  questions: str | Sequence[str | None] | None = None,
  *,
  max_new_tokens: int = 64,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  rows: Sequence[int] | None = None,
  padding_side: str = "left",
  batch_size: int | None = None,
) -> list[Answer]:
  """Answers ``questions`` (one for all, or one per image; None: caption) about uint8 images
  [N, H, W, 3], ``batch_size`` images per ``generate`` call (default: all; a short last batch is
  padded with copies of its first row, so every call has one shape). ``rows``: each image's
  index for its sampling key (``row_keys``; default 0..N-1)."""
  n = len(images)
  if questions is None or isinstance(questions, str):
    questions = [questions] * n
  if len(questions) != n:
    raise ValueError(f"{len(questions)} questions for {n} images")
  rows = list(range(n)) if rows is None else list(rows)
  seqs = [prompt_ids(cm, q) for q in questions]
  length = max(len(s) for s in seqs)
  bs = batch_size or n
  out = []
  for start in range(0, n, bs):
    sl = slice(start, start + bs)
    chunk, imgs, rws = seqs[sl], np.asarray(images[sl]), rows[sl]
    extra = bs - len(chunk)
    if extra:  # one shape per call: repeat the first row
      chunk = chunk + [chunk[0]] * extra
      imgs = np.concatenate([imgs, np.repeat(imgs[:1], extra, axis=0)])
      rws = rws + [rws[0]] * extra
    ids, valid = pad_batch(chunk, cm.tokenizer.pad_id, padding_side, length)
    gen = generate(
      cm.model,
      cm.params,
      ids,
      valid,
      iomm.vit_input(imgs, cm.image_size),
      row_keys(seed, rws),
      max_new_tokens=max_new_tokens,
      stop_ids=cm.stop_ids,
      pad_id=cm.tokenizer.pad_id,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
    )
    tokens, counts = np.asarray(gen.tokens), np.asarray(gen.num_tokens)
    stopped = np.asarray(gen.stopped)
    for i in range(len(chunk) - extra):
      toks = tuple(int(x) for x in tokens[i, : counts[i]])
      text_ids = toks[:-1] if stopped[i] else toks
      out.append(Answer(cm.tokenizer.decode(list(text_ids)).strip(), toks, bool(stopped[i])))
  return out
