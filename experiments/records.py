"""Results records: one JSON line per evaluation point.

Every evaluator returns a list of records made by :func:`make_record`; the
study appends them to ``results.jsonl`` with :func:`append` and the report
reads them back with :func:`read`, so a sweep can be re-reported without its
models.

Required fields (DESIGN.md), ``None`` where a field does not apply:

  model      the trained model's name ("rope", "alibi", ...)
  pe         its position encoding ("rope", "nope", "sinusoidal", ...)
  scaling    RoPE scaling applied at evaluation ("none", "linear", ...)
  scale      the scaling factor (1.0 when unscaled)
  mask       the attention mask at evaluation ("causal", "sliding_window(W)",
             "lambda(sinks=S, window=W)")
  train_len  the training length (for tasks: the longest training length)
  eval_len   the evaluation length (tokens per window, or the task length)
  mode       "nonoverlap" or "sliding" for perplexity, else None
  stride     the sliding stride (only with mode "sliding")
  task       the synthetic task or passkey, None for text
  metric     what ``value`` is ("perplexity", "passkey_accuracy", ...)
  value      a float (NaN when the model cannot run at that length)
  n_tokens   how many tokens the value averages over
  seed, step the training seed and step (None when unknown)

Optional fields: ``variant`` (the report's column label), ``experiment``
(which sweep made it: one report table per experiment), ``depth`` (passkey),
``position`` / ``position_end`` (loss-per-position buckets), ``train_min_len``
(the shortest training length of a task), ``n_trials``, ``decode``
(passkey: teacher_forced or greedy), ``answers`` (a greedy passkey cell's
decoded continuations, one string per trial) and ``base`` (a fine-tuned
study variant's base variant, ``study_finetune``).

NaN and infinite values are written as JSON's ``NaN`` / ``Infinity`` (what
Python's json module reads back).
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any, Iterable, Mapping

from extrapolax.experiments import jsonl

__all__ = ["FIELDS", "OPTIONAL_FIELDS", "MODES", "make_record", "append",
           "read", "variant_label"]

FIELDS = ("model", "pe", "scaling", "scale", "mask", "train_len", "eval_len",
          "mode", "stride", "task", "metric", "value", "n_tokens", "seed",
          "step")
OPTIONAL_FIELDS = ("variant", "experiment", "depth", "position",
                   "position_end", "train_min_len", "n_trials", "decode",
                   "answers", "base")
MODES = ("nonoverlap", "sliding")


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _text(name, value, *, optional=False):
  if value is None and optional:
    return None
  if not isinstance(value, str) or not value:
    raise ValueError(f"record field {name!r} must be a non-empty string"
                     f"{' or None' if optional else ''}, got {value!r}")
  return value


def _integer(name, value, minimum, *, optional=False):
  if value is None and optional:
    return None
  if not _is_int(value) or value < minimum:
    raise ValueError(f"record field {name!r} must be an integer >= {minimum}"
                     f"{' or None' if optional else ''}, got {value!r}")
  return int(value)


def _real(name, value, *, optional=False, finite=False):
  if value is None and optional:
    return None
  if not _is_real(value) or (finite and not math.isfinite(value)):
    raise ValueError(f"record field {name!r} must be a "
                     f"{'finite ' if finite else ''}number"
                     f"{' or None' if optional else ''}, got {value!r}")
  return float(value)


def make_record(**fields) -> dict[str, Any]:
  """A validated results record (see the module docstring for the fields).

  Raises:
    ValueError: a required field is missing, a field is unknown, or a value
      has the wrong type or range (the message names the field).
  """
  missing = [f for f in FIELDS if f not in fields]
  if missing:
    raise ValueError(f"record is missing fields {missing}; required: "
                     f"{list(FIELDS)}")
  unknown = sorted(set(fields) - set(FIELDS) - set(OPTIONAL_FIELDS))
  if unknown:
    raise ValueError(f"unknown record fields {unknown}; allowed: "
                     f"{list(FIELDS) + list(OPTIONAL_FIELDS)}")
  f = fields
  record = dict(
      model=_text("model", f["model"]),
      pe=_text("pe", f["pe"]),
      scaling=_text("scaling", f["scaling"]),
      scale=_real("scale", f["scale"], optional=True, finite=True),
      mask=_text("mask", f["mask"]),
      train_len=_integer("train_len", f["train_len"], 1),
      eval_len=_integer("eval_len", f["eval_len"], 1),
      mode=f["mode"],
      stride=_integer("stride", f["stride"], 1, optional=True),
      task=_text("task", f["task"], optional=True),
      metric=_text("metric", f["metric"]),
      value=_real("value", f["value"]),
      n_tokens=_integer("n_tokens", f["n_tokens"], 0),
      seed=_integer("seed", f["seed"], 0, optional=True),
      step=_integer("step", f["step"], 0, optional=True),
  )
  if record["mode"] is not None and record["mode"] not in MODES:
    raise ValueError(f"record field 'mode' must be one of {MODES} or None, "
                     f"got {record['mode']!r}")
  if (record["mode"] == "sliding") != (record["stride"] is not None):
    raise ValueError(f"record field 'stride' is set exactly when mode is "
                     f"'sliding'; got mode={record['mode']!r}, "
                     f"stride={record['stride']!r}")
  for name in ("variant", "experiment", "decode", "base"):
    if name in f:
      record[name] = _text(name, f[name], optional=True)
  if "depth" in f:
    depth = _real("depth", f["depth"], optional=True, finite=True)
    if depth is not None and not 0.0 <= depth <= 1.0:
      raise ValueError(f"record field 'depth' must be in [0, 1], got {depth}")
    record["depth"] = depth
  for name in ("position", "position_end", "train_min_len", "n_trials"):
    if name in f:
      record[name] = _integer(name, f[name], 0, optional=True)
  if "answers" in f:
    answers = f["answers"]
    if not isinstance(answers, (list, tuple)) or not all(
        isinstance(a, str) for a in answers):
      raise ValueError(f"record field 'answers' must be a list of strings, "
                       f"got {answers!r}")
    record["answers"] = list(answers)
  return record


def variant_label(record: Mapping[str, Any]) -> str:
  """The report's column name: ``variant`` or model [+ scaling] [+ mask]."""
  if record.get("variant"):
    return record["variant"]
  label = record["model"]
  if record["scaling"] != "none":
    label += f" {record['scaling']}"
    if record.get("scale") is not None:
      label += f" x{record['scale']:g}"
  if record["mask"] != "causal":
    label += f" {record['mask']}"
  return label


def append(path: str, records: Iterable[Mapping[str, Any]]) -> int:
  """Validates ``records`` and appends them to ``path`` (JSON lines).

  Every record is validated before anything is written, so a bad record
  leaves the file as it was. The lines go out in one write, then flush and
  fsync (``jsonl.append``: a torn last line left by a kill is cut away
  first). Returns the number of records written.
  """
  lines = [json.dumps(make_record(**r), sort_keys=True) for r in records]
  jsonl.append(path, lines)
  return len(lines)


def read(path: str) -> list[dict[str, Any]]:
  """The records of a JSON-lines file, validated (blank lines skipped).

  A torn last line (a kill during an append) is dropped with a warning; a
  bad line elsewhere raises ValueError naming the file and line.
  """
  records = []
  for number, data in jsonl.read(path):
    try:
      if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {data!r}")
      records.append(make_record(**data))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{path}:{number}: bad record: {e}") from e
  return records
