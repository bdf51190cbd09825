"""The name tables of the converted families (``convert.flux``, ``convert.vae``,
``convert.internvl``) and the checks they share (``convert.tensors``), without torch: every
parameter of ours has one file key with the shape its hook gives, export and import through a
table are exact inverses, and a checkpoint that does not fit is one error line naming each key.
The parity tests beside this file check the same tables against the real torch models."""

from __future__ import annotations

import numpy as np
import pytest

from iomm_jax import dtypes
from iomm_jax.convert import flux, internvl, tensors, vae
from iomm_jax.convert.tensors import ConversionError
from iomm_jax.models import codec, mllm, mmdit
from tests.models.test_mmdit import _expected_diffusers_shapes  # diffusers' modules, written out

# ----------------------------------------------------------------------------- FLUX transformer


def test_flux_table_is_the_diffusers_state_dict():
  cfg = mmdit.get_mmdit_config("tiny")
  template = flux.transformer_template(cfg)
  table = flux.transformer_table(template)
  shapes = tensors.file_shapes(table, template)
  assert {e.key: shapes[p] for p, e in table.items()} == _expected_diffusers_shapes(cfg)
  assert table["transformer_blocks_0/attn/to_out_0/kernel"] == tensors.Entry(
    "transformer_blocks.0.attn.to_out.0.weight", tensors.TRANSPOSE
  )
  assert table["single_transformer_blocks_0/attn/norm_q/scale"] == tensors.Entry(
    "single_transformer_blocks.0.attn.norm_q.weight", tensors.AS_IS
  )
  # linear_1 is a module of its own in diffusers, not a list entry
  key = table["time_text_embed/timestep_embedder/linear_1/kernel"].key
  assert key == "time_text_embed.timestep_embedder.linear_1.weight"


# ----------------------------------------------------------------------------- FLUX VAE


def test_vae_table_follows_diffusers():
  template = vae.abstract_params(codec.VAE_VARIANTS["tiny"])
  table = vae.name_table(template)
  keys = {e.key for e in table.values()}
  for k in (
    "encoder.conv_in.weight",
    "encoder.down_blocks.0.resnets.0.conv1.weight",
    "encoder.down_blocks.0.downsamplers.0.conv.weight",
    "encoder.down_blocks.1.resnets.0.conv_shortcut.bias",
    "encoder.mid_block.attentions.0.to_q.weight",
    "encoder.mid_block.attentions.0.to_out.0.bias",
    "encoder.mid_block.attentions.0.group_norm.weight",
    "encoder.mid_block.resnets.1.norm2.bias",
    "encoder.conv_norm_out.weight",
    "decoder.up_blocks.0.upsamplers.0.conv.weight",
    "decoder.up_blocks.1.resnets.1.conv2.weight",  # layers_per_block + 1 resnets
    "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
    "decoder.conv_out.bias",
  ):
    assert k in keys, k
  for k in (
    "encoder.down_blocks.1.downsamplers.0.conv.weight",  # none after the last block
    "encoder.down_blocks.0.resnets.1.conv1.weight",
    "decoder.up_blocks.1.upsamplers.0.conv.weight",
    "encoder.down_blocks.0.resnets.0.conv_shortcut.weight",  # 8 -> 8: no shortcut conv
  ):
    assert k not in keys, k
  flat, shapes = tensors.flatten(template), tensors.file_shapes(table, template)
  conv, dense = "encoder/conv_in/kernel", "encoder/mid_block/attentions_0/to_q/kernel"
  assert table[conv].hook is tensors.CONV and table[dense].hook is tensors.TRANSPOSE
  assert flat[conv].shape == (3, 3, 3, 8) and shapes[conv] == (8, 3, 3, 3)  # HWIO, OIHW
  assert flat[dense].shape == shapes[dense] == (16, 16)
  assert table["encoder/conv_norm_out/scale"] == tensors.Entry("encoder.conv_norm_out.weight")


# ----------------------------------------------------------------------------- InternVL


def test_internvl_table_examples():
  cfg = mllm.get_mllm_config("tiny")
  table = internvl.name_table(internvl.abstract_params(cfg))
  rows = {
    "vision_tower/encoder/layer_0/attention/q_proj/kernel": (
      "vision_tower.encoder.layer.0.attention.q_proj.weight",
      tensors.TRANSPOSE,
    ),
    "language_model/layers_0/input_layernorm/scale": (
      "language_model.model.layers.0.input_layernorm.weight",
      tensors.AS_IS,
    ),
    "language_model/embed_tokens/embedding": (
      "language_model.model.embed_tokens.weight",
      tensors.AS_IS,
    ),
    "multi_modal_projector/linear_1/kernel": (
      "multi_modal_projector.linear_1.weight",
      tensors.TRANSPOSE,
    ),
    f"{internvl.PATCH_CONV}/kernel": (
      "vision_tower.embeddings.patch_embeddings.projection.weight",
      tensors.CONV,
    ),
  }
  for path, (key, hook) in rows.items():
    assert (table[path].key, table[path].hook) == (key, hook), path
  assert table[internvl.CLS_TOKEN].key == "vision_tower.embeddings.cls_token"
  cls = table[internvl.CLS_TOKEN].hook.to_file(np.zeros((7,), np.float32))
  assert cls.shape == (1, 1, 7)
  if not cfg.text.tie_word_embeddings:
    assert table[internvl.LM_HEAD].key == "language_model.lm_head.weight"
  # in the in-memory layout too, each key names one parameter
  assert internvl._in_memory(
    ["model.language_model.norm.weight", "lm_head.weight"], "x"
  ) == {"language_model.norm.weight": "model.language_model.norm.weight",
        "lm_head.weight": "lm_head.weight"}  # fmt: skip
  with pytest.raises(ConversionError, match="both name 'lm_head.weight'"):
    internvl._in_memory(["lm_head.weight", "language_model.lm_head.weight"], "x")


