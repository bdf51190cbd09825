"""Robust decoding of untrusted images and captions, shared by ``iomm-prepare`` and training.

``load_image`` turns encoded bytes (or a decoded array, as tfds yields) into a square uint8
[S, S, 3] RGB array, or raises ``BadRecord`` with a short machine-readable ``reason``. Nothing
else escapes: every hostile input is either fixed (and the fix is visible in the pixels) or
refused with one of ``SKIP_REASONS``. The policy, decided once here:

* Refused: zero-byte input (``empty``), bytes no decoder recognises (``not_an_image``), truncated
  or corrupt files (``corrupt``: Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off; also a PNG whose
  header declares more pixel data than its bytes can hold at deflate's best ratio, refused
  before Pillow allocates the declared image), more than
  ``max_pixels`` pixels read from the header before decoding, or a Pillow
  ``DecompressionBombWarning`` / ``Error`` (``too_many_pixels``; ``Image.MAX_IMAGE_PIXELS`` is
  never changed globally), longer side / shorter side above ``max_aspect`` (``extreme_aspect``:
  a centre crop of a 1x4000 strip would keep 0.025 % of it, so it is skipped, not cropped), and
  shorter side below ``min_size`` (``too_small``; anything between ``min_size`` and the target
  is upscaled).
* Converted: EXIF orientation applied (``ImageOps.exif_transpose``: orientation 6 swaps the
  dimensions); palette (``P``) expanded to its colours; grey (``1``, ``L``) replicated to RGB;
  ``CMYK`` / ``YCbCr`` / ``LAB`` by Pillow's conversion (no ICC colour management: approximate
  for print CMYK); 16-bit grey (``I;16*``, ``I``) scaled by 255 / 65535 with rounding; float
  (``F``) clipped to [0, 255]; any alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency)
  composited over white, the background most image viewers show.
* Resized: the shorter side to ``resolution`` with Lanczos (antialiased) resampling, then the
  centre square (one ``resize`` with a crop box). JPEGs are first decoded at the smallest DCT
  scale that still covers the target (``Image.draft``), which is several times faster at 512 px.

Captions (``clean_caption``): bytes are decoded as UTF-8 (a BOM dropped); UTF-16 (a UTF-16 BOM,
or without one the NUL-byte pattern of mostly-ASCII text, every other byte zero) is decoded as
such and counted as ``caption_utf16``; bytes that are not valid UTF-8 are decoded with U+FFFD
replacement characters and counted as ``caption_not_utf8`` (as are text captions holding lone
surrogates, which no UTF-8 writer accepts). Surrounding whitespace is stripped and inner runs
of whitespace become one space; an empty result means "no caption" (``caption_empty``); more
than ``max_caption_chars`` characters are cut at the last space before the limit
(``caption_truncated``).
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SKIP_REASONS = (
  "empty",
  "not_an_image",
  "corrupt",
  "too_many_pixels",
  "extreme_aspect",
  "too_small",
  "no_image",  # a caption / sidecar without an image (tar shards, parquet nulls)
  "duplicate_key",
  "unreadable",  # the file or directory could not be read at all (permissions, vanished)
  "not_a_file",  # a FIFO, device or socket with an image name: never opened
  "too_large",  # a file over --max-file-bytes: never read
)
_WHITESPACE = re.compile(r"\s+")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadRecord(Exception):
  """A record that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
  """What ``load_image`` accepts and produces (see the module docstring)."""

  resolution: int = 512  # output side in pixels
  min_size: int = 128  # shorter sides below this are skipped; between this and resolution upscaled
  max_aspect: float = 4.0  # longer / shorter side above this is skipped
  max_pixels: int = 64_000_000  # width x height above this is refused before decoding

  def __post_init__(self):
    if self.resolution <= 0:
      raise ValueError(f"resolution={self.resolution} must be positive")
    if self.min_size < 0:
      raise ValueError(f"min_size={self.min_size} must be >= 0")
    if self.max_aspect < 1.0:
      raise ValueError(f"max_aspect={self.max_aspect} must be >= 1")
    if self.max_pixels <= 0:
      raise ValueError(f"max_pixels={self.max_pixels} must be positive")


def _open(data: bytes, name: str) -> Image.Image:
  where = f"{name}: " if name else ""
  if not data:
    raise BadRecord("empty", f"{where}zero bytes")
  try:
    return Image.open(io.BytesIO(data))
  except UnidentifiedImageError:  # its message names the BytesIO object, not the file
    raise BadRecord(
      "not_an_image", f"{where}no image format recognised ({len(data)} bytes, {data[:8]!r}...)"
    ) from None
  except (OSError, SyntaxError, ValueError) as e:
    raise BadRecord("corrupt", f"{where}{str(e)[:200]}") from None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
_DEFLATE_MAX_RATIO = 1032  # deflate's ceiling: a 258-byte match in as little as 2 bits


