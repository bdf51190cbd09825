"""The command-line entry points in --quick / :quick mode, as a user runs them."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def run(*args, ok=True):
  proc = subprocess.run(
    [os.path.join(BIN, args[0]), *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=900
  )
  if ok and proc.returncode:
    raise AssertionError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("demo"))
  proc = run("iomm-demo", "--workdir", wd, "--quick")
  return wd, proc.stdout


def test_demo_quick_runs_every_stage(demo):
  wd, out = demo
  for stage in ("mllm", "pretrain", "finetune"):
    with open(os.path.join(wd, stage, "metrics.jsonl")) as f:
      recs = [json.loads(line) for line in f]
    assert recs[-1]["step"] == 6
  assert os.path.getsize(os.path.join(wd, "samples.png")) > 0
  with open(os.path.join(wd, "demo_eval.json")) as f:
    report = json.load(f)
  assert set(report["scores"]) == {"pretrain", "finetune"}
  assert 0.0 <= report["scores"]["finetune"]["overall"] <= 1.0
  cmp, scores = report["finetune_minus_pretrain"], report["scores"]
  assert cmp["difference"] == pytest.approx(
    scores["finetune"]["overall"] - scores["pretrain"]["overall"]
  )
  assert "stage 2 - stage 1, same 12 prompts and noise:" in out  # --quick: 2 per category
  assert "demo wall time" in out


def test_one_checkpoint_has_one_score(demo):
  """The demo, iomm-eval, the recipe study and benchmarks/shapes_score.py score a checkpoint with
  the same protocol: the same report for the same images."""
  from iomm_jax.cli import study

  wd = os.path.join(demo[0], "finetune")
  with open(os.path.join(demo[0], "demo_eval.json")) as f:
    from_demo = json.load(f)["scores"]["finetune"]  # --quick: 2 images per category
  run("iomm-eval", "--workdir", wd, "--per-category", "2")
  with open(os.path.join(wd, "eval", "shapes_geneval.json")) as f:
    from_eval = json.load(f)
  from_study = study._evaluate(wd, study.Scale("t", 0, 0, 0, 2, 2), "geneval")
  bench = run(sys.executable, "benchmarks/shapes_score.py", "--workdir", wd, "--per-category", "2")
  from_bench = json.loads(bench.stdout.strip().splitlines()[-1])["scores"]
  keys = ("overall", "overall_se", "categories", "empty", "num_images", "prompts_per_category")
  for other in (from_eval, from_study, from_bench):
    assert {k: other[k] for k in keys} == {k: from_demo[k] for k in keys}
  assert from_study["correct"] == [bool(c) for c in from_study["correct"]]
  assert len(from_study["correct"]) == from_demo["num_images"] == 12


@pytest.mark.slow  # issue 18: a long end-to-end set-up; .ci/run runs every slow test
def test_train_cli_overrides_and_resume(demo, tmp_path):
  """A relative path is stored absolute (the workdir loads from anywhere); the resume passes it
  absolute, and its model check compares no paths."""
  wd = str(tmp_path / "p")
  args = ("iomm-train", "--config", "experiments/shapes/pretrain.py:quick", "--workdir", wd)
  mllm = os.path.join(demo[0], "mllm")
  relative = f"--config.model.mllm_from={os.path.relpath(mllm, ROOT)}"  # run() runs in ROOT
  run(*args, relative, "--config.optim.lr=3e-4", "--config.train.num_steps=2")
  with open(os.path.join(wd, "config.json")) as f:
    saved = json.load(f)
  assert saved["optim"]["lr"] == 3e-4 and saved["model"]["mllm_from"] == mllm
  absolute = f"--config.model.mllm_from={mllm}"
  out = run(*args, absolute, "--config.optim.lr=3e-4", "--config.train.num_steps=4").stdout
  assert "resuming" in out and "step 4/4" in out


def test_train_cli_unknown_key_is_named(demo, tmp_path):
  proc = run(
    "iomm-train",
    "--config",
    "experiments/shapes/pretrain.py:quick",
    "--workdir",
    str(tmp_path),
    "--config.optim.learning_rate=3e-4",
    ok=False,
  )
  assert proc.returncode != 0
  assert "learning_rate" in proc.stderr


def test_sample_cli_writes_a_grid(demo, tmp_path):
  out = str(tmp_path / "grid.png")
  proc = run(
    "iomm-sample",
    "--workdir",
    os.path.join(demo[0], "finetune"),
    "--prompt",
    "a photo of two red circles",
    "--num",
    "4",
    "--steps",
    "2",
    "--out",
    out,
  )
  assert os.path.getsize(out) > 0 and "wrote" in proc.stdout


def test_sample_cli_from_a_moved_workdir(demo, tmp_path):
  """Was: a workdir's config.json kept ``model.mllm_from`` relative to the directory training
  ran in, so sampling from elsewhere failed ("'runs/demo/mllm' holds no checkpoint"). Here an
  older workdir (relative paths) moved to another tree is sampled from a third directory."""
  tree, here = tmp_path / "elsewhere" / "runs" / "demo", tmp_path / "somewhere_else"
  for stage in ("mllm", "finetune"):
    shutil.copytree(os.path.join(demo[0], stage), tree / stage)
  os.makedirs(here)
  with open(tree / "finetune" / "config.json") as f:
    config = json.load(f)
  config["model"]["mllm_from"] = "runs/demo/mllm"
  config["train"]["init_from"] = "runs/demo/pretrain"
  with open(tree / "finetune" / "config.json", "w") as f:
    json.dump(config, f)
  out = str(here / "grid.png")
  proc = subprocess.run(
    [os.path.join(BIN, "iomm-sample"), "--workdir", str(tree / "finetune"), "--prompt",
     "a photo of a red circle", "--num", "1", "--steps", "1", "--out", out],
    cwd=here, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.getsize(out) > 0 and "warning" not in proc.stderr


def test_eval_cli_writes_scores_and_failures(demo):
  wd = os.path.join(demo[0], "finetune")
  proc = run("iomm-eval", "--workdir", wd, "--per-category", "1", "--steps", "2")
  with open(os.path.join(wd, "eval", "shapes_geneval.json")) as f:
    report = json.load(f)
  assert report["step"] == 6 and report["num_images"] == 6 and report["per_category"] == 1
  assert set(report["categories"]) == {
    "single_object", "two_object", "counting", "colors", "position", "color_attr"
  }  # fmt: skip
  assert report["overall"] == sum(report["categories"].values()) / 6
  assert "overall" in proc.stdout and "wrote" in proc.stdout
  if report["overall"] < 1.0:
    assert os.path.getsize(os.path.join(wd, "eval", "shapes_geneval_failures.png")) > 0
  bad = run("iomm-eval", "--workdir", wd, "--step", "5", ok=False)
  assert bad.returncode != 0 and "no checkpoint at step 5; saved steps: [3, 6]" in bad.stderr


@pytest.mark.slow  # issue 18: a long end-to-end set-up; .ci/run runs every slow test
def test_sample_cli_benchmark_layouts_resume_identically(demo, tmp_path):
  from tests.data.test_benchmark_format import REAL_DPG, REAL_GENEVAL

  wd = os.path.join(demo[0], "finetune")
  geneval = REAL_GENEVAL
  if not os.path.isfile(geneval):  # see tests/data/test_benchmark_format.py
    geneval = str(tmp_path / "meta.jsonl")
    with open(geneval, "w") as f:
      for p in ("a photo of a red circle", "a photo of two squares"):
        f.write(json.dumps({"tag": "single_object", "include": [], "prompt": p}) + "\n")
  out = str(tmp_path / "geneval")
  common = ("--workdir", wd, "--steps", "2", "--no-progress")
  args = ("--prompts-file", geneval, "--format", "geneval", "--outdir", out, "--limit", "2")
  run("iomm-sample", *common, *args, "--num-per-prompt", "2", "--batch", "3")
  assert sorted(os.listdir(out)) == ["00000", "00001"]
  assert sorted(os.listdir(os.path.join(out, "00001", "samples"))) == ["0000.png", "0001.png"]
  sample = os.path.join(out, "00001", "samples", "0001.png")
  with open(sample, "rb") as f:
    before = f.read()
  os.remove(sample)  # an interrupted run, resumed with another batch size
  proc = run("iomm-sample", *common, *args, "--num-per-prompt", "2", "--batch", "1")
  assert '"generated_images": 1' in proc.stdout
  with open(sample, "rb") as f:
    assert f.read() == before

  dpg = REAL_DPG
  if not os.path.isdir(dpg):
    dpg = str(tmp_path / "prompts")
    os.makedirs(dpg)
    with open(os.path.join(dpg, "7.txt"), "w") as f:
      f.write("A red circle above a blue square, drawn on a white background. " * 4)
  out = str(tmp_path / "dpg")
  proc = run(
    "iomm-sample", *common, "--prompts-file", dpg, "--format", "dpg", "--outdir", out,
    "--limit", "1", "--max-text-len", "640",
  )  # fmt: skip
  (name,) = os.listdir(out)
  assert name.endswith(".png")
  warned = [line for line in proc.stderr.splitlines() if "out-of-vocabulary" in line]
  assert len(warned) == 1  # a DPG prompt has words the shapes captions never had
  if dpg != REAL_DPG:
    assert "words 'A', 'drawn', 'on', 'white', 'background.':" in warned[0]

  wise = str(tmp_path / "wise.json")
  with open(wise, "w") as f:
    json.dump([{"Prompt": "a photo of a red circle", "prompt_id": 11}], f)
  out = str(tmp_path / "wise")
  run("iomm-sample", *common, "--prompts-file", wise, "--format", "wise", "--outdir", out)
  assert os.listdir(out) == ["11.png"]
  bad = run("iomm-sample", "--workdir", wd, "--prompts-file", wise, "--outdir", out, ok=False)
  assert bad.returncode != 0 and "--format" in bad.stderr


def test_flags_take_dashes_or_underscores():
  from iomm_jax.cli import absl_argv

  argv = ["prog", "--num-per-prompt=4", "--no-ema", "--prompts-file", "a-b.json", "--config.x=y-z"]
  assert absl_argv(argv) == [
    "prog", "--num_per_prompt=4", "--noema", "--prompts_file", "a-b.json", "--config.x=y-z"
  ]  # fmt: skip


@pytest.mark.slow  # issue 18: a long end-to-end set-up; .ci/run runs every slow test
def test_edit_cli_is_the_studys_zero_shot_route(demo, tmp_path):
  """iomm-edit on shapes-world editing tasks written as an ImgEdit-style JSON: one PNG per id
  (ImgEdit's layout), the images the study's editing scorer draws for the same tasks (so both
  score the same), resumable, and a folder mode that mirrors its layout."""
  import numpy as np
  from PIL import Image

  from iomm_jax import inference
  from iomm_jax.configs import specs
  from iomm_jax.data import pipeline, shapes
  from iomm_jax.eval import shapes_editing

  wd = os.path.join(demo[0], "finetune")
  config, ctx, params = inference.load_generator(wd)
  world = pipeline.shapes_world(specs.from_config(config).data)
  tasks = shapes_editing.make_tasks(world, per_kind=2, seed=0)  # recolour and add
  src = tmp_path / "sources"
  (src / "sub").mkdir(parents=True)
  table = {}
  for i, t in enumerate(tasks):
    name = f"{i:03d}.png" if i % 2 else f"sub/{i:03d}.png"
    Image.fromarray(shapes.render(t.source, world)).save(src / name)
    table[f"task{i}"] = {"id": name, "prompt": t.instruction, "edit_type": t.kind}
  (tmp_path / "edits.json").write_text(json.dumps(table))
  out = tmp_path / "edited"
  args = ["iomm-edit", "--workdir", wd, "--edits", str(tmp_path / "edits.json"), "--image_root",
          str(src), "--outdir", str(out), "--batch", "32", "--progress=false"]  # fmt: skip
  proc = run(*args)
  assert sorted(os.listdir(out)) == sorted(f"{k}.png" for k in table)
  got = np.stack([np.asarray(Image.open(out / f"task{i}.png")) for i in range(len(tasks))])
  ev = shapes_editing.evaluate(config, ctx, params, per_kind=2, seed=0, reconstruction=False)
  sources = np.stack([shapes.render(t.source, world) for t in tasks])
  want = shapes_editing.edit_lib.edit(config, ctx, params, sources,
                                      [t.instruction for t in tasks],
                                      shapes_editing.task_keys(tasks, 0))  # fmt: skip
  assert got.shape == (len(tasks), config.model.image_size, config.model.image_size, 3)
  assert np.array_equal(got, want)  # the study's images (the same batch shape: 32)
  scored = shapes_editing.summarise([shapes_editing.score(g, t, world) for g, t in
                                     zip(got, tasks, strict=True)], tasks)  # fmt: skip
  assert scored["success"] == ev["success"] and set(scored["kinds"]) == {"recolor", "add"}
  # resumed: nothing left to do; a removed output comes back identical
  assert '"generated_images": 0' in run(*args).stdout
  os.remove(out / "task1.png")
  assert '"generated_images": 1' in run(*args).stdout
  assert np.array_equal(np.asarray(Image.open(out / "task1.png")), got[1])
  # a folder by one instruction mirrors its layout; a missing source is one line
  run("iomm-edit", "--workdir", wd, "--images", str(src), "--instruction", "make the circle red",
      "--outdir", str(tmp_path / "folder"), "--progress=false")  # fmt: skip
  assert sorted(os.listdir(tmp_path / "folder")) == ["001.png", "003.png", "sub"]
  bad = run("iomm-edit", "--workdir", wd, "--image", str(tmp_path / "nope.png"),
            "--instruction", "make it red", ok=False)  # fmt: skip
  assert bad.returncode != 0 and "nope.png" in bad.stderr and "Traceback" not in bad.stderr
  assert proc.returncode == 0
