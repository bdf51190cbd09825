"""Export of the trained generator to PyTorch (``convert.flux`` + ``torch_port``).

* Tiny MM-DiTs (with / without guidance embeddings, several depths, patch sizes) with random
  parameters are exported and loaded by diffusers' ``FluxTransformer2DModel.from_pretrained`` with
  no missing or unexpected keys; its output matches our velocity in float32 (max abs <= 1e-4).
* export -> import gives back the parameters bit for bit (transformer, adapter, connector).
* The torch adapter / connector modules match the Flax ones on random inputs (<= 1e-5).
* The torch pipeline (transformers InternVL exported by ``convert.internvl``, adapter, connector,
  diffusers transformer, pixel codec) reproduces ``generate._generate``'s images from the same
  prompt and noise; the torch sampler with a diffusers ``AutoencoderKL`` (``convert.vae``)
  reproduces the JAX sampler + ``VAECodec`` given the same condition.
* Bad checkpoints raise ``ConversionError`` naming the parameter and both shapes.

Measured parities are printed (``pytest -s``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from iomm_jax import generate
from iomm_jax.configs import specs
from iomm_jax.configs.base import get_base_config
from iomm_jax.convert import flux, tensors, torch_port
from iomm_jax.convert.tensors import ConversionError
from iomm_jax.diffusion import sampling
from iomm_jax.models import codec as codec_lib
from iomm_jax.models import iomm, mmdit
from tests.convert import tiny_flux

TOL_TRANSFORMER = 1e-4
TOL_MODULES = 1e-5
TOL_PIXELS = 1e-3

torch.set_num_threads(2)
_t = tiny_flux.to_torch


# ----------------------------------------------------------------------------- transformer

CONFIGS = {
  "plain": tiny_flux.TINY,  # 2 double + 1 single blocks, no guidance
  # guidance embeddings, single-stream only, out_channels and diffusers patch_size set
  "guidance": mmdit.MMDiTConfig(
    in_channels=16,
    out_channels=8,
    patch_size=2,
    num_layers=0,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
  ),
}  # (the shapes demo's tiny generator goes through diffusers in the pipeline test)


def _transformer_case(cfg: mmdit.MMDiTConfig, seed: int = 0):
  """Random params and inputs of an MM-DiT: (params, numpy inputs, our velocity)."""
  inputs = tiny_flux.inputs(cfg, seed + 1)
  guidance = np.array([3.5, 1.0], np.float32) if cfg.guidance_embeds else None
  params = tiny_flux.random_params(flux.transformer_template(cfg), seed)
  out = jax.jit(mmdit.MMDiT(cfg).apply)({"params": params}, **inputs, guidance=guidance)
  return params, inputs, guidance, np.asarray(out)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_transformer_matches_mmdit(name, tmp_path):
  cfg = CONFIGS[name]
  params, inputs, guidance, ours = _transformer_case(cfg)
  flux.export_transformer(params, cfg, str(tmp_path))
  model, info = diffusers.FluxTransformer2DModel.from_pretrained(
    str(tmp_path), output_loading_info=True
  )
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert model.dtype == torch.float32
  theirs = tiny_flux.diffusers_velocity(model, inputs, guidance)
  err = float(np.abs(theirs - ours).max())
  print(
    f"\n[flux export] {name}: max |diffusers - ours| = {err:.3g} (scale {np.abs(ours).max():.3g})"
  )
  assert theirs.shape == ours.shape
  assert err <= TOL_TRANSFORMER


def test_transformer_round_trip_is_bit_identical(tmp_path):
  cfg = CONFIGS["guidance"]
  params = tiny_flux.random_params(flux.transformer_template(cfg), 3)
  flux.export_transformer(params, cfg, str(tmp_path))
  config = json.load(open(tmp_path / flux.CONFIG_NAME))
  assert config["_class_name"] == "FluxTransformer2DModel" and config["guidance_embeds"] is True
  cfg2, params2 = flux.import_transformer(str(tmp_path))
  assert cfg2 == cfg
  a, b = tensors.flatten(params), tensors.flatten(params2)
  assert sorted(a) == sorted(b)
  for k in a:
    assert b[k].dtype == np.float32 and np.array_equal(a[k], b[k]), k
  # bfloat16 export: half the bytes, imported back as float32 of the rounded values
  flux.export_transformer(params, cfg, str(tmp_path / "bf16"), dtype="bfloat16")
  _, params3 = flux.import_transformer(str(tmp_path / "bf16"))
  c = tensors.flatten(params3)
  for k in a:
    assert np.array_equal(c[k], a[k].astype(jnp.bfloat16).astype(np.float32)), k


def test_config_maps_both_ways():
  cfg = mmdit.get_mmdit_config("B", latent_patch=1, in_channels=16)
  d = flux.diffusers_config(cfg)
  assert d["axes_dims_rope"] == [16, 56, 56] and d["_iomm_latent_patch"] == 1
  assert flux.mmdit_config_from_diffusers(d) == cfg
  # A FLUX.1 config (no private keys) gets FLUX's 2x2 packing.
  d.pop("_iomm_latent_patch")
  assert flux.mmdit_config_from_diffusers(d).latent_patch == 2
  with pytest.raises(ConversionError, match="mlp_ratio"):
    flux.diffusers_config(dataclasses.replace(cfg, mlp_ratio=2.0))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A small exported transformer directory and its params."""
  out = str(tmp_path_factory.mktemp("flux_bad"))
  return out, tiny_flux.TINY, tiny_flux.export_random(tiny_flux.TINY, out, 5)


