"""Procedural "shapes world": scenes, renderer, GenEval-style captions and a held-out prompt set.

The world is designed for learnability by a tiny model at a small canvas (default 32x32):

* The canvas is split into a coarse ``grid x grid`` lattice of cells (default 2x2). Each object
  occupies one cell (at most one object per cell), with a small jitter of its centre and one of a
  few discrete sizes, and always keeps a 1 px margin to its cell border, so objects never touch
  and stay recognisable after rendering.
* Objects are flat-coloured circles, squares and triangles (optionally diamonds) in a small,
  well-separated palette (``PALETTE``) on a plain background (white by default).
* Rendering supersamples (default 4x) and box-downsamples, giving crisp shapes with light
  anti-aliasing. It is fully deterministic: a scene holds every random choice.

Captions follow the six GenEval categories with GenEval's wording (``CATEGORIES``):

=============  ===============================================================
single_object  ``a photo of a {shape}``
two_object     ``a photo of a {shape} and a {shape}`` (two different shapes)
counting       ``a photo of {two|three|four} {shape}s``
colors         ``a photo of a {color} {shape}``
position       ``a photo of a {shape A} {left of|right of|above|below} a {shape B}``
color_attr     ``a photo of a {color} {shape} and a {color} {shape}`` (different shapes and
               different colours)
=============  ===============================================================

The indefinite article follows GenEval too: "an" before a vowel ("a photo of an orange circle").
Position follows GenEval's convention: "a photo of A right of B" means A is to the right of B.
Position prompts carry no colours (as in GenEval); colours of position scenes are random. A
position scene places A and B in different columns (left/right) or different rows (above/below);
the other axis is random, so a diagonal layout may satisfy two relations at once, which is still
true to the caption.

Each prompt comes with a GenEval-like metadata dict::

  {"tag": category, "include": [{"class": shape, "count": n, "color"?: c,
   "position"?: [relation, index]}], "exclude"?: [...], "prompt": caption}

For position the reference object B is ``include[0]`` and A is ``include[1]`` with
``"position": [relation, 0]``; counting adds ``"exclude": [{"class": shape, "count": n + 1}]``
so that counts are exact, exactly as in GenEval's metadata.

A descriptive caption (``describe``) such as "a red circle above a blue square" or "two green
triangles and a red circle" is used for MLLM captioning pre-training.

Hold-out rules (``WorldConfig.holdout``): for each category the full, finite prompt space is
enumerated and a seeded subset of it is held out. ``"v1"`` holds out a third, rounded up (default
3-shape world: single_object 3 -> 1, two_object 6 -> 2, counting 9 -> 3, colors 18 -> 6,
position 24 -> 8, color_attr 180 -> 60). ``"v2"`` holds out at least ``V2_MIN_HELDOUT`` (8)
prompts per category and at least a third (the 8-shape world of ``V2_SHAPES``: single_object 8 ->
8, two_object 56 -> 19, counting 24 -> 8, colors 48 -> 16, position 224 -> 75, color_attr 1680 ->
560), so that every category's score rests on at least 8 distinct prompts. The subset is redrawn
until every slot value (shape, colour, number, relation) used by several prompts of the category
still occurs in one of its training prompts; single_object prompts each hold a distinct shape, so
a held-out "a photo of a square" is learnt only through the other categories ("a photo of a
square and a circle", "a photo of a red square", ...); under v2 every single_object prompt is
held out. Held-out strings never appear in training (``sample_pair`` and ``make_pair_set``
exclude them, ``all_caption_corpus`` too) while every word does. ``eval_prompts`` returns the
first ``per_category`` held-out prompts of each category.

Shapes (``KNOWN_SHAPES``): circle, square, triangle (apex up), diamond, ring and frame (a circle
and a square with a hole of half their extent), and the wide rectangle and oval (twice as wide
as tall). A world uses at least three of them. (A plus-shaped cross was tried and dropped: at
7-10 px it renders too close to a diamond for a detector to tell them apart.)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import zlib
from typing import Any

import numpy as np

from iomm_jax.configs.base import AUX_PROMPT  # the auxiliary reconstruction prompt

PALETTE: dict[str, tuple[int, int, int]] = {
  "red": (220, 30, 30),
  "orange": (245, 125, 20),
  "yellow": (240, 215, 30),
  "green": (35, 160, 55),
  "cyan": (25, 190, 210),
  "blue": (35, 75, 225),
  "purple": (135, 50, 185),
  "black": (25, 25, 25),
  "white": (250, 250, 250),
}
"""Named object colours (RGB). Any two differ by at least ``MIN_COLOR_SEPARATION``."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
  "white": (255, 255, 255),
  "gray": (128, 128, 128),
  "black": (0, 0, 0),
}
"""Named background colours; ``WorldConfig.background`` also accepts an RGB triple."""

