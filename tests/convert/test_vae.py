"""Tests for iomm_jax.convert.vae: diffusers AutoencoderKL <-> our Flax port.

Tiny random diffusers models are built and saved locally (no network). Parity: encode mean and
decode in float32 within 1e-4 of diffusers; export then re-import is bit-identical and loads in
diffusers with no missing/unexpected keys; bad checkpoints fail with errors naming the parameter.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file, save_file

from iomm_jax.assembly import context
from iomm_jax.configs import specs
from iomm_jax.configs.base import get_base_config
from iomm_jax.convert import tensors, vae
from iomm_jax.convert.tensors import ConversionError
from iomm_jax.models import codec

TOL = 1e-4

# "tiny": the exact shape of VAE_VARIANTS["tiny"] (FLUX-like: no quant convs, mid attention,
# FLUX's shift/scale). "wide": 16 latent channels, 2 layers per block, SD-style quant convs, no
# mid attention, no shift factor.
CONFIGS = {
  "tiny": dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
  ),
  "wide": dict(
    block_out_channels=(8, 16),
    layers_per_block=2,
    norm_num_groups=4,
    latent_channels=16,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=False,
  ),
}

# black-forest-labs/FLUX.1-dev vae/config.json
FLUX_CONFIG = {
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.30.0.dev0",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D"] * 4,
  "force_upcast": True,
  "in_channels": 3,
  "latent_channels": 16,
  "latents_mean": None,
  "latents_std": None,
  "layers_per_block": 2,
  "mid_block_add_attention": True,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 1024,
  "scaling_factor": 0.3611,
  "shift_factor": 0.1159,
  "up_block_types": ["UpDecoderBlock2D"] * 4,
  "use_post_quant_conv": False,
  "use_quant_conv": False,
}


def _torch_vae(name: str, seed: int) -> TorchAutoencoderKL:
  """A tiny diffusers AutoencoderKL with every parameter (norms included) randomised."""
  kw = CONFIGS[name]
  n = len(kw["block_out_channels"])
  torch.manual_seed(seed)
  model = TorchAutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kw
  ).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Both tiny diffusers models, saved (src) and imported (ours), with their state dicts."""
  root = tmp_path_factory.mktemp("vae")
  out = {}
  for seed, name in enumerate(CONFIGS):
    model = _torch_vae(name, seed)
    src, ours = str(root / f"{name}_src"), str(root / f"{name}_ours")
    model.save_pretrained(src)
    cfg = vae.import_vae(src, ours)
    out[name] = types.SimpleNamespace(model=model, src=src, ours=ours, cfg=cfg, root=root)
  return out