def _rewrite(src: str, dst, edit) -> str:
  """Copies an exported transformer dir with its state dict changed by ``edit(state)``."""
  dst = str(dst)
  os.makedirs(dst, exist_ok=True)
  state = load_file(os.path.join(src, flux.WEIGHTS_NAME))
  edit(state)
  save_file(state, os.path.join(dst, flux.WEIGHTS_NAME))
  with open(os.path.join(src, flux.CONFIG_NAME)) as f:
    config = f.read()
  with open(os.path.join(dst, flux.CONFIG_NAME), "w") as f:
    f.write(config)
  return dst


def test_wrong_class_name_is_named(exported, tmp_path):
  src, _, _ = exported
  dst = _rewrite(src, tmp_path, lambda s: None)
  config = json.load(open(os.path.join(dst, flux.CONFIG_NAME)))
  config["_class_name"] = "SD3Transformer2DModel"
  json.dump(config, open(os.path.join(dst, flux.CONFIG_NAME), "w"))
  with pytest.raises(ConversionError, match="SD3Transformer2DModel"):
    flux.import_transformer(dst)


def test_missing_key_is_named(exported, tmp_path):
  src, _, _ = exported
  dst = _rewrite(src, tmp_path, lambda s: s.pop("transformer_blocks.1.attn.to_out.0.weight"))
  with pytest.raises(
    ConversionError, match=r"missing.*transformer_blocks\.1\.attn\.to_out\.0\.weight"
  ):
    flux.import_transformer(dst)


def test_unexpected_key_is_named(exported, tmp_path):
  src, _, _ = exported

  def edit(state):
    state["transformer_blocks.2.attn.to_q.weight"] = np.zeros((32, 32), np.float32)

  dst = _rewrite(src, tmp_path, edit)
  with pytest.raises(
    ConversionError, match=r"unexpected.*transformer_blocks\.2\.attn\.to_q\.weight"
  ):
    flux.import_transformer(dst)


def test_shape_mismatch_names_parameter_and_both_shapes(exported, tmp_path):
  src, _, _ = exported
  key = "context_embedder.weight"  # torch (out, in) = (32, 24)

  def edit(state):
    state[key] = np.zeros((32, 23), np.float32)

  dst = _rewrite(src, tmp_path, edit)
  with pytest.raises(ConversionError) as e:
    flux.import_transformer(dst)
  msg = str(e.value)
  assert key in msg and "(32, 24)" in msg and "(32, 23)" in msg, msg


