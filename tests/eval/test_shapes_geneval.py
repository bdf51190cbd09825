"""The shapes GenEval (``iomm-eval``'s library): prompt selection, scoring, failure grid.

The generator is replaced by a stand-in that renders each prompt's ground truth (or nothing),
so these tests check the evaluation's bookkeeping; ``tests/cli`` runs it on a trained model.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from iomm_jax import inference
from iomm_jax.data import shapes
from iomm_jax.eval import shapes_geneval as G

WORLD = shapes.WorldConfig(canvas=24, grid=2)  # the demo's world


def _config():
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict({"canvas": WORLD.canvas, "grid": WORLD.grid})
  return c


def test_prompt_selection_is_held_out_and_complete():
  prompts = shapes.eval_prompts(WORLD, per_category=None, version=G.PROMPT_SET)
  rows = G.select_prompts(WORLD, num_per_prompt=3)
  assert len(rows) == 3 * len(prompts)
  assert [r["prompt"] for r in rows[::3]] == [p["prompt"] for p in prompts]
  assert {r["tag"] for r in rows} == set(shapes.CATEGORIES)
  assert all(shapes.is_heldout(r["prompt"], WORLD) for r in rows)
  train = {m["prompt"] for c in shapes.CATEGORIES for m in shapes.training_prompts(WORLD, c)}
  assert not train & {r["prompt"] for r in rows}
  per_cat = G.select_prompts(WORLD, per_category=5)
  assert len(per_cat) == 5 * len(shapes.CATEGORIES)
  with pytest.raises(ValueError, match="exactly one"):
    G.select_prompts(WORLD)
  with pytest.raises(ValueError, match="must be >= 1"):
    G.select_prompts(WORLD, num_per_prompt=0)


@pytest.fixture
def ground_truth_sampler(monkeypatch):
  """Replaces the generator: renders the ground truth of each prompt (blank if ``blank``)."""
  metas = {m["prompt"]: m for m in shapes.eval_prompts(WORLD, per_category=None)}
  state = {"blank": False}

  def fake(config, ctx, params, prompts, seed, **kw):
    rng = np.random.default_rng(seed)
    out = []
    for p in prompts:
      img = shapes.render(shapes.scene_for_meta(rng, WORLD, metas[p]), WORLD)
      out.append(np.full_like(img, 255) if state["blank"] else img)
    return np.stack(out)

  monkeypatch.setattr(inference, "sample_prompts", fake)
  return state


def test_ground_truth_scores_one_and_has_no_failures(ground_truth_sampler):
  ev = G.evaluate(_config(), None, None, num_per_prompt=2)
  assert ev.report["overall"] >= 0.99
  assert set(ev.report["categories"]) == set(shapes.CATEGORIES)
  assert ev.report["num_images"] == len(ev.images) == 2 * ev.report["num_prompts"]
  assert ev.report["prompt_set"] == G.PROMPT_SET
  assert (G.failure_grid(ev) is None) == all(ev.correct)


def test_blank_images_fail_everything_and_fill_the_failure_grid(ground_truth_sampler):
  ground_truth_sampler["blank"] = True
  ev = G.evaluate(_config(), None, None, per_category=4)
  assert ev.report["overall"] == 0.0 and not any(ev.correct)
  grid = G.failure_grid(ev, max_rows=7)
  scale_h = WORLD.canvas * 3 + 4
  assert grid.shape[0] == 7 * scale_h  # 7 rows, round-robin over the six categories
  table = G.markdown_table({"blank": ev.report})
  assert "| blank |" in table and "0.000" in table


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


def test_report_carries_the_standard_error_of_overall(ground_truth_sampler):
  ev = G.evaluate(_config(), None, None, per_category=4)
  assert ev.report["overall_se"] == 0.0  # every image right: no spread
  ground_truth_sampler["blank"] = True
  assert G.evaluate(_config(), None, None, per_category=4).report["overall_se"] == 0.0