KNOWN_SHAPES = ("circle", "square", "triangle", "diamond", "ring", "frame", "rectangle", "oval")
V1_SHAPES = ("circle", "square", "triangle")
"""The shapes of the first world (hold-out v1; ``WorldConfig``'s default)."""
V2_SHAPES = KNOWN_SHAPES
"""The shapes of the second world (hold-out v2): eight, so single_object has 8 prompts."""
WIDE_SHAPES = ("rectangle", "oval")
"""Shapes twice as wide as tall (their extent is their width)."""
HOLE = 0.5
"""Side of a ring's (round) or a frame's (square) hole as a fraction of its extent."""
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {
  1: "a",
  2: "two",
  3: "three",
  4: "four",
  5: "five",
  6: "six",
  7: "seven",
  8: "eight",
  9: "nine",
}
MAX_COUNTING = 4
"""Counting prompts use GenEval's range, two to four (further capped by ``max_count``)."""

DESCRIPTIVE = "descriptive"
"""Tag of descriptive-caption pairs (unconstrained scenes), see ``sample_pair``."""

MARGIN_PX = 1.0
"""Minimum distance (pixels) between an object's extent and its cell border."""
MIN_OBJECT_PX = 6.0
"""Smallest allowed object extent in pixels."""
MIN_COLOR_SEPARATION = 80.0
"""Minimum RGB distance between two world colours."""
MIN_BACKGROUND_SEPARATION = 100.0
"""Minimum RGB distance between a world colour and the background."""
POSITION_MARGIN = 0.5
"""A position relation holds when the centroids differ by more than this fraction of a cell
along the relation's axis (see ``relation_holds``)."""
HOLDOUT_VERSIONS = ("v1", "v2")
V2_MIN_HELDOUT = 8
"""Hold-out v2: the fewest held-out prompts of a category (all of them if it has fewer)."""