def test_export_checks_params_against_config(exported, tmp_path):
  _, cfg, params = exported
  wrong = dataclasses.replace(cfg, joint_attention_dim=25)
  with pytest.raises(ConversionError, match=r"context_embedder/kernel.*\(25, 32\).*\(24, 32\)"):
    flux.export_transformer(params, wrong, str(tmp_path))


def test_pickles_are_not_read(tmp_path):
  json.dump(flux.diffusers_config(CONFIGS["plain"]), open(tmp_path / flux.CONFIG_NAME, "w"))
  (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ConversionError, match="pickled weights are not read"):
    flux.import_transformer(str(tmp_path))


# ----------------------------------------------------------------------------- adapter, connector


def _model(condition="rqa", connector="linear", codec="pixel", **overrides):
  """A tiny IOMM (tiny MLLM / MM-DiT), 3 queries, 32 px images."""
  c = get_base_config()
  m = c.model
  m.condition, m.connector, m.codec = condition, connector, codec
  m.num_queries, m.adapter_heads, m.connector_heads = 3, 4, 4
  m.codec_factor, m.vae = 4, "tiny"
  for k, v in overrides.items():
    setattr(m, k, v)
  return iomm.build(specs.from_config(c).model, vocab_size=64, image_token_id=6)


def _trainable(model, seed=0, generator=True):
  """Random trainable params of ``model`` (without the generator's: faster, for the adapter and
  connector tests)."""
  if generator:
    return tiny_flux.random_params(jax.eval_shape(lambda: iomm.init_trainable(model, 0, 8)), seed)
  d = model.mllm_config.text.width
  x, valid = jnp.zeros((1, 8, d)), jnp.ones((1, 8), bool)
  inits = {"connector": lambda: model.connector.init(jax.random.key(0), x)["params"]}
  if model.adapter is not None:
    inits["adapter"] = lambda: model.adapter.init(jax.random.key(0), x, valid)["params"]
  return {k: tiny_flux.random_params(jax.eval_shape(f), seed) for k, f in inits.items()}


@pytest.mark.parametrize(
  "condition,connector,layers",
  [("rqa", "linear", 1), ("rqa", "transformer", 2), ("queries", "mlp", 1), ("raw", "linear", 1)],
)
def test_torch_adapter_and_connector_match_flax(condition, connector, layers, tmp_path):
  model = _model(condition, connector, adapter_layers=layers, connector_layers=layers)
  trainable = _trainable(model, generator=False)
  meta = flux.export_trainable(trainable, model, str(tmp_path))
  assert meta["condition"] == condition
  assert os.path.exists(tmp_path / flux.ADAPTER_FILE) == (condition != "raw")
  rng = np.random.default_rng(0)
  embeds = rng.standard_normal((2, 7, 128), np.float32)
  valid = np.array([[True] * 7, [True] * 4 + [False] * 3])
  errs = {}
  adapter = torch_port.load_adapter(str(tmp_path))
  if condition == "raw":
    assert adapter is None
  else:
    ours = jax.jit(model.adapter.apply)({"params": trainable["adapter"]}, embeds, valid)
    with torch.no_grad():
      theirs = adapter(_t(embeds), _t(valid)).numpy()
    errs["adapter"] = float(np.abs(theirs - np.asarray(ours)).max())
  connector_t = torch_port.load_connector(str(tmp_path))
  ours = jax.jit(model.connector.apply)({"params": trainable["connector"]}, embeds)
  with torch.no_grad():
    theirs = connector_t(_t(embeds)).numpy()
  errs["connector"] = float(np.abs(theirs - np.asarray(ours)).max())
  print(f"\n[flux export] {condition}/{connector}: max abs errors {errs}")
  assert max(errs.values()) <= TOL_MODULES
  # round trip
  meta2, back = flux.import_trainable(str(tmp_path))
  assert meta2 == json.loads(json.dumps(meta))
  for name, tree in back.items():
    a, b = tensors.flatten(trainable[name]), tensors.flatten(tree)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a), name


