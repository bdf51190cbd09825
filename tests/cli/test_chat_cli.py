"""``iomm-chat`` as a user runs it, on the tiny random chat InternVL (tests/convert/tiny_internvl)
and, slow, on the quick stage-0 captioner: a folder -> one JSON line per image, resumed without
recomputing; bad input is one line naming it (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.convert import tiny_internvl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT = os.path.join(os.path.dirname(sys.executable), "iomm-chat")


def chat(*args: str) -> subprocess.CompletedProcess:
  """Runs ``iomm-chat`` with ``args`` in the repository root."""
  return subprocess.run(
    [CHAT, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
  )


def ok(*args: str) -> subprocess.CompletedProcess:
  """``chat`` that must succeed."""
  proc = chat(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
  """The single stderr line of a usage error (exit 2), which must hold ``words``."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("iomm-chat: error: "), proc.stderr
  for w in words:
    assert w in lines[0], lines[0]
  return lines[0]


def read(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(imported tiny chat InternVL directory, a folder of 3 differently sized images + a text
  file)."""
  root = tmp_path_factory.mktemp("chat_cli")
  tc = tiny_internvl.build(str(root / "model"))
  folder = root / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i, size in enumerate((56, 40, 64)):
    Image.fromarray(rng.integers(0, 256, (size, size + i, 3), dtype=np.uint8)).save(
      folder / f"img{i}.png"
    )
  (folder / "notes.txt").write_text("not an image")
  return tc.imported, str(folder)


def test_folder_to_jsonl_and_rerun_recomputes_nothing(tiny, tmp_path):
  model, folder = tiny
  out = str(tmp_path / "answers.jsonl")
  args = ("--mllm", model, "--images", folder, "--batch", "2", "--max-new-tokens", "5")
  proc = ok(*args, "--out", out)
  assert "wrote 3 answers" in proc.stdout
  recs = read(out)
  assert [os.path.basename(r["image"]) for r in recs] == ["img0.png", "img1.png", "img2.png"]
  for r in recs:
    assert set(r) == {"image", "prompt", "answer", "tokens"} and r["prompt"] is None
    assert 1 <= len(r["tokens"]) <= 5 and isinstance(r["answer"], str)
  before = open(out, encoding="utf-8").read()
  again = ok(*args, "--out", out)
  assert "nothing to do" in again.stdout
  assert open(out, encoding="utf-8").read() == before


def test_resume_answers_only_the_missing_images(tiny, tmp_path):
  """An interrupted file (a line missing, the last one cut short) is completed: only those
  images are answered again, with the same greedy answers; another prompt is a new set."""
  model, folder = tiny
  out = tmp_path / "answers.jsonl"
  args = ("--mllm", model, "--images", folder, "--max-new-tokens", "4", "--out", str(out))
  ok(*args, "--prompt", "what is it?")
  full = read(out)
  lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
  out.write_text(lines[1] + lines[2][:10], encoding="utf-8")  # img0 missing, img2 cut short
  proc = ok(*args, "--prompt", "what is it?")
  assert "wrote 2 answers" in proc.stdout and "(1 already there)" in proc.stdout
  by_image = {r["image"]: r for r in read(out)}
  assert by_image == {r["image"]: r for r in full}


def test_bad_input_is_one_line(tiny, tmp_path):
  model, folder = tiny
  one_line_error(chat("--mllm", model, "--image", str(tmp_path / "nope.png")), "nope.png")
  one_line_error(chat("--mllm", model, "--image", os.path.join(folder, "notes.txt")), "notes.txt")
  (tmp_path / "empty").mkdir()
  one_line_error(chat("--mllm", model, "--images", str(tmp_path / "empty")), "holds no image")
  one_line_error(chat("--mllm", str(tmp_path / "none"), "--image", "x.png"), "none")
  one_line_error(chat("--mllm", model), "--image")
  bad = tmp_path / "bad.jsonl"
  bad.write_text("not json\n{}\n", encoding="utf-8")
  one_line_error(
    chat("--mllm", model, "--images", folder, "--out", str(bad)), "bad.jsonl", "line 1"
  )


@pytest.mark.slow
def test_stage0_captioner_captions_and_refuses_questions(quick_mllm, tiny, tmp_path):
  """The quick stage-0 workdir captions the folder; a question is refused in one line."""
  wd, _ = quick_mllm
  _, folder = tiny
  out = str(tmp_path / "captions.jsonl")
  ok("--mllm", wd, "--images", folder, "--out", out, "--max-new-tokens", "8")
  recs = read(out)
  assert len(recs) == 3 and all(r["prompt"] is None for r in recs)
  one_line_error(
    chat("--mllm", wd, "--images", folder, "--prompt", "what is red?"), "stage-0 captioner"
  )