def _rgb_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorldConfig:
  """Parameters of the shapes world.

  Attributes:
    canvas: image side in pixels.
    grid: cells per side; objects sit one per cell.
    shapes: shape names (at least 3 of ``KNOWN_SHAPES``).
    colors: colour names from ``PALETTE`` (at least 2).
    size_range: (min, max) object extent as a fraction of the cell side.
    size_levels: number of discrete sizes, evenly spaced over ``size_range``.
    jitter: maximum centre offset as a fraction of the cell side (further limited so the object
      keeps ``MARGIN_PX`` to its cell border).
    background: a ``BACKGROUNDS`` name or an RGB triple.
    max_count: most objects in a scene (2 to grid * grid).
    supersample: anti-aliasing factor of the renderer.
    holdout: the hold-out version (``HOLDOUT_VERSIONS``) that splits each category's prompts
      into training and evaluation prompts.
  """

  canvas: int = 32
  grid: int = 2
  shapes: tuple[str, ...] = V1_SHAPES
  colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
  size_range: tuple[float, float] = (0.6, 0.8)
  size_levels: int = 3
  jitter: float = 0.1
  background: str | tuple[int, int, int] = "white"
  max_count: int = 4
  supersample: int = 4
  holdout: str = "v1"

  def __post_init__(self) -> None:
    def fail(name: str, msg: str) -> None:
      raise ValueError(f"WorldConfig.{name}: {msg} (got {getattr(self, name)!r})")

    for name in ("shapes", "colors", "size_range"):
      if isinstance(getattr(self, name), str):
        fail(name, "must be a sequence, not a string")
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if not isinstance(self.background, str):
      object.__setattr__(self, "background", tuple(int(v) for v in self.background))

    if not isinstance(self.canvas, int) or self.canvas < 16:
      fail("canvas", "must be an int >= 16")
    if not isinstance(self.grid, int) or self.grid < 2:
      fail("grid", "must be an int >= 2")
    if self.cell < 8:
      fail("grid", f"cells must be >= 8 px; canvas {self.canvas} / grid gives {self.cell:.1f}")
    unknown = [s for s in self.shapes if s not in KNOWN_SHAPES]
    if unknown:
      fail("shapes", f"unknown shapes {unknown}; known: {KNOWN_SHAPES}")
    if len(set(self.shapes)) != len(self.shapes) or len(self.shapes) < 3:
      fail("shapes", "must hold at least 3 distinct shapes")
    unknown = [c for c in self.colors if c not in PALETTE]
    if unknown:
      fail("colors", f"unknown colours {unknown}; known: {tuple(PALETTE)}")
    if len(set(self.colors)) != len(self.colors) or len(self.colors) < 2:
      fail("colors", "must hold at least 2 distinct colours")
    for i, a in enumerate(self.colors):
      for b in self.colors[i + 1 :]:
        if _rgb_distance(PALETTE[a], PALETTE[b]) < MIN_COLOR_SEPARATION:
          fail("colors", f"{a!r} and {b!r} are too similar")
    if isinstance(self.background, str):
      if self.background not in BACKGROUNDS:
        fail("background", f"unknown background; known: {tuple(BACKGROUNDS)} or an RGB triple")
    elif len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
      fail("background", "must be a name or an RGB triple of 0..255")
    for c in self.colors:
      if _rgb_distance(PALETTE[c], self.background_rgb) < MIN_BACKGROUND_SEPARATION:
        fail("background", f"too close to object colour {c!r}")
    if len(self.size_range) != 2 or not 0 < self.size_range[0] <= self.size_range[1]:
      fail("size_range", "must be (min, max) with 0 < min <= max")
    if self.size_range[1] * self.cell > self.cell - 2 * MARGIN_PX:
      fail(
        "size_range", f"max size must leave a {MARGIN_PX:g} px margin in a {self.cell:.1f} px cell"
      )
    if self.size_range[0] * self.cell < MIN_OBJECT_PX:
      fail("size_range", f"min size is below {MIN_OBJECT_PX:g} px in a {self.cell:.1f} px cell")
    if not isinstance(self.size_levels, int) or self.size_levels < 1:
      fail("size_levels", "must be an int >= 1")
    if not 0 <= self.jitter <= 0.25:
      fail("jitter", "must be in [0, 0.25]")
    if not isinstance(self.max_count, int) or not 2 <= self.max_count <= self.grid**2:
      fail("max_count", f"must be an int in [2, grid * grid = {self.grid**2}]")
    if not isinstance(self.supersample, int) or not 1 <= self.supersample <= 8:
      fail("supersample", "must be an int in [1, 8]")
    if self.holdout not in HOLDOUT_VERSIONS:
      fail("holdout", f"unknown hold-out version; known: {HOLDOUT_VERSIONS}")

  @property
  def cell(self) -> float:
    """Cell side in pixels."""
    return self.canvas / self.grid

  @property
  def background_rgb(self) -> tuple[int, int, int]:
    """Background as an RGB triple."""
    if isinstance(self.background, str):
      return BACKGROUNDS[self.background]
    return self.background  # type: ignore[return-value]

  @property
  def sizes(self) -> tuple[float, ...]:
    """Discrete object sizes as fractions of the cell side."""
    lo, hi, n = *self.size_range, self.size_levels
    return (float(lo),) if n == 1 else tuple(lo + (hi - lo) * i / (n - 1) for i in range(n))

  @property
  def counting_numbers(self) -> tuple[int, ...]:
    """Counts used by counting prompts."""
    return tuple(range(2, min(MAX_COUNTING, self.max_count) + 1))


