"""The paper-size experiment files (experiments/iomm_{b,l,xl}/): recipe values and model sizes.

Models are built abstractly (``jax.eval_shape`` of the inits: traced, never allocated), so the
6 B generator costs seconds and no memory.
"""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from iomm_jax import optim
from iomm_jax.configs import loading, paper, specs
from iomm_jax.data import pipeline
from iomm_jax.models import iomm, layers
from iomm_jax.models import mllm as mllm_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ("iomm_b", "iomm_l", "iomm_xl")
STAGES = ("pretrain", "finetune")
PATHS = "mllm=/w/internvl3_2b,vae=/w/flux_vae,data=/d/shards"
# paper Tab. 4 / Tab. 5 (paper.md §3.1-3.2): optimizer, r, EMA, stage-1 / stage-2 batch
PAPER = {
  "iomm_b": ("adamw", 0.85, 0.999, 1024, 256),
  "iomm_l": ("adamw", 0.85, 0.0, 512, 256),
  "iomm_xl": ("muon", 0.45, 0.0, 4096, 256),
}
GENERATOR_B = {"iomm_b": 1.6e9, "iomm_l": 2.7e9, "iomm_xl": 6.0e9}  # paper §2.6
INTERNVL3_2B = 2_088_957_440  # tests/models/test_mllm.py: 304.0 M + 8.7 M + 1543.3 M + 233.0 M
RQA = 28_718_592  # tests/models/test_adapter.py: the paper's "29M"
COND_LEN = 300  # any condition length: it changes no parameter shape


def _spec(name: str, stage: str, arg: str = "") -> str:
  """The ``path[:arg]`` of experiments/<name>/<stage>.py."""
  return os.path.join(ROOT, "experiments", name, f"{stage}.py") + (f":{arg}" if arg else "")


def _load(name: str, stage: str, arg: str = PATHS):
  """The locked config, as iomm-train loads it (a fine-tune gets an ``init`` path)."""
  if stage == "finetune" and "init=" not in arg:
    arg += f",init=/runs/{name}/pretrain"
  return loading.load_config(_spec(name, stage, arg))


def _build(config) -> iomm.IOMM:
  """The static model for the imported InternVL3-2B tokenizer (151674 ids, <IMG_CONTEXT> =
  151667)."""
  return iomm.build(specs.from_config(config).model, vocab_size=151674, image_token_id=151667)


@functools.cache
def _trainable_shapes(name: str):
  """Abstract boxed parameters of the adapter, connector and generator of ``name``'s model."""
  model = _build(_load(name, "pretrain"))
  return jax.eval_shape(lambda: iomm.init_trainable(model, 0, COND_LEN))


def _trainable_counts(name: str) -> dict[str, int]:
  """Parameter counts of the adapter, connector and generator of ``name``'s model."""
  return {k: layers.count_params(v) for k, v in _trainable_shapes(name).items()}


def _mllm_count(cfg: mllm_lib.MLLMConfig, vision_layers: int, text_layers: int) -> int:
  """Parameters of the whole MLLM of ``cfg`` cut to the given depths."""
  cfg = dataclasses.replace(
    cfg,
    vision=dataclasses.replace(cfg.vision, num_layers=vision_layers),
    text=dataclasses.replace(cfg.text, num_layers=text_layers),
  )
  model = iomm.IOMM(mllm_lib.InternVLModel(cfg), *[None] * 4, image_size=512, num_queries=256)
  return layers.count_params(jax.eval_shape(lambda: iomm.init_mllm(model, 0)))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", MODELS)
def test_recipe_values(name, stage):
  c = _load(name, stage)
  opt, r, ema, batch1, batch2 = PAPER[name]
  assert c.stage == stage
  assert (c.model.mllm, c.model.mllm_dtype) == ("internvl3_2b", "bfloat16")
  assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "float32")
  assert (c.model.codec, c.model.vae, c.model.image_size) == ("vae", "flux", 512)
  assert (c.model.condition, c.model.num_queries) == ("rqa", 256)
  assert (c.model.mllm_from, c.model.vae_checkpoint) == ("/w/internvl3_2b", "/w/flux_vae")
  assert (c.data.source, c.data.path) == ("array_record", "/d/shards")
  assert (c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2) == (opt, 1e-4, 0.9, 0.95)
  assert (c.optim.weight_decay, c.optim.clip_norm) == (0.0, 1.0)
  assert c.diffusion.mask_ratio == r
  assert c.train.ema_decay == ema
  assert c.train.batch_size == (batch1 if stage == "pretrain" else batch2)
  if stage == "finetune":
    assert c.diffusion.mix_ratio == 0.5
    assert c.train.init_from == f"/runs/{name}/pretrain"
  loading.validate(c, num_devices=8)  # what iomm-train checks first


def test_default_steps_follow_the_epochs():
  assert _load("iomm_b", "pretrain").train.num_steps == 107_422  # 10 x 11 M / 1024
  assert _load("iomm_l", "pretrain").train.num_steps == 107_422  # 5 x 11 M / 512
  assert _load("iomm_b", "finetune").train.num_steps == 8_204  # 10 x 210 K / 256
  assert _load("iomm_b", "pretrain", PATHS + ",steps=500").train.num_steps == 500


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts(name):
  counts = _trainable_counts(name)
  gen = counts["generator"]
  assert abs(gen - GENERATOR_B[name]) <= 0.03 * GENERATOR_B[name], gen
  assert counts["adapter"] == RQA
  assert counts["connector"] == 1536 * 1536 + 1536  # linear 1536 -> 1536 condition width
  model = _build(_load(name, "pretrain"))
  assert model.latent_shape == (64, 64, 16)  # 512 px / 8, FLUX's 16 channels
  assert model.generator.config.in_channels == 64  # 16 channels packed 2x2
  assert model.num_image_tokens == 256
  if name == "iomm_b":  # the abstract's "IOMM-B (3.6B)" = generator + frozen MLLM
    assert abs(gen + INTERNVL3_2B - 3.6e9) <= 0.05 * 3.6e9


