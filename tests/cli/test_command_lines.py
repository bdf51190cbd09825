"""Command lines that help (issue 16, item 3), without a trained model: ``--help`` of every absl
command, one-line errors for misspelled config keys, the out-of-vocabulary rule and warning,
and workdir paths that resolve from any directory. The checks that need a trained workdir
(sampling from a moved workdir, the warning of ``iomm-sample``) are in ``test_cli.py``."""

import json
import os
import subprocess
import sys

import pytest

from iomm_jax import cli
from iomm_jax.configs import loading, specs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
QUICK = os.path.join(ROOT, "experiments", "shapes", "pretrain.py:quick")
OWN_FLAGS = {  # a few flags of each command's own module (and the shared multi-process ones)
  "iomm-train": ["--config:", "--config.KEY=VALUE:", "--workdir:", "--num-processes:"],
  "iomm-sample": ["--prompt:", "--num-per-prompt:", "--[no-]ema:", "--coordinator-address:"],
  "iomm-eval": ["--per-category:", "--batch:", "--[no-]ema:", "--process-id:"],
  "iomm-demo": ["--workdir:", "--[no-]quick:", "--eval-per-category:"],
}


def _run_all(commands: list[list[str]], cwd: str = ROOT) -> list[subprocess.CompletedProcess]:
  """Runs the commands (console scripts of this venv) side by side; their results, in order."""
  procs = [
    subprocess.Popen(
      [os.path.join(BIN, c[0]), *c[1:]], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True,
    )
    for c in commands
  ]  # fmt: skip
  out = []
  for c, p in zip(commands, procs, strict=True):
    stdout, stderr = p.communicate(timeout=300)
    out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
  return out


def test_help_shows_the_commands_own_flags_and_exits_0(tmp_path):
  """Was: ``USAGE: ... Try --helpfull`` and exit 1; ``--helpfull`` had the command's flags after
  140 lines of absl and JAX flags."""
  names = list(OWN_FLAGS)
  runs = _run_all([[n, "--help"] for n in names] + [["iomm-eval", "--helpfull"]], str(tmp_path))
  for name, proc in zip([*names, "iomm-eval"], runs, strict=True):
    assert proc.returncode == 0, (name, proc.stderr[-2000:])
    text = proc.stdout
    assert text.startswith(f"{name}: ") and f"flags of {name}" in text, (name, text[:300])
    for flag in OWN_FLAGS[name]:
      assert f"\n  {flag}" in text, (name, flag)
    assert "Try --helpfull" not in text and "Traceback" not in proc.stderr
  full = runs[-1].stdout
  assert "--[no-]ema: use the EMA parameters (default: true)" in runs[1].stdout  # iomm-sample
  assert "--batch: images per device per sampler call" in runs[2].stdout  # help strings too
  assert "(default: 32)" in runs[2].stdout and "--workdir: a stage-1 or stage-2 workdir" in full
  assert "(required)" in runs[0].stdout.split("--workdir:")[1].split("\n  --")[0]
  assert "absl.logging:" in full and full.index("--per-category:") < full.index("absl.")
  assert full.index("--process-id:") < full.index("absl.")


def test_misspelled_config_key_is_one_line_naming_the_nearest_key():
  """Was: a 56-line chained traceback ending in an escaped AttributeError."""
  base = ["iomm-train", "--config", QUICK, "--workdir", "/nonexistent/never/written"]
  runs = _run_all([[*base, "--config.optim.lrr=1"], [*base, "--config.optimm.lr=1"]])
  expected = [
    "iomm-train: error: argument --config.optim.lrr: unknown config key 'optim.lrr'; "
    "did you mean 'optim.lr'?",
    "iomm-train: error: argument --config.optimm.lr: unknown config key 'optimm.lr' "
    "(no 'optimm'); did you mean 'optim.lr'?",
  ]
  for proc, want in zip(runs, expected, strict=True):
    assert proc.returncode == cli.USAGE_ERROR == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(want), proc.stderr[-2000:]
  assert not os.path.exists("/nonexistent/never/written")


