"""Tests of the procedural shapes world: config, renderer, captions, samplers and the hold-out."""

import dataclasses

import numpy as np
import pytest

from iomm_jax.data import shapes as S

WORLD = S.WorldConfig()
WORLD3 = S.WorldConfig(
  canvas=48, grid=3, shapes=("circle", "square", "triangle", "diamond"), max_count=9
)


def _caption(meta):
  """GenEval wording rebuilt independently from the metadata."""
  inc, tag = meta["include"], meta["tag"]

  def a(w):
    return "an" if w[0] in "aeiou" else "a"

  def obj(req):
    words = ([req["color"]] if "color" in req else []) + [req["class"]]
    return f"{a(words[0])} {' '.join(words)}"

  if tag in ("single_object", "colors"):
    return f"a photo of {obj(inc[0])}"
  if tag in ("two_object", "color_attr"):
    return f"a photo of {obj(inc[0])} and {obj(inc[1])}"
  if tag == "counting":
    n = inc[0]["count"]
    return f"a photo of {S.NUMBER_WORDS[n]} {inc[0]['class']}s"
  if tag == "position":
    return f"a photo of {obj(inc[1])} {inc[1]['position'][0]} {obj(inc[0])}"
  raise AssertionError(tag)


def test_render_deterministic_size_dtype():
  for world in (WORLD, WORLD3):
    rng = np.random.default_rng(0)
    scenes = [S.sample_scene(rng, world) for _ in range(5)]
    rng = np.random.default_rng(0)
    again = [S.sample_scene(rng, world) for _ in range(5)]
    assert scenes == again
    for scene in scenes:
      img = S.render(scene, world)
      assert img.shape == (world.canvas, world.canvas, 3) and img.dtype == np.uint8
      np.testing.assert_array_equal(img, S.render(scene, world))


def test_render_colors_background_and_antialiasing():
  blank = S.render(S.Scene(), WORLD)
  assert (blank == 255).all()
  obj = S.Obj("circle", "red", 0, 0, 8.0, 8.0, 12.0)
  img = S.render(S.Scene((obj,)), WORLD)
  np.testing.assert_array_equal(img[8, 8], S.PALETTE["red"])
  assert (img[:, 16:] == 255).all() and (img[16:] == 255).all()
  # Edge pixels are blends (light anti-aliasing), neither background nor object colour.
  px = img.reshape(-1, 3).astype(int)
  blends = (np.abs(px - 255).sum(-1) > 0) & (np.abs(px - S.PALETTE["red"]).sum(-1) > 0)
  assert 0 < blends.sum() < 40
  dark = S.WorldConfig(background="black", colors=("white", "red", "cyan", "yellow"))
  assert (S.render(S.Scene(), dark) == 0).all()


def test_objects_stay_in_their_cells():
  for world in (WORLD, WORLD3):
    rng = np.random.default_rng(1)
    for _ in range(200):
      scene = S.sample_scene(rng, world)
      cells = [(o.row, o.col) for o in scene.objects]
      assert len(set(cells)) == len(cells) and 1 <= len(cells) <= world.max_count
      for o in scene.objects:
        h, c = o.size / 2, world.cell
        assert o.col * c + S.MARGIN_PX - 1e-9 <= o.cx - h and o.cx + h <= (o.col + 1) * c - 1
        assert o.row * c + S.MARGIN_PX - 1e-9 <= o.cy - h and o.cy + h <= (o.row + 1) * c - 1
        assert o.shape in world.shapes and o.color in world.colors


