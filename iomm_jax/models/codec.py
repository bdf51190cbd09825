"""Latent codecs: images [B, H, W, 3] in [-1, 1] <-> latents [B, H/f, W/f, C], behind one interface.

* ``AutoencoderKL``: a Flax Linen port of diffusers' ``AutoencoderKL`` (the SD/FLUX VAE): an
  ``Encoder`` (conv_in, ``DownEncoderBlock2D`` x len(block_out_channels) with a stride-2
  ``Downsample2D`` after every block but the last, ``UNetMidBlock2D`` with one single-head
  self-attention, GroupNorm, SiLU, conv_out to 2 x latent channels = mean, logvar) and a
  ``Decoder`` (conv_in, mid block, ``UpDecoderBlock2D`` x len(block_out_channels) with
  layers_per_block + 1 resnets and a nearest-2x ``Upsample2D`` after every block but the last,
  GroupNorm, SiLU, conv_out). ``VAE_VARIANTS["flux"]`` is the FLUX.1 VAE (83,819,683 params).
* ``LatentCodec``: the interface the diffusion code sees, with pure functions of explicit params:
  ``VAECodec`` (wraps ``AutoencoderKL``, applies FLUX's shift/scale) and ``PixelCodec``
  (parameter-free space-to-depth; the codec of the embedded demo). ``make_codec`` builds one by
  name.

Layout: activations are NHWC, convolution kernels HWIO (kh, kw, in, out), dense kernels (in, out).

Parameter names are diffusers' module names (``<name>_<i>`` for its ModuleList entry
``<name>.<i>``), so the name table of ``convert.vae`` (which owns the diffusers keys and the
kernel transposes) maps them one to one.

Every parameter carries logical axis names: conv kernels (conv_h, conv_w, conv_in, conv_out), conv
biases (conv_out,), GroupNorm scale/bias (norm,), attention projections (embed, heads) and
(heads, embed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iomm_jax import dtypes
from iomm_jax.models import layers
from iomm_jax.models.layers import Dense, Dtype

Params = Any

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
  """Hyper-parameters of ``AutoencoderKL`` (diffusers names; the encoder always has double_z).

  ``dtype`` is the compute dtype ("float32", "bfloat16", "float16"); parameters stay float32 and
  GroupNorm statistics and the attention softmax are computed in float32.
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  mid_block_add_attention: bool = True
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  scaling_factor: float = 0.3611
  shift_factor: float = 0.1159
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    for name in (
      "in_channels",
      "out_channels",
      "latent_channels",
      "layers_per_block",
      "norm_num_groups",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")
    if not self.block_out_channels:
      raise ValueError("VAEConfig.block_out_channels must not be empty")
    for c in self.block_out_channels:
      if not isinstance(c, int) or c <= 0:
        raise ValueError(
          f"VAEConfig.block_out_channels must hold positive ints, got {self.block_out_channels}"
        )
      if c % self.norm_num_groups:
        raise ValueError(
          f"VAEConfig.block_out_channels={self.block_out_channels}: {c} is not "
          f"divisible by norm_num_groups={self.norm_num_groups}"
        )
    if not self.norm_eps > 0:
      raise ValueError(f"VAEConfig.norm_eps must be positive, got {self.norm_eps}")
    if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
      raise ValueError(
        f"VAEConfig.scaling_factor must be positive and finite, got {self.scaling_factor}"
      )
    if not math.isfinite(self.shift_factor):
      raise ValueError(f"VAEConfig.shift_factor must be finite, got {self.shift_factor}")
    dtypes.dtype(self.dtype, what="VAEConfig.dtype")

  @property
  def downsample(self) -> int:
    """Spatial reduction factor: 2 ** (number of down blocks - 1)."""
    return 2 ** (len(self.block_out_channels) - 1)


VAE_VARIANTS: dict[str, VAEConfig] = {
  # FLUX.1 [dev/schnell] ae: diffusers AutoencoderKL config of black-forest-labs/FLUX.1-dev.
  "flux": VAEConfig(),
  # For tests: 2x downsampling, 43,619 parameters.
  "tiny": VAEConfig(
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4
  ),
}

# ----------------------------------------------------------------------------- building blocks

_CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


class Conv(nn.Module):
  """2-D convolution over NHWC with an HWIO kernel carrying logical axis names.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    strides: square stride.
    padding: symmetric zero padding (int) or ((top, bottom), (left, right)).
  __call__: x [B, H, W, Cin] -> [B, H', W', features] in ``dtype``.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int | tuple[tuple[int, int], tuple[int, int]] = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: layers.Initializer = layers.default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param(
      "kernel",
      layers.logical(self.kernel_init, _CONV_AXES),
      (k, k, x.shape[-1], self.features),
      self.param_dtype,
    )
    pad = self.padding
    if isinstance(pad, int):
      pad = ((pad, pad), (pad, pad))
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      (self.strides, self.strides),
      tuple(tuple(p) for p in pad),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.use_bias:
      bias = self.param(
        "bias",
        layers.logical(nn.initializers.zeros_init(), ("conv_out",)),
        (self.features,),
        self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    return y


class GroupNorm(nn.Module):
  """Group normalisation over (H, W, C/G) per group, statistics in float32 (torch semantics).

  __call__: x [B, H, W, C] (C divisible by num_groups) -> [B, H, W, C] in ``dtype``.
  """

  num_groups: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    g = self.num_groups
    if c % g:
      raise ValueError(f"GroupNorm: channels {c} not divisible by num_groups {g}")
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    scale = self.param(
      "scale", layers.logical(nn.initializers.ones_init(), ("norm",)), (c,), self.param_dtype
    )
    bias = self.param(
      "bias", layers.logical(nn.initializers.zeros_init(), ("norm",)), (c,), self.param_dtype
    )
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D without time embedding: GN-SiLU-conv3 x2 plus (1x1) shortcut.

  __call__: x [B, H, W, Cin] -> [B, H, W, out_channels]; ``conv_shortcut`` exists iff
  Cin != out_channels.
  """

  out_channels: int
  groups: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = Conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
    h = Conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
    return x.astype(self.dtype) + h


class Downsample2D(nn.Module):
  """diffusers Downsample2D(use_conv=True, padding=0): zero pad bottom/right by 1, conv3 stride 2.

  __call__: x [B, H, W, C] -> [B, H // 2, W // 2, C].
  """

  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # torch F.pad(x, (0, 1, 0, 1)) then Conv2d(k=3, s=2, p=0): the pad is asymmetric.
    return Conv(
      self.channels,
      3,
      strides=2,
      padding=((0, 1), (0, 1)),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
    )(x)


class Upsample2D(nn.Module):
  """diffusers Upsample2D(use_conv=True): nearest-neighbour 2x, then conv3 (padding 1).

  __call__: x [B, H, W, C] -> [B, 2H, 2W, C].
  """

  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(
      self.channels, 3, padding=1, dtype=self.dtype, param_dtype=self.param_dtype, name="conv"
    )(x)


class VAEAttention(nn.Module):
  """Mid-block self-attention (diffusers Attention, one head of width C, residual, rescale 1).

  __call__: x [B, H, W, C] -> [B, H, W, C] = x + to_out_0(attn(to_q/k/v(group_norm(x)))).
  """

  groups: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x).reshape(b, hh * ww, 1, c)
    q = Dense(c, ("embed", "heads"), name="to_q", **kw)(h)
    k = Dense(c, ("embed", "heads"), name="to_k", **kw)(h)
    v = Dense(c, ("embed", "heads"), name="to_v", **kw)(h)
    out = layers.dot_product_attention(q, k, v)  # scale c ** -0.5, float32 softmax
    out = Dense(c, ("heads", "embed"), name="to_out_0", **kw)(out.reshape(b, hh * ww, c))
    return x.astype(self.dtype) + out.reshape(b, hh, ww, c)


