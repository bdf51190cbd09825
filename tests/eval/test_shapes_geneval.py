"""The shapes GenEval (the one scorer of ``iomm-eval``, ``iomm-demo``, the study and
``benchmarks/shapes_score.py``): prompt selection, batch-independent noise, scores with their
standard errors and empty share, the scored and failure grids.

The generator is replaced by a stand-in that renders each prompt's ground truth (or nothing),
so these tests check the evaluation's bookkeeping; ``tests/cli`` runs it on a trained model.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from iomm_jax import inference, metrics
from iomm_jax.configs.base import get_base_config
from iomm_jax.data import shapes
from iomm_jax.eval import shapes_geneval as G

WORLD = shapes.WorldConfig(canvas=24, grid=2, shapes=shapes.V2_SHAPES, holdout="v2")  # the demo's


def _config(world=WORLD):
  """A run's config in ``world`` with the demo's sampler settings."""
  c = get_base_config()
  c.data.update(canvas=world.canvas, grid=world.grid, shapes=world.shapes, holdout=world.holdout)
  c.sample.update(num_steps=20, solver="euler", cfg_scale=3.0, shift=1.0)
  return c


def test_prompt_selection_cycles_each_categorys_held_out_prompts():
  rows = G.select_prompts(WORLD, per_category=64)
  assert len(rows) == 64 * len(shapes.CATEGORIES)
  assert [r["tag"] for r in rows[::64]] == list(shapes.CATEGORIES)
  assert all(shapes.is_heldout(r["prompt"], WORLD) for r in rows)
  train = {m["prompt"] for c in shapes.CATEGORIES for m in shapes.training_prompts(WORLD, c)}
  assert not train & {r["prompt"] for r in rows}
  for c in shapes.CATEGORIES:  # v2: every category rests on at least 8 distinct prompts
    assert len({r["prompt"] for r in rows if r["tag"] == c}) >= 8, c
  held = [m for m in shapes.eval_prompts(WORLD, None) if m["tag"] == "single_object"]
  assert [r["prompt"] for r in rows[:16]] == [m["prompt"] for m in held] * 2  # cycled in order
  with pytest.raises(ValueError, match="must be >= 1"):
    G.select_prompts(WORLD, per_category=0)
  # the first world's set is still there, under its own hold-out
  v1 = shapes.WorldConfig(canvas=24, grid=2)
  assert {r["prompt"] for r in G.select_prompts(v1, 4) if r["tag"] == "single_object"} == {
    "a photo of a square"
  }


def test_image_noise_does_not_depend_on_the_batch():
  keys = G.image_keys(0, 10)
  again = G.image_keys(0, 4)
  for i in range(4):
    assert (jax.random.key_data(keys[i]) == jax.random.key_data(again[i])).all()
  assert not (jax.random.key_data(keys[0]) == jax.random.key_data(G.image_keys(1, 1)[0])).all()


@pytest.fixture
def ground_truth_sampler(monkeypatch):
  """Replaces the generator: renders the ground truth of each prompt (blank if ``blank``);
  records the keys it was given."""
  metas = {m["prompt"]: m for m in shapes.eval_prompts(WORLD, per_category=None)}
  state = {"blank": False, "keys": None}

  def fake(config, ctx, params, prompts, seed, **kw):
    state["keys"] = seed
    rng = np.random.default_rng(0)
    out = []
    for p in prompts:
      img = shapes.render(shapes.scene_for_meta(rng, WORLD, metas[p]), WORLD)
      out.append(np.full_like(img, 255) if state["blank"] else img)
    return np.stack(out)

  monkeypatch.setattr(inference, "sample_prompts", fake)
  return state


def test_ground_truth_scores_one_with_no_error_and_nothing_empty(ground_truth_sampler):
  ev = G.evaluate(_config(), None, None, per_category=8)
  r = ev.report
  assert r["overall"] >= 0.99 and r["overall_se"] <= 0.02 and r["empty"] == 0.0
  assert list(r["categories"]) == list(shapes.CATEGORIES) == list(r["category_se"])
  assert r["num_images"] == len(ev.images) == 48 and r["prompt_set"] == "v2"
  assert r["prompts_per_category"]["single_object"] == 8
  assert (r["seed"], r["per_category"], r["cfg_scale"], r["sample_steps"]) == (0, 8, 3.0, 20)
  assert len(ground_truth_sampler["keys"]) == 48  # one key per image
  assert (G.failure_grid(ev) is None) == all(ev.correct)


def test_blank_images_are_empty_fail_everything_and_fill_the_failure_grid(ground_truth_sampler):
  ground_truth_sampler["blank"] = True
  ev = G.evaluate(_config(), None, None, per_category=4)
  assert ev.report["overall"] == 0.0 and not any(ev.correct) and ev.report["empty"] == 1.0
  assert ev.report["empty_categories"] == {c: 1.0 for c in shapes.CATEGORIES}
  grid = G.failure_grid(ev, max_rows=7)
  assert grid.shape[0] > 7 * WORLD.canvas * 3  # 7 rows, round-robin over the six categories
  table = G.markdown_table({"blank": ev.report})
  assert "| blank |" in table and "0.000 ± 0.000" in table and "| 1.000 | 24 |" in table


def test_standard_errors_follow_the_category_mean_rule():
  one = [{"class": "circle", "count": 1}]
  metas = [{"tag": t, "prompt": f"{t} {i}", "include": one} for t in ("a", "b") for i in range(4)]
  images = np.full((8, 24, 24, 3), 255, np.uint8)
  scored = G.score_images(images, metas, WORLD)
  assert scored["report"]["overall"] == 0.0 and scored["report"]["empty"] == 1.0
  _, se, means, ses = G._mean_of_categories(metas, [1, 0, 0, 0, 1, 1, 0, 0])
  assert means == {"a": 0.25, "b": 0.5}
  assert ses["a"] == pytest.approx(np.sqrt(np.var([1, 0, 0, 0], ddof=1) / 4))
  assert se == pytest.approx(np.sqrt(ses["a"] ** 2 + ses["b"] ** 2) / 2)


def test_compare_gives_the_paired_difference_and_its_standard_error():
  metas = [{"tag": t, "prompt": f"{t} {i}"} for t in ("a", "b") for i in range(4)]
  base = G.Evaluation({}, None, metas, [0, 0, 0, 0, 1, 0, 0, 0])
  other = G.Evaluation({}, None, metas, [1, 1, 0, 0, 1, 1, 1, 0])
  cmp = G.compare(base, other)
  # per category the differences are [1, 1, 0, 0] and [0, 1, 1, 0]: mean 0.5, variance 1/3 each
  assert cmp["difference"] == pytest.approx(0.5)
  assert cmp["se"] == pytest.approx(np.sqrt(2 * (1 / 3) / 4) / 2)
  assert cmp["categories"] == {"a": 0.5, "b": 0.5}
  assert (cmp["only_other"], cmp["only_base"], cmp["num_images"]) == (4, 0, 8)
  with pytest.raises(ValueError, match="same prompts"):
    G.compare(base, G.Evaluation({}, None, metas[::-1], other.correct))


def test_scored_grid_labels_rows_and_frames_right_and_wrong(ground_truth_sampler):
  ev = G.scored_samples(_config(), None, None, prompts_per_category=1, per_prompt=3)
  assert len(ev.images) == 18 and len({m["prompt"] for m in ev.metas}) == 6
  ev.correct[0] = False  # one wrong image: its frame is red, the others' green
  grid = G.scored_grid(ev, scale=3)
  colours = {tuple(p) for p in grid.reshape(-1, 3)}
  assert metrics.RIGHT in colours and metrics.WRONG in colours
  rows = grid.shape[0]
  assert rows >= 6 * (24 * 3 + 6)  # a row per prompt, under the legend


def test_grids_have_visible_borders():
  white = np.full((3, 8, 8, 3), 255, np.uint8)
  grid = metrics.image_grid(white, rows=1)
  assert (grid[0] != 255).any() and (grid[:, 8 + 2] != 255).any()  # between and around
  canvas = metrics.labelled_grid([("a", list(white), None)], header=["source", "s1", "s2"])
  assert tuple(metrics.BORDER) in {tuple(p) for p in canvas.reshape(-1, 3)}


def test_a_long_legend_widens_the_grid_instead_of_being_cut():
  white = np.full((2, 8, 8, 3), 255, np.uint8)
  legend = "step 1800: source image, then samples conditioned on it with 85% of its tokens masked"
  short = metrics.labelled_grid([("a", list(white), None)], header=["source", "s1"])
  long = metrics.labelled_grid([("a", list(white), None)], header=["source", "s1"], legend=legend)
  assert long.shape[1] > short.shape[1] + 200
  assert (long[:18, -60:] != 255).any()  # the legend's end is drawn, near the right edge
