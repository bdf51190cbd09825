"""Benchmark-format generation: prompt readers, the three evaluator layouts, resumption.

The GenEval and DPG-Bench tests read the real prompt files from ../shared/data (or
$IOMM_BENCHMARK_DATA) when present; elsewhere they write small files in the same formats, so
the layouts are tested on every machine. WISE's prompts are not redistributable, so its tests
always build a file in WISE's format. The model here is a stand-in ``sample_fn`` whose image is
a function of its PRNG key; ``tests/cli`` runs the same path with a trained tiny model.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from iomm_jax.data import benchmark_format as bf
from tests.conftest import SHARED

DATA = os.environ.get("IOMM_BENCHMARK_DATA", os.path.join(SHARED, "data"))
REAL_GENEVAL = os.path.join(DATA, "geneval", "evaluation_metadata.jsonl")
REAL_DPG = os.path.join(DATA, "dpg", "prompts")


@pytest.fixture
def geneval_file(tmp_path):
  if os.path.isfile(REAL_GENEVAL):
    return REAL_GENEVAL
  path = tmp_path / "evaluation_metadata.jsonl"
  rows = [
    {
      "tag": "single_object",
      "include": [{"class": "cat", "count": 1}],
      "prompt": "a photo of a cat",
    },
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"},
    {
      "tag": "colors",
      "include": [{"class": "car", "count": 1, "color": "red"}],
      "prompt": "a red car",
    },
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture
def dpg_dir(tmp_path):
  if os.path.isdir(REAL_DPG):
    return REAL_DPG
  d = tmp_path / "prompts"
  d.mkdir()
  for key, text in [("a", "A long prompt about a red barn."), ("b", "Two cats on a sofa.")]:
    (d / f"{key}.txt").write_text(text + "\n")
  return str(d)


@pytest.fixture
def wise_file(tmp_path):
  rows = [
    {
      "Prompt": f"prompt {i}",
      "Explanation": "x",
      "Category": "c",
      "Subcategory": "s",
      "prompt_id": i,
    }
    for i in (1, 2, 3)
  ]
  path = tmp_path / "cultural_common_sense.json"
  path.write_text(json.dumps(rows))
  return str(path)


def fake_sample(prompts, keys):
  """A stand-in model: a 6x6 image whose colour is a function of the row's key alone."""
  data = np.asarray(jax.random.key_data(keys)).reshape(len(prompts), -1)
  colour = np.stack([np.random.default_rng(list(row)).integers(0, 256, 3) for row in data])
  return np.broadcast_to(colour[:, None, None, :].astype(np.uint8), (len(prompts), 6, 6, 3)).copy()


def test_geneval_reader_keeps_every_line_verbatim(geneval_file):
  items = bf.read_prompts(geneval_file, "geneval")
  with open(geneval_file) as f:
    lines = f.read().splitlines()
  assert [it.line for it in items] == lines
  assert [it.key for it in items] == [f"{i:05d}" for i in range(len(lines))]
  assert all(it.prompt == json.loads(it.line)["prompt"] for it in items)
  if geneval_file == REAL_GENEVAL:
    assert len(items) == 553


def test_dpg_and_wise_readers(dpg_dir, wise_file):
  dpg = bf.read_prompts(dpg_dir, "dpg")
  names = sorted(n for n in os.listdir(dpg_dir) if n.endswith(".txt"))
  assert sorted(it.key + ".txt" for it in dpg) == names
  if dpg_dir == REAL_DPG:
    assert len(dpg) == 1065
  with open(os.path.join(dpg_dir, dpg[0].key + ".txt")) as f:
    assert dpg[0].prompt == f.read().strip()
  wise = bf.read_prompts(wise_file, "wise")
  assert [(it.key, it.prompt) for it in wise] == [
    ("1", "prompt 1"),
    ("2", "prompt 2"),
    ("3", "prompt 3"),
  ]


