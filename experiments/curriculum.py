"""Length curricula: train short, then long, at a fixed number of tokens
per step (``config.curriculum``).

Shortformer's staged training and Dataset Decomposition's length buckets
train on short sequences first. A training config's optional
``curriculum`` field is a schedule of stages, each (first step, train
length, batch size):

* a string ``"0:16x64,200:32x32,400:64x16"`` (``STEP:LENGTHxBATCH``,
  separated by commas or semicolons: ``tiny.py:curriculum=0:16x64;200:64x16``
  in a config argument), or a tuple of (step, length, batch) triples in a
  config file;
* the first stage starts at step 0, the starts increase and each is below
  ``train_steps``;
* every stage has ``length * batch == config.train_len *
  config.batch_size`` (the tokens per step stay fixed) and a length of at
  most ``config.train_len`` (the model's max_len: a learned position table
  and the RoPE scalings' original length); batches must suit the mesh.

Step ``s`` (0-based: the (s+1)-th update) trains on the stage with the
largest start <= s: its batch is that stage's data source's batch ``s``
(each stage's source is ``train_data.make_source`` of the config at the
stage's length and batch size), so the batches are a pure function of
(seed, step) and a run stopped mid-schedule resumes bit-identically (the
checkpoint records the stage, and a resume checks it). The learning-rate
schedule spans the whole run. Absent, None, "" or (): no curriculum.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

__all__ = ["Stage", "stages", "validate", "stage_at", "stage_config",
           "CurriculumSource", "make_source"]

_STAGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Stage:
  """From step ``start`` on: batches of ``batch_size`` x ``train_len``."""
  start: int
  train_len: int
  batch_size: int


def _parse(value) -> list:
  if isinstance(value, str):
    out = []
    for item in re.split(r"[,;]", value):
      match = _STAGE.match(item)
      if not match:
        raise ValueError(f"config.curriculum={value!r}: stage {item!r} is "
                         "not STEP:LENGTHxBATCH (e.g. '0:16x64,200:64x16')")
      out.append(tuple(int(g) for g in match.groups()))
    return out
  try:
    out = [tuple(stage) for stage in value]
  except TypeError:
    out = None
  if out is None or not all(
      len(s) == 3 and all(isinstance(x, int) and not isinstance(x, bool)
                          for x in s) for s in out):
    raise ValueError(f"config.curriculum={value!r} must be a string "
                     "'STEP:LENGTHxBATCH,...' or (step, length, batch) "
                     "integer triples")
  return out


def stages(config) -> Optional[tuple[Stage, ...]]:
  """The validated stages of ``config.curriculum`` (None: no curriculum).

  Raises:
    ValueError: one line naming the bad schedule and the rule it breaks.
  """
  value = config.get("curriculum")
  if value is None or (not isinstance(value, str) and hasattr(
      value, "__len__") and not value) or value == "":
    return None
  out = tuple(Stage(*s) for s in _parse(value))
  tokens = int(config.train_len) * int(config.batch_size)
  text = repr(value)
  if out[0].start != 0:
    raise ValueError(f"config.curriculum={text}: the first stage must start "
                     f"at step 0, not {out[0].start}")
  for before, after in zip(out, out[1:]):
    if after.start <= before.start:
      raise ValueError(f"config.curriculum={text}: stage starts must "
                       f"increase ({before.start} then {after.start})")
  for stage in out:
    if stage.start >= max(int(config.train_steps), 1):
      raise ValueError(f"config.curriculum={text}: the stage at step "
                       f"{stage.start} is never reached (train_steps="
                       f"{config.train_steps})")
    if not 1 <= stage.train_len <= int(config.train_len):
      raise ValueError(f"config.curriculum={text}: length "
                       f"{stage.train_len} must be in [1, config.train_len="
                       f"{config.train_len}]")
    if stage.batch_size < 1 or stage.train_len * stage.batch_size != tokens:
      raise ValueError(
          f"config.curriculum={text}: stage {stage.train_len}x"
          f"{stage.batch_size} has {stage.train_len * stage.batch_size} "
          f"tokens per step; every stage needs config.train_len x "
          f"config.batch_size = {tokens}")
  return out


def validate(config) -> None:
  """Raises ValueError naming a bad ``config.curriculum`` (or a stage's
  batch that does not suit the mesh)."""
  from extrapolax.experiments import sharding  # pylint: disable=import-outside-toplevel
  for stage in stages(config) or ():
    try:
      sharding.validate_mesh_config(stage_config(config, stage))
    except ValueError as e:
      raise ValueError(f"config.curriculum stage {stage.train_len}x"
                       f"{stage.batch_size}: {e}") from e


def stage_at(schedule: tuple[Stage, ...], index: int) -> tuple[int, Stage]:
  """(stage number, stage) that trains step ``index`` (0-based)."""
  number = max(i for i, s in enumerate(schedule) if s.start <= index)
  return number, schedule[number]


def stage_config(config, stage: Stage):
  """A copy of ``config`` at the stage's length and batch size (for its
  data source; the model keeps config.train_len as its max_len)."""
  out = config.copy_and_resolve_references()
  out.unlock()
  out.train_len = stage.train_len
  out.batch_size = stage.batch_size
  return out


class CurriculumSource:
  """A data source that serves each step from its stage's source."""

  def __init__(self, schedule: tuple[Stage, ...], sources: list):
    self.schedule = schedule
    self.sources = sources

  def shape(self, index: int) -> tuple[int, int]:
    """(batch_size, train_len) of step ``index``."""
    _, stage = stage_at(self.schedule, index)
    return stage.batch_size, stage.train_len

  def batch(self, index: int) -> Any:
    number, _ = stage_at(self.schedule, index)
    return self.sources[number].batch(index)

  def state(self, step: int) -> dict:
    """The stage that serves the next batch and its source's state."""
    number, stage = stage_at(self.schedule, step)
    source = self.sources[number]
    return {"stage": number, "train_len": stage.train_len,
            "batch_size": stage.batch_size,
            "source": source.state(step) if hasattr(source, "state")
                      else None}


def make_source(config, workdir: str, make) -> CurriculumSource:
  """The curriculum's source: ``make(stage config, workdir)`` per stage."""
  schedule = stages(config)
  return CurriculumSource(schedule, [make(stage_config(config, s), workdir)
                                     for s in schedule])