@dataclasses.dataclass(frozen=True)
class Obj:
  """One object: shape, colour, grid cell, centre (pixels, x right, y down) and extent (pixels)."""

  shape: str
  color: str
  row: int
  col: int
  cx: float
  cy: float
  size: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """A scene: objects in distinct cells (a list is stored as a tuple)."""

  objects: tuple[Obj, ...] = ()

  def __post_init__(self) -> None:
    object.__setattr__(self, "objects", tuple(self.objects))


# ------------------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, obj: Obj) -> np.ndarray:
  """Inside-test of ``obj`` at points (xs, ys) in pixel coordinates."""
  dx, dy, h = xs - obj.cx, ys - obj.cy, obj.size / 2
  if shape == "circle":
    return dx * dx + dy * dy <= h * h
  if shape == "square":
    return (np.abs(dx) <= h) & (np.abs(dy) <= h)
  if shape == "triangle":  # apex up, base at the bottom, bounding box size x size
    return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= h
  if shape == "ring":
    r2 = dx * dx + dy * dy
    return (r2 <= h * h) & (r2 >= (HOLE * h) ** 2)
  if shape == "frame":
    m = np.maximum(np.abs(dx), np.abs(dy))
    return (m <= h) & (m >= HOLE * h)
  if shape == "rectangle":  # twice as wide as tall
    return (np.abs(dx) <= h) & (np.abs(dy) <= h / 2)
  if shape == "oval":
    return (dx / h) ** 2 + (dy / (h / 2)) ** 2 <= 1.0
  raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, world: WorldConfig) -> np.ndarray:
  """Renders ``scene`` to a uint8 [canvas, canvas, 3] image (supersampled, box-downsampled)."""
  ss, n = world.supersample, world.canvas
  hi = np.empty((n * ss, n * ss, 3), np.float32)
  hi[...] = np.asarray(world.background_rgb, np.float32)
  for obj in scene.objects:
    h = obj.size / 2
    x0 = max(int(math.floor((obj.cx - h) * ss)) - 1, 0)
    x1 = min(int(math.ceil((obj.cx + h) * ss)) + 1, n * ss)
    y0 = max(int(math.floor((obj.cy - h) * ss)) - 1, 0)
    y1 = min(int(math.ceil((obj.cy + h) * ss)) + 1, n * ss)
    ys = (np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5) / ss
    xs = (np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5) / ss
    mask = _shape_mask(obj.shape, xs, ys, obj)
    hi[y0:y1, x0:x1][mask] = np.asarray(PALETTE[obj.color], np.float32)
  lo = hi.reshape(n, ss, n, ss, 3).mean(axis=(1, 3))
  return np.clip(np.round(lo), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------- captions


def article(word: str) -> str:
  """GenEval's indefinite article: "an" before a vowel ("an orange circle"), else "a"."""
  return "an" if word[:1] in "aeiou" else "a"


def plural(shape: str, count: int) -> str:
  """``shape`` with an ``s`` when ``count`` != 1 (every shape of ``KNOWN_SHAPES`` is regular)."""
  return shape if count == 1 else shape + "s"


def relation_holds(
  a_xy: tuple[float, float], b_xy: tuple[float, float], relation: str, world: WorldConfig
) -> bool:
  """Whether a point A is ``relation`` of B ("A right of B": A's x exceeds B's by the margin)."""
  margin = POSITION_MARGIN * world.cell
  dx, dy = a_xy[0] - b_xy[0], a_xy[1] - b_xy[1]
  if relation == "left of":
    return dx < -margin
  if relation == "right of":
    return dx > margin
  if relation == "above":
    return dy < -margin
  if relation == "below":
    return dy > margin
  raise ValueError(f"unknown relation {relation!r}; known: {RELATIONS}")


def _meta(tag: str, include: list[dict[str, Any]], prompt: str, exclude=None) -> dict[str, Any]:
  meta: dict[str, Any] = {"tag": tag, "include": include}
  if exclude:
    meta["exclude"] = exclude
  meta["prompt"] = prompt
  return meta


@functools.lru_cache(maxsize=64)
def _category_space(world: WorldConfig, category: str) -> tuple[tuple[tuple, dict[str, Any]], ...]:
  """All (slots, meta) of a category, in a canonical order (cached: never mutate the metas)."""
  shapes, colors = world.shapes, world.colors
  pairs = [(a, b) for a in shapes for b in shapes if a != b]
  out: list[tuple[tuple, dict[str, Any]]] = []
  if category == "single_object":
    for s in shapes:
      out.append(
        ((s,), _meta(category, [{"class": s, "count": 1}], f"a photo of {article(s)} {s}"))
      )
  elif category == "two_object":
    for a, b in pairs:
      inc = [{"class": a, "count": 1}, {"class": b, "count": 1}]
      out.append(
        ((a, b), _meta(category, inc, f"a photo of {article(a)} {a} and {article(b)} {b}"))
      )
  elif category == "counting":
    for s in shapes:
      for n in world.counting_numbers:
        prompt = f"a photo of {NUMBER_WORDS[n]} {plural(s, n)}"
        meta = _meta(category, [{"class": s, "count": n}], prompt, [{"class": s, "count": n + 1}])
        out.append(((s, n), meta))
  elif category == "colors":
    for c in colors:
      for s in shapes:
        inc = [{"class": s, "count": 1, "color": c}]
        out.append(((c, s), _meta(category, inc, f"a photo of {article(c)} {c} {s}")))
  elif category == "position":
    for a, b in pairs:
      for rel in RELATIONS:
        inc = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]
        out.append(
          ((a, rel, b), _meta(category, inc, f"a photo of {article(a)} {a} {rel} {article(b)} {b}"))
        )
  elif category == "color_attr":
    for a, b in pairs:
      for ca in colors:
        for cb in colors:
          if ca == cb:
            continue
          inc = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
          prompt = f"a photo of {article(ca)} {ca} {a} and {article(cb)} {cb} {b}"
          out.append(((ca, a, cb, b), _meta(category, inc, prompt)))
  else:
    raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")
  return tuple(out)