def test_geneval_layout_and_resume(geneval_file, tmp_path):
  items = bf.read_prompts(geneval_file, "geneval")[:3]
  out = str(tmp_path / "geneval")
  w = bf.Writer("geneval", out, 4)
  counts = bf.generate(fake_sample, items, w, seed=0, batch=5, progress=False)
  assert counts == {
    "prompts": 3, "skipped_prompts": 0, "generated_images": 12, "written_images": 12
  }  # fmt: skip
  for it in items:
    folder = os.path.join(out, it.key)
    with open(os.path.join(folder, "metadata.jsonl")) as f:
      assert f.read() == it.line + "\n"
    assert sorted(os.listdir(os.path.join(folder, "samples"))) == [f"{j:04d}.png" for j in range(4)]
    assert Image.open(os.path.join(folder, "grid.png")).size[1] > 0
  assert sorted(os.listdir(out)) == [it.key for it in items]  # no temporary files left
  first = {
    p: open(os.path.join(out, p), "rb").read()
    for p in ("00001/samples/0002.png", "00002/samples/0000.png")
  }
  # an interrupted run: two samples missing; resuming (another batch size) makes only those,
  # and makes them identical to the uninterrupted run's
  for p in first:
    os.remove(os.path.join(out, p))
  counts = bf.generate(fake_sample, items, w, seed=0, batch=3, progress=False)
  assert counts == {
    "prompts": 3, "skipped_prompts": 1, "generated_images": 2, "written_images": 2
  }  # fmt: skip
  for p, data in first.items():
    assert open(os.path.join(out, p), "rb").read() == data
  assert (
    bf.generate(fake_sample, items, w, seed=0, batch=3, progress=False)["generated_images"] == 0
  )


def test_dpg_layout_is_an_unpadded_square_grid(dpg_dir, tmp_path):
  items = bf.read_prompts(dpg_dir, "dpg")[:2]
  out = str(tmp_path / "dpg")
  bf.generate(fake_sample, items, bf.Writer("dpg", out, 4), seed=1, batch=3, progress=False)
  assert sorted(os.listdir(out)) == sorted(it.key + ".png" for it in items)
  grid = np.asarray(Image.open(os.path.join(out, items[0].key + ".png")))
  assert grid.shape == (12, 12, 3)  # 2x2 tiles of 6 px, no padding: the evaluator crops it
  keys = bf.sample_keys(1, [(items[0], j) for j in range(4)])
  tiles = fake_sample(["p"] * 4, keys)
  np.testing.assert_array_equal(grid[:6, 6:], tiles[1])
  np.testing.assert_array_equal(grid[6:, :6], tiles[2])


def test_wise_layout_one_image_per_prompt_id(wise_file, tmp_path):
  items = bf.read_prompts(wise_file, "wise")
  out = str(tmp_path / "wise")
  bf.generate(fake_sample, items, bf.Writer("wise", out, 1), seed=0, batch=2, progress=False)
  assert sorted(os.listdir(out)) == ["1.png", "2.png", "3.png"]
  assert np.asarray(Image.open(os.path.join(out, "2.png"))).shape == (6, 6, 3)


def test_images_depend_on_seed_prompt_and_sample_only(geneval_file):
  items = bf.read_prompts(geneval_file, "geneval")[:2]
  a = fake_sample(["p"] * 3, bf.sample_keys(0, [(items[0], 0), (items[0], 1), (items[1], 0)]))
  b = fake_sample(["p"], bf.sample_keys(0, [(items[0], 1)]))
  c = fake_sample(["p"], bf.sample_keys(1, [(items[0], 1)]))
  np.testing.assert_array_equal(a[1], b[0])
  assert len({a[0].tobytes(), a[1].tobytes(), a[2].tobytes(), c[0].tobytes()}) == 4


def test_bad_inputs_are_named(tmp_path, wise_file):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "ok"}\n{"tag": "x"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: no \"prompt\""):
    bf.read_prompts(str(bad), "geneval")
  bad.write_text('{"prompt": "ok"}\nnot json\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
    bf.read_prompts(str(bad), "geneval")
  with pytest.raises(FileNotFoundError, match="GenEval prompts"):
    bf.read_prompts(str(tmp_path / "missing.jsonl"), "geneval")
  with pytest.raises(FileNotFoundError, match="holds no <key>.txt"):
    bf.read_prompts(str(tmp_path), "dpg")
  dup = tmp_path / "dup.json"
  dup.write_text(json.dumps([{"Prompt": "a", "prompt_id": 1}, {"Prompt": "b", "prompt_id": 1}]))
  with pytest.raises(ValueError, match="prompt_id '1' repeats"):
    bf.read_prompts(str(dup), "wise")
  with pytest.raises(ValueError, match="unknown benchmark format 'parti'"):
    bf.read_prompts(wise_file, "parti")
  with pytest.raises(ValueError, match="WISE scores one image"):
    bf.Writer("wise", str(tmp_path), 4)
  with pytest.raises(ValueError, match="must be a square"):
    bf.Writer("dpg", str(tmp_path), 3)
  with pytest.raises(ValueError, match="--batch must be >= 1"):
    bf.generate(fake_sample, [], bf.Writer("wise", str(tmp_path), 1), 0, 0, progress=False)