@pytest.mark.parametrize("category", S.CATEGORIES)
def test_sampled_captions_match_meta_and_scene(category):
  rng = np.random.default_rng(2)
  for world in (WORLD, WORLD3):
    for _ in range(60):
      scene, caption, meta = S.sample_pair(rng, world, category, include_heldout=True)
      assert meta["tag"] == category and meta["prompt"] == caption == _caption(meta)
      shapes = [o.shape for o in scene.objects]
      want = {}
      for req in meta["include"]:
        want[req["class"]] = want.get(req["class"], 0) + req["count"]
        if "color" in req:
          assert any(o.shape == req["class"] and o.color == req["color"] for o in scene.objects)
      assert sorted(shapes) == sorted(s for s, n in want.items() for _ in range(n))
      if category == "counting":
        assert meta["exclude"] == [{"class": shapes[0], "count": len(shapes) + 1}]
      else:
        assert "exclude" not in meta


def test_position_relations_are_unambiguous():
  rng = np.random.default_rng(3)
  opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
  for world in (WORLD, WORLD3):
    seen = set()
    for _ in range(300):
      scene, _, meta = S.sample_pair(rng, world, "position", include_heldout=True)
      ref, tgt = meta["include"]
      rel = tgt["position"][0]
      assert tgt["position"][1] == 0 and ref["class"] != tgt["class"]
      (a,) = [o for o in scene.objects if o.shape == tgt["class"]]
      (b,) = [o for o in scene.objects if o.shape == ref["class"]]
      if rel in ("left of", "right of"):
        assert a.col != b.col
      else:
        assert a.row != b.row
      assert S.relation_holds((a.cx, a.cy), (b.cx, b.cy), rel, world)
      assert not S.relation_holds((a.cx, a.cy), (b.cx, b.cy), opposite[rel], world)
      seen.add(rel)
    assert seen == set(S.RELATIONS)


def test_relation_convention():
  # GenEval: "A right of B" means A is to the right of B.
  assert S.relation_holds((24.0, 8.0), (8.0, 8.0), "right of", WORLD)
  assert S.relation_holds((8.0, 24.0), (8.0, 8.0), "below", WORLD)
  assert not S.relation_holds((10.0, 8.0), (8.0, 8.0), "right of", WORLD)  # within the margin


def test_free_scenes_and_descriptive_pairs():
  rng = np.random.default_rng(4)
  counts = set()
  for _ in range(300):
    scene, caption, meta = S.sample_pair(rng, WORLD, S.DESCRIPTIVE)
    counts.add(len(scene.objects))
    assert caption == S.describe(scene) and meta["tag"] == S.DESCRIPTIVE
    assert sum(r["count"] for r in meta["include"]) == len(scene.objects)
  assert counts == {1, 2, 3, 4}


def test_describe():
  def o(shape, color, row, col):
    return S.Obj(shape, color, row, col, 0.0, 0.0, 8.0)

  assert S.describe(S.Scene((o("circle", "red", 1, 1),))) == "a red circle"
  scene = S.Scene((o("square", "blue", 1, 0), o("circle", "orange", 0, 0)))
  assert S.describe(scene) == "an orange circle above a blue square"
  scene = S.Scene((o("square", "blue", 0, 1), o("circle", "red", 0, 0)))
  assert S.describe(scene) == "a red circle left of a blue square"
  scene = S.Scene(
    (o("triangle", "green", 0, 0), o("circle", "red", 0, 1), o("triangle", "green", 1, 0))
  )
  assert S.describe(scene) == "two green triangles and a red circle"
  scene = S.Scene((o("circle", "red", 0, 0), o("square", "blue", 0, 1), o("circle", "red", 1, 1)))
  assert S.describe(scene) == "two red circles and a blue square"
  assert S.describe(S.Scene()) == "an empty image"