def _images(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1.0, 1.0, (2, 16, 16, 3)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_encode_decode(model: TorchAutoencoderKL, x: np.ndarray, z: np.ndarray | None = None):
  """diffusers' posterior mean of x and decode of z (default: of that mean), NHWC numpy."""
  with torch.no_grad():
    mean = _nhwc(model.encode(_nchw(x)).latent_dist.mean)
    dec = _nhwc(model.decode(_nchw(mean if z is None else z)).sample)
  return mean, dec


# ----------------------------------------------------------------------------- configs


def test_flux_config_maps_to_the_flux_variant():
  assert vae.vae_config_from_diffusers(FLUX_CONFIG) == codec.VAE_VARIANTS["flux"]
  out = vae.diffusers_config(codec.VAE_VARIANTS["flux"])
  assert {k: v for k, v in FLUX_CONFIG.items() if not k.startswith("_")} == {
    k: v for k, v in out.items() if not k.startswith("_")
  }


def test_config_errors_name_the_class_or_key():
  with pytest.raises(ConversionError, match="wrong model type.*UNet2DModel"):
    vae.vae_config_from_diffusers({**FLUX_CONFIG, "_class_name": "UNet2DModel"})
  with pytest.raises(ConversionError, match="latents_mean"):
    vae.vae_config_from_diffusers({**FLUX_CONFIG, "latents_mean": [0.0] * 16})
  with pytest.raises(ConversionError, match="act_fn"):
    vae.vae_config_from_diffusers({**FLUX_CONFIG, "act_fn": "gelu"})
  with pytest.raises(ConversionError, match="down_block_types"):
    vae.vae_config_from_diffusers({**FLUX_CONFIG, "down_block_types": ["DownBlock2D"] * 4})
  with pytest.raises(ConversionError, match="some_new_option"):
    vae.vae_config_from_diffusers({**FLUX_CONFIG, "some_new_option": 1})
  # Omitted keys take diffusers' defaults (quant convs on, shift None -> 0).
  cfg = vae.vae_config_from_diffusers({"_class_name": "AutoencoderKL"})
  assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.shift_factor == 0.0


# ----------------------------------------------------------------------------- parity


def test_parity_tiny_through_the_run_config(models):
  """model.vae_checkpoint -> context.init_codec_params -> VAECodec = diffusers + shift/scale."""
  m = models["tiny"]
  assert m.cfg == codec.VAE_VARIANTS["tiny"]
  config = get_base_config()
  config.model.codec, config.model.vae, config.model.vae_checkpoint = "vae", "tiny", m.ours
  vc = codec.make_codec("vae", variant="tiny")
  params = context.init_codec_params(specs.from_config(config).model, vc, jax.random.key(0), 16)
  x = _images(0)
  mean, _ = _torch_encode_decode(m.model, x)
  want = (mean - 0.1159) * 0.3611
  _, dec = _torch_encode_decode(m.model, x, want / 0.3611 + 0.1159)
  # One compiled program for both directions (compiles dominate this test on CPU).
  both = jax.jit(lambda p, x, z: (vc.encode(p, x), vc.decode(p, z)))
  latents, decoded = both(params, jnp.asarray(x), jnp.asarray(want))
  err_enc = float(np.abs(np.asarray(latents) - want).max()) / 0.3611  # in posterior-mean units
  err_dec = float(np.abs(np.asarray(decoded) - dec).max())
  print(f"\nVAE parity tiny: encode mean max|err| {err_enc:.3g}, decode max|err| {err_dec:.3g}")
  assert err_enc <= TOL and err_dec <= TOL


def test_parity_wide_quant_convs(models):
  """Raw AutoencoderKL encode mean / decode (quant convs, no mid attention, 16 channels)."""
  m = models["wide"]
  cfg, params = vae.load_vae(m.ours)
  assert cfg.use_quant_conv and cfg.use_post_quant_conv and not cfg.mid_block_add_attention
  assert (cfg.latent_channels, cfg.layers_per_block, cfg.shift_factor) == (16, 2, 0.0)
  module = codec.AutoencoderKL(cfg)

  def both(p, x, z):
    mean, _ = module.apply({"params": p}, x, method=module.encode)
    return mean, module.apply({"params": p}, z, method=module.decode)

  x = _images(1)
  mean, dec = _torch_encode_decode(m.model, x)
  our_mean, our_dec = jax.jit(both)(params, jnp.asarray(x), jnp.asarray(mean))
  err_enc = float(np.abs(np.asarray(our_mean) - mean).max())
  err_dec = float(np.abs(np.asarray(our_dec) - dec).max())
  print(f"\nVAE parity wide: encode mean max|err| {err_enc:.3g}, decode max|err| {err_dec:.3g}")
  assert err_enc <= TOL and err_dec <= TOL


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_reimport_bit_identical_and_loads_in_diffusers(models, name):
  m = models[name]
  cfg, params = vae.load_vae(m.ours)
  exported = str(m.root / f"{name}_export")
  vae.export_vae(params, cfg, exported)
  # The exported state dict is the original one, bit for bit.
  original = {k: v.numpy() for k, v in m.model.state_dict().items()}
  written = load_file(os.path.join(exported, vae.DIFFUSERS_WEIGHTS))
  assert sorted(written) == sorted(original)
  for k, v in original.items():
    assert written[k].dtype == v.dtype and np.array_equal(written[k], v), k
  back = str(m.root / f"{name}_reimported")
  assert vae.import_vae(exported, back) == cfg
  cfg2, params2 = vae.load_vae(back)
  assert cfg2 == cfg
  flat, flat2 = tensors.flatten(params), tensors.flatten(params2)
  assert sorted(flat) == sorted(flat2)
  for k in flat:
    assert flat[k].dtype == flat2[k].dtype and np.array_equal(flat[k], flat2[k]), k
  with pytest.raises(ConversionError, match="converted"):
    vae.export_vae(params, cfg, m.ours)  # never overwrite an import_vae directory
  with pytest.raises(ConversionError, match="must differ"):
    vae.import_vae(exported, exported)
  loaded, info = TorchAutoencoderKL.from_pretrained(exported, output_loading_info=True)
  assert info["missing_keys"] == [] and info["unexpected_keys"] == []
  assert info["mismatched_keys"] == [] and info["error_msgs"] == []
  assert loaded.config.scaling_factor == cfg.scaling_factor
  assert (loaded.config.shift_factor or 0.0) == cfg.shift_factor


def test_bfloat16_import_and_sharded_diffusers_index(models, tmp_path):
  m = models["tiny"]
  _, params = vae.load_vae(m.ours)
  # Split the diffusers weights into two shards listed by diffusers' index name.
  state = load_file(os.path.join(m.src, vae.DIFFUSERS_WEIGHTS))
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  shutil.copy(os.path.join(m.src, "config.json"), sharded / "config.json")
  keys = sorted(state)
  weight_map = {}
  for i, part in enumerate((keys[::2], keys[1::2])):
    shard = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
    save_file({k: state[k] for k in part}, str(sharded / shard))
    weight_map.update({k: shard for k in part})
  (sharded / tensors.DIFFUSERS_INDEX).write_text(json.dumps({"weight_map": weight_map}))
  vae.import_vae(str(sharded), str(tmp_path / "bf16"), dtype="bfloat16")
  with open(tmp_path / "bf16" / "config.json") as f:
    meta = json.load(f)
  assert meta["format"] == "iomm_jax.vae" and meta["params_dtype"] == "bfloat16"
  assert meta["source"] == os.path.abspath(str(sharded))
  _, bf16 = vae.load_vae(str(tmp_path / "bf16"))
  for k, v in tensors.flatten(params).items():
    w = tensors.flatten(bf16)[k]
    assert w.dtype == jnp.bfloat16 and np.array_equal(w, v.astype(jnp.bfloat16)), k
  # A pipeline directory with a vae/ subfolder (FLUX.1-dev's layout) is accepted too.
  pipe = tmp_path / "pipe"
  shutil.copytree(m.src, pipe / "vae")
  assert vae.import_vae(str(pipe), str(tmp_path / "from_pipe")) == m.cfg


# ----------------------------------------------------------------------------- bad inputs


def _copy_with(m, tmp_path, edit=None, config=None) -> str:
  """A copy of a saved diffusers dir with its state dict edited and/or config.json replaced."""
  dst = tmp_path / "bad"
  shutil.copytree(m.src, dst)
  if edit is not None:
    path = str(dst / vae.DIFFUSERS_WEIGHTS)
    state = load_file(path)
    edit(state)
    save_file(state, path)
  if config is not None:
    (dst / "config.json").write_text(json.dumps(config))
  return str(dst)


def test_wrong_class_name(models, tmp_path):
  m = models["tiny"]
  with open(os.path.join(m.src, "config.json")) as f:
    cfg = json.load(f)
  src = _copy_with(m, tmp_path, config={**cfg, "_class_name": "UNet2DConditionModel"})
  with pytest.raises(ConversionError, match="wrong model type.*UNet2DConditionModel"):
    vae.import_vae(src, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "config.json")


def test_no_safetensors_and_pickles_never_read(models, tmp_path):
  m = models["tiny"]
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(m.src, "config.json"), empty / "config.json")
  with pytest.raises(ConversionError, match="not a checkpoint"):
    vae.import_vae(str(empty), str(tmp_path / "out"))

  sentinel = tmp_path / "unpickled"

  class Trap:
    def __reduce__(self):
      return (os.mkdir, (str(sentinel),))

  (empty / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
  with pytest.raises(ConversionError, match=r"not a checkpoint.*\.bin.*pickled"):
    vae.import_vae(str(empty), str(tmp_path / "out"))
  assert not sentinel.exists()
  assert not os.path.exists(tmp_path / "out" / "config.json")


def test_missing_key(models, tmp_path):
  src = _copy_with(models["tiny"], tmp_path, edit=lambda s: s.pop("decoder.conv_in.bias"))
  with pytest.raises(ConversionError, match="missing") as e:
    vae.import_vae(src, str(tmp_path / "out"))
  assert "decoder/conv_in/bias" in str(e.value) and "decoder.conv_in.bias" in str(e.value)


def test_unexpected_key(models, tmp_path):
  def add(state):
    state["encoder.extra_block.weight"] = np.zeros((2, 2), np.float32)

  src = _copy_with(models["tiny"], tmp_path, edit=add)
  with pytest.raises(ConversionError, match="unexpected.*encoder.extra_block.weight"):
    vae.import_vae(src, str(tmp_path / "out"))


def test_shape_mismatch_names_both_shapes(models, tmp_path):
  def widen(state):
    state["encoder.conv_in.weight"] = np.zeros((16, 3, 3, 3), np.float32)

  src = _copy_with(models["tiny"], tmp_path, edit=widen)
  with pytest.raises(ConversionError, match="shape mismatch") as e:
    vae.import_vae(src, str(tmp_path / "out"))
  msg = str(e.value)
  assert "encoder/conv_in/kernel" in msg and "encoder.conv_in.weight" in msg
  assert "(3, 3, 3, 8)" in msg and "(3, 3, 3, 16)" in msg
  # the file's own key, file and shape, and the shape expected in the file's layout
  want = "'encoder.conv_in.weight' in {} has shape (16, 3, 3, 3), ours is (8, 3, 3, 3)"
  assert want.format(vae.DIFFUSERS_WEIGHTS) in msg


def test_load_refuses_other_directories(models, tmp_path):
  with pytest.raises(ConversionError, match="not a converted VAE directory"):
    vae.load_vae(models["tiny"].src)
  with pytest.raises(ConversionError, match="not a converted VAE directory"):
    vae.load_vae(str(tmp_path))


def test_run_config_checks(models):
  config = get_base_config()
  config.model.codec, config.model.vae = "vae", "tiny"
  template = {"sentinel": 1}
  model = lambda: specs.from_config(config).model  # noqa: E731
  assert context.codec_params(model(), template) is template  # no checkpoint: unchanged
  config.model.vae_checkpoint = models["wide"].ours
  with pytest.raises(ConversionError, match="different VAE.*'tiny'.*latent_channels") as e:
    context.codec_params(model(), template)
  assert models["wide"].ours in str(e.value)
  config.model.codec = "pixel"
  with pytest.raises(ConversionError, match="codec='pixel'"):
    context.codec_params(model(), template)
