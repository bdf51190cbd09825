"""Atomic file writes: a temporary file in the same directory, flushed to disk, then renamed over
the target, so a crash or a kill never leaves half a file (the project's one text/JSON writer)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(
  path: str,
  obj: Any,
  *,
  indent: int = 2,
  sort_keys: bool = True,
  ensure_ascii: bool = True,
  newline: bool = False,
) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically; ``newline`` ends the file with one."""
  text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
  write_text(path, text + ("\n" if newline else ""))