def _check_png_payload(img: Image.Image, data: bytes, name: str) -> None:
  """Refuses a PNG whose header declares more filtered scanline bytes than ``data`` could
  inflate to (the non-interlaced size: a lower bound, so no valid PNG is refused)."""
  if img.format != "PNG" or data[12:16] != b"IHDR" or len(data) < 26:
    return
  depth, colour = data[24], data[25]
  w, h = img.size
  raw = h * (1 + -(-w * depth * _PNG_CHANNELS.get(colour, 1) // 8))
  if raw > _DEFLATE_MAX_RATIO * len(data) + 1024:
    where = f"{name}: " if name else ""
    raise BadRecord(
      "corrupt",
      f"{where}declares {w}x{h} ({raw} bytes of pixel data) but holds only {len(data)} bytes",
    )


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any Pillow mode -> RGB (palette expanded, alpha over white, 16-bit scaled)."""
  mode = img.mode
  if mode == "P" or mode == "PA":
    img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
    mode = img.mode
  if mode.startswith("I;16") or mode == "I":
    a = np.asarray(img, dtype=np.float64)
    a = np.round(np.clip(a, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if mode == "F":
    a = np.round(np.clip(np.asarray(img, np.float64), 0, 255)).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if mode in _ALPHA_MODES:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img if mode == "RGB" else img.convert("RGB")


def _square(img: Image.Image, resolution: int) -> Image.Image:
  """Centre square of ``img`` resized to ``resolution`` (Lanczos), in one resampling pass."""
  w, h = img.size
  if w == h == resolution:  # already prepared at this size (training-time reads)
    return img
  side = min(w, h)
  left, top = (w - side) / 2, (h - side) / 2
  box = (left, top, left + side, top + side)
  return img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)


def load_image(data: bytes | np.ndarray, policy: ImagePolicy, name: str = "") -> np.ndarray:
  """Encoded image bytes (or a uint8 [H, W, C] array) -> uint8 [S, S, 3], S = resolution.

  ``name`` (a file name, a tar member) prefixes the details of refusals that concern the bytes.

  Raises:
    BadRecord: the input is refused (its ``reason`` says why).
  """
  with warnings.catch_warnings():
    # A decompression bomb warning is an error here, scoped to this call only.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    try:
      if isinstance(data, np.ndarray):
        img = _from_array(data)
        orig = img.size
      else:
        data = bytes(data)
        img = _open(data, name)
        orig = img.size
        _check_geometry(orig, policy)  # the declared size, before anything is decoded
        _check_png_payload(img, data, name)
        if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
          # Orientation 5-8 swap the axes, but draft keeps both sides >= the request anyway.
          img.draft(img.mode, (policy.resolution, policy.resolution))
        img.load()
        img = ImageOps.exif_transpose(img)
      _check_geometry(orig, policy)
      img = _to_rgb(img)
      out = _square(img, policy.resolution)
      return np.asarray(out, np.uint8)
    except BadRecord:
      raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      raise BadRecord("too_many_pixels", str(e)[:200]) from None
    except Exception as e:  # any decoder failure on hostile bytes (OSError, struct.error, ...)
      where = f"{name}: " if name else ""
      raise BadRecord("corrupt", f"{where}{type(e).__name__}: {str(e)[:200]}") from None


def _from_array(a: np.ndarray) -> Image.Image:
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
    raise BadRecord("corrupt", f"array of shape {a.shape} and dtype {a.dtype} is not an image")
  if a.size == 0:
    raise BadRecord("empty", f"array of shape {a.shape}")
  return Image.fromarray(np.ascontiguousarray(a))


def _check_geometry(size: tuple[int, int], policy: ImagePolicy) -> None:
  w, h = size
  if w <= 0 or h <= 0:
    raise BadRecord("corrupt", f"size {w}x{h}")
  if w * h > policy.max_pixels:
    raise BadRecord("too_many_pixels", f"{w}x{h} > max_pixels={policy.max_pixels}")
  if max(w, h) / min(w, h) > policy.max_aspect:
    raise BadRecord("extreme_aspect", f"{w}x{h}, aspect > max_aspect={policy.max_aspect:g}")
  if min(w, h) < policy.min_size:
    raise BadRecord("too_small", f"{w}x{h}, shorter side < min_size={policy.min_size}")


def clean_caption(
  raw: str | bytes | None, max_chars: int = 2000, fixes: dict[str, int] | None = None
) -> str | None:
  """A caption per the module docstring's policy; None when missing or empty.

  ``fixes``: counts of the repairs made (``caption_not_utf8``, ``caption_empty``,
  ``caption_truncated``), incremented in place.
  """

  def note(what):
    if fixes is not None:
      fixes[what] = fixes.get(what, 0) + 1

  if raw is None:
    return None
  if isinstance(raw, bytes | bytearray | memoryview):
    raw = bytes(raw)
    utf16 = _utf16_codec(raw)
    if utf16:
      raw = raw.decode(utf16, errors="replace")
      note("caption_utf16")
    else:
      try:
        raw = raw.decode("utf-8-sig")
      except UnicodeDecodeError:
        raw = raw.decode("utf-8", errors="replace")
        note("caption_not_utf8")
  if not isinstance(raw, str):
    raw = str(raw)
  try:
    raw.encode("utf-8")
  except UnicodeEncodeError:  # lone surrogates (a JSON "\udce9" escape): not writable as UTF-8
    raw = raw.encode("utf-8", errors="replace").decode("utf-8")
    note("caption_not_utf8")
  text = _WHITESPACE.sub(" ", raw).strip()
  if not text:
    note("caption_empty")
    return None
  if len(text) > max_chars:
    cut = text[:max_chars]
    space = cut.rfind(" ")
    text = (cut[:space] if space > max_chars // 2 else cut).rstrip()
    note("caption_truncated")
  return text


def _utf16_codec(raw: bytes) -> str | None:
  """The UTF-16 codec of ``raw`` if it has a UTF-16 BOM, or (no BOM) one byte of each pair is
  zero in at least half the pairs and the other almost never: mostly-ASCII UTF-16 text, which
  UTF-8 would otherwise read as text full of NULs. None otherwise."""
  if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
    return "utf-16"  # reads and drops the BOM
  if len(raw) < 2 or b"\0" not in raw:
    return None
  even, odd = raw[0::2], raw[1::2]
  n = len(raw) // 2
  for zeros, other, codec in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
    if zeros.count(0) >= max(1, n / 2) and other.count(0) <= n / 10:
      return codec
  return None