def test_eval_prompts_fixed_and_held_out():
  metas = S.eval_prompts(WORLD)
  assert metas == S.eval_prompts(S.WorldConfig())  # deterministic
  sizes = {c: sum(m["tag"] == c for m in metas) for c in S.CATEGORIES}
  assert sizes == {
    "single_object": 1,
    "two_object": 2,
    "counting": 3,
    "colors": 6,
    "position": 8,
    "color_attr": 16,
  }
  assert len(S.eval_prompts(WORLD, per_category=None)) == 1 + 2 + 3 + 6 + 8 + 60
  prompts = [m["prompt"] for m in metas]
  assert len(set(prompts)) == len(prompts)
  assert all(S.is_heldout(p) and S.is_heldout(p, WORLD) for p in prompts)
  assert all(m["prompt"] == _caption(m) for m in metas)
  with pytest.raises(ValueError, match="version"):
    S.eval_prompts(WORLD, version="v0")


def test_holdout_keeps_every_slot_value_in_training():
  for world in (WORLD, WORLD3):
    for category in S.CATEGORIES[1:]:
      train = S.training_prompts(world, category)
      held = [m for m in S.eval_prompts(world, per_category=None) if m["tag"] == category]
      words = {w for m in train for w in m["prompt"].split()}
      assert all(set(m["prompt"].split()) <= words for m in held), category
      assert len(train) + len(held) == len(S.category_prompts(world, category))


def test_training_pairs_exclude_eval_prompts():
  pairs = S.make_pair_set(WORLD, 2000, seed=0)
  assert len(pairs) == 2000
  captions = {caption for _, caption, _ in pairs}
  eval_set = {m["prompt"] for m in S.eval_prompts(WORLD, per_category=None)}
  assert not captions & eval_set
  assert {m["tag"] for _, _, m in pairs} == set(S.CATEGORIES)
  # Every word of the evaluation prompts occurs in training captions.
  words = {w for c in captions for w in c.split()}
  assert {w for p in eval_set for w in p.split()} <= words
  again = S.make_pair_set(WORLD, 50, seed=0)
  assert [c for _, c, _ in again] == [c for _, c, _ in pairs[:50]]


def test_caption_corpus_covers_grammar():
  corpus = S.all_caption_corpus(WORLD)
  assert S.AUX_PROMPT in corpus
  assert not set(corpus) & S.heldout_captions(WORLD)
  words = {w for c in corpus for w in c.split()}
  rng = np.random.default_rng(5)
  grammar = [m["prompt"] for c in S.CATEGORIES for m in S.category_prompts(WORLD, c)]
  grammar += [S.describe(S.sample_scene(rng, WORLD)) for _ in range(300)]
  assert {w for c in grammar for w in c.split()} <= words


@pytest.mark.parametrize(
  ("kwargs", "field"),
  [
    ({"canvas": 8}, "canvas"),
    ({"grid": 1}, "grid"),
    ({"canvas": 16, "grid": 3}, "grid"),
    ({"shapes": ("circle", "square")}, "shapes"),
    ({"shapes": ("circle", "square", "hexagon")}, "shapes"),
    ({"colors": ("red",)}, "colors"),
    ({"colors": ("red", "magenta")}, "colors"),
    ({"size_range": (0.6, 0.99)}, "size_range"),
    ({"size_range": (0.2, 0.8)}, "size_range"),
    ({"size_levels": 0}, "size_levels"),
    ({"jitter": 0.5}, "jitter"),
    ({"background": "teal"}, "background"),
    ({"background": (225, 35, 35)}, "background"),
    ({"max_count": 5}, "max_count"),
    ({"max_count": 1}, "max_count"),
    ({"supersample": 0}, "supersample"),
  ],
)
def test_world_config_validation_names_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"WorldConfig\.{field}\b"):
    S.WorldConfig(**kwargs)


def test_world_config_is_frozen_keyword_only():
  with pytest.raises(TypeError):
    S.WorldConfig(32)  # type: ignore[misc]
  with pytest.raises(dataclasses.FrozenInstanceError):
    WORLD.canvas = 64  # type: ignore[misc]
  assert S.WorldConfig(shapes=["circle", "square", "triangle"]) == WORLD
  assert len(S.PALETTE) >= 6


