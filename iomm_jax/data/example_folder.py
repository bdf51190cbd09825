"""A folder of photo-like images with caption sidecars, for trying the own-data path without
data of your own (and for its tests): ``python -m iomm_jax.data.example_folder --out DIR``.

Each image is a scene at 64 px: a background (a sky over grass, a beach under a sky, or a wall
over a floor: gradients, texture noise, a horizon) and one object (a ball, a box, a tree or a
cup) in one of four colours, shaded and with sensor noise and JPEG-like blur. The sidecar
``NAME.txt`` holds its caption, e.g. "a red ball on the grass". Deterministic in ``--seed``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "yellow": (225, 200, 40),
           "green": (40, 160, 60)}  # fmt: skip
OBJECTS = ("ball", "box", "tree", "cup")
BACKGROUNDS = {"grass": "on the grass", "beach": "on the beach", "room": "in a room"}
SIZE = 64


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
  y = np.linspace(0.0, 1.0, SIZE)[:, None, None]
  horizon = rng.uniform(0.45, 0.6)
  top, bottom = {
    "grass": ((110, 160, 230), (60, 140, 50)),
    "beach": ((120, 170, 235), (215, 195, 140)),
    "room": ((190, 180, 165), (120, 90, 60)),
  }[kind]
  img = np.where(y < horizon, np.array(top) * (0.8 + 0.3 * y), np.array(bottom) * (1.1 - 0.3 * y))
  img = np.broadcast_to(img, (SIZE, SIZE, 3)).copy()
  img += rng.normal(0.0, 10.0, (SIZE, SIZE, 1))  # texture
  return img


def _object(img: np.ndarray, kind: str, colour: tuple[int, int, int], rng) -> np.ndarray:
  pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
  d = ImageDraw.Draw(pil)
  cx, cy, r = rng.integers(20, 44), rng.integers(30, 46), int(rng.integers(8, 14))
  dark = tuple(int(c * 0.6) for c in colour)
  if kind == "ball":
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=dark)
    d.ellipse((cx - r // 2, cy - r // 2, cx - r // 6, cy - r // 6), fill=(250, 250, 250))
  elif kind == "box":
    d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=dark)
    d.polygon([(cx - r, cy - r), (cx - r // 2, cy - 3 * r // 2), (cx + 3 * r // 2, cy - 3 * r // 2),
               (cx + r, cy - r)], fill=dark)  # fmt: skip
  elif kind == "tree":
    d.rectangle((cx - 2, cy, cx + 2, cy + r + 4), fill=(100, 70, 40))
    d.polygon([(cx, cy - 2 * r), (cx - r, cy + 2), (cx + r, cy + 2)], fill=colour, outline=dark)
  else:  # cup
    d.rectangle((cx - r // 2 - 2, cy - r // 2, cx + r // 2 + 2, cy + r), fill=colour, outline=dark)
    d.arc((cx + r // 2, cy - r // 4, cx + r, cy + r // 2), -90, 90, fill=dark, width=2)
  return np.asarray(pil.filter(ImageFilter.GaussianBlur(0.6)), np.float64)


def make_image(index: int, seed: int = 0) -> tuple[np.ndarray, str]:
  """(uint8 [64, 64, 3] image, caption) of scene ``index``."""
  rng = np.random.default_rng((seed, index))
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  obj = OBJECTS[rng.integers(len(OBJECTS))]
  bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
  img = _object(_background(bg, rng), obj, COLOURS[colour], rng)
  img += rng.normal(0.0, 4.0, img.shape)  # sensor noise
  return np.clip(img, 0, 255).astype(np.uint8), f"a {colour} {obj} {BACKGROUNDS[bg]}"


def write_folder(out: str, num: int, seed: int = 0, uncaptioned: float = 0.1) -> None:
  """``num`` PNGs ``img_00000.png`` ... into ``out``, each with a ``.txt`` caption except a
  share ``uncaptioned`` of them (image-only records, as a real folder has)."""
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng((seed, 1 << 30))
  for i in range(num):
    img, caption = make_image(i, seed)
    name = os.path.join(out, f"img_{i:05d}")
    Image.fromarray(img).save(name + ".png")
    if rng.random() >= uncaptioned:
      with open(name + ".txt", "w") as f:
        f.write(caption + "\n")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="folder to write")
  p.add_argument("--num", type=int, default=2000, help="images")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--uncaptioned", type=float, default=0.1, help="share without a caption")
  a = p.parse_args(argv)
  write_folder(a.out, a.num, a.seed, a.uncaptioned)
  print(f"wrote {a.num} images (and their captions) to {a.out}")


if __name__ == "__main__":
  main()
