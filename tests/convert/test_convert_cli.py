"""``iomm-convert`` end to end, as a user runs it on real checkpoints (here tiny local ones).

A tiny random transformers InternVL plus a tiny Qwen2-style tokenizer (built here, no network)
is imported with ``iomm-convert import-internvl``; stage 1 trains two steps on the shapes world
with that MLLM frozen (``model.mllm=from_checkpoint``); ``iomm-convert export-torch`` writes the
diffusers/PyTorch directory; the PyTorch pipeline then turns the same prompt and noise into the
same image as the JAX sampler, and re-importing the export gives the EMA weights bit for bit.
``import-vae`` runs on a tiny diffusers AutoencoderKL. Bad input exits 2 naming the problem.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL

from iomm_jax import generate, inference
from iomm_jax.cli import convert as convert_cli
from iomm_jax.configs import loading
from iomm_jax.convert import flux, internvl, tensors, vae
from iomm_jax.convert.torch_port import IOMMPipeline
from iomm_jax.data.hf_tokenizer import HFTokenizer
from iomm_jax.train import pretrain
from tests.convert.test_internvl import randomize
from tests.data.test_hf_tokenizer import make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "a photo of a red circle"


def _tiny_internvl(path: str) -> None:
  """A random InternVL whose vocabulary and image token match the tokenizer saved beside it."""
  make_tokenizer(path)
  tok = HFTokenizer.load(path)
  config = transformers.InternVLConfig(
    vision_config=dict(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
      image_size=28, patch_size=14,
    ),
    text_config=dict(
      model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=40, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=56, num_hidden_layers=2, rms_norm_eps=1e-6,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    image_token_id=tok.img_context_id,
    downsample_ratio=0.5,
  )  # fmt: skip
  torch.manual_seed(0)
  model = transformers.InternVLForConditionalGeneration(config).eval()
  randomize(model, 0)
  model.save_pretrained(path)


def test_import_train_export_sample_in_torch(tmp_path, capsys):
  hf, mllm, wd, out = (str(tmp_path / n) for n in ("hf", "mllm", "pretrain", "torch"))
  _tiny_internvl(hf)
  assert convert_cli.main(["import-internvl", "--hf-dir", hf, "--out", mllm]) == 0
  assert f"--config.model.mllm_from={mllm}" in capsys.readouterr().out
  assert internvl.is_imported(mllm)

  config = loading.load_config(
    os.path.join(ROOT, "experiments/shapes/pretrain.py:quick"),
    {"model.mllm_from": mllm, "model.mllm": "from_checkpoint", "train.num_steps": 2},
  )
  pretrain.train_and_evaluate(config, wd)

  assert convert_cli.main(["export-torch", "--workdir", wd, "--out", out, "--ema"]) == 0
  with open(os.path.join(out, "source.json")) as f:
    assert json.load(f) == {"workdir": os.path.abspath(wd), "step": 2, "weights": "ema"}
  config, ctx, ema = inference.load_generator(wd, use_ema=True)
  _, back = flux.import_generator(out)
  flat_a, flat_b = tensors.flatten(jax.device_get(ema)), tensors.flatten(back)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), flat_b[k], err_msg=k)

  ids, valid = ctx.conditioner.text_conditions([PROMPT, "two blue squares"])
  null_ids, null_valid = ctx.conditioner.null_condition()
  settings = dict(num_steps=3, solver="euler", cfg_scale=3.0, shift=1.0)
  key = jax.random.key(0)
  ours = np.asarray(
    generate._generate(
      ctx.model, ema, ctx.frozen, ids, valid, null_ids, null_valid, None, None, key, **settings
    )
  )
  noise = np.asarray(jax.random.normal(key, (2, *ctx.model.latent_shape), jnp.float32))
  pipe = IOMMPipeline.from_pretrained(out)
  t = lambda x: torch.from_numpy(np.asarray(x))
  theirs = pipe.generate(
    t(ids).long(), t(valid), t(null_ids).long(), t(null_valid), t(noise), **settings
  )
  diff = np.abs(theirs.astype(np.int32) - ours.astype(np.int32))
  print(f"\n[iomm-convert] torch pipeline vs JAX: mean |diff| / 255 = {diff.mean() / 255:.3g}")
  assert ours.shape == theirs.shape and diff.mean() / 255 <= 1e-3


def test_import_vae_cli(tmp_path, capsys):
  src, out = str(tmp_path / "vae_hf"), str(tmp_path / "vae")
  torch.manual_seed(0)
  AutoencoderKL(
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    use_quant_conv=False, use_post_quant_conv=False,
  ).save_pretrained(src)  # fmt: skip
  assert convert_cli.main(["import-vae", "--diffusers-dir", src, "--out", out]) == 0
  assert f"--config.model.vae_checkpoint={out}" in capsys.readouterr().out
  cfg, params = vae.load_vae(out)
  assert cfg.latent_channels == 4 and params


def test_bad_input_exits_2_and_names_it(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "pytorch_model.bin").write_bytes(b"not read")
  assert convert_cli.main(["import-vae", "--diffusers-dir", str(empty), "--out", "x"]) == 2
  assert str(empty) in capsys.readouterr().err
  assert convert_cli.main(["import-internvl", "--hf-dir", str(empty), "--out", "y"]) == 2
  err = capsys.readouterr().err
  assert "import-internvl: error" in err and str(empty) in err
  code = convert_cli.main(["export-torch", "--workdir", str(empty), "--out", str(tmp_path / "o")])
  assert code == 2 and "not an iomm_jax workdir" in capsys.readouterr().err