def test_small_worlds_have_a_holdout():
  for world in (S.WorldConfig(max_count=2), S.WorldConfig(colors=("red", "blue"))):
    metas = S.eval_prompts(world, per_category=None)
    assert {m["tag"] for m in metas} == set(S.CATEGORIES)
    pairs = S.make_pair_set(world, 120, seed=1)
    assert not any(S.is_heldout(c, world) for _, c, _ in pairs)


WORLD_V2 = S.WorldConfig(canvas=24, shapes=S.V2_SHAPES, holdout="v2")  # the demo's world


def test_v2_holdout_puts_at_least_eight_prompts_in_every_category():
  metas = S.eval_prompts(WORLD_V2, per_category=None)
  sizes = {c: sum(m["tag"] == c for m in metas) for c in S.CATEGORIES}
  assert sizes == {
    "single_object": 8,
    "two_object": 19,
    "counting": 8,
    "colors": 16,
    "position": 75,
    "color_attr": 560,
  }
  assert len({m["prompt"] for m in metas}) == len(metas)
  # every single_object prompt is held out, so no training category holds single objects...
  assert S.training_prompts(WORLD_V2, "single_object") == []
  assert S.training_categories(WORLD_V2) == S.CATEGORIES[1:]
  with pytest.raises(ValueError, match="no training prompts"):
    S.sample_pair(np.random.default_rng(0), WORLD_V2, "single_object")
  # ... but every shape word of them is trained through the other categories
  pairs = S.make_pair_set(WORLD_V2, 3000, seed=0)
  captions = {c for _, c, _ in pairs}
  assert not captions & S.heldout_captions(WORLD_V2)
  words = {w for c in captions for w in c.split()}
  assert {w for m in metas for w in m["prompt"].split()} <= words
  assert {m["tag"] for _, _, m in pairs} == set(S.CATEGORIES[1:])
  # the version is the world's: explicit and implicit agree, v1 of the same world differs
  assert S.eval_prompts(WORLD_V2, None, version="v2") == metas
  assert len(S.eval_prompts(WORLD_V2, None, version="v1")) < len(metas)


def test_v1_holdout_is_unchanged_by_v2():
  """The v1 prompt set (and so every score reported on it) stays loadable as it was."""
  v1 = [m["prompt"] for m in S.eval_prompts(WORLD, per_category=None)]
  assert v1[:3] == [m["prompt"] for m in S.eval_prompts(S.WorldConfig(holdout="v1"), 3)][:3]
  assert "a photo of a square" in v1 and len(v1) == 80
  assert S.training_categories(WORLD) == S.CATEGORIES


def test_new_shapes_render_their_geometry():
  # at 96 px, where anti-aliased edges (counted whole below) barely change the shares
  w = S.WorldConfig(canvas=96, shapes=S.V2_SHAPES, holdout="v2")
  cell = w.cell
  for shape, fill in (("ring", 0.59), ("frame", 0.75), ("rectangle", 1.0), ("oval", 0.785)):
    obj = S.Obj(shape, "blue", 0, 0, cell / 2, cell / 2, 0.8 * cell)
    mask = (S.render(S.Scene((obj,)), w) != 255).any(-1)
    ys, xs = np.nonzero(mask)
    h, wd = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if shape in S.WIDE_SHAPES:
      assert wd >= 1.6 * h, shape  # twice as wide as tall
    else:
      assert abs(int(wd) - int(h)) <= 1, shape
    # share of the bounding box covered: annulus / frame / full box / ellipse (pixelated)
    assert mask.sum() / (h * wd) == pytest.approx(fill, abs=0.06), shape
    if shape in ("ring", "frame"):
      assert not mask[int(cell / 2), int(cell / 2)], shape  # the hole
  assert S.plural("frame", 2) == "frames" and S.plural("oval", 1) == "oval"
  with pytest.raises(ValueError, match=r"WorldConfig\.holdout"):
    S.WorldConfig(holdout="v3")
