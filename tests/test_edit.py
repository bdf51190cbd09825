"""``iomm_jax.edit`` (the zero-shot editing route of ``iomm-edit``): its inputs (ImgEdit-style
JSON, folders) with their errors, and ImgEdit's output layout from a generator with a (tiny,
random) VAE codec."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from iomm_jax import edit, inference
from iomm_jax.configs.loading import load_config
from iomm_jax.data import benchmark_format
from iomm_jax.train import pretrain
from tests.conftest import ROOT


def _png(path, colour=(200, 30, 30), size=(40, 30)) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, colour).save(path)


def test_imgedit_json_and_folder_inputs(tmp_path):
  (tmp_path / "empty").mkdir()
  _png(tmp_path / "src" / "a.png")
  _png(tmp_path / "src" / "deep" / "b.jpg")
  (tmp_path / "src" / "notes.txt").write_text("not an image")
  table = {"7": {"id": "a.png", "prompt": " make it blue ", "edit_type": "replace"},
           "8": {"id": "deep/b.jpg", "prompt": "add a cup"}}  # fmt: skip
  path = tmp_path / "src" / "edits.json"
  path.write_text(json.dumps(table))
  items = edit.read_edits(str(path))  # sources relative to the JSON's folder by default
  assert [(it.key, it.prompt, it.index) for it in items] == [("7", "make it blue", 0),
                                                              ("8", "add a cup", 1)]  # fmt: skip
  assert items[1].line == os.path.join(str(tmp_path / "src"), "deep/b.jpg")
  edit.check_sources(items)
  folder = edit.folder_edits(str(tmp_path / "src"), "make it red")
  assert [it.key for it in folder] == ["a", os.path.join("deep", "b")]
  img = edit.load_source(items[0].line, 16)
  assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and tuple(img[8, 8]) == (200, 30, 30)
  bad = {
    "[1, 2]": "must be a non-empty",
    '{"x": {"prompt": "p"}}': "entry 'x' has no \"id\"",
    '{"x": {"id": "a.png"}}': "entry 'x' has no \"prompt\"",
    '{"a/b": {"id": "a.png", "prompt": "p"}}': "id 'a/b' cannot be a file name",
    "{not json": "is not JSON",
  }
  for text, message in bad.items():
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
      edit.read_edits(str(path))
  path.write_text(json.dumps({"1": {"id": "gone.png", "prompt": "p"}}))
  with pytest.raises(ValueError, match=r"edit '1': source image .*gone.png' is not a file"):
    edit.check_sources(edit.read_edits(str(path)))
  with pytest.raises(ValueError, match="holds no image"):
    edit.folder_edits(str(tmp_path / "empty"), "x")
  (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(ValueError, match=r"source image .*broken.png"):
    edit.load_source(str(tmp_path / "broken.png"), 16)


@pytest.mark.slow  # a VAE-codec run's compilations (about 2 CPU minutes); .ci/run runs it
def test_imgedit_layout_from_a_vae_generator(quick_mllm, tmp_path):
  """A stage-1 run with a tiny random VAE codec edits an ImgEdit-style JSON into D/<id>.png at
  the model's size, resumably (the CLI's loop: ``benchmark_format.generate`` over the items)."""
  wd = str(tmp_path / "vae_run")
  overrides = {"model.mllm_from": quick_mllm[0], "model.codec": "vae", "model.vae": "tiny",
               "train.num_steps": 2, "sample.num_grid": 0}  # fmt: skip
  pretrain.train_and_evaluate(
    load_config(os.path.join(ROOT, "experiments", "shapes", "pretrain.py:quick"), overrides), wd
  )
  config, ctx, params = inference.load_generator(wd)
  for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
    _png(tmp_path / "src" / f"{i}.png", colour)
  table = {f"id{i}": {"id": f"{i}.png", "prompt": "make it red"} for i in range(3)}
  (tmp_path / "src" / "edits.json").write_text(json.dumps(table))
  items = edit.read_edits(str(tmp_path / "src" / "edits.json"))
  size = config.model.image_size

  def sample_fn(chunk, keys):
    sources = np.stack([edit.load_source(it.line, size) for it in chunk])
    return edit.edit(config, ctx, params, sources, [it.prompt for it in chunk], keys, steps=2)

  out = str(tmp_path / "out")
  writer = benchmark_format.Writer(benchmark_format.EDIT_FORMAT, out, 1)
  counts = benchmark_format.generate(sample_fn, items, writer, 0, 2, False, pass_items=True)
  assert counts["generated_images"] == 3 and sorted(os.listdir(out)) == [
    "id0.png", "id1.png", "id2.png"
  ]  # fmt: skip
  first = np.asarray(Image.open(os.path.join(out, "id0.png")))
  assert first.shape == (size, size, 3)
  os.remove(os.path.join(out, "id0.png"))
  again = benchmark_format.generate(sample_fn, items, writer, 0, 2, False, pass_items=True)
  assert again["generated_images"] == 1
  assert np.array_equal(np.asarray(Image.open(os.path.join(out, "id0.png"))), first)
  with pytest.raises(ValueError, match="ImgEdit scores one image per prompt"):
    benchmark_format.Writer(benchmark_format.EDIT_FORMAT, out, 2)
