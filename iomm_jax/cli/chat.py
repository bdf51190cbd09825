r"""``iomm-chat``: the frozen MLLM answers a question about an image, or captions it.

  iomm-chat --mllm DIR (--image FILE | --images FOLDER [--batch 8]) [--prompt "question"] \
      [--max-new-tokens 64] [--temperature 0] [--top-p 1] [--top-k 0] [--seed 0] [--out FILE.jsonl]

``--mllm``: an imported InternVL directory (``iomm-convert import-internvl``; prompts rendered
with its chat template) or a stage-0 workdir (the shapes captioner: it only captions, so
``--prompt`` is refused). Without ``--prompt`` the image is captioned (a chat model is asked
"Describe the image."). ``--temperature 0`` decodes greedily; above 0 it samples (with
``--top-p`` / ``--top-k``), each image with its own key from ``--seed`` and its index in the
sorted folder, so a resumed or re-batched run samples each image with the same key.

Each answer is one JSON line ``{"image", "prompt", "answer", "tokens"}`` (``prompt``: the
``--prompt`` given, null for a caption; ``tokens``: the generated ids, the stop token last when
one ended the answer) appended to ``--out`` (or printed when there is none). A run is resumable:
images that ``--out`` already answers for the same prompt are skipped. Images are read as RGB
and resized to the model's input size (bicubic, as transformers' InternVL image processor; one
tile, no dynamic tiling). A folder is read without descending into subfolders; its files with an
image suffix (``IMAGE_SUFFIXES``) are the images. Flags may be spelt with dashes or underscores.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging
from PIL import Image, UnidentifiedImageError

from iomm_jax.cli import run
from iomm_jax.data.inputs import IMAGE_EXTS

IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)  # the suffixes iomm-prepare reads

_MLLM = flags.DEFINE_string("mllm", None, "a stage-0 workdir or an imported InternVL directory")
_IMAGE = flags.DEFINE_string("image", None, "one image file")
_IMAGES = flags.DEFINE_string("images", None, "a folder of images (answered in sorted order)")
_BATCH = flags.DEFINE_integer("batch", 8, "images per decoding call")
_PROMPT = flags.DEFINE_string("prompt", None, "the question (default: caption the image)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "most tokens per answer")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling temperature")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "sampling: nucleus probability mass (1: all)")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sampling: only the k most likely tokens (0: all)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_OUT = flags.DEFINE_string("out", None, "answers .jsonl, appended and resumed (default: print)")


def _check_flags() -> None:
  """Flag values and combinations, checked before anything is read."""
  if (_IMAGE.value is None) == (_IMAGES.value is None):
    raise app.UsageError("give exactly one of --image FILE and --images FOLDER")
  for name, value, low in (("--batch", _BATCH.value, 1), ("--max-new-tokens", _MAX_NEW.value, 1)):
    if value < low:
      raise app.UsageError(f"{name} must be >= {low}, got {value}")
  if _TEMPERATURE.value < 0:
    raise app.UsageError(f"--temperature must be >= 0, got {_TEMPERATURE.value}")
  if not 0 < _TOP_P.value <= 1:
    raise app.UsageError(f"--top-p must be in (0, 1], got {_TOP_P.value}")
  if _TOP_K.value < 0:
    raise app.UsageError(f"--top-k must be >= 0, got {_TOP_K.value}")


def image_files() -> list[str]:
  """The image paths of ``--image`` / ``--images`` (normalised; a folder's in sorted order),
  each opened once to check that it is an image."""
  if _IMAGE.value is not None:
    path = os.path.normpath(_IMAGE.value)
    if not os.path.isfile(path):
      raise app.UsageError(f"--image {_IMAGE.value!r} does not exist (or is not a file)")
    files = [path]
  else:
    folder = _IMAGES.value
    if not os.path.isdir(folder):
      raise app.UsageError(f"--images {folder!r} is not a folder")
    names = sorted(
      n
      for n in os.listdir(folder)
      if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, n))
    )
    if not names:
      raise app.UsageError(
        f"--images {folder!r} holds no image ({', '.join(IMAGE_SUFFIXES)} files)"
      )
    files = [os.path.normpath(os.path.join(folder, n)) for n in names]
  for path in files:
    try:
      with Image.open(path) as im:
        im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      raise app.UsageError(f"{path!r} is not a readable image ({type(e).__name__})") from None
  return files


def read_image(path: str, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: the file as RGB, bicubic-resized to ``size`` if it differs."""
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
      return np.asarray(im, np.uint8)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise app.UsageError(f"{path!r} is not a readable image ({type(e).__name__})") from None


def answered(out: str | None, prompt: str | None) -> set[str]:
  """The images ``out`` already answers for ``prompt``. A last line cut short (an interrupted
  run) is dropped from the file; any other line that is not a JSON answer is an error."""
  if not out or not os.path.exists(out):
    return set()
  with open(out, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  if lines and lines[-1] and not text.endswith("\n"):  # cut short: rewritten without it
    lines = lines[:-1]
    with open(out, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines if line))
  done = set()
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      image = rec["image"]
    except (json.JSONDecodeError, KeyError, TypeError):
      raise app.UsageError(f"--out {out!r} line {i} is not an iomm-chat answer") from None
    if rec.get("prompt") == prompt:
      done.add(os.path.normpath(image))
  return done


def _main(argv):
  del argv
  _check_flags()
  logging.set_verbosity(logging.WARNING)
  if not os.path.isdir(_MLLM.value):  # the cheap checks first: JAX is not imported yet
    raise app.UsageError(f"--mllm {_MLLM.value!r} is not a directory")
  files = image_files()
  index = {path: i for i, path in enumerate(files)}  # the sampling key of each image
  prompt = _PROMPT.value
  done = answered(_OUT.value, prompt)
  todo = [p for p in files if p not in done]
  from iomm_jax import chat, runtime
  from iomm_jax.convert.tensors import ConversionError

  try:
    kind = chat.kind(_MLLM.value)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  if kind == "caption" and prompt:
    raise app.UsageError(
      f"--mllm {_MLLM.value!r} is a stage-0 captioner (trained on captions only, no "
      "questions): leave --prompt out to caption the images"
    )
  if not todo:
    print(f"nothing to do: {_OUT.value} already answers all {len(files)} images")
    return
  runtime.enable_compilation_cache()
  try:
    cm = chat.load(_MLLM.value)
  except (FileNotFoundError, ValueError, ConversionError) as e:
    raise app.UsageError(str(e)) from None
  sink = open(_OUT.value, "a", encoding="utf-8") if _OUT.value else sys.stdout
  try:
    bs = min(_BATCH.value, len(todo))  # no padded rows for a small run
    for start in range(0, len(todo), bs):
      paths = todo[start : start + bs]
      images = np.stack([read_image(p, cm.image_size) for p in paths])
      answers = chat.answer(
        cm,
        images,
        prompt,
        max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        seed=_SEED.value,
        rows=[index[p] for p in paths],
        batch_size=bs,
      )
      for path, a in zip(paths, answers, strict=True):
        rec = {"image": path, "prompt": prompt, "answer": a.text, "tokens": list(a.tokens)}
        sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
      sink.flush()
  finally:
    if sink is not sys.stdout:
      sink.close()
  if _OUT.value:
    print(f"wrote {len(todo)} answers to {_OUT.value} ({len(files) - len(todo)} already there)")


def main():
  """Entry point of ``iomm-chat``."""
  run(_main, "iomm-chat", __name__, required=["mllm"])


if __name__ == "__main__":
  main()
