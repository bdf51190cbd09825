"""Generates every hostile input case into a folder, with the outcome each must have.

``make_hostile_folder(root)`` writes the files and returns ``{file: Expect}``; decoding runs with
``POLICY`` (32 px output, shorter sides below 16 skipped). Images are uniform (or two flat
halves) so the resize leaves known pixel values.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import zlib

import numpy as np
from PIL import Image

from iomm_jax.data import decode

POLICY = decode.ImagePolicy(resolution=32, min_size=16, max_aspect=4.0, max_pixels=64_000_000)
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
LONG_CAPTION = "word " * 600  # 3000 characters, cut to the 2000-character default


@dataclasses.dataclass(frozen=True)
class Expect:
  """``reason``: the skip reason, or None when the image is kept; ``rgb``: its uniform colour
  (None: checked separately); ``caption``: the cleaned caption kept with it."""

  reason: str | None = None
  rgb: tuple[int, int, int] | None = None
  caption: str | None = None


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
  """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
  small = encode(Image.new("L", (1, 1)), "PNG")
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  chunk = b"IHDR" + ihdr
  return (
    small[:8]
    + struct.pack(">I", 13)
    + chunk
    + struct.pack(">I", zlib.crc32(chunk))
    + (small[8 + 25 :])
  )


def exif_rotated() -> bytes:
  """80x40 JPEG, left half red, right half blue, EXIF orientation 6 (display rotated 90° CW:
  upright it is 40x80 with red on top)."""
  a = np.zeros((40, 80, 3), np.uint8)
  a[:, :40] = RED
  a[:, 40:] = BLUE
  exif = Image.Exif()
  exif[0x0112] = 6
  return encode(Image.fromarray(a), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())


def cases() -> dict[str, tuple[bytes, Expect]]:
  """file name -> (bytes, expected outcome)."""
  rng = np.random.default_rng(0)
  noise = Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8))
  jpg, png = encode(noise, "JPEG"), encode(noise, "PNG")
  webp = encode(Image.new("RGB", (64, 64), (10, 20, 30)), "WEBP")
  pal = Image.new("P", (40, 40), 1)
  pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
  pal_t = pal.copy()
  pal_t.info["transparency"] = 1
  i16 = Image.fromarray(np.full((40, 40), 128 * 257, np.uint16))
  return {
    "ok.jpg": (jpg, Expect(None, None, "hello world")),
    "ok.png": (png, Expect("duplicate_key")),  # same key "ok" as ok.jpg, which comes first
    "truncated.jpg": (jpg[: len(jpg) // 2], Expect("corrupt")),
    "truncated_png.png": (png[: len(png) // 2], Expect("corrupt")),
    "corrupt.webp": (webp[:40] + b"\0" * (len(webp) - 40), Expect("corrupt")),
    "zero.jpg": (b"", Expect("empty")),
    "text.png": (b"this is not an image, just text\n", Expect("not_an_image")),
    "cmyk.jpg": (
      encode(Image.new("CMYK", (40, 40), (255, 0, 0, 0)), "JPEG"),
      Expect(rgb=(0, 255, 255)),
    ),
    "grey.png": (encode(Image.new("L", (40, 40), 100), "PNG"), Expect(rgb=(100, 100, 100))),
    "la.png": (encode(Image.new("LA", (40, 40), (50, 0)), "PNG"), Expect(rgb=WHITE)),
    "palette.png": (encode(pal, "PNG"), Expect(rgb=(10, 200, 30))),
    "palette_transparent.png": (encode(pal_t, "PNG"), Expect(rgb=WHITE)),
    "rgba_clear.png": (
      encode(Image.new("RGBA", (40, 40), (255, 0, 0, 0)), "PNG"),
      Expect(rgb=WHITE),
    ),
    "rgba_half.png": (
      encode(Image.new("RGBA", (40, 40), (255, 0, 0, 128)), "PNG"),
      Expect(rgb=(255, 127, 127)),
    ),
    "i16.png": (encode(i16, "PNG"), Expect(rgb=(128, 128, 128))),
    "exif6.jpg": (exif_rotated(), Expect()),
    "strip.png": (encode(Image.new("L", (1, 4000), 9), "PNG"), Expect("extreme_aspect")),
    "tiny.png": (encode(Image.new("RGB", (8, 8), RED), "PNG"), Expect("too_small")),
    "upscaled.png": (encode(Image.new("RGB", (20, 20), BLUE), "PNG"), Expect(rgb=BLUE)),
    "bomb.png": (png_header_only(30000, 30000), Expect("too_many_pixels")),  # Pillow's error
    "bomb_warn.png": (png_header_only(10000, 9000), Expect("too_many_pixels")),  # over 89 M
  }


# Sidecar captions of the folder case: stem -> bytes (written as <stem>.txt unless noted).
SIDECARS = {
  "ok": b"  hello \n  world  ",
  "grey": b" \t\n ",  # whitespace only: no caption
  "la": b"caf\xe9 au lait",  # Latin-1, not UTF-8
  "palette": LONG_CAPTION.encode(),
  "upscaled.json": json.dumps({"caption": "from a json sidecar"}).encode(),
}
CAPTIONS = {
  "ok": "hello world",
  "grey": None,
  "la": "caf\ufffd au lait",
  "palette": ("word " * 400).strip(),
  "upscaled": "from a json sidecar",
}


def make_hostile_folder(root: str) -> dict[str, Expect]:
  """Writes ``cases()`` and ``SIDECARS`` under ``root`` (some in a subfolder with a symlink
  loop back to ``root``); returns {relative path: Expect}."""
  os.makedirs(os.path.join(root, "sub"), exist_ok=True)
  out = {}
  for name, (data, expect) in cases().items():
    rel = name if not name.startswith(("rgba", "i16")) else f"sub/{name}"
    with open(os.path.join(root, rel), "wb") as f:
      f.write(data)
    out[rel] = expect
  for stem, data in SIDECARS.items():
    name = stem if "." in stem else f"{stem}.txt"
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
  os.symlink("..", os.path.join(root, "sub", "loop"))  # root/sub/loop -> root: a cycle
  return out
