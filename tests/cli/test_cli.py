"""The command-line entry points in --quick / :quick mode, as a user runs them."""

import json
import os
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
  assert "demo wall time" in out


def test_train_cli_overrides_and_resume(demo, tmp_path):
  wd = str(tmp_path / "p")
  args = (
    "iomm-train",
    "--config",
    "experiments/shapes/pretrain.py:quick",
    "--workdir",
    wd,
    f"--config.model.mllm_from={demo[0]}/mllm",
    "--config.optim.lr=3e-4",
  )
  run(*args, "--config.train.num_steps=2")
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["optim"]["lr"] == 3e-4
  out = run(*args, "--config.train.num_steps=4").stdout
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