class UNetMidBlock2D(nn.Module):
  """resnets_0, [attentions_0], resnets_1 at constant width. x [B, H, W, C] -> [B, H, W, C]."""

  groups: int
  eps: float = 1e-6
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, self.eps, name="resnets_0", **kw)(x)
    if self.add_attention:
      x = VAEAttention(self.groups, self.eps, name="attentions_0", **kw)(x)
    return ResnetBlock2D(c, self.groups, self.eps, name="resnets_1", **kw)(x)


class DownEncoderBlock2D(nn.Module):
  """num_layers resnets to out_channels, then an optional Downsample2D (downsamplers_0)."""

  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{i}", **kw)(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """num_layers resnets to out_channels, then an optional Upsample2D (upsamplers_0)."""

  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{i}", **kw)(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """VAE encoder. x [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (mean, logvar)."""

  config: VAEConfig
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=dtypes.DTYPES[c.dtype], param_dtype=self.param_dtype)
    blocks = c.block_out_channels
    x = Conv(blocks[0], 3, padding=1, name="conv_in", **kw)(x)
    for i, ch in enumerate(blocks):
      x = DownEncoderBlock2D(
        ch,
        c.layers_per_block,
        c.norm_num_groups,
        add_downsample=i < len(blocks) - 1,
        eps=c.norm_eps,
        name=f"down_blocks_{i}",
        **kw,
      )(x)
    x = UNetMidBlock2D(
      c.norm_num_groups, c.norm_eps, c.mid_block_add_attention, name="mid_block", **kw
    )(x)
    x = nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(x))
    return Conv(2 * c.latent_channels, 3, padding=1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """VAE decoder. z [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels]."""

  config: VAEConfig
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=dtypes.DTYPES[c.dtype], param_dtype=self.param_dtype)
    rev = tuple(reversed(c.block_out_channels))
    x = Conv(rev[0], 3, padding=1, name="conv_in", **kw)(z)
    x = UNetMidBlock2D(
      c.norm_num_groups, c.norm_eps, c.mid_block_add_attention, name="mid_block", **kw
    )(x)
    for i, ch in enumerate(rev):
      x = UpDecoderBlock2D(
        ch,
        c.layers_per_block + 1,
        c.norm_num_groups,
        add_upsample=i < len(rev) - 1,
        eps=c.norm_eps,
        name=f"up_blocks_{i}",
        **kw,
      )(x)
    x = nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(x))
    return Conv(c.out_channels, 3, padding=1, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL (no tiling/slicing). Shift/scale are applied by ``VAECodec``.

  encode: x [B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent], float32,
    logvar clipped to [-30, 20] as in DiagonalGaussianDistribution.
  decode: z [B, h, w, latent] (unscaled) -> [B, h*f, w*f, 3] float32.
  __call__: x -> (decode(mean or sample), mean, logvar); sampling iff ``rng`` is given. Used by
    ``init`` to create every parameter.
  """

  config: VAEConfig
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=dtypes.DTYPES[c.dtype], param_dtype=self.param_dtype)
    self.encoder = Encoder(c, self.param_dtype)
    self.decoder = Decoder(c, self.param_dtype)
    if c.use_quant_conv:
      self.quant_conv = Conv(2 * c.latent_channels, 1, padding=0, **kw)
    if c.use_post_quant_conv:
      self.post_quant_conv = Conv(c.latent_channels, 1, padding=0, **kw)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = self.encoder(x)
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(
    self, x: jax.Array, rng: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    mean, logvar = self.encode(x)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return self.decode(z), mean, logvar


# ----------------------------------------------------------------------------- codecs


def images_to_unit(images: Any) -> Any:
  """uint8 images [..., H, W, C] in [0, 255] -> float32 in [-1, 1] (numpy in, numpy out)."""
  xp = jnp if isinstance(images, jax.Array) else np
  return xp.asarray(images).astype(xp.float32) / 127.5 - 1.0


def unit_to_images(x: Any) -> Any:
  """float images in [-1, 1] -> uint8 in [0, 255]: clip, scale, round (numpy in, numpy out)."""
  xp = jnp if isinstance(x, jax.Array) else np
  y = (xp.clip(xp.asarray(x, dtype=xp.float32), -1.0, 1.0) + 1.0) * 127.5
  return xp.round(y).astype(xp.uint8)


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(image_size, int):
    return image_size, image_size
  h, w = image_size
  return int(h), int(w)


@runtime_checkable
class LatentCodec(Protocol):
  """Images [B, H, W, 3] in [-1, 1] <-> latents [B, H/f, W/f, C]; pure in explicit params.

  Attributes:
    latent_channels: C.
    downsample: f (H and W must be multiples of it).
  """

  latent_channels: int
  downsample: int

  def init_params(self, rng: jax.Array, image_size: int | Sequence[int]) -> Params:
    """Parameters for images of ``image_size`` (int or (H, W)); {} when there are none."""
    ...

  def encode(self, params: Params, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """[B, H, W, 3] in [-1, 1] -> [B, H/f, W/f, C]; stochastic iff ``rng`` is given."""
    ...

  def decode(self, params: Params, latents: jax.Array) -> jax.Array:
    """[B, h, w, C] -> [B, h*f, w*f, 3], nominally in [-1, 1] (not clipped)."""
    ...

  def moments(self, params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """What ``encode`` draws from, before any shift/scale: (mean, std) [B, H/f, W/f, C], std
    None for a deterministic codec (cached by ``iomm-cache-features``)."""
    ...

  def latent_from_moments(
    self, mean: jax.Array, std: jax.Array | None, noise: jax.Array | None = None
  ) -> jax.Array:
    """``encode``'s output from ``moments``' (mean, std), float32: mean + std * ``noise`` (a
    standard normal draw of mean's shape) when both are given, else from the mean alone;
    ``encode(p, x, rng)`` is it with ``noise = jax.random.normal(rng, mean.shape)``."""
    ...

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    """(H/f, W/f, C) for an image of (height, width)."""
    ...


def _check_hw(name: str, height: int, width: int, f: int) -> None:
  if height % f or width % f:
    raise ValueError(f"{name}: image size {height}x{width} is not divisible by {f}")


class PixelCodec:
  """Parameter-free codec: space-to-depth of the [-1, 1] image by ``factor``.

  latents[b, i, j, (p * f + q) * 3 + c] = images[b, i * f + p, j * f + q, c] (TF space_to_depth
  order, einops "b (h p) (w q) c -> b h w (p q c)"); decode is the exact inverse.
  """

  def __init__(self, factor: int = 2, channels: int = 3):
    if not isinstance(factor, int) or factor <= 0:
      raise ValueError(f"PixelCodec.factor must be a positive int, got {factor!r}")
    self.factor = factor
    self.channels = channels
    self.downsample = factor
    self.latent_channels = channels * factor * factor

  def init_params(self, rng: jax.Array, image_size: int | Sequence[int]) -> Params:
    del rng
    _check_hw("PixelCodec", *_hw(image_size), self.factor)
    return {}

  def encode(self, params: Params, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    del params, rng
    b, h, w, c = images.shape
    f = self.factor
    _check_hw("PixelCodec.encode", h, w, f)
    x = images.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // f, w // f, f * f * c)

  def moments(self, params: Params, images: jax.Array) -> tuple[jax.Array, None]:
    return self.encode(params, images), None

  def latent_from_moments(
    self, mean: jax.Array, std: None = None, noise: jax.Array | None = None
  ) -> jax.Array:
    del std, noise
    return mean.astype(jnp.float32)

  def decode(self, params: Params, latents: jax.Array) -> jax.Array:
    del params
    b, h, w, _ = latents.shape
    f, c = self.factor, self.channels
    x = latents.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * f, w * f, c)

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    _check_hw("PixelCodec", height, width, self.factor)
    return height // self.factor, width // self.factor, self.latent_channels

  def __repr__(self) -> str:
    return f"PixelCodec(factor={self.factor})"


class VAECodec:
  """``AutoencoderKL`` as a codec: latents = (z - shift_factor) * scaling_factor.

  ``params`` is the unboxed "params" collection of ``AutoencoderKL(config)``. ``encode`` uses the
  posterior mean, or a sample mean + std * noise when ``rng`` is given (std = exp(logvar / 2);
  ``moments`` gives mean and std, ``latent_from_moments`` the latent from them).
  """

  def __init__(self, config: VAEConfig | None = None):
    self.config = config if config is not None else VAE_VARIANTS["flux"]
    self.module = AutoencoderKL(self.config)
    self.latent_channels = self.config.latent_channels
    self.downsample = self.config.downsample

  def init_params(self, rng: jax.Array, image_size: int | Sequence[int]) -> Params:
    """Random-init params (unboxed "params" collection), initialised under one ``jax.jit``.

    The parameters do not depend on the image size, which is only validated; the trace uses the
    smallest valid size. For the logical axis names use ``jax.eval_shape(self.module.init, ...)``.
    (On CPU, compiling threefry initialisers is slow; an ``impl="rbg"`` key is several times
    cheaper to compile.)
    """
    _check_hw("VAECodec", *_hw(image_size), self.downsample)
    f = self.downsample
    x = jnp.zeros((1, f, f, self.config.in_channels), jnp.float32)
    return nn.meta.unbox(jax.jit(self.module.init)(rng, x)["params"])

  def encode(self, params: Params, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    mean, logvar = self.module.apply({"params": params}, images, method=AutoencoderKL.encode)
    if rng is None:
      return self.latent_from_moments(mean, None)
    std = jnp.exp(0.5 * logvar)
    return self.latent_from_moments(mean, std, jax.random.normal(rng, mean.shape, mean.dtype))

  def moments(self, params: Params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean, logvar = self.module.apply({"params": params}, images, method=AutoencoderKL.encode)
    return mean, jnp.exp(0.5 * logvar)

  def latent_from_moments(
    self, mean: jax.Array, std: jax.Array | None, noise: jax.Array | None = None
  ) -> jax.Array:
    z = mean.astype(jnp.float32)
    if std is not None and noise is not None:
      z = z + std.astype(jnp.float32) * noise.astype(jnp.float32)
    return (z - self.config.shift_factor) * self.config.scaling_factor

  def decode(self, params: Params, latents: jax.Array) -> jax.Array:
    z = latents.astype(jnp.float32) / self.config.scaling_factor + self.config.shift_factor
    return self.module.apply({"params": params}, z, method=AutoencoderKL.decode)

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    _check_hw("VAECodec", height, width, self.downsample)
    return height // self.downsample, width // self.downsample, self.latent_channels

  def __repr__(self) -> str:
    return f"VAECodec({self.config})"


def _make_vae(variant: str = "flux", config: VAEConfig | None = None, **overrides: Any) -> VAECodec:
  if config is None:
    if variant not in VAE_VARIANTS:
      raise ValueError(f"unknown VAE variant {variant!r}; choose from {sorted(VAE_VARIANTS)}")
    config = VAE_VARIANTS[variant]
  return VAECodec(dataclasses.replace(config, **overrides) if overrides else config)


CODECS: dict[str, Callable[..., LatentCodec]] = {"vae": _make_vae, "pixel": PixelCodec}


def make_codec(kind: str, **kwargs: Any) -> LatentCodec:
  """Builds a codec by name: "pixel" (factor=2) or "vae" (variant="flux"|"tiny", or config=,
  plus VAEConfig field overrides)."""
  if kind not in CODECS:
    raise ValueError(f"unknown codec kind {kind!r}; choose from {sorted(CODECS)}")
  return CODECS[kind](**kwargs)