def category_prompts(world: WorldConfig, category: str) -> list[dict[str, Any]]:
  """Every prompt (as metadata) of ``category``, held-out ones included, in canonical order."""
  return [copy.deepcopy(meta) for _, meta in _category_space(world, category)]


def _version(world: WorldConfig, version: str | None) -> str:
  """The hold-out version asked for, or the world's own."""
  return world.holdout if version is None else version


@functools.lru_cache(maxsize=32)
def _holdout(world: WorldConfig, version: str) -> dict[str, tuple[tuple[int, ...], frozenset[int]]]:
  """Per category: (held-out indices in selection order, their set)."""
  if version not in HOLDOUT_VERSIONS:
    raise ValueError(f"unknown hold-out version {version!r}; known: {HOLDOUT_VERSIONS}")
  result = {}
  for category in CATEGORIES:
    space = _category_space(world, category)
    slots = [s for s, _ in space]
    k = max(1, math.ceil(len(space) / 3))
    if version == "v2":
      k = min(len(space), max(k, V2_MIN_HELDOUT))
    # Slot values used by more than one prompt must stay in a training prompt of the category
    # (single_object's shapes each occur in one prompt only, so nothing is required there).
    need = []
    for j in range(len(slots[0])):
      values = [s[j] for s in slots]
      need.append({v for v in values if values.count(v) > 1})
    rng = np.random.default_rng(zlib.crc32(f"shapes-holdout/{version}/{category}".encode()))
    for _ in range(1000):
      order = tuple(int(i) for i in rng.permutation(len(space))[:k])
      kept = [slots[i] for i in range(len(space)) if i not in set(order)]
      if all(need[j] <= {s[j] for s in kept} for j in range(len(need))):
        break
    else:  # pragma: no cover - only for degenerate worlds
      raise RuntimeError(f"no balanced hold-out found for {category!r}")
    result[category] = (order, frozenset(order))
  return result