def test_iomm_plan_names_bad_keys_the_same_way(capsys):
  """iomm-plan (argparse) words a bad key as iomm-train does, nearest key included."""
  from iomm_jax.cli import plan

  with pytest.raises(SystemExit) as e:
    plan.main(["--config", QUICK, "--mesh", "data=1", "--config.optimm.lrr=1"])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert e.value.code == 2
  assert err == (
    "iomm-plan: error: argument --config.optimm.lrr: unknown config key 'optimm.lrr' "
    "(no 'optimm'); did you mean 'optim.lr'?"
  )


def test_export_and_sampling_default_to_the_same_weights():
  """Was: ``export-torch`` exported the raw parameters by default, ``iomm-sample`` sampled the
  EMA (its default is checked in the --help test above)."""
  import inspect

  from iomm_jax.cli import convert

  parser = convert._parser()
  base = ["export-torch", "--workdir", "w", "--out", "o"]
  assert parser.parse_args(base).ema is True
  assert parser.parse_args([*base, "--ema"]).ema is True
  assert parser.parse_args([*base, "--no-ema"]).ema is False
  assert inspect.signature(convert.export_torch).parameters["ema"].default is True
  assert "It exports the EMA" in convert.__doc__


def test_nearest_key_and_messages():
  """``loading``'s suggestions (difflib) and its messages when nothing is close."""
  config = loading.load_config(QUICK)
  near = {
    "optim.lrr": "optim.lr",
    "optimm.lr": "optim.lr",
    "model.mllm_frm": "model.mllm_from",
    "train.lr": "optim.lr",  # the right leaf in another section
    "sample.num_step": "sample.num_steps",
    "optim.learning_rate": None,
  }
  for key, want in near.items():
    assert loading.nearest_key(config, key) == want, key
  with pytest.raises(KeyError) as e:
    loading.set_dotted(config, "optim.learning_rate", 1.0)
  assert e.value.args[0].startswith("unknown config key 'optim.learning_rate'; 'optim' has b1, b2")
  with pytest.raises(KeyError) as e:
    loading.get_dotted(config, "optim.lr.x")
  assert e.value.args[0] == "unknown config key 'optim.lr.x': 'optim.lr' is a value, not a section"


# ----------------------------------------------------------------------------- vocabulary


@pytest.fixture(scope="module")
def shapes_tokenizer():
  """The shapes world's sentencepiece tokenizer, the corpus it was trained on and the held-out
  prompts iomm-eval samples."""
  from iomm_jax.assembly import context
  from iomm_jax.data import pipeline, shapes

  config = loading.load_config(QUICK)
  world = pipeline.shapes_world(specs.from_config(config).data)
  corpus = shapes.all_caption_corpus(world) + [config.model.aux_prompt]
  held_out = [m["prompt"] for m in shapes.eval_prompts(world, per_category=None)]  # iomm-eval's
  return context.train_tokenizer(config, ""), corpus + held_out


def test_out_of_vocabulary_words(shapes_tokenizer):
  """Was: "sneaker" became ``s ne a <unk> er`` and the prompt was sampled without a word."""
  tok, corpus = shapes_tokenizer
  assert [s for s in corpus if tok.unknown_words(s)] == []  # no caption or held-out prompt warns
  assert tok.unknown_words("a photo of two red circles, left of a square") == []
  assert tok.unknown_words("a photo of a sneaker") == ["sneaker"]  # holds <unk>
  assert tok.unknown_words("a redd dog next to a dog") == ["redd", "dog", "next"]  # split up
  assert tok.unknown_words("A red circle.") == ["A", "circle."]  # characters no caption had