def test_trainable_key_names_and_bad_shapes(tmp_path):
  model = _model("rqa", "transformer")
  trainable = _trainable(model, generator=False)
  flux.export_trainable(trainable, model, str(tmp_path))
  keys = set(load_file(str(tmp_path / flux.ADAPTER_FILE)))
  assert {"queries", "blocks.0.attn.q_proj.weight", "blocks.0.fc2.bias"} <= keys
  keys = set(load_file(str(tmp_path / flux.CONNECTOR_FILE)))
  assert {"blocks.1.norm2.weight", "blocks.1.norm2.bias", "proj.weight"} <= keys
  state = load_file(str(tmp_path / flux.CONNECTOR_FILE))
  state["proj.weight"] = state["proj.weight"][:, :-1]
  save_file(state, str(tmp_path / flux.CONNECTOR_FILE))
  with pytest.raises(ConversionError) as e:
    torch_port.load_connector(str(tmp_path))
  assert (
    "proj.weight" in str(e.value) and "(128, 128)" in str(e.value) and "(128, 127)" in str(e.value)
  )


# ----------------------------------------------------------------------------- sampling


def test_time_grid_matches_jax():
  for steps, shift in [(1, 1.0), (7, 1.0), (25, 3.0)]:
    ours = np.asarray(sampling.time_grid(steps, shift))
    theirs = torch_port.time_grid(steps, shift).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def pipeline_case(tmp_path_factory):
  """A tiny IOMM (RQA, linear connector, pixel codec) with random trainable and MLLM params,
  exported with ``export_generator(..., frozen=...)`` and loaded as an ``IOMMPipeline``."""
  model = _model("rqa", "linear", adapter_layers=1)
  trainable = _trainable(model, 1)
  mllm_abstract = jax.eval_shape(lambda: iomm.init_mllm(model, 0))
  frozen = {"mllm": tiny_flux.random_params(mllm_abstract, 2, small=0.02), "codec": {}}
  out = str(tmp_path_factory.mktemp("iomm_export"))
  flux.export_generator(model, trainable, out, frozen=frozen)
  assert os.path.isdir(os.path.join(out, flux.MLLM_DIR))
  pipe = torch_port.IOMMPipeline.from_pretrained(out)
  return model, trainable, frozen, pipe, out


def test_pipeline_reproduces_jax_generate(pipeline_case):
  """Prompt ids -> image through the whole torch port, against ``generate._generate``."""
  model, trainable, frozen, pipe, _ = pipeline_case
  ids = np.array([[2, 7, 9, 11, 0, 0], [3, 5, 8, 13, 21, 4]], np.int32)
  valid = ids != 0
  null_ids, null_valid = np.array([1, 0, 0], np.int32), np.array([True, False, False])
  settings = dict(num_steps=3, solver="euler", cfg_scale=3.0, shift=2.0)
  key = jax.random.key(0)
  h, w, c = model.latent_shape
  noise = np.asarray(jax.random.normal(key, (2, h, w, c), jnp.float32))  # _generate's draw
  ours = np.asarray(
    generate._generate(
      model, trainable, frozen, ids, valid, null_ids, null_valid, None, None, key, **settings
    )
  )
  theirs = pipe.generate(
    _t(ids).long(),
    _t(valid),
    _t(null_ids).long(),
    _t(null_valid),
    _t(noise),
    **settings,
  )
  diff = np.abs(theirs.astype(np.int32) - ours.astype(np.int32))
  print(
    f"\n[flux export] pipeline uint8: mean |torch - jax| / 255 = {diff.mean() / 255:.3g}, "
    f"max {diff.max()} level(s), {int((diff > 0).sum())} of {diff.size} values differ"
  )
  assert ours.shape == theirs.shape == (2, 32, 32, 3) and ours.std() > 1
  assert diff.mean() / 255 <= TOL_PIXELS and diff.max() <= 1


