"""The recipe study's runner (``iomm_jax.cli.study``) and a one-seed miniature of question 1."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from iomm_jax.cli import study
from tests.conftest import ROOT


def _report(overall: float) -> dict:
  cats = {"single_object": overall, "two_object": 0.0, "counting": 1.0, "colors": 0.5,
          "position": 0.0, "color_attr": 0.25}  # fmt: skip
  return {"overall": overall, "categories": cats}


def test_summarise_markdown_plot_and_docs(tmp_path):
  s = study.summarise([_report(0.2), _report(0.4)])
  assert s["overall_mean"] == pytest.approx(0.3) and s["seeds"] == 2
  assert s["overall_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
  assert s["categories"]["counting"] == 1.0
  results = {"A->B": s, "C->D": study.summarise([_report(0.1)])}
  table = study.markdown(results)
  assert "| A->B | 0.300 ± 0.141 | 2 |" in table and "| C->D | 0.100 ± 0.000 | 1 |" in table
  png = str(tmp_path / "plot.png")
  study.plot(results, "title", png)
  pixels = np.asarray(Image.open(png).convert("RGB"))
  bar = np.all(pixels == (90, 130, 200), axis=-1)  # the bars' colour
  rows = np.flatnonzero(bar.any(axis=1))
  lengths = [bar[r].sum() for r in (rows[0], rows[-1])]  # first and last arm
  assert len(rows) > 0 and lengths[0] == pytest.approx(3 * lengths[1], rel=0.05)  # 0.3 vs 0.1
  doc = str(tmp_path / "RESULTS.md")
  with open(doc, "w") as f:
    f.write("# Results\n\nkeep me\n")
  study.write_docs(doc, "q1_small", "table one")
  study.write_docs(doc, "q2_small", "table two")
  study.write_docs(doc, "q1_small", "table one, again")
  text = open(doc).read()
  assert "keep me" in text and "table two" in text and "table one, again" in text
  assert "table one\n" not in text and text.count("<!-- study:q1_small begin -->") == 1


def test_contrast_is_the_paired_difference_over_seeds():
  tags = ["a"] * 4 + ["b"] * 4
  arm = lambda *correct: {"correct": [list(c) for c in correct], "tags": tags}  # noqa: E731
  results = {
    "A": arm([1, 1, 0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]),
    "B": arm([0, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]),
  }
  r = study.contrast(results, study.Contrast("c", "A", "B"))
  # seed 0: per category [1, 1, 0, 0] and [0, 1, 1, 0] -> 0.5 (paired SE sqrt(2/12)/2); seed 1: 1
  assert r["per_seed"] == pytest.approx([0.5, 1.0])
  assert r["per_seed_image_se"] == pytest.approx([np.sqrt(2 * (1 / 3) / 4) / 2, 0.0])
  assert r["difference"] == pytest.approx(0.75)
  seed_se = np.std([0.5, 1.0], ddof=1) / np.sqrt(2)
  assert r["se"] == pytest.approx(max(seed_se, r["image_se"])) and r["z"] == pytest.approx(
    0.75 / r["se"]
  )
  table = study.contrast_table(results, [study.Contrast("c", "A", "B")])
  assert "| c: A − B | +0.750 ± 0.250 | 3.0 |" in table
  with pytest.raises(ValueError, match="per-image verdicts"):
    study.contrast({"A": {}, "B": {}}, study.Contrast("c", "A", "B"))
  other = {**results["B"], "prompts": [f"p{i}" for i in range(8)]}
  mine = {**results["A"], "prompts": [f"p{i}" for i in range(7, -1, -1)]}
  with pytest.raises(ValueError, match="same prompts"):
    study.contrast({"A": mine, "B": other}, study.Contrast("c", "A", "B"))


def test_the_ledger_keeps_results_across_calls_and_drops_stale_ones(tmp_path, monkeypatch):
  """Results measured in one session are reused by the next (nothing retrained), an arm's table
  grows seed by seed, contrasts pair only the seeds both arms ran, and a changed experiment
  (another fingerprint) is neither reused nor tabulated."""
  tags = ["a"] * 2 + ["b"] * 2
  trained = []

  def run_arm(arm, seed, scale, root, question, metric="geneval"):
    trained.append((arm.name, seed))
    correct = [seed % 2 == 0, True, arm.name == "A", False]
    return {"overall": 0.5 if arm.name == "A" else 0.25, "categories": {"a": 0.5, "b": 0.5},
            "correct": correct, "tags": tags, "prompts": ["p", "q", "r", "s"]}  # fmt: skip

  monkeypatch.setattr(study, "run_arm", run_arm)
  arms = [study.Arm("A"), study.Arm("B", pretrain_overrides=(("diffusion.mask_ratio", 0.5),))]
  scale, path = study.SCALES["quick"], str(tmp_path / "ledger")
  study.run_question("q", arms, [0], scale, str(tmp_path), ledger=study.Ledger(path, "q"))
  study.run_question("q", arms[:1], [0, 1], scale, str(tmp_path), ledger=study.Ledger(path, "q"))
  assert trained == [("A", 0), ("B", 0), ("A", 1)]  # A seed 0 came from the ledger
  held = study.Ledger(path, "q").current(arms, scale, "geneval")
  assert {k: list(v) for k, v in held.items()} == {"A": [0, 1], "B": [0]}
  entry = held["A"][1]
  assert entry["date"] and entry["commit"] and entry["report"]["overall"] == 0.5
  results = {
    n: study.summarise([e["report"] for e in by.values()], list(by)) for n, by in held.items()
  }
  d = study.contrast(results, study.Contrast("c", "A", "B"))
  assert d["seeds"] == [0] and d["per_seed"] == pytest.approx([0.25])
  # a change to what an arm trains makes its entries stale
  changed = [arms[0], study.Arm("B", pretrain_overrides=(("diffusion.mask_ratio", 0.6),))]
  assert list(study.Ledger(path, "q").current(changed, scale, "geneval")) == ["A"]
  study.run_question("q", changed[1:], [0], scale, str(tmp_path), ledger=study.Ledger(path, "q"))
  assert trained[-1] == ("B", 0)
  # another question's arm that is the same experiment is taken from its ledger, untrained
  same = study.run_question("q9", [study.Arm("A again")], [1], scale, str(tmp_path),
                            ledger=study.Ledger(path, "q9"))  # fmt: skip
  assert trained[-1] == ("B", 0) and same["A again"]["overall"] == [0.5]
  assert study.Ledger(path, "q9").entries["A again"]["1"]["date"] == entry["date"]
  # another metric of the same runs is another recipe
  rec = study.recipe(arms[0], 0, scale, "reconstruction")
  assert not rec.matches(study.recipe(arms[0], 0, scale, "geneval").configs)
  # a config key the project gained since an entry was measured, left at its default, matches
  old = json.loads(json.dumps(rec.configs))
  del old["stages"][1]["diffusion"]["mask_ratio"]
  assert rec.matches(old)
  old["stages"][1]["diffusion"]["mix_ratio"] = 0.3  # a real difference
  assert not rec.matches(old)


def test_main_prints_contrasts_and_plots_into_a_folder_without_touching_results(
  tmp_path, monkeypatch, capsys
):
  """``--plot-dir``: the table of this call drawn into ``<dir>/<question>_<scale>.png`` (two
  questions of one script into two files), the paired contrast printed, RESULTS left alone."""
  tags = ["a", "a", "b", "b"]

  def run_arm(arm, seed, scale, root, question, metric="geneval"):
    correct = [True, arm.name == "A", seed == 0, False]
    return {"overall": 0.5, "categories": {"a": 0.5, "b": 0.5}, "correct": correct,
            "tags": tags, "prompts": ["p", "q", "r", "s"]}  # fmt: skip

  monkeypatch.setattr(study, "run_arm", run_arm)
  monkeypatch.setattr(study, "write_docs", lambda *a: pytest.fail("RESULTS written"))
  arms = [study.Arm("A"), study.Arm("B", pretrain_overrides=(("diffusion.mask_ratio", 0.5),))]
  plots = tmp_path / "plots"
  argv = ["--scale", "quick", "--seeds", "0", "1", "--root", str(tmp_path / "runs"),
          "--plot-dir", str(plots)]  # fmt: skip
  study.main("q8", "Q8", arms, "q8.py", argv, contrasts=(study.Contrast("A vs B", "A", "B"),))
  study.main("q8r", "Q8r", arms, "q8.py", argv)
  out = capsys.readouterr().out
  assert "| A vs B: A − B | +0.250" in out  # A gets prompt q right, B never
  assert sorted(os.listdir(plots)) == ["q8_quick.png", "q8r_quick.png"]
  with Image.open(plots / "q8_quick.png") as im:
    assert im.size[0] > 200 and im.size[1] > 100


def test_arm_validation():
  with pytest.raises(ValueError, match="pretrain='text'"):
    study.Arm("x", pretrain="text")
  with pytest.raises(ValueError, match="arm names repeat"):
    study.run_question(
      "q", [study.Arm("a"), study.Arm("a")], [0], study.SCALES["quick"], "/nonexistent"
    )


def test_a_run_from_before_a_new_config_key_is_still_the_same_run(tmp_path):
  scale = study.SCALES["quick"]
  defaults = study._config("finetune", scale, scale.finetune_steps, {})
  want = study._config("finetune", scale, scale.finetune_steps, {"seed": 3})
  other = tmp_path / "q1" / "arm_x-s3"
  (other / "checkpoints" / str(want.train.num_steps)).mkdir(parents=True)
  old = json.loads(want.to_json())
  del old["data"]["path"]  # a key the project gained after this run
  (other / "config.json").write_text(json.dumps(old))
  wd = str(tmp_path / "q2" / "arm_y-s3")
  assert study._same_run(str(tmp_path), wd, want, defaults) == str(other)
  old["diffusion"]["mix_ratio"] = 0.3  # a real difference
  (other / "config.json").write_text(json.dumps(old))
  assert study._same_run(str(tmp_path), wd, want, defaults) is None
  old["diffusion"]["mix_ratio"] = want.diffusion.mix_ratio
  old["data"]["path"] = "/elsewhere"  # a new key the old run had otherwise
  (other / "config.json").write_text(json.dumps(old))
  assert study._same_run(str(tmp_path), wd, want, defaults) is None


def test_a_preempted_pretraining_stops_the_study_before_its_fine_tune(tmp_path, monkeypatch):
  from iomm_jax.train import finetune, loop, pretrain

  def preempted(config, workdir):
    raise loop.Preempted(5, workdir)

  finetuned = []
  monkeypatch.setattr(study, "mllm_dir", lambda root, scale: "/stage0")
  monkeypatch.setattr(pretrain, "train_and_evaluate", preempted)
  monkeypatch.setattr(finetune, "train_and_evaluate", lambda c, wd: finetuned.append(wd))
  argv = ["--scale", "quick", "--seeds", "0", "--root", str(tmp_path)]
  with pytest.raises(SystemExit) as exit_:
    study.main("q", "Q", [study.Arm("a")], "q.py", argv)
  assert exit_.value.code == 75 and finetuned == []  # no stage 2 from a stopped stage 1


@pytest.mark.slow  # issue 18: a long end-to-end set-up; .ci/run runs every slow test
def test_question_1_miniature(tmp_path):
  """CI's one-seed miniature of question 1: all six recipes train, evaluate and tabulate."""
  path = os.path.join(ROOT, "experiments", "shapes", "study", "q1_recipes.py")
  spec = importlib.util.spec_from_file_location("q1_recipes", path)
  q1 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(q1)
  root = str(tmp_path)
  results = study.main(
    "q1",
    "Q1",
    q1.ARMS,
    path,
    ["--scale", "quick", "--seeds", "0", "--root", root],
    contrasts=q1.CONTRASTS,
  )
  assert list(results) == [
    "Image->Image", "Image->Pair", "Image->Mix", "Pair->Image", "Pair->Pair", "Pair->Mix"
  ]  # fmt: skip
  for r in results.values():
    assert 0.0 <= r["overall_mean"] <= 1.0 and r["seeds"] == 1
  # two pre-training runs (image, pair) serve the six recipes
  assert sorted(os.listdir(os.path.join(root, "pretrain"))) == ["image-s0", "pair-s0"]
  with open(os.path.join(root, "pretrain", "pair-s0", "config.json")) as f:
    pair = json.load(f)
  assert pair["diffusion"]["mix_ratio"] == 0.0 and pair["train"]["init_from"] == "scratch"
  with open(os.path.join(root, "q1", "arm_Image_Mix-s0", "config.json")) as f:
    mix = json.load(f)
  assert mix["diffusion"]["mix_ratio"] == 0.5
  assert mix["train"]["init_from"] == os.path.join(root, "pretrain", "image-s0")
  # the miniature samples no training-time grids (config.sample.num_grid = 0)
  assert not [f for d, _, fs in os.walk(root) for f in fs if f.startswith("samples_")]
  with open(os.path.join(root, "q1", "results_quick.json")) as f:
    assert set(json.load(f)) == set(results)
  # the paper's contrasts come from the per-image verdicts of the same prompts and noise
  for c in q1.CONTRASTS:
    d = study.contrast(results, c)
    assert d["difference"] == pytest.approx(
      results[c.a]["overall_mean"] - results[c.b]["overall_mean"]
    )
  assert len(results["Image->Mix"]["correct"][0]) == 6 * study.SCALES["quick"].eval_per_category
  # question 7 scores question 1's trained runs on zero-shot editing, training nothing new
  edits = study.run_question(
    "q7", q1.ARMS[2:3], [0], study.SCALES["quick"], root, metric="editing", runs="q1"
  )
  assert set(edits["Image->Mix"]["categories"]) == {
    "recolor success", "add success", "recolor preservation", "add preservation",
    "reconstruct r=0.0", "reconstruct r=0.85",
  }  # fmt: skip
  assert not os.path.exists(os.path.join(root, "q7"))
  # question 2's second table: the stage-1 models' reconstruction control, no stage 2 trained
  quick = study.SCALES["quick"]
  recon = study.run_question("q2r", q1.ARMS[:1], [0], quick, root, metric="reconstruction")
  assert set(recon["Image->Image"]["categories"]) == {
    "r=0.0 preservation", "r=0.0 exact", "r=0.85 preservation", "r=0.85 exact"
  }  # fmt: skip
  assert os.path.exists(os.path.join(root, "pretrain", "image-s0", "eval"))
  assert not os.path.exists(os.path.join(root, "q2r"))
  with pytest.raises(ValueError, match="needs an image-only stage 1"):
    study.run_question("q2r", q1.ARMS[3:4], [0], quick, root, metric="reconstruction")


def test_a_run_that_stored_its_paths_absolute_is_the_same_run(tmp_path, monkeypatch):
  """Workdirs store their paths absolute (workdirs.prepare_workdir); the study asks with relative
  ones (its --root): still the same run."""
  monkeypatch.chdir(tmp_path)
  scale = study.SCALES["quick"]
  overrides = {"model.mllm_from": "runs/study/mllm", "train.init_from": "runs/study/pretrain/x"}
  defaults = study._config("finetune", scale, scale.finetune_steps, {})
  want = study._config("finetune", scale, scale.finetune_steps, overrides)
  other = tmp_path / "runs" / "study" / "q1" / "arm_x-s0"
  (other / "checkpoints" / str(want.train.num_steps)).mkdir(parents=True)
  saved = json.loads(want.to_json())
  saved["model"]["mllm_from"] = str(tmp_path / "runs" / "study" / "mllm")
  saved["train"]["init_from"] = str(tmp_path / "runs" / "study" / "pretrain" / "x")
  (other / "config.json").write_text(json.dumps(saved))
  wd = "runs/study/q2/arm_y-s0"
  assert study._same_run("runs/study", wd, want, defaults) == "runs/study/q1/arm_x-s0"
