"""Tests for iomm_jax.models.codec: PixelCodec, the tiny VAE, the FLUX VAE's size, validation."""

from __future__ import annotations

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iomm_jax.models import codec, layers


def _uniform(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  """Uniform [-1, 1) test images from numpy (no jax RNG compile)."""
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32))


@pytest.fixture(scope="module")
def tiny():
  """The tiny VAE: codec, its params, the abstract boxed init, an input and raw-module outputs."""
  cfg = codec.VAE_VARIANTS["tiny"]
  module = codec.AutoencoderKL(cfg)
  vc = codec.make_codec("vae", variant="tiny")
  x = _uniform((2, 8, 8, 3))
  # Compiling threefry initialisers on CPU takes seconds per shape; an rbg key is far cheaper.
  params = vc.init_params(jax.random.key(0, impl="rbg"), 8)
  boxed = jax.eval_shape(module.init, jax.random.key(0), x)
  # Eager applies at one shape share compiled ops with the codec calls in the tests below.
  encode = functools.partial(module.apply, method=codec.AutoencoderKL.encode)
  decode = functools.partial(module.apply, method=codec.AutoencoderKL.decode)
  mean, logvar = encode({"params": params}, x)
  out = decode({"params": params}, mean)
  return types.SimpleNamespace(
    cfg=cfg,
    module=module,
    vc=vc,
    params=params,
    boxed=boxed,
    x=x,
    mean=mean,
    logvar=logvar,
    out=out,
  )


# ----------------------------------------------------------------------------- pixel codec


def test_pixel_codec_round_trip_and_shape():
  pc = codec.make_codec("pixel", factor=2)
  assert isinstance(pc, codec.LatentCodec)
  assert pc.init_params(jax.random.key(0), 32) == {}
  x = _uniform((2, 32, 32, 3))
  z = pc.encode({}, x)
  assert z.shape == (2, 16, 16, 12)
  assert pc.latent_shape(32, 32) == (16, 16, 12)
  assert (pc.latent_channels, pc.downsample) == (12, 2)
  np.testing.assert_array_equal(pc.decode({}, z), x)
  pc4 = codec.PixelCodec(factor=4)
  np.testing.assert_array_equal(pc4.decode({}, pc4.encode({}, x)), x)
  with pytest.raises(ValueError, match="divisible"):
    pc.encode({}, x[:, :31])


def test_pixel_codec_layout():
  # 1 image, 2x4 pixels, 1 channel; value = 10 * row + col.
  x = (10 * jnp.arange(2)[:, None] + jnp.arange(4)[None, :]).astype(jnp.float32)
  z = codec.PixelCodec(factor=2, channels=1).encode({}, x[None, :, :, None])
  # latents[0, 0, j, p * 2 + q] = x[p, 2j + q]
  np.testing.assert_array_equal(z[0, 0], [[0, 1, 10, 11], [2, 3, 12, 13]])


def test_uint8_helpers():
  u8 = np.array([0, 1, 127, 128, 254, 255], np.uint8)
  x = codec.images_to_unit(u8)
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(codec.unit_to_images(x), u8)
  np.testing.assert_array_equal(codec.unit_to_images(jnp.array([-3.0, 3.0])), [0, 255])


# ----------------------------------------------------------------------------- tiny VAE


def test_tiny_vae_shapes_and_logical_names(tiny):
  cfg = tiny.cfg
  assert cfg.downsample == 2 ** (len(cfg.block_out_channels) - 1) == 2
  assert tiny.mean.shape == tiny.logvar.shape == (2, 4, 4, cfg.latent_channels)
  assert tiny.out.shape == tiny.x.shape
  for a in (tiny.mean, tiny.logvar, tiny.out):
    assert bool(jnp.all(jnp.isfinite(a)))

  names = layers.logical_axes_tree(tiny.boxed["params"])
  flat_names = jax.tree_util.tree_leaves_with_path(names, is_leaf=lambda n: isinstance(n, tuple))
  flat_params = dict(jax.tree_util.tree_leaves_with_path(tiny.params))
  assert len(flat_names) == len(flat_params) > 0
  for path, axes in flat_names:
    assert axes is not None, path
    assert len(axes) == flat_params[path].ndim, path
    assert all(a in layers.LOGICAL_AXES for a in axes), path