def test_x_prediction_export_reproduces_jax_generate(pipeline_case, tmp_path):
  """With ``model.prediction`` "x" the exported pipeline turns the transformer's clean-sample
  output into the velocity as ``iomm.velocity`` does (``iomm.json`` carries the setting)."""
  model_v, trainable, frozen, _, _ = pipeline_case
  model = dataclasses.replace(model_v, prediction="x", x_pred_t_min=0.1)
  out = str(tmp_path / "x")
  flux.export_generator(model, trainable, out, frozen=frozen)
  meta = flux.read_meta(out)
  assert (meta["prediction"], meta["x_pred_t_min"]) == ("x", 0.1)
  pipe = torch_port.IOMMPipeline.from_pretrained(out)
  ids = np.array([[2, 7, 9, 11, 0, 0]], np.int32)
  null_ids, null_valid = np.array([1, 0, 0], np.int32), np.array([True, False, False])
  settings = dict(num_steps=3, solver="euler", cfg_scale=2.0, shift=1.0)
  key = jax.random.key(3)
  h, w, c = model.latent_shape
  noise = np.asarray(jax.random.normal(key, (1, h, w, c), jnp.float32))
  args = (trainable, frozen, ids, ids != 0, null_ids, null_valid, None, None, key)
  ours = np.asarray(generate._generate(model, *args, **settings))
  as_velocity = np.asarray(generate._generate(model_v, *args, **settings))
  theirs = pipe.generate(
    _t(ids).long(),
    _t(ids != 0),
    _t(null_ids).long(),
    _t(null_valid),
    _t(noise),
    **settings,
  )
  diff = np.abs(theirs.astype(np.int32) - ours.astype(np.int32))
  assert diff.mean() / 255 <= TOL_PIXELS and diff.max() <= 1
  assert np.abs(ours.astype(np.int32) - as_velocity.astype(np.int32)).mean() > 2  # it matters


def test_image_condition_matches_jax(pipeline_case):
  """Image tokens (torch vision tower, masked) scattered at <IMG_CONTEXT>, then the RQA path."""
  model, trainable, frozen, pipe, _ = pipeline_case
  p = model.num_image_tokens
  ids = np.array([[2] + [6] * p + [9, 0], [2, 4] + [6] * p + [9]], np.int32)
  valid = ids != 0
  images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  keep = np.ones((2, p), bool)
  keep[0, 1] = False

  @jax.jit
  def jax_condition(ids, valid, images, keep):
    vis = iomm.vision_tokens(model, frozen["mllm"], images) * keep[..., None]
    return iomm.condition(model, trainable, frozen["mllm"], ids, valid, vis)

  ctx, pooled = (np.asarray(x) for x in jax_condition(ids, valid, images, keep))
  with torch.no_grad():
    vis = torch_port.vision_tokens(pipe.mllm, _t(images), model.mllm_config.image_size)
    vis = vis * _t(keep)[..., None]
    ctx_t, pooled_t = torch_port.condition(
      pipe.mllm, pipe.adapter, pipe.connector, _t(ids).long(), _t(valid), vis,
      model.mllm_config.image_token_id,
    )  # fmt: skip
  err = max(np.abs(ctx_t.numpy() - ctx).max(), np.abs(pooled_t.numpy() - pooled).max())
  print(f"\n[flux export] image condition: max |torch - jax| = {err:.3g}")
  assert err <= TOL_TRANSFORMER


def test_raw_condition_matches_jax(pipeline_case, tmp_path):
  """Condition "raw" (no queries; every prompt position, padding zeroed) through the same MLLM."""
  model0, _, frozen, pipe, _ = pipeline_case
  model = _model("raw", "mlp")
  assert model.mllm_config == model0.mllm_config
  trainable = _trainable(model, 8, generator=False)
  flux.export_trainable(trainable, model, str(tmp_path))
  connector = torch_port.load_connector(str(tmp_path))
  ids = np.array([[2, 7, 9, 11, 0, 0], [3, 5, 8, 13, 21, 4]], np.int32)
  valid = ids != 0
  cond = jax.jit(lambda i, v: iomm.condition(model, trainable, frozen["mllm"], i, v, None))
  ctx, pooled = (np.asarray(x) for x in cond(ids, valid))
  with torch.no_grad():
    ctx_t, pooled_t = torch_port.condition(pipe.mllm, None, connector, _t(ids).long(), _t(valid))
  err = max(np.abs(ctx_t.numpy() - ctx).max(), np.abs(pooled_t.numpy() - pooled).max())
  print(f"\n[flux export] raw condition: max |torch - jax| = {err:.3g}")
  assert ctx.shape == (2, 6, 128) and np.all(ctx[0, 4:] == 0)
  assert err <= TOL_TRANSFORMER


