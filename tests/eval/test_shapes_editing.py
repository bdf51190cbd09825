"""Zero-shot editing tasks and their scorer (study question 7)."""

from __future__ import annotations

import numpy as np
import pytest

from iomm_jax import edit
from iomm_jax.configs.base import get_base_config
from iomm_jax.data import pipeline, shapes
from iomm_jax.data.tokenizer import Tokenizer
from iomm_jax.eval import shapes_editing as E

WORLD = shapes.WorldConfig(canvas=24, grid=2)


def test_tasks_are_deterministic_and_well_formed():
  tasks = E.make_tasks(WORLD, 10, seed=3)
  assert [t.kind for t in tasks] == ["recolor"] * 10 + ["add"] * 10
  assert [t.instruction for t in tasks] == [t.instruction for t in E.make_tasks(WORLD, 10, 3)]
  for t in tasks:
    assert len(t.target.objects) == len(t.kept) + 1
    if t.kind == "recolor":
      old = [o for o in t.source.objects if (o.row, o.col) == (t.edited.row, t.edited.col)]
      assert old[0].color != t.edited.color and t.instruction.endswith(t.edited.color)
      assert sum(o.shape == t.edited.shape for o in t.source.objects) == 1
    else:
      assert (t.edited.row, t.edited.col) not in {(o.row, o.col) for o in t.source.objects}
      assert t.instruction.startswith("add") and t.instruction.endswith(t.edited.shape)


def test_scorer_on_targets_and_on_unedited_copies():
  tasks = E.make_tasks(WORLD, 24, seed=0)
  target = [E.score(shapes.render(t.target, WORLD), t, WORLD) for t in tasks]
  copy = [E.score(shapes.render(t.source, WORLD), t, WORLD) for t in tasks]
  blank = [E.score(np.full((24, 24, 3), 255, np.uint8), t, WORLD) for t in tasks]
  s_target, s_copy, s_blank = (E.summarise(r, tasks) for r in (target, copy, blank))
  assert s_target["success"] >= 0.99 and s_target["preservation"] >= 0.99
  assert s_copy["success"] == 0.0 and s_copy["preservation"] >= 0.99  # nothing edited
  assert s_blank["success"] == 0.0 and s_blank["preservation"] < 0.1  # nothing kept
  assert set(s_target["kinds"]) == {"recolor", "add"}


def test_reconstruction_scorer():
  rng = np.random.default_rng(0)
  scenes = [shapes.sample_scene(rng, WORLD) for _ in range(16)]
  same = [E.score_reconstruction(shapes.render(sc, WORLD), sc, WORLD) for sc in scenes]
  assert all(e for e, _ in same) and all(p == 1.0 for _, p in same)
  blank = np.full((24, 24, 3), 255, np.uint8)
  assert all(E.score_reconstruction(blank, sc, WORLD) == (False, 0.0) for sc in scenes)
  # another scene: not exact, and only objects that happen to coincide count as preserved
  pairs = zip(scenes, scenes[1:])
  other = [E.score_reconstruction(shapes.render(b, WORLD), a, WORLD) for a, b in pairs]
  assert not all(e for e, _ in other) and np.mean([p for _, p in other]) < 0.5


@pytest.fixture(scope="module")
def conditioner(tmp_path_factory):
  corpus = shapes.all_caption_corpus(WORLD) + [shapes.AUX_PROMPT]
  tok = Tokenizer.train(corpus, get_base_config().model.tokenizer_vocab, None)
  return pipeline.Conditioner(tok, 16, shapes.AUX_PROMPT, 24)


def test_edit_condition_layout(conditioner):
  ids, valid = edit.edit_conditions(conditioner, ["make the circle blue"])
  t = conditioner.tokenizer
  n = len(t.encode("make the circle blue", bos=True))
  row = ids[0][valid[0]].tolist()
  assert row[:n] == t.encode("make the circle blue", bos=True)
  assert row[n] == t.img_start_id and row[-1] == t.img_end_id
  assert row[n + 1 : -1] == [t.img_context_id] * 16
  with pytest.raises(ValueError, match="is too long"):
    edit.edit_conditions(conditioner, ["make the circle blue " * 20])