# ----------------------------------------------------------------------------- shared


def test_torch_key_list_entries():
  assert tensors.torch_key("blocks_0/attn/q_proj/kernel") == "blocks.0.attn.q_proj.weight"
  assert tensors.torch_key("queries") == "queries"
  assert tensors.torch_key("a_1/b_2/scale", lists=("b",)) == "a_1.b.2.weight"
  assert tensors.torch_key("embed/embedding") == "embed.weight"


def _toy() -> tuple[dict, tensors.Table]:
  template = {
    "dense": {"kernel": np.zeros((3, 5), np.float32), "bias": np.zeros((5,), np.float32)},
    "conv_0": {"kernel": np.zeros((2, 2, 3, 4), np.float32)},
    "cls": np.zeros((6,), np.float32),
  }
  hooks = {
    "dense/kernel": tensors.TRANSPOSE,
    "conv_0/kernel": tensors.CONV,
    "cls": tensors.leading_ones(2),
  }
  table = tensors.name_table(
    template, lambda p, _: tensors.Entry(tensors.torch_key(p), hooks.get(p, tensors.AS_IS))
  )
  return template, table


def test_table_export_and_import_are_inverse():
  template, table = _toy()
  rng = np.random.default_rng(0)
  flat = {
    p: rng.standard_normal(x.shape).astype(np.float32) for p, x in tensors.flatten(template).items()
  }
  state = tensors.to_file(table, flat)
  assert {k: v.shape for k, v in state.items()} == {
    "dense.weight": (5, 3),
    "dense.bias": (5,),
    "conv.0.weight": (4, 3, 2, 2),
    "cls": (1, 1, 6),
  }
  back = tensors.flatten(tensors.from_file(table, template, state, "toy"))
  assert all(np.array_equal(back[p], flat[p]) and back[p].flags.c_contiguous for p in flat)
  half = tensors.to_file(table, flat, dtypes.dtype("bfloat16"))
  assert {v.dtype for v in half.values()} == {dtypes.DTYPES["bfloat16"]}


def test_check_keys_names_every_problem_in_one_line():
  template, table = _toy()
  shapes = {"dense.weight": (5, 2), "conv.0.weight": (4, 3, 2, 2), "cls": (1, 1, 6)}
  shapes["extra.weight"] = (9,)
  with pytest.raises(ConversionError) as e:
    tensors.check_keys(table, template, shapes, "toy", {"dense.weight": "a.safetensors"})
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("toy: ")
  assert "1 missing key(s): 'dense.bias' (5,) for dense/bias" in msg
  assert "1 unexpected key(s): 'extra.weight' (9,)" in msg
  assert (
    "'dense.weight' in a.safetensors has shape (5, 2), ours is (5, 3) "
    "(dense/kernel: (3, 5) in our layout, (2, 5) given)"
  ) in msg
  # a mismatch the caller takes over is returned, not raised
  del shapes["extra.weight"]
  shapes["dense.bias"] = (5,)
  assert tensors.check_keys(table, template, shapes, "toy", tolerate=lambda *_: True) == [
    "dense/kernel"
  ]


def test_two_parameters_on_one_key_are_refused():
  template = {"a_0": {"bias": np.zeros(1)}, "a": {"0": {"bias": np.zeros(1)}}}
  with pytest.raises(ConversionError, match="both map to the file key 'a.0.bias'"):
    tensors.name_table(template, lambda p, _: tensors.Entry(tensors.torch_key(p)))


def test_dtype_names_are_one_table():
  assert dtypes.dtype("bfloat16") == np.dtype("bfloat16") == dtypes.DTYPES["bfloat16"]
  assert dtypes.name_of(np.float16) == "float16" and dtypes.name_of(np.int8) is None
  with pytest.raises(ValueError, match="dtype 'float16' unknown; choose from"):
    dtypes.dtype("float16", dtypes.STORAGE)
  with pytest.raises(ConversionError, match="import_vae: dtype 'int8' unknown"):
    vae.import_vae("/nonexistent", "/nonexistent2", dtype="int8")
