"""Initialising our generator from a diffusers ``FluxTransformer2DModel`` directory
(``config.train.init_from``; ``convert.flux.read_transformer_init``, ``context.initial_trainable``).

* ours exported, then imported as init_from: the same parameters bit for bit (plain and sharded
  checkpoints, a pipeline folder's ``transformer/``), the adapter and connector from their init;
* a random diffusers model saved by ``save_pretrained``: after the import our velocity equals
  diffusers' forward on the same inputs in float32;
* condition embedders of another input width are re-initialised, each named in one log line and
  in the record; every other mismatch (missing, unexpected, mis-shaped key, RoPE axes) is one
  line naming the file's key and both shapes.

Measured parities are printed (``pytest -s``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from iomm_jax import sharding
from iomm_jax.assembly import context
from iomm_jax.configs import specs
from iomm_jax.configs.base import get_base_config
from iomm_jax.convert import flux, tensors
from iomm_jax.convert.tensors import ConversionError
from iomm_jax.models import iomm, mmdit
from tests.convert import tiny_flux

TOL_DIFFUSERS = 1e-4  # as the export parity test (float32, different op order)

torch.set_num_threads(2)
_t = tiny_flux.to_torch


def _loaded(init: flux.TransformerInit) -> dict[str, np.ndarray]:
  """Every parameter the file fills, by our path (float32, our layout)."""
  return {p: init.array(p) for p in init.keys}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """tiny_flux.TINY with random parameters, exported."""
  out = str(tmp_path_factory.mktemp("flux_init"))
  return out, tiny_flux.TINY, tiny_flux.export_random(tiny_flux.TINY, out, 11)


def test_exported_model_imports_back_bit_identical(exported, tmp_path):
  src, cfg, params = exported
  init = flux.read_transformer_init(src, cfg)
  assert init.reinitialised == () and "re-initialised: none" in init.summary()
  want = tensors.flatten(params)
  got = _loaded(init)
  assert sorted(got) == sorted(want)
  assert all(got[k].dtype == np.float32 and np.array_equal(got[k], want[k]) for k in want)
  # a pipeline folder (its transformer/), and the same weights in 5 shards with an index
  pipe = tmp_path / "pipeline"
  model = diffusers.FluxTransformer2DModel.from_pretrained(src)
  model.save_pretrained(str(pipe / flux.TRANSFORMER_DIR), max_shard_size="20KB")
  shards = [f for f in os.listdir(pipe / flux.TRANSFORMER_DIR) if f.endswith(".safetensors")]
  assert len(shards) > 1
  assert flux.transformer_dir(str(pipe)) == str(pipe / flux.TRANSFORMER_DIR)
  got = _loaded(flux.read_transformer_init(str(pipe), cfg))
  assert all(np.array_equal(got[k], want[k]) for k in want)


def test_diffusers_random_model_velocity_matches_after_import(tmp_path):
  cfg = tiny_flux.TINY
  torch.manual_seed(0)
  model = diffusers.FluxTransformer2DModel(**tiny_flux.diffusers_kwargs(cfg))
  with torch.no_grad():  # diffusers zero-initialises nothing here, but make every tensor random
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(tmp_path))
  params = tensors.unflatten(_loaded(flux.read_transformer_init(str(tmp_path), cfg)))
  inputs = tiny_flux.inputs(cfg, 1)
  ours = np.asarray(jax.jit(mmdit.MMDiT(cfg).apply)({"params": params}, **inputs))
  theirs = tiny_flux.diffusers_velocity(model, inputs)
  err = float(np.abs(theirs - ours).max())
  print(f"\n[flux init] diffusers random model: max |diffusers - ours| = {err:.3g} "
        f"(scale {np.abs(ours).max():.3g})")  # fmt: skip
  assert ours.shape == theirs.shape and err <= TOL_DIFFUSERS


def test_condition_embedders_of_another_width_are_reinitialised(exported):
  src, cfg, params = exported
  ours = dataclasses.replace(cfg, joint_attention_dim=40, pooled_projection_dim=40)
  init = flux.read_transformer_init(src, ours)
  got = {(r.key, r.path, r.file_shape, r.shape) for r in init.reinitialised}
  assert got == {
    ("context_embedder.weight", "context_embedder/kernel", (32, 24), (32, 40)),
    (
      "time_text_embed.text_embedder.linear_1.weight",
      "time_text_embed/text_embedder/linear_1/kernel",
      (32, 20),
      (32, 40),
    ),
  }
  line = init.summary()
  assert "\n" not in line and "context_embedder.weight (file (32, 24), ours (32, 40))" in line
  meta = json.loads(json.dumps(init.meta()))
  assert meta["format"] == "FluxTransformer2DModel" and len(meta["reinitialised"]) == 2
  # the biases of those layers and everything else carry over
  want = tensors.flatten(params)
  loaded = _loaded(init)
  assert set(want) - set(loaded) == {r.path for r in init.reinitialised}
  assert np.array_equal(loaded["context_embedder/bias"], want["context_embedder/bias"])


def _rewrite(src: str, dst, edit=None, config_edit=None) -> str:
  """A copy of an exported transformer directory with its state dict / config edited."""
  dst = str(dst)
  os.makedirs(dst, exist_ok=True)
  state = load_file(os.path.join(src, flux.WEIGHTS_NAME))
  if edit:
    edit(state)
  save_file(state, os.path.join(dst, flux.WEIGHTS_NAME))
  config = json.load(open(os.path.join(src, flux.CONFIG_NAME)))
  if config_edit:
    config_edit(config)
  json.dump(config, open(os.path.join(dst, flux.CONFIG_NAME), "w"))
  return dst


def _one_line_error(path: str, cfg: mmdit.MMDiTConfig) -> str:
  """The ``ConversionError`` message of importing ``path`` into ``cfg`` (checked: one line)."""
  with pytest.raises(ConversionError) as e:
    flux.read_transformer_init(path, cfg)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_missing_key_is_named(exported, tmp_path):
  src, cfg, _ = exported
  key = "transformer_blocks.1.ff.net.2.weight"
  msg = _one_line_error(_rewrite(src, tmp_path, lambda s: s.pop(key)), cfg)
  assert "1 missing key(s)" in msg and f"'{key}' (32, 128)" in msg, msg


def test_extra_key_is_named_with_its_shape(exported, tmp_path):
  src, cfg, _ = exported

  def edit(state):
    state["transformer_blocks.2.attn.to_q.weight"] = np.zeros((32, 32), np.float32)

  msg = _one_line_error(_rewrite(src, tmp_path, edit), cfg)
  assert "1 unexpected key(s)" in msg and "'transformer_blocks.2.attn.to_q.weight' (32, 32)" in msg


def test_wrong_shape_names_key_file_and_both_shapes(exported, tmp_path):
  src, cfg, _ = exported
  key = "x_embedder.weight"  # (out, in) = (32, 16): the latent width cannot be re-initialised

  def edit(state):
    state[key] = np.zeros((32, 12), np.float32)

  msg = _one_line_error(_rewrite(src, tmp_path, edit), cfg)
  assert f"'{key}' in {flux.WEIGHTS_NAME} has shape (32, 12), ours is (32, 16)" in msg, msg
  assert "x_embedder/kernel: (16, 32) in our layout" in msg
  # a re-initialisable kernel whose *output* width differs is an error too
  wide = {"context_embedder.weight": np.zeros((31, 24), np.float32)}
  dst = _rewrite(src, tmp_path / "ctx", lambda s: s.update(wide))
  msg = _one_line_error(dst, cfg)
  assert "'context_embedder.weight'" in msg and "(31, 24), ours is (32, 24)" in msg


def test_rope_axes_and_class_are_checked(exported, tmp_path):
  src, cfg, _ = exported
  dst = _rewrite(src, tmp_path / "rope", config_edit=lambda c: c.update(axes_dims_rope=[8, 4, 4]))
  assert "axes_dims_rope is (8, 4, 4) there, (4, 6, 6)" in _one_line_error(dst, cfg)
  dst = _rewrite(src, tmp_path / "sd3", config_edit=lambda c: c.update(_class_name="SD3Model"))
  assert flux.transformer_dir(dst) is None
  assert "is not a FluxTransformer2DModel directory" in _one_line_error(dst, cfg)


def _tiny_iomm(lora_rank: int = 0, lora_trainable: tuple[str, ...] = ()):
  """A stage-2 config of the tiny IOMM (base config, 3 queries) and its model."""
  c = get_base_config()
  m = c.model
  m.num_queries, m.adapter_heads, m.connector_heads, m.codec_factor = 3, 4, 4, 4
  m.lora.rank, m.lora.trainable = lora_rank, lora_trainable
  c.stage = "finetune"
  return c, iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6)


def test_initial_trainable_takes_the_generator_and_inits_the_rest(tmp_path):
  """The ``init_from`` hook: the FLUX generator bit for bit, the adapter and connector (and
  LoRA's adapters) as ``init_trainable`` makes them, on the mesh of ``placing_on``."""
  c, model = _tiny_iomm(lora_rank=2, lora_trainable=("context_embedder",))
  abstract = jax.eval_shape(lambda: iomm.init_trainable(model, 0, 4))
  base = {k: v for k, v in tensors.flatten(abstract["generator"]).items() if "lora" not in k}
  gen = tiny_flux.random_params(tensors.unflatten(base), 3)
  flux.export_transformer(gen, model.generator.config, str(tmp_path))
  c.train.init_from = str(tmp_path)
  mesh = sharding.single_device_mesh()
  with sharding.placing_on(mesh, ()):
    full, record = context.initial_trainable(c, model, 4)
  assert record["format"] == "FluxTransformer2DModel" and record["reinitialised"] == []
  got, want = tensors.flatten(full["generator"]), tensors.flatten(gen)
  assert all(np.array_equal(got[k], want[k]) for k in want)
  assert all(not np.any(got[k]) for k in got if k.endswith("lora_b"))  # a fresh LoRA: B = 0

  def not_loaded():  # the same init, only the leaves the file does not fill (XLA drops the rest)
    flat = tensors.flatten(sharding.unbox(iomm.init_trainable(model, c.seed, 4)))
    return {k: v for k, v in flat.items() if not k.startswith("generator/") or "lora" in k}

  fresh = jax.jit(not_loaded)()
  for k, v in fresh.items():
    assert np.array_equal(tensors.flatten(full)[k], v), k
  # split for LoRA: the adapters and context_embedder train, every other weight is frozen
  trainable, frozen = iomm.split_generator(model, full)
  names = tensors.flatten(trainable["generator"])
  assert all(k.endswith(("lora_a", "lora_b")) or k.startswith("context_embedder/") for k in names)
  assert "context_embedder/kernel" in names and "x_embedder/kernel" in tensors.flatten(frozen)