def test_generator_round_trip(pipeline_case):
  model, trainable, _, _, out = pipeline_case
  meta, back = flux.import_generator(out)
  assert meta["condition"] == "rqa" and meta["latent_shape"] == list(model.latent_shape)
  a, b = tensors.flatten(trainable), tensors.flatten(back)
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_sampler_with_vae_reproduces_jax(tmp_path):
  """The same condition fed to both samplers (Heun, guidance, shift), decoded by the tiny VAE in
  each (ours through ``VAECodec``; diffusers' ``AutoencoderKL`` exported by ``convert.vae``)."""
  from iomm_jax.convert import vae as vae_convert

  codec = codec_lib.make_codec("vae", variant="tiny")  # 2x down, 4 latent channels
  cfg = CONFIGS["plain"]  # in_channels 16 = 4 channels packed 2x2
  params = tiny_flux.random_params(flux.transformer_template(cfg), 4)
  vae_params = tiny_flux.random_params(vae_convert.abstract_params(codec.config), 6, small=0.05)
  vae_convert.export_vae(vae_params, codec.config, str(tmp_path / "vae"))
  flux.export_transformer(params, cfg, str(tmp_path / "transformer"))
  transformer = torch_port.load_transformer(str(tmp_path))
  vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()

  rng = np.random.default_rng(7)
  ctx = rng.standard_normal((2, 3, cfg.joint_attention_dim), np.float32)
  ctx_u = rng.standard_normal((1, 3, cfg.joint_attention_dim), np.float32)
  pooled = rng.standard_normal((2, cfg.pooled_projection_dim), np.float32)
  pooled_u = rng.standard_normal((1, cfg.pooled_projection_dim), np.float32)
  h, w, c = codec.latent_shape(16, 16)
  noise = rng.standard_normal((2, h, w, c), np.float32)
  settings = dict(num_steps=2, solver="heun", shift=1.5)
  cfg_scale, p = 2.5, cfg.latent_patch

  @jax.jit
  def jax_images(noise):
    ctx_all = jnp.concatenate([ctx, jnp.broadcast_to(ctx_u, ctx.shape)])
    pooled_all = jnp.concatenate([pooled, jnp.broadcast_to(pooled_u, pooled.shape)])

    def v_fn(x, t):  # iomm.velocity of [x; x] under [cond; uncond], then guidance
      out = mmdit.MMDiT(cfg).apply(
        {"params": params}, mmdit.pack_latents(jnp.concatenate([x, x]), p),
        mmdit.image_ids(4, h // p, w // p), ctx_all, mmdit.text_ids(4, 3), pooled_all,
        jnp.concatenate([t, t]),
      )  # fmt: skip
      v = mmdit.unpack_latents(out, h, w, p)
      return v[2:] + cfg_scale * (v[:2] - v[2:])

    return codec.decode(vae_params, sampling.sample(v_fn, noise, **settings))

  ours = np.asarray(jax_images(noise))
  with torch.no_grad():
    latents = torch_port.sample_latents(
      transformer, _t(ctx), _t(pooled), _t(noise), cfg_scale=cfg_scale, latent_patch=p,
      ctx_uncond=_t(ctx_u), pooled_uncond=_t(pooled_u), **settings,
    )  # fmt: skip
    theirs = torch_port.vae_decode(vae, latents).numpy()
  err = np.abs(theirs - ours)
  print(f"\n[flux export] VAE sampler: mean |torch - jax| = {err.mean():.3g}, max {err.max():.3g}")
  assert ours.shape == theirs.shape == (2, 16, 16, 3) and ours.std() > 0.1
  assert err.mean() <= TOL_PIXELS