@functools.lru_cache(maxsize=32)
def heldout_captions(world: WorldConfig, version: str | None = None) -> frozenset[str]:
  """All held-out prompt strings of ``world`` (a superset of the evaluated ones); ``version``
  defaults to the world's ``holdout``."""
  out = set()
  for category, (order, _) in _holdout(world, _version(world, version)).items():
    space = _category_space(world, category)
    out.update(space[i][1]["prompt"] for i in order)
  return frozenset(out)


def is_heldout(caption: str, world: WorldConfig | None = None, version: str | None = None) -> bool:
  """Whether ``caption`` is a held-out evaluation prompt (never used for training)."""
  return caption in heldout_captions(world or WorldConfig(), version)


def eval_prompts(
  world: WorldConfig | None = None, per_category: int | None = 16, version: str | None = None
) -> list[dict[str, Any]]:
  """The fixed evaluation prompt set: up to ``per_category`` held-out prompts per category.

  Deterministic for a given world and version. With the default world and ``per_category=16``
  the sizes are single_object 1, two_object 2, counting 3, colors 6, position 8, color_attr 16
  (``None`` gives all held-out prompts: color_attr 60). Generate several images per prompt.
  """
  world = world or WorldConfig()
  out = []
  for category, (order, _) in _holdout(world, _version(world, version)).items():
    space = _category_space(world, category)
    take = order if per_category is None else order[:per_category]
    out.extend(copy.deepcopy(space[i][1]) for i in take)
  return out


def training_prompts(
  world: WorldConfig, category: str, version: str | None = None
) -> list[dict[str, Any]]:
  """The prompts of ``category`` that may be used for training (held-out ones removed; none for
  v2's single_object)."""
  return [copy.deepcopy(m) for m in _training_space(world, category, _version(world, version))]


def training_categories(world: WorldConfig, version: str | None = None) -> tuple[str, ...]:
  """The categories that keep at least one training prompt (v2 holds out all single_object)."""
  v = _version(world, version)
  return tuple(c for c in CATEGORIES if _training_space(world, c, v))


@functools.lru_cache(maxsize=64)
def _training_space(world: WorldConfig, category: str, version: str) -> tuple[dict[str, Any], ...]:
  held = _holdout(world, version)[category][1]
  return tuple(m for i, (_, m) in enumerate(_category_space(world, category)) if i not in held)


def _phrase(count: int, color: str, shape: str) -> str:
  """ "a red circle", "an orange square", "two blue triangles"."""
  num = article(color) if count == 1 else NUMBER_WORDS[count]
  return f"{num} {color} {plural(shape, count)}"


