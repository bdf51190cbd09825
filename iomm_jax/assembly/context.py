"""What the generator stages and the samplers share: tokenizer, model, frozen MLLM, conditioner.

The frozen MLLM comes from ``config.model.mllm_from``, either a stage-0 workdir (its tokenizer and
latest parameters) or a directory written by ``convert.internvl.import_internvl`` (an off-the-shelf
InternVL3: its parameters and ``HFTokenizer``), or, for the ablation ``mllm_init='random'``, from a
seeded random init. With an imported directory, ``config.model.mllm`` names the variant the
checkpoint must be (e.g. "internvl3_2b"; a mismatch is an error naming both) or is
``"from_checkpoint"`` to take the checkpoint's own ``MLLMConfig``. The codec's parameters are a
seeded init, or, with ``config.model.vae_checkpoint``, a VAE imported by ``convert.vae``.

The generator a stage-2 run starts from (``initial_trainable``): ``config.train.init_from``, a
stage-1 workdir (its EMA weights) or a diffusers ``FluxTransformer2DModel`` directory
(``convert.flux.read_transformer_init``). With LoRA (``config.model.lora``) its base weights are
frozen and come from there at every start, training and sampling alike.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from iomm_jax import checkpointing, runtime, sharding
from iomm_jax.assembly import workdirs
from iomm_jax.configs import specs
from iomm_jax.convert import flux, internvl, tensors
from iomm_jax.convert import vae as vae_convert
from iomm_jax.data import pipeline, shapes, sources
from iomm_jax.data.hf_tokenizer import HFTokenizer
from iomm_jax.data.tokenizer import TextTokenizer, Tokenizer
from iomm_jax.models import codec as codec_lib
from iomm_jax.models import iomm
from iomm_jax.models import mllm as mllm_lib
from iomm_jax.models import mmdit as mmdit_lib

TOKENIZER_FILE = "tokenizer.model"
MLLM_SEED = 17  # offset of the MLLM's init seed from config.seed
HF_TOKENIZER_DIR = "hf_tokenizer"  # workdir copy of an imported MLLM's tokenizer files
FROM_CHECKPOINT = "from_checkpoint"  # config.model.mllm: the imported checkpoint's own config


@dataclasses.dataclass
class GenerationContext:
  """Static model + tokenizer + frozen parameters of a generator run."""

  model: iomm.IOMM
  tokenizer: TextTokenizer
  conditioner: pipeline.Conditioner
  frozen: dict[str, Any]


def train_tokenizer(config: ml_collections.ConfigDict, path: str) -> Tokenizer:
  """The run's sentencepiece tokenizer (written to ``path`` unless it is ""): a copy of
  ``config.model.tokenizer_from`` (a tokenizer.model, or a workdir holding one), else trained on
  the shapes caption grammar (``data.source = "shapes"``) or on the captions of the run's
  training records (own data; held-out records excluded), plus the auxiliary prompt, with a
  soft vocabulary of ``config.model.tokenizer_vocab`` pieces."""
  spec = specs.from_config(config)
  m = spec.model
  given = m.tokenizer_from
  if given:
    file = os.path.join(given, TOKENIZER_FILE) if os.path.isdir(given) else given
    if not os.path.isfile(file):
      raise FileNotFoundError(
        f"config.model.tokenizer_from={given!r} is not a {TOKENIZER_FILE} nor a folder holding one"
      )
    try:
      tok = Tokenizer.load(file)
    except (ValueError, RuntimeError) as e:  # not sentencepiece, or other special ids
      raise ValueError(f"config.model.tokenizer_from={given!r}: {e}") from None
    if path:
      tok.save(path)
    return tok
  if spec.data.source == "shapes":
    corpus = shapes.all_caption_corpus(pipeline.shapes_world(spec.data))
  else:
    corpus = sources.caption_corpus(spec)
    if not corpus:
      raise ValueError(
        f"config.data.path={config.data.path!r} has no captioned training record to train the "
        "tokenizer on: caption the data, or set config.model.tokenizer_from"
      )
  return Tokenizer.train(corpus + [m.aux_prompt], m.tokenizer_vocab, path or None)


def ensure_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``<workdir>/tokenizer.model``, trained there first if missing. Process 0 alone trains and
  writes it; every process waits for it, so none reads a half-written file."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if jax.process_index() == 0 and not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    train_tokenizer(config, path)
  runtime.barrier(f"iomm_jax tokenizer {os.path.abspath(path)}")
  return path


def restore_params(
  workdir: str, boxed_params: Any, which: str = "params", step: int | None = None
) -> Any:
  """``params`` (or ``ema``) at ``step`` (default: the latest) of a run in ``workdir``, shaped
  like the (boxed) template. A run that kept no EMA (``train.ema_decay = 0``) gives its
  parameters for ``which="ema"``.

  Only that entry of the saved state is read (``Checkpointer.restore_partial``: no optimiser
  state). Arrays land directly in their shards on the mesh of ``sharding.placing_on`` (placed by
  the template's logical axes), else on this process's first device, whatever mesh saved them.
  """
  checkpointing.find_checkpoint_dir(workdir, "restore")
  cfg = workdirs.load_workdir_config(workdir)
  mesh, rules = sharding.placement() or (sharding.single_device_mesh(), ())
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    saved = sorted(ckpt.manager.all_steps())
    if step is not None and step not in saved:
      raise FileNotFoundError(f"{workdir!r} has no checkpoint at step {step}; saved steps: {saved}")
    ema = ckpt.saved_ema(step)  # (ema_decay = 0 runs of older versions saved a copy too)
    if which == "ema" and not (ema and workdirs.keeps_ema(cfg)):  # no EMA: its parameters
      which = "params"
    target = sharding.abstract_target(
      boxed_params, sharding.logical_shardings(boxed_params, mesh, rules)
    )
    state = ckpt.restore_partial({which: target}, step=step)
  finally:
    ckpt.close()
  return state[which]


def _strip_lora(tree: Any) -> Any:
  """``tree`` without the LoRA leaves (the layout of a run without LoRA)."""
  if not isinstance(tree, dict):
    return tree
  return {k: _strip_lora(v) for k, v in tree.items() if k not in mmdit_lib.LORA_LEAVES}


def initial_trainable(
  config: ml_collections.ConfigDict, model: iomm.IOMM, cond_len: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """(the whole trainable tree a stage-2 run starts from, unboxed, every generator parameter
  included (LoRA's too), placed on the mesh of ``sharding.placing_on`` by the parameters'
  logical axes (else on this process's first device); a JSON record of the source or None).

  ``config.train.init_from``:
    * a ``FluxTransformer2DModel`` directory (``flux.transformer_dir``): the generator from its
      file, strictly (``flux.read_transformer_init``; one log line names each re-initialised
      parameter); the adapter, connector, LoRA and re-initialised parameters from their init;
    * a stage-1 workdir: its EMA weights; LoRA's from their init;
    * "scratch": the init.
  The init is ``iomm.init_trainable`` with ``config.seed``, computed only for the leaves that
  are not loaded. Split it for LoRA with ``iomm.split_generator``.
  """
  boxed = jax.eval_shape(lambda: iomm.init_trainable(model, config.seed, cond_len))
  mesh, rules = sharding.placement() or (sharding.single_device_mesh(), ())
  where = tensors.flatten(sharding.logical_shardings(boxed, mesh, rules))
  abstract = tensors.flatten(nn.meta.unbox(boxed))
  src = config.train.init_from
  loaded: dict[str, Any] = {}
  record = None
  if src and src != "scratch" and flux.transformer_dir(src) is not None:
    init = flux.read_transformer_init(src, model.generator.config)
    print(init.summary(), flush=True)
    for p in init.keys:
      path = f"generator/{p}"
      array = init.array(p, abstract[path].dtype)
      loaded[path] = sharding.place(array, where[path])
    record = init.meta()
  elif src and src != "scratch":
    restored = restore_params(src, _strip_lora(boxed), which="ema")
    loaded = tensors.flatten(restored)
    record = {"format": "workdir", "path": os.path.abspath(src), "weights": "ema"}
  fresh = [p for p in abstract if p not in loaded]

  def init_rest():  # XLA computes only the leaves returned
    full = tensors.flatten(nn.meta.unbox(iomm.init_trainable(model, config.seed, cond_len)))
    return {p: full[p] for p in fresh}

  rest = jax.jit(init_rest, out_shardings={p: where[p] for p in fresh})() if fresh else {}
  return tensors.unflatten({**loaded, **rest}), record


def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> GenerationContext:
  """Tokenizer, model and frozen parameters for a stage-1/2 run or for sampling.

  With ``workdir``, the tokenizer is copied there (so the workdir alone can be sampled later).
  """
  spec = specs.from_config(config)
  m = spec.model
  imported = m.mllm_init == "checkpoint" and internvl.is_imported(m.mllm_from)
  if imported:  # an off-the-shelf InternVL3 written by convert.internvl.import_internvl
    tokenizer, model, mllm = _load_imported(m, workdir)
  elif m.mllm_init == "checkpoint":
    src = checkpointing.find_checkpoint_dir(m.mllm_from, "config.model.mllm_from")
    tok_path = os.path.join(src, TOKENIZER_FILE)
    if not os.path.exists(tok_path):
      raise FileNotFoundError(f"config.model.mllm_from={src!r} has no {TOKENIZER_FILE}")
    tokenizer = Tokenizer.load(tok_path)
  else:
    tok_path = os.path.join(workdir or "", TOKENIZER_FILE)
    tokenizer = (
      Tokenizer.load(tok_path)
      if workdir and os.path.exists(tok_path)
      else train_tokenizer(config, tok_path if workdir else "")
    )
  if workdir and jax.process_index() == 0 and not imported:
    os.makedirs(workdir, exist_ok=True)
    dst = os.path.join(workdir, TOKENIZER_FILE)
    if os.path.abspath(tok_path) != os.path.abspath(dst):
      shutil.copyfile(tok_path, dst)
  if not imported:
    model = iomm.build(m, tokenizer.vocab_size, tokenizer.img_context_id)
    if m.mllm_init == "checkpoint":  # only the shapes of an init are needed to restore
      mllm = restore_params(m.mllm_from, jax.eval_shape(lambda: iomm.init_mllm(model, MLLM_SEED)))
    else:
      mllm = nn.meta.unbox(iomm.init_mllm(model, spec.seed + MLLM_SEED))
  codec = init_codec_params(  # converted VAE weights when model.vae_checkpoint is set
    m, model.codec, iomm.init_key(spec.seed + 23), model.image_size
  )
  conditioner = pipeline.Conditioner(
    tokenizer, model.num_image_tokens, m.aux_prompt, m.max_text_len
  )
  return GenerationContext(model, tokenizer, conditioner, {"mllm": mllm, "codec": codec})


def codec_params(m: specs.ModelSpec, template: Any) -> Any:
  """The codec params of a run (``m``: its model spec): ``template`` unchanged when
  ``model.vae_checkpoint`` is empty, else the VAE imported there (``convert.vae.load_into``),
  checked against ``model.vae``'s ``VAE_VARIANTS`` entry and ``template``'s shapes, cast to its
  dtypes.

  Raises ``ConversionError`` when a checkpoint is set for a non-VAE codec, or when it holds
  another VAE than ``config.model.vae`` (both named, with the fields).
  """
  path = m.vae_checkpoint
  if not path:
    return template
  if m.codec != "vae":
    raise tensors.ConversionError(
      f"config.model.vae_checkpoint={path!r} is set but config.model.codec={m.codec!r} "
      f"(use codec='vae' or clear vae_checkpoint)"
    )
  if m.vae not in codec_lib.VAE_VARIANTS:
    raise tensors.ConversionError(
      f"config.model.vae={m.vae!r} unknown; choose from {sorted(codec_lib.VAE_VARIANTS)}"
    )
  return vae_convert.load_into(
    path,
    codec_lib.VAE_VARIANTS[m.vae],
    template,
    f"config.model.vae_checkpoint={path!r}",
    f"config.model.vae={m.vae!r}",
  )


def init_codec_params(
  m: specs.ModelSpec,
  latent_codec: Any,
  rng: jax.Array,
  image_size: int | Sequence[int],
) -> Any:
  """A run's codec params (``m``: its model spec): ``latent_codec.init_params(rng, image_size)``,
  or, when ``model.vae_checkpoint`` is set, the converted weights (no random init is computed;
  only its shapes are traced)."""
  if not m.vae_checkpoint:
    return latent_codec.init_params(rng, image_size)
  template = jax.eval_shape(lambda key: latent_codec.init_params(key, image_size), rng)
  return codec_params(m, template)


def _config_diff(variant: mllm_lib.MLLMConfig, ckpt: mllm_lib.MLLMConfig) -> list[str]:
  """The MLLMConfig fields (``vision.width``, ...) on which the two differ, ignoring
  ``vision.layer_scale_init`` (an init value only)."""
  a, b = (tensors.flatten(dataclasses.asdict(c), ".") for c in (variant, ckpt))
  return [
    f"{k}: variant {a[k]!r}, checkpoint {b[k]!r}"
    for k in a
    if a[k] != b[k] and k != "vision.layer_scale_init"
  ]


def _load_imported(m: specs.ModelSpec, workdir: str | None) -> tuple[HFTokenizer, iomm.IOMM, Any]:
  """Tokenizer, model and MLLM parameters (in ``config.model.mllm_dtype``) of an imported InternVL
  directory ``config.model.mllm_from`` (``m``: the model spec); with ``workdir``, the tokenizer
  is saved there too."""
  ckpt_cfg, params, tokenizer = internvl.load_internvl(m.mllm_from)
  if tokenizer is None:
    raise FileNotFoundError(
      f"config.model.mllm_from={m.mllm_from!r} has no tokenizer.json: import a checkpoint "
      "directory that holds its tokenizer (import_internvl(..., tokenizer_dir=...))"
    )
  if tokenizer.img_context_id != ckpt_cfg.image_token_id:
    raise ValueError(
      f"config.model.mllm_from={m.mllm_from!r}: the tokenizer's <IMG_CONTEXT> is id "
      f"{tokenizer.img_context_id}, the model's image_token_id is {ckpt_cfg.image_token_id}"
    )
  if tokenizer.vocab_size > ckpt_cfg.text.vocab_size:
    raise ValueError(
      f"config.model.mllm_from={m.mllm_from!r}: the tokenizer has {tokenizer.vocab_size} ids, "
      f"more than the model's vocab_size {ckpt_cfg.text.vocab_size}"
    )
  if workdir and jax.process_index() == 0:
    tokenizer.save(os.path.join(workdir, HF_TOKENIZER_DIR))
  model = iomm.build(
    m,
    ckpt_cfg.text.vocab_size,
    ckpt_cfg.image_token_id,
    mllm_config=ckpt_cfg if m.mllm == FROM_CHECKPOINT else None,
  )
  diff = _config_diff(model.mllm_config, ckpt_cfg)
  if diff:
    raise ValueError(
      f"config.model.mllm={m.mllm!r} does not match the imported checkpoint "
      f"config.model.mllm_from={m.mllm_from!r} ({'; '.join(diff)}); set config.model.mllm to "
      f"the matching variant or to {FROM_CHECKPOINT!r}"
    )
  dtype = model.mllm.param_dtype
  return tokenizer, model, jax.tree.map(lambda x: jax.numpy.asarray(x, dtype), params)