def test_vae_codec_scaling_and_shift(tiny):
  vc, params, x, mean, logvar = tiny.vc, tiny.params, tiny.x, tiny.mean, tiny.logvar
  assert isinstance(vc, codec.LatentCodec)
  assert (vc.latent_channels, vc.downsample) == (4, 2)
  assert vc.latent_shape(8, 8) == (4, 4, 4)
  s, b = tiny.cfg.scaling_factor, tiny.cfg.shift_factor
  assert (s, b) == (0.3611, 0.1159)
  encode = vc.encode
  z = encode(params, x)
  np.testing.assert_allclose(z, (mean - b) * s, rtol=1e-5, atol=1e-5)
  key = jax.random.key(3, impl="rbg")
  zr = encode(params, x, key)
  noise = jax.random.normal(key, mean.shape)
  np.testing.assert_allclose(zr, (mean + jnp.exp(0.5 * logvar) * noise - b) * s, atol=1e-5)
  np.testing.assert_allclose(vc.decode(params, z), tiny.out, rtol=1e-5, atol=1e-5)
  recon, m2, _ = tiny.module.apply({"params": params}, x)
  np.testing.assert_allclose(recon, tiny.out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(m2, mean, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- FLUX VAE size


def test_flux_vae_param_count():
  # Analytic count for block_out_channels (128, 256, 512, 512), 2 layers/block, latent 16:
  #   conv(i, o, k) = k*k*i*o + o;  gn(c) = 2c;
  #   res(i, o) = gn(i) + conv(i, o, 3) + gn(o) + conv(o, o, 3) + [i != o] conv(i, o, 1)
  #   attn(c) = gn(c) + 4 (c*c + c);  mid(c) = 2 res(c, c) + attn(c)
  #   res: 128->128 295,680; 128->256 919,296; 256->256 1,181,184; 256->512 3,673,600;
  #        512->512 4,721,664;  down convs 147,584 / 590,080 / 2,359,808;  mid(512) 10,495,488.
  #   encoder = conv(3,128) 3,584 + 2*295,680 + 147,584 + 919,296 + 1,181,184 + 590,080
  #             + 3,673,600 + 4,721,664 + 2,359,808 + 2*4,721,664 + mid 10,495,488
  #             + gn(512) 1,024 + conv(512, 32) 147,488 = 34,274,208
  #   decoder = conv(16,512) 74,240 + mid 10,495,488 + 3*4,721,664 + 2,359,808 (up 0)
  #             + 3*4,721,664 + 2,359,808 (up 1) + res(512,256) 1,968,000 + 2*1,181,184
  #             + 590,080 (up 2) + res(256,128) 492,288 + 2*295,680 (up 3)
  #             + gn(128) 256 + conv(128, 3) 3,459 = 49,545,475
  #   total 83,819,683 = diffusers' FLUX.1 AutoencoderKL (no quant convs).
  cfg = codec.VAE_VARIANTS["flux"]
  module = codec.AutoencoderKL(cfg)
  shapes = jax.eval_shape(
    module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  )
  p = shapes["params"]
  assert layers.count_params(p["encoder"]) == 34_274_208
  assert layers.count_params(p["decoder"]) == 49_545_475
  assert layers.count_params(p) == 83_819_683
  assert cfg.downsample == 8
  assert codec.VAECodec(cfg).latent_shape(1024, 768) == (128, 96, 16)


# ----------------------------------------------------------------------------- blocks


def test_downsample_asymmetric_padding():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  ones = {"conv": {"kernel": jnp.ones((3, 3, 1, 1)), "bias": jnp.zeros((1,))}}
  y = codec.Downsample2D(1).apply({"params": ones}, x)[0, :, :, 0]
  # Pad one zero row at the bottom and one zero column at the right, 3x3 windows at stride 2
  # starting at (0, 0): sums of x[0:3, 0:3], x[0:3, 2:4], x[2:4, 0:3], x[2:4, 2:4].
  xn = np.arange(16, dtype=np.float32).reshape(4, 4)
  want = [[xn[0:3, 0:3].sum(), xn[0:3, 2:4].sum()], [xn[2:4, 0:3].sum(), xn[2:4, 2:4].sum()]]
  np.testing.assert_array_equal(y, want)
  assert codec.Downsample2D(1).apply({"params": ones}, jnp.zeros((1, 5, 7, 1))).shape == (
    1,
    2,
    3,
    1,
  )


def test_upsample_is_nearest():
  x = jnp.arange(4, dtype=jnp.float32).reshape(1, 2, 2, 1)
  ident = jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(1.0)
  y = codec.Upsample2D(1).apply({"params": {"conv": {"kernel": ident, "bias": jnp.zeros(1)}}}, x)
  np.testing.assert_array_equal(
    y[0, :, :, 0], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
  )


def test_group_norm_matches_reference():
  x = jnp.asarray(np.random.default_rng(0).normal(1.0, 3.0, (2, 3, 5, 8)).astype(np.float32))
  gn = codec.GroupNorm(num_groups=4, eps=1e-6)
  y = gn.apply(nn.meta.unbox(gn.init(jax.random.key(0), x)), x)
  xg = np.asarray(x).reshape(2, 3, 5, 4, 2)
  m = xg.mean(axis=(1, 2, 4), keepdims=True)
  v = xg.var(axis=(1, 2, 4), keepdims=True)
  np.testing.assert_allclose(y, ((xg - m) / np.sqrt(v + 1e-6)).reshape(x.shape), atol=1e-5)


# ----------------------------------------------------------------------------- config & registry


@pytest.mark.parametrize(
  "kwargs, field",
  [
    (dict(block_out_channels=(8, 12), norm_num_groups=8), "block_out_channels"),
    (dict(block_out_channels=()), "block_out_channels"),
    (dict(latent_channels=0), "latent_channels"),
    (dict(layers_per_block=-1), "layers_per_block"),
    (dict(norm_num_groups=0), "norm_num_groups"),
    (dict(scaling_factor=0.0), "scaling_factor"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(dtype="int8"), "dtype"),
  ],
)
def test_config_validation_names_field(kwargs, field):
  with pytest.raises(ValueError, match=f"VAEConfig.{field}"):
    codec.VAEConfig(**kwargs)


def test_config_is_frozen_keyword_only():
  with pytest.raises(TypeError):
    codec.VAEConfig(3)  # noqa
  cfg = codec.VAEConfig(block_out_channels=[32, 64])
  assert cfg.block_out_channels == (32, 64)
  with pytest.raises(AttributeError):
    cfg.latent_channels = 4  # type: ignore[misc]


def test_make_codec_registry():
  with pytest.raises(ValueError, match="unknown codec kind 'jpeg'"):
    codec.make_codec("jpeg")
  with pytest.raises(ValueError, match="unknown VAE variant"):
    codec.make_codec("vae", variant="sdxl")
  vc = codec.make_codec("vae", variant="tiny", latent_channels=8)
  assert vc.latent_channels == 8
  assert codec.make_codec("vae").downsample == 8