def describe(scene: Scene) -> str:
  """Descriptive caption for MLLM captioning pre-training.

  One object: "a red circle". Two: "a red circle left of a blue square" (first object in reading
  order; "above" when the rows differ, else "left of"). More: (colour, shape) groups in reading
  order, e.g. "two green triangles and a red circle" or "a red circle, a blue square and two green
  triangles". An empty scene is "an empty image".
  """
  objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
  if not objs:
    return "an empty image"
  if len(objs) == 1:
    return _phrase(1, objs[0].color, objs[0].shape)
  if len(objs) == 2:
    a, b = objs
    rel = "above" if a.row != b.row else "left of"
    return f"{_phrase(1, a.color, a.shape)} {rel} {_phrase(1, b.color, b.shape)}"
  groups: dict[tuple[str, str], int] = {}
  for o in objs:
    groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
  parts = [_phrase(n, c, s) for (c, s), n in groups.items()]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _describe_meta(scene: Scene, caption: str) -> dict[str, Any]:
  counts: dict[str, int] = {}
  for o in scene.objects:
    counts[o.shape] = counts.get(o.shape, 0) + 1
  include = [{"class": s, "count": n} for s, n in counts.items()]
  exclude = [{"class": s, "count": n + 1} for s, n in counts.items()]
  return _meta(DESCRIPTIVE, include, caption, exclude)


# -------------------------------------------------------------------------------------- sampling


def _place(
  rng: np.random.Generator, world: WorldConfig, shape: str, color: str, row: int, col: int
) -> Obj:
  cell = world.cell
  size = _pick(rng, world.sizes) * cell
  slack = max((cell - size) / 2 - MARGIN_PX, 0.0)
  j = min(world.jitter * cell, slack)
  dx, dy = rng.uniform(-j, j, size=2) if j > 0 else (0.0, 0.0)
  return Obj(
    shape, color, row, col, (col + 0.5) * cell + float(dx), (row + 0.5) * cell + float(dy), size
  )


def _pick(rng: np.random.Generator, seq: tuple | list) -> Any:
  return seq[int(rng.integers(len(seq)))]