def test_warning_is_one_line_per_prompt(shapes_tokenizer, capsys):
  """One line per distinct prompt, then one line counting the prompts past the limit."""
  tok, _ = shapes_tokenizer
  prompts = ["a photo of a sneaker"] * 4 + ["a photo of a red circle", "a dog and a bag"]
  assert cli.warn_unknown_words("iomm-sample", tok, prompts) == 2
  lines = capsys.readouterr().err.splitlines()
  assert lines == [
    "iomm-sample: warning: prompt 'a photo of a sneaker' has out-of-vocabulary word 'sneaker': "
    "the tokenizer learnt no such word from the training captions",
    "iomm-sample: warning: prompt 'a dog and a bag' has out-of-vocabulary words 'dog', 'bag': "
    "the tokenizer learnt no such word from the training captions",
  ]
  many = [f"a photo of {n} dogs" for n in ("five", "six", "seven")]
  assert cli.warn_unknown_words("iomm-eval", tok, many, limit=1) == 3
  err = capsys.readouterr().err.splitlines()
  assert (
    len(err) == 2 and err[1] == "iomm-eval: warning: 2 more prompts have out-of-vocabulary words"
  )


# ----------------------------------------------------------------------------- workdir paths


def test_workdir_config_stores_paths_absolute_and_resumes_either_way(tmp_path, monkeypatch):
  """Was: config.json kept ``model.mllm_from`` relative to the directory training ran in."""
  from iomm_jax.assembly import workdirs

  monkeypatch.chdir(tmp_path)
  os.makedirs("runs/demo/mllm")
  relative = {"model.mllm_from": "runs/demo/mllm"}
  workdirs.prepare_workdir(loading.load_config(QUICK, relative), "runs/demo/pretrain")
  with open("runs/demo/pretrain/config.json") as f:
    saved = json.load(f)
  assert saved["model"]["mllm_from"] == str(tmp_path / "runs/demo/mllm")
  assert saved["model"]["vae_checkpoint"] == saved["train"]["init_from"] == ""  # unset stays unset
  os.makedirs("runs/demo/pretrain/checkpoints")  # resume: the saved model config is compared
  workdirs.prepare_workdir(loading.load_config(QUICK, relative), "runs/demo/pretrain")
  absolute = {"model.mllm_from": str(tmp_path / "runs/demo/mllm")}
  saved["model"]["mllm_from"] = "runs/demo/mllm"  # an older workdir: relative in config.json
  with open("runs/demo/pretrain/config.json", "w") as f:
    json.dump(saved, f)
  workdirs.prepare_workdir(loading.load_config(QUICK, absolute), "runs/demo/pretrain")
  finetune = {"train.init_from": "scratch", "model.mllm_from": "runs/demo/mllm"}
  workdirs.prepare_workdir(loading.load_config(QUICK, finetune), "runs/demo/scratch")
  with open("runs/demo/scratch/config.json") as f:
    assert json.load(f)["train"]["init_from"] == "scratch"  # a word, not a path


def test_old_and_moved_workdirs_find_their_paths(tmp_path, monkeypatch):
  """Relative paths of an older workdir, and absolute ones of a moved tree, are found in and
  above the workdir; what is found nowhere, or is no local path, stays as it is."""
  from iomm_jax.assembly import workdirs

  tree = tmp_path / "elsewhere" / "runs" / "demo"
  for d in ("mllm", "pretrain", "finetune"):
    os.makedirs(tree / d)
  config = loading.load_config(QUICK)
  for key, value in (
    ("model.mllm_from", "runs/demo/mllm"),  # relative to the directory training ran in
    ("train.init_from", "/gone/home/me/runs/demo/pretrain"),  # absolute, then the tree moved
    ("data.path", "/gone/data/photos"),  # found nowhere: left as it is, for its error
    ("data.features", "gs://bucket/features"),  # not a local path
  ):
    loading.set_dotted(config, key, value)
  with open(tree / "finetune" / "config.json", "w") as f:
    f.write(config.to_json())
  monkeypatch.chdir(tmp_path)
  got = workdirs.load_workdir_config(str(tree / "finetune"))
  assert got.model.mllm_from == str(tree / "mllm")
  assert got.train.init_from == str(tree / "pretrain")
  assert got.data.path == "/gone/data/photos" and got.data.features == "gs://bucket/features"
  monkeypatch.chdir(tmp_path / "elsewhere")  # where training ran: the relative path as it is
  assert workdirs.load_workdir_config(str(tree / "finetune")).model.mllm_from == "runs/demo/mllm"
