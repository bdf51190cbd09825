"""Each stage for a few steps (quick configs): metrics, save, restore, stage chaining, and the
configuration errors that must be raised before anything compiles (resuming: test_faults.py)."""

import json
import os

import numpy as np
import pytest

from iomm_jax import metrics
from iomm_jax.configs import loading, specs
from iomm_jax.configs.loading import load_config
from iomm_jax.train import finetune, pretrain

EXP = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "experiments", "shapes"
)


def cfg(name, **overrides):
  return load_config(os.path.join(EXP, f"{name}.py:quick"), overrides)


@pytest.fixture(scope="module")
def stage0(quick_mllm):
  return quick_mllm  # tests/conftest.py: trained once per session


@pytest.fixture(scope="module")
def stage1(stage0, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("runs") / "pretrain")
  last = pretrain.train_and_evaluate(cfg("pretrain", **{"model.mllm_from": stage0[0]}), wd)
  return wd, last


def test_stage0_trains_and_checkpoints(stage0):
  wd, last = stage0
  recs = metrics.read_metrics(wd)
  assert [r["step"] for r in recs] == [1, 2, 4, 6]
  for key in ("step", "loss", "lr", "grad_norm", "steps_per_s"):
    assert key in recs[-1]
  assert recs[-1]["loss"] < recs[0]["loss"]
  assert os.path.exists(os.path.join(wd, "tokenizer.model"))
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]
  assert os.path.isdir(os.path.join(wd, "tensorboard"))


def test_stage1_metrics_and_sample_grid(stage1):
  wd, last = stage1
  recs = metrics.read_metrics(wd)
  assert recs[-1]["step"] == 6 and np.isfinite(recs[-1]["loss"])
  assert recs[-1]["image_only_share"] == 1.0
  # r = 0.85: about 15 % of the condition's image tokens survive
  assert 0.0 < np.mean([r["kept_token_share"] for r in recs]) < 0.4
  assert os.path.exists(os.path.join(wd, "samples_0000006.png"))
  assert os.path.exists(os.path.join(wd, "tokenizer.model"))


def test_stage2_initialises_from_stage1_and_mixes(stage0, stage1, tmp_path):
  wd = str(tmp_path / "finetune")
  c = cfg("finetune", **{"model.mllm_from": stage0[0], "train.init_from": stage1[0]})
  finetune.train_and_evaluate(c, wd)
  recs = metrics.read_metrics(wd)
  assert recs[-1]["step"] == 6
  share = np.mean([r["image_only_share"] for r in recs])
  assert 0.1 < share < 0.9  # lambda = 0.5, batches of 8
  # step 1 starts from the stage-1 EMA weights: its loss is far below a fresh model's
  assert recs[0]["loss"] < metrics.read_metrics(stage1[0])[0]["loss"]
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["train"]["init_from"] == stage1[0]


# ----------------------------------------------------------------------------- bad input


def test_finetune_without_stage1_checkpoint(stage0, tmp_path):
  with pytest.raises(ValueError, match="config.train.init_from is empty"):
    finetune.train_and_evaluate(
      cfg("finetune", **{"model.mllm_from": stage0[0]}), str(tmp_path / "x")
    )
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    finetune.train_and_evaluate(
      cfg("finetune", **{"model.mllm_from": stage0[0], "train.init_from": str(tmp_path)}),
      str(tmp_path / "y"),
    )


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("diffusion.mask_ratio", 1.0, r"mask_ratio=1.0 must be in \[0, 1\)"),
    ("diffusion.mask_ratio", -0.1, r"mask_ratio=-0.1 must be in \[0, 1\)"),
    ("diffusion.mix_ratio", 1.5, r"mix_ratio=1.5 must be in \[0, 1\]"),
    ("diffusion.mix_ratio", -0.5, r"mix_ratio=-0.5 must be in \[0, 1\]"),
    ("train.batch_size", 6, "batch_size=6 does not divide over 4 devices"),
    ("diffusion.cond_dropout", 1.0, r"cond_dropout=1.0 must be in \[0, 1\)"),
  ],
)
def test_bad_values_are_named(key, value, match):
  c = cfg("pretrain", **{"model.mllm_from": "x", key: value})
  with pytest.raises(ValueError, match=match):
    loading.validate(c, num_devices=4)


def test_bad_value_fails_before_anything_is_written(stage0, tmp_path):
  c = cfg("pretrain", **{"model.mllm_from": stage0[0], "diffusion.mask_ratio": 1.0})
  with pytest.raises(ValueError, match="mask_ratio"):
    pretrain.train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_unknown_config_key():
  with pytest.raises(KeyError, match="unknown config key 'optim.learning_rate'"):
    cfg("pretrain", **{"optim.learning_rate": 1e-3})


def test_workdir_from_another_model_config(stage0, stage1, tmp_path):
  c = cfg("pretrain", **{"model.mllm_from": stage0[0], "model.num_queries": 8})
  with open(os.path.join(stage1[0], "config.json")) as f:
    before = f.read()
  with pytest.raises(
    ValueError, match=r"config.model.num_queries: checkpoint has 16, config has 8"
  ):
    pretrain.train_and_evaluate(c, stage1[0])
  with open(os.path.join(stage1[0], "config.json")) as f:
    assert f.read() == before  # the refused run left the workdir as it was


def test_prompt_longer_than_the_tokenizer_limit(stage1):
  from iomm_jax import inference

  config, ctx, params = inference.load_generator(stage1[0])
  long = "a photo of " + " and ".join(["a red circle"] * 20)
  with pytest.raises(ValueError, match="max_len=24"):
    inference.sample_prompts(specs.from_config(config).sample, ctx, params, [long], seed=0)
  img = inference.sample_prompts(
    specs.from_config(config).sample, ctx, params, ["a photo of a red circle"], seed=0, steps=2
  )
  s = config.model.image_size
  assert img.shape == (1, s, s, 3) and img.dtype == np.uint8
