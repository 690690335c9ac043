"""JSON-lines files that survive a kill: metrics.jsonl and results.jsonl.

``append`` writes a whole batch of lines with one write, then flush and
fsync, so a kill leaves at most one half-written *last* line. ``read``
drops such a torn last line (no newline, not JSON) with a warning naming
the file, and ``append`` cuts it away before writing; a bad line anywhere
else is one ValueError naming the file and line.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from absl import logging as absl_logging

__all__ = ["read", "append"]


def _split(path: str) -> tuple[list[tuple[int, Any]], int, bool]:
  """(parsed (line number, value) pairs, bytes of the whole lines, torn).

  Raises ValueError naming the file and line of a bad line that is not a
  torn last one.
  """
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  tail = lines.pop()          # b"" when the file ends with a newline
  parsed = []
  for number, raw in enumerate(lines, 1):
    if not raw.strip():
      continue
    try:
      parsed.append((number, json.loads(raw)))
    except ValueError as e:
      raise ValueError(f"{path}:{number}: not a JSON line ({e}); fix or "
                       "delete that line") from e
  whole = len(data) - len(tail)
  if not tail.strip():
    return parsed, len(data), False
  try:
    parsed.append((len(lines) + 1, json.loads(tail)))
    return parsed, len(data), False     # complete, only its newline missing
  except ValueError:
    return parsed, whole, True


def read(path: str) -> list[tuple[int, Any]]:
  """(line number, parsed JSON) of every non-blank line of ``path``; a torn
  last line (a kill during an append) is dropped with a warning."""
  parsed, _, torn = _split(path)
  if torn:
    absl_logging.warning("%s: dropping its last line, which is incomplete (a "
                         "run was killed while appending it)", path)
  return parsed


def append(path: str, lines: Iterable[str]) -> None:
  """Appends ``lines`` (JSON texts, no newlines) with one write + fsync,
  first cutting away a torn last line (or ending a complete one)."""
  text = "".join(line + "\n" for line in lines)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a+b") as f:
    size = f.tell()
    if size:
      f.seek(size - 1)
      if f.read(1) != b"\n":
        _, whole, torn = _split(path)
        if torn:
          absl_logging.warning("%s: cutting away its incomplete last line "
                               "before appending", path)
          f.truncate(whole)
        else:
          text = "\n" + text
    f.write(text.encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())