def test_exact_generator_counts():
  # mmdit.py's variant table; XL = 27 single blocks of 221,226,496 + 72,284,224 embedders/out
  want = {"iomm_b": 1_601_038_400, "iomm_l": 2_692_494_912, "iomm_xl": 6_045_399_616}
  assert {n: _trainable_counts(n)["generator"] for n in MODELS} == want


def test_mllm_is_internvl3_2b():
  model = _build(_load("iomm_b", "pretrain"))
  cfg = model.mllm_config
  assert cfg == mllm_lib.get_mllm_config("internvl3_2b")
  assert model.mllm.dtype == model.mllm.param_dtype == jnp.bfloat16
  # Identical layers: trace 1-2 layer copies (seconds) and extrapolate to 24 ViT + 28 LLM layers.
  one = _mllm_count(cfg, 1, 1)
  per_vision, per_text = _mllm_count(cfg, 2, 1) - one, _mllm_count(cfg, 1, 2) - one
  total = one + (cfg.vision.num_layers - 1) * per_vision + (cfg.text.num_layers - 1) * per_text
  assert total == INTERNVL3_2B


@pytest.mark.parametrize("name", MODELS)
def test_stages_share_the_model(name):
  # stage 2 restores the stage-1 checkpoint, which needs the same model config
  pre, fin = _load(name, "pretrain").model.to_dict(), _load(name, "finetune").model.to_dict()
  assert pre == fin


def test_muon_builds_for_the_xl_generator():
  c = _load("iomm_xl", "pretrain")
  opt, _ = optim.make_optimizer(specs.from_config(c).optim, c.train.num_steps)
  params = nn.meta.unbox(_trainable_shapes("iomm_xl"))
  state = jax.eval_shape(opt.init, params)
  # Muon keeps a momentum for every 2-D weight, Adam two moments for every other parameter
  inner = state[-1].inner_states  # after the clip: the partition into Muon and Adam
  held = lambda tree: [x for x in jax.tree.leaves(tree) if not isinstance(x, optax.MaskedNode)]
  muon, adam = inner["muon"].inner_state[0], inner["adam"].inner_state[0]
  leaves = jax.tree.leaves(params)
  matrices = [x.shape for x in leaves if x.ndim == 2]
  others = [x.shape for x in leaves if x.ndim != 2]
  assert matrices and others
  assert sorted(x.shape for x in held(muon.mu)) == sorted(matrices)
  assert sorted(x.shape for x in held(adam.mu)) == sorted(others)
  assert sorted(x.shape for x in held(adam.nu)) == sorted(others)


@pytest.mark.parametrize("name", ("iomm_b", "iomm_l"))
def test_finetune_at_1024(name):
  c = _load(name, "finetune", PATHS + ",res=1024")
  assert (c.model.image_size, c.train.batch_size) == (1024, 96)
  assert _build(c).latent_shape == (128, 128, 16)


def test_settings_the_paper_lacks_are_errors():
  with pytest.raises(ValueError, match="pre-trains at 512 px only"):
    _load("iomm_b", "pretrain", PATHS + ",res=1024")
  with pytest.raises(ValueError, match="res=1024 has no paper setting"):
    _load("iomm_xl", "finetune", PATHS + ",res=1024")
  with pytest.raises(ValueError, match="unknown config argument 'init'"):
    _load("iomm_b", "pretrain", PATHS + ",init=/x")


def test_loads_without_arguments_but_training_names_what_is_missing():
  c = loading.load_config(_spec("iomm_b", "pretrain"))
  assert (c.model.mllm_from, c.model.vae_checkpoint, c.data.path) == ("", "", "")
  _build(c)  # the abstract model needs no weights
  with pytest.raises(ValueError, match="config.model.mllm_from is empty"):
    loading.validate(c, num_devices=1)
  with pytest.raises(ValueError, match="config.train.init_from is empty"):
    loading.validate(loading.load_config(_spec("iomm_b", "finetune", PATHS)), num_devices=1)


def test_missing_prepared_data_is_a_clear_error():
  # The ArrayRecord loader itself is tested in tests/data/test_sources.py.
  c = _load("iomm_b", "pretrain")
  with pytest.raises(FileNotFoundError, match="config.data.path='/d/shards'"):
    pipeline.make_dataset(specs.from_config(c), conditioner=None)


def test_paper_config_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown paper recipe"):
    paper.paper_config("iomm_s", "pretrain")
  with pytest.raises(ValueError, match="stages 'pretrain' and 'finetune'"):
    paper.paper_config("iomm_b", "mllm")


def test_command_line_overrides_parse_to_typed_values():
  items = ["optim.lr=3e-4", "train.num_steps=10", "x=true", "data.shapes=(circle, 'ring')", "m=a=b"]
  assert loading.parse_overrides(items) == {
    "optim.lr": 3e-4, "train.num_steps": 10, "x": True, "data.shapes": ("circle", "ring"),
    "m": "a=b",
  }  # fmt: skip
  c = loading.load_config(
    os.path.join(ROOT, "experiments/shapes/finetune.py"),
    loading.parse_overrides(["model.generator_overrides=num_layers=3", "optim.lr=0.002"]),
  )
  assert c.model.generator_overrides == "num_layers=3" and c.optim.lr == 0.002
  with pytest.raises(ValueError, match="override 'lr' is not KEY=VALUE"):
    loading.parse_overrides(["lr"])
