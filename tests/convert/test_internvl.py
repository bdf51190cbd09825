"""InternVL3 import / export against transformers' ``InternVLForConditionalGeneration``.

Tiny random transformers models in several shapes are saved with ``save_pretrained`` (no network),
imported, and run next to the torch model on the same image + text (the image expanded as the HF
processor does: ``<img>`` + P x ``<IMG_CONTEXT>`` + ``</img>``): last hidden states and logits
agree in float32 within 1e-4. Exports load back into transformers with no missing or unexpected
keys, and import(export(p)) == p bit for bit. Malformed inputs raise ``ConversionError`` s that
name what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from iomm_jax.convert import internvl
from iomm_jax.convert.tensors import ConversionError
from iomm_jax.models import mllm as mllm_lib

TOL = 1e-4
VOCAB = 120
IMG_START, IMG_END, IMG_CONTEXT = 116, 117, 118


@dataclasses.dataclass(frozen=True)
class Case:
  """One tiny transformers InternVL shape."""

  name: str
  vision: dict
  text: dict
  tie: bool
  images: int = 1  # batch rows, one image each
  downsample_ratio: float = 0.5


CASES = [
  # GQA 4 q heads / 2 kv heads, head dim 10; 2 ViT layers; 28 px / patch 14 -> 1 image token;
  # untied; a batch of two rows with an image each.
  Case(
    "gqa4x2_untied_28px",
    vision=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                image_size=28, patch_size=14, attention_bias=True),
    text=dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, intermediate_size=56,
              num_hidden_layers=2),
    tie=False,
    images=2,
  ),
  # GQA 4/1, odd ViT head count (36 = 3 x 12), 3 ViT layers, 56 px -> 4 image tokens, tied
  # embeddings, RMSNorm ViT with q/k norm and a final LayerNorm (use_mean_pooling False).
  Case(
    "gqa4x1_tied_56px_rms_qknorm",
    vision=dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=40,
                image_size=56, patch_size=14, attention_bias=True, norm_type="rms_norm",
                use_qk_norm=True, use_mean_pooling=False),
    text=dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, intermediate_size=64,
              num_hidden_layers=2),
    tie=True,
  ),
  # Odd text width 44 (2 q heads / 1 kv head, head dim 22) and ViT width 44 (4 heads of 11), no
  # q/k/v bias in the ViT, 56 px with downsample 0.25 (4x4 patches -> 1 token), untied.
  Case(
    "w44_untied_56px_ds4",
    vision=dict(hidden_size=44, num_hidden_layers=2, num_attention_heads=4, intermediate_size=36,
                image_size=56, patch_size=14, attention_bias=False),
    text=dict(hidden_size=44, num_attention_heads=2, num_key_value_heads=1, intermediate_size=52,
              num_hidden_layers=3),
    tie=False,
    downsample_ratio=0.25,
  ),
]  # fmt: skip


def hf_config(case: Case):
  return transformers.InternVLConfig(
    vision_config=case.vision,
    text_config=dict(
      model_type="qwen2",
      vocab_size=VOCAB,
      rms_norm_eps=1e-6,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
      tie_word_embeddings=case.tie,
      **case.text,
    ),
    image_token_id=IMG_CONTEXT,
    downsample_ratio=case.downsample_ratio,
    tie_word_embeddings=case.tie,
  )


def randomize(model, seed: int) -> None:
  """Every parameter random (transformers' init leaves cls/pos zero, norms one, lambdas 0.1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif "lambda" in name:
        p.copy_(0.5 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)


def make_hf(case: Case, path: str, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.InternVLForConditionalGeneration(hf_config(case)).eval()
  randomize(model, seed)
  model.save_pretrained(path)
  return model


def inputs(cfg: mllm_lib.MLLMConfig, n: int, seed: int = 0):
  """ids [n, L] (text, <img>, P x <IMG_CONTEXT>, </img>, text) and NCHW pixels [n, 3, S, S]."""
  rng = np.random.default_rng(seed)
  p = cfg.num_image_tokens
  rows = []
  for i in range(n):
    pre, post = rng.integers(0, 110, 3 + i).tolist(), rng.integers(0, 110, 4 - i).tolist()
    rows.append(pre + [IMG_START] + [IMG_CONTEXT] * p + [IMG_END] + post)
  s = cfg.image_size
  return np.array(rows, np.int64), rng.standard_normal((n, 3, s, s)).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Builds (once per module) and imports the transformers model of a case, on demand."""
  cache = {}

  def get(case: Case):
    if case.name not in cache:
      root = tmp_path_factory.mktemp(case.name)
      hf_dir, out = str(root / "hf"), str(root / "imported")
      model = make_hf(case, hf_dir)
      internvl.import_internvl(hf_dir, out)
      cfg, params, _ = internvl.load_internvl(out)
      cache[case.name] = (case, model, hf_dir, out, cfg, params)
    return cache[case.name]

  return get


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def imported(request, built):
  return built(request.param)


@pytest.fixture()
def first(built):
  """The first case only (for checks one shape covers)."""
  return built(CASES[0])


def test_config_maps_every_shape(imported):
  case, _, _, _, cfg, _ = imported
  v, t = case.vision, case.text
  assert (cfg.vision.width, cfg.vision.num_layers, cfg.vision.num_heads) == (
    v["hidden_size"],
    v["num_hidden_layers"],
    v["num_attention_heads"],
  )
  assert (cfg.text.width, cfg.text.num_heads, cfg.text.num_kv_heads, cfg.text.num_layers) == (
    t["hidden_size"],
    t["num_attention_heads"],
    t["num_key_value_heads"],
    t["num_hidden_layers"],
  )
  assert cfg.text.tie_word_embeddings == case.tie
  assert cfg.image_token_id == IMG_CONTEXT and cfg.text.vocab_size == VOCAB
  assert cfg.vision.post_layernorm == (not v.get("use_mean_pooling", True))
  assert cfg.downsample_ratio == case.downsample_ratio
  assert ("lm_head" in imported[5]) == (not case.tie)


def ours(cfg, params, ids, pix):
  """Our image tokens [N, P, D], final hidden states [B, L, D] and logits [B, L, V]."""
  model = mllm_lib.InternVLModel(cfg)
  v = {"params": params}
  nhwc = jnp.transpose(pix, (0, 2, 3, 1))
  image = model.apply(v, nhwc, method=mllm_lib.InternVLModel.encode_images)
  embeds = mllm_lib.merge_image_tokens(
    model.apply(v, ids, method=mllm_lib.InternVLModel.embed), ids, image, cfg.image_token_id
  )
  b, length = ids.shape
  pos = jnp.broadcast_to(jnp.arange(length), (b, length))
  mask = mllm_lib.causal_mask(jnp.ones((b, length), bool))
  hidden = model.apply(v, embeds, pos, mask, method=mllm_lib.InternVLModel.decode)
  return image, hidden, model.apply(v, ids, nhwc)


def test_forward_matches_transformers(imported):
  case, hf, _, _, cfg, params = imported
  ids, pix = inputs(cfg, case.images)
  with torch.no_grad():
    ref_logits = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    ref_hidden = hf.model(
      input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)
    ).last_hidden_state.numpy()
    ref_image = hf.model.get_image_features(torch.tensor(pix)).pooler_output.numpy()
  image, hidden, logits = jax.jit(ours, static_argnums=0)(cfg, params, ids.astype(np.int32), pix)
  errs = {
    "image": float(np.abs(np.asarray(image) - ref_image).max()),
    "hidden": float(np.abs(np.asarray(hidden) - ref_hidden).max()),
    "logits": float(np.abs(np.asarray(logits) - ref_logits).max()),
  }
  print(f"{case.name}: max abs error {errs} (logit scale {np.abs(ref_logits).max():.2f})")
  assert max(errs.values()) <= TOL, errs
  assert np.abs(ref_logits).max() > 0.5  # not a degenerate comparison


def test_export_loads_in_transformers_and_round_trips(imported, tmp_path):
  case, hf, hf_dir, _, cfg, params = imported
  out = str(tmp_path / "export")
  internvl.export_internvl(params, cfg, out)
  model, info = transformers.InternVLForConditionalGeneration.from_pretrained(
    out, output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  # Same tensors as the original transformers model (the tied head included).
  want = hf.state_dict()
  got = model.state_dict()
  assert set(got) == set(want)
  for k in want:
    assert torch.equal(got[k], want[k]), k
  # The files hold the keys save_pretrained writes.
  assert set(load_file(os.path.join(out, "model.safetensors"))) == set(
    load_file(os.path.join(hf_dir, "model.safetensors"))
  )
  cfg2, params2 = internvl.read_hf(out)
  assert cfg2 == cfg
  flat, flat2 = internvl.tensors.flatten(params), internvl.tensors.flatten(params2)
  assert set(flat) == set(flat2)
  for k in flat:
    assert flat2[k].dtype == flat[k].dtype and np.array_equal(flat2[k], flat[k]), k


def test_bfloat16_import_and_round_trip(first, tmp_path):
  case, _, hf_dir, _, cfg, params32 = first
  out = str(tmp_path / "bf16")
  internvl.import_internvl(hf_dir, out, dtype="bfloat16")
  cfg_b, params, _ = internvl.load_internvl(out)
  assert cfg_b == cfg
  leaves = jax.tree.leaves(params)
  assert {x.dtype for x in leaves} == {np.dtype(jnp.bfloat16)}
  for a, b in zip(leaves, jax.tree.leaves(params32), strict=True):
    np.testing.assert_array_equal(a, b.astype(jnp.bfloat16))
  internvl.export_internvl(params, cfg, str(tmp_path / "bf16_hf"))
  with open(tmp_path / "bf16_hf" / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  _, again = internvl.read_hf(str(tmp_path / "bf16_hf"), dtype="bfloat16")
  for a, b in zip(leaves, jax.tree.leaves(again), strict=True):
    assert a.dtype == b.dtype and np.array_equal(a, b)


def test_imported_directory_layout(imported):
  _, _, hf_dir, out, cfg, _ = imported
  with open(os.path.join(out, "config.json")) as f:
    meta = json.load(f)
  assert meta["format"] == "iomm_jax.mllm" and meta["source"] == os.path.abspath(hf_dir)
  assert internvl.mllm_config_from_dict(meta["mllm"]) == cfg
  keys = set(load_file(os.path.join(out, "params.safetensors")))
  assert "vision_tower/encoder/layer_0/attention/q_proj/kernel" in keys
  assert "language_model/layers_0/input_layernorm/scale" in keys
  assert internvl.is_imported(out) and not internvl.is_imported(hf_dir)


def test_in_memory_key_layout_is_accepted(first, tmp_path):
  """Files keyed by the in-memory names (``model.language_model.*``, ``lm_head.*``) import too."""
  case, _, hf_dir, _, cfg, params = first
  d = tmp_path / "inmem"
  shutil.copytree(hf_dir, d)
  tensors = load_file(str(d / "model.safetensors"))

  def in_memory(k):
    if k.startswith("language_model.lm_head."):
      return k[len("language_model.") :]
    if k.startswith("language_model.model."):
      return "model.language_model." + k[len("language_model.model.") :]
    return "model." + k

  save_file({in_memory(k): v for k, v in tensors.items()}, str(d / "model.safetensors"))
  cfg2, params2 = internvl.read_hf(str(d))
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
    assert np.array_equal(a, b)


def test_sharded_checkpoint(first, tmp_path):
  _, hf, _, _, cfg, params = first
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  cfg2, params2 = internvl.read_hf(str(tmp_path / "sharded"))
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
    assert np.array_equal(a, b)


def test_internvl3_2b_hub_config_is_the_2b_variant():
  """A config.json shaped like OpenGVLab/InternVL3-2B-hf's (written by transformers 4.x: rope
  theta at the text top level, no top-level tie flag) maps to ``MLLM_VARIANTS['internvl3_2b']``."""
  hub = {
    "architectures": ["InternVLForConditionalGeneration"],
    "model_type": "internvl",
    "downsample_ratio": 0.5,
    "image_seq_length": 256,
    "image_token_id": 151667,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "torch_dtype": "bfloat16",
    "text_config": {
      "architectures": ["Qwen2ForCausalLM"],
      "model_type": "qwen2",
      "hidden_size": 1536,
      "intermediate_size": 8960,
      "num_attention_heads": 12,
      "num_hidden_layers": 28,
      "num_key_value_heads": 2,
      "max_window_layers": 70,
      "rms_norm_eps": 1e-06,
      "rope_scaling": None,
      "rope_theta": 1000000.0,
      "sliding_window": 32768,
      "use_sliding_window": False,
      "tie_word_embeddings": False,
      "vocab_size": 151674,
    },
    "vision_config": {
      "model_type": "internvl_vision",
      "attention_bias": True,
      "hidden_size": 1024,
      "image_size": [448, 448],
      "intermediate_size": 4096,
      "layer_scale_init_value": 0.1,
      "norm_type": "layer_norm",
      "num_attention_heads": 16,
      "num_hidden_layers": 24,
      "patch_size": [14, 14],
      "use_qk_norm": False,
    },
  }
  assert internvl.mllm_config_from_hf(hub) == mllm_lib.MLLM_VARIANTS["internvl3_2b"]
  back = internvl.hf_config_from_mllm(mllm_lib.MLLM_VARIANTS["internvl3_2b"])
  assert internvl.mllm_config_from_hf(back) == mllm_lib.MLLM_VARIANTS["internvl3_2b"]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def hf_copy(first, tmp_path):
  hf_dir = first[2]
  d = tmp_path / "copy"
  shutil.copytree(hf_dir, d)
  return d


def edit_config(d, fn):
  with open(d / "config.json") as f:
    cfg = json.load(f)
  fn(cfg)
  with open(d / "config.json", "w") as f:
    json.dump(cfg, f)


def edit_tensors(d, fn):
  t = load_file(str(d / "model.safetensors"))
  fn(t)
  save_file(t, str(d / "model.safetensors"))


def test_wrong_model_type(hf_copy, tmp_path):
  edit_config(hf_copy, lambda c: c.update(model_type="llava"))
  with pytest.raises(ConversionError, match="model_type='llava'"):
    internvl.import_internvl(str(hf_copy), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "config.json")


@pytest.mark.parametrize(
  "edit, key",
  [
    (lambda c: c["text_config"].update(use_sliding_window=True), "text_config.use_sliding_window"),
    (lambda c: c.update(vision_feature_layer=-2), "vision_feature_layer"),
    (lambda c: c["vision_config"].update(hidden_act="relu"), "vision_config.hidden_act"),
    (lambda c: c["vision_config"].update(image_size=[28, 42]), "vision_config.image_size"),
    (
      lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
      "rope_type",
    ),
    (lambda c: c["text_config"].update(model_type="qwen3"), "text_config.model_type"),
  ],
)
def test_unsupported_options_name_the_key(hf_copy, edit, key):
  edit_config(hf_copy, edit)
  with pytest.raises(ConversionError, match=key):
    internvl.read_hf(str(hf_copy))


def test_missing_key(hf_copy):
  edit_tensors(hf_copy, lambda t: t.pop("vision_tower.encoder.layer.1.mlp.fc2.weight"))
  with pytest.raises(ConversionError, match=r"missing.*vision_tower\.encoder\.layer\.1\.mlp\.fc2"):
    internvl.read_hf(str(hf_copy))


def test_unexpected_key(hf_copy):
  edit_tensors(hf_copy, lambda t: t.update({"vision_tower.extra.weight": np.zeros((2, 2))}))
  with pytest.raises(ConversionError, match=r"unexpected.*vision_tower\.extra\.weight"):
    internvl.read_hf(str(hf_copy))


def test_shape_mismatch_names_param_and_both_shapes(hf_copy):
  key = "language_model.model.layers.0.mlp.up_proj.weight"  # (56, 40) -> kernel (40, 56)
  edit_tensors(hf_copy, lambda t: t.update({key: np.zeros((57, 40), np.float32)}))
  with pytest.raises(ConversionError) as e:
    internvl.read_hf(str(hf_copy))
  msg = str(e.value)
  assert "language_model/layers_0/mlp/up_proj/kernel" in msg
  assert "(40, 56)" in msg and "(40, 57)" in msg
  # the file's own key, file and shape, and the shape expected in the file's (torch) layout
  assert f"{key!r} in model.safetensors has shape (57, 40), ours is (56, 40)" in msg


def test_pickle_only_directory_is_refused(hf_copy):
  os.remove(hf_copy / "model.safetensors")
  torch.save({"x": torch.zeros(2)}, hf_copy / "pytorch_model.bin")
  with pytest.raises(ConversionError, match="pytorch_model.bin.*pickled"):
    internvl.read_hf(str(hf_copy))


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConversionError, match="config.json"):
    internvl.import_internvl(str(tmp_path / "empty"), str(tmp_path / "out"))
  with pytest.raises(ConversionError, match="not a directory"):
    internvl.read_hf(str(tmp_path / "nope"))
  with pytest.raises(ConversionError, match="not an imported MLLM directory"):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "internvl"}')
    internvl.load_internvl(str(tmp_path / "other"))


def test_tied_config_with_a_distinct_head_loads_untied(hf_copy):
  """transformers 5 does not tie an lm_head that differs from the embedding; neither do we."""
  edit_config(hf_copy, lambda c: c.update(tie_word_embeddings=True))
  cfg, params = internvl.read_hf(str(hf_copy))
  assert not cfg.text.tie_word_embeddings and "lm_head" in params


def test_untied_config_without_head_is_missing_it(built, tmp_path):
  hf_dir = built(CASES[1])[2]  # tied: the file has no lm_head
  d = tmp_path / "untied"
  shutil.copytree(hf_dir, d)
  edit_config(d, lambda c: c.update(tie_word_embeddings=False))
  with pytest.raises(ConversionError, match=r"missing.*lm_head"):
    internvl.read_hf(str(d))


# ----------------------------------------------------------------------------- wiring


def test_context_builds_from_an_imported_checkpoint(tmp_path):
  """``config.model.mllm_from`` = an imported directory: its params and HFTokenizer are used."""
  from iomm_jax.assembly import context
  from iomm_jax.configs.loading import load_config
  from iomm_jax.data.hf_tokenizer import HFTokenizer
  from iomm_jax.models import iomm
  from tests.data.test_hf_tokenizer import make_tokenizer

  hf_dir = str(tmp_path / "hf")
  make_tokenizer(hf_dir)
  tok = HFTokenizer.load(hf_dir)
  config = hf_config(CASES[0])
  config.text_config.vocab_size = 320
  config.image_token_id = tok.img_context_id
  model = transformers.InternVLForConditionalGeneration(config).eval()
  randomize(model, 1)
  model.save_pretrained(hf_dir)
  out = str(tmp_path / "imported")
  cfg = internvl.import_internvl(hf_dir, out)
  assert os.path.exists(os.path.join(out, "tokenizer.json"))

  exp = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "shapes", "pretrain.py")
  over = {"model.mllm_from": out, "model.mllm": context.FROM_CHECKPOINT}
  c = load_config(f"{exp}:quick", over)
  wd = str(tmp_path / "run")
  ctx = context.build(c, wd)
  assert isinstance(ctx.tokenizer, HFTokenizer) and ctx.model.mllm_config == cfg
  assert os.path.exists(os.path.join(wd, context.HF_TOKENIZER_DIR, "tokenizer.json"))
  _, params, _ = internvl.load_internvl(out)
  for a, b in zip(jax.tree.leaves(ctx.frozen["mllm"]), jax.tree.leaves(params), strict=True):
    assert np.array_equal(np.asarray(a), b)
  ids, valid = ctx.conditioner.image_condition()
  assert (ids == cfg.image_token_id).sum() == cfg.num_image_tokens
  images = np.zeros((2, c.model.image_size, c.model.image_size, 3), np.uint8)
  toks = jax.eval_shape(lambda p: iomm.vision_tokens(ctx.model, p, images), ctx.frozen["mllm"])
  assert toks.shape == (2, cfg.num_image_tokens, cfg.text.width)

  internvl.export_internvl(ctx.frozen["mllm"], cfg, str(tmp_path / "export"), tokenizer_dir=out)
  exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
  assert exported.convert_tokens_to_ids("<IMG_CONTEXT>") == cfg.image_token_id

  c = load_config(f"{exp}:quick", {**over, "model.mllm": "tiny"})
  with pytest.raises(ValueError, match=r"config.model.mllm='tiny'.*vision.width: variant 64"):
    context.build(c)
