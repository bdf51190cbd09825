"""README's own-data example, every stage through the console scripts (issue 16, item 1): a
generated folder of photo-like images with captions -> iomm-prepare -> stage 0 (the folder's own
tokenizer and captions) -> stage 1 -> stage 2 -> iomm-eval (held-out records) -> iomm-sample,
with the quick variants of ``experiments/folder/``. Slow (about 3 CPU minutes): ``-m slow``."""

import json
import os
import subprocess
import sys

import pytest

from iomm_jax.data.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
EXP = os.path.join(ROOT, "experiments", "folder")


def _run(cwd: str, *cmd: str) -> str:
  exe = (
    [sys.executable, "-m", cmd[0][3:]] if cmd[0].startswith("-m ") else [os.path.join(BIN, cmd[0])]
  )
  p = subprocess.run([*exe, *cmd[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, (cmd, p.stderr[-3000:])
  return p.stdout


@pytest.mark.slow
def test_every_stage_on_an_own_captioned_folder(tmp_path):
  cwd, data = str(tmp_path), "runs/own/prepared"
  spec = lambda stage: f"{EXP}/{stage}.py:data={data},quick"  # noqa: E731
  _run(cwd, "-m iomm_jax.data.example_folder", "--out", "runs/own/images", "--num", "120")
  out = _run(cwd, "iomm-prepare", "--images", "runs/own/images", "--out", data,
             "--resolution", "32", "--min-size", "24")  # fmt: skip
  assert "wrote 120 records" in out
  _run(cwd, "iomm-train", "--config", spec("mllm"), "--workdir", "runs/own/mllm")
  tok = Tokenizer.load(os.path.join(cwd, "runs/own/mllm/tokenizer.model"))
  for word in ("ball", "beach", "grass", "room"):  # the folder's words (none in the shapes
    ids = tok.encode(word)  # grammar): known pieces, at most two
    assert tok.unk_id not in ids and len(ids) <= 2, (word, ids)
  _run(cwd, "iomm-train", "--config", spec("pretrain"), "--workdir", "runs/own/pretrain",
       "--config.model.mllm_from=runs/own/mllm")  # fmt: skip
  init = "--config.train.init_from=runs/own/pretrain"
  _run(cwd, "iomm-train", "--config", spec("finetune"), "--workdir", "runs/own/finetune",
       "--config.model.mllm_from=runs/own/mllm", init)  # fmt: skip
  for stage in ("pretrain", "finetune"):  # grids of the held-out records, not shapes scenes
    assert [f for f in os.listdir(os.path.join(cwd, "runs/own", stage)) if f.startswith("samples_")]
  out = _run(cwd, "iomm-eval", "--workdir", "runs/own/finetune", "--per_category", "2")
  assert "held-out caption match" in out
  with open(os.path.join(cwd, "runs/own/finetune/eval/heldout.json")) as f:
    report = json.load(f)
  # the quick variants hold out the folder's last 8 records; their captions are the prompts
  assert 0 < report["num_images"] <= 8 and len(report["prompts"]) == report["num_images"]
  assert 0.0 <= report["caption_match"] <= 1.0 and 0.0 < report["chance"] <= 1.0
  assert os.path.exists(os.path.join(cwd, "runs/own/finetune/eval/heldout.png"))
  prompt = report["prompts"][0]
  _run(cwd, "iomm-sample", "--workdir", "runs/own/finetune", "--prompt", prompt,
       "--num", "2", "--out", "runs/own/samples.png")  # fmt: skip
  assert os.path.exists(os.path.join(cwd, "runs/own/samples.png"))