def _cells(rng: np.random.Generator, world: WorldConfig, n: int) -> list[tuple[int, int]]:
  idx = rng.choice(world.grid**2, size=n, replace=False)
  return [(int(i) // world.grid, int(i) % world.grid) for i in idx]


def _color(rng: np.random.Generator, world: WorldConfig) -> str:
  return _pick(rng, world.colors)


def _free_scene(rng: np.random.Generator, world: WorldConfig) -> Scene:
  n = int(rng.integers(1, world.max_count + 1))
  objs = [
    _place(rng, world, _pick(rng, world.shapes), _color(rng, world), r, c)
    for r, c in _cells(rng, world, n)
  ]
  return Scene(tuple(objs))


def _position_cells(
  rng: np.random.Generator, world: WorldConfig, relation: str
) -> tuple[tuple[int, int], tuple[int, int]]:
  """Cells (A, B) with A ``relation`` B on the relation's axis; the other axis is random."""
  g = world.grid
  lo, hi = sorted(int(v) for v in rng.choice(g, size=2, replace=False))
  first, second = (lo, hi) if relation in ("left of", "above") else (hi, lo)
  while True:
    oa, ob = int(rng.integers(g)), int(rng.integers(g))
    if relation in ("left of", "right of"):
      a, b = (oa, first), (ob, second)
    else:
      a, b = (first, oa), (second, ob)
    if a != b:
      return a, b


def scene_for_meta(rng: np.random.Generator, world: WorldConfig, meta: dict[str, Any]) -> Scene:
  """A random scene satisfying ``meta`` (one of the six categories' prompts)."""
  tag, inc = meta["tag"], meta["include"]
  if tag == "position":
    (rel, _), a, b = inc[1]["position"], inc[1]["class"], inc[0]["class"]
    (ra, ca), (rb, cb) = _position_cells(rng, world, rel)
    objs = [
      _place(rng, world, a, _color(rng, world), ra, ca),
      _place(rng, world, b, _color(rng, world), rb, cb),
    ]
  elif tag in ("single_object", "two_object", "counting", "colors", "color_attr", DESCRIPTIVE):
    specs = [(req["class"], req.get("color")) for req in inc for _ in range(req["count"])]
    if len(specs) > world.grid**2:
      raise ValueError(f"meta needs {len(specs)} objects, the grid has {world.grid**2} cells")
    cells = _cells(rng, world, len(specs))
    objs = [
      _place(rng, world, s, c if c is not None else _color(rng, world), r, col)
      for (s, c), (r, col) in zip(specs, cells, strict=True)
    ]
  else:
    raise ValueError(f"unknown tag {tag!r}")
  order = rng.permutation(len(objs))
  return Scene(tuple(objs[int(i)] for i in order))


def sample_pair(
  rng: np.random.Generator,
  world: WorldConfig,
  category: str | None = None,
  *,
  include_heldout: bool = False,
  version: str | None = None,
) -> tuple[Scene, str, dict[str, Any]]:
  """Samples (scene, caption, meta).

  Args:
    rng: random generator.
    world: world configuration.
    category: one of ``CATEGORIES`` (None: uniform over them, or with ``include_heldout``
      False over ``training_categories``) or ``DESCRIPTIVE`` (an unconstrained scene with its
      ``describe`` caption; its meta has exact per-shape counts).
    include_heldout: also sample held-out evaluation prompts (never for training).
    version: hold-out version (default: the world's).
  """
  version = _version(world, version)
  if category is None:
    category = _pick(rng, CATEGORIES if include_heldout else training_categories(world, version))
  if category == DESCRIPTIVE:
    scene = _free_scene(rng, world)
    caption = describe(scene)
    return scene, caption, _describe_meta(scene, caption)
  if include_heldout:
    metas = tuple(m for _, m in _category_space(world, category))
  else:
    metas = _training_space(world, category, version)
    if not metas:
      raise ValueError(
        f"category {category!r} has no training prompts under hold-out {version!r} "
        f"(every one is an evaluation prompt)"
      )
  meta = copy.deepcopy(_pick(rng, metas))
  return scene_for_meta(rng, world, meta), meta["prompt"], meta


def sample_scene(
  rng: np.random.Generator, world: WorldConfig, category: str | None = None
) -> Scene:
  """A scene of ``category`` (see ``sample_pair``); None: an unconstrained "image-only" scene
  with 1..max_count objects of random shapes, colours and cells."""
  if category is None:
    return _free_scene(rng, world)
  return sample_pair(rng, world, category)[0]


def make_pair_set(
  world: WorldConfig, num_pairs: int, seed: int, *, version: str | None = None
) -> list[tuple[Scene, str, dict[str, Any]]]:
  """A deterministic training pair set: categories cycle in ``CATEGORIES`` order (those with
  training prompts: ``training_categories``), prompts are uniform over each category's
  non-held-out prompts, so no evaluation prompt ever appears."""
  rng = np.random.default_rng(seed)
  cats = training_categories(world, version)
  return [sample_pair(rng, world, cats[i % len(cats)], version=version) for i in range(num_pairs)]


def all_caption_corpus(world: WorldConfig | None = None, *, seed: int = 0) -> list[str]:
  """Captions covering every word of the grammar, for tokenizer training.

  Holds every non-held-out category prompt, descriptive captions of many random scenes plus an
  explicit enumeration of descriptive phrases, and ``AUX_PROMPT``. Held-out prompts are left out
  (their words all occur elsewhere).
  """
  world = world or WorldConfig()
  out = [AUX_PROMPT, "an empty image"]
  for category in CATEGORIES:
    out.extend(m["prompt"] for m in training_prompts(world, category))
  for c in world.colors:
    for s in world.shapes:
      for n in range(1, world.max_count + 1):
        out.append(_phrase(n, c, s))
      for rel in ("left of", "above"):
        out.append(f"{_phrase(1, c, s)} {rel} {_phrase(1, c, s)}")
  rng = np.random.default_rng(seed)
  out.extend(describe(_free_scene(rng, world)) for _ in range(500))
  return out
