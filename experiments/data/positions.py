"""Training-time position sampling: which positions a training row carries.

Training on short rows with position values drawn from a larger range lets a
model see large positions (and large distances) without long rows. Each
sampler maps one document piece of ``n`` tokens to ``n`` strictly increasing
positions in ``[0, max_position)``; ``PositionSampling`` applies it to every
document piece of every row (a piece: a run of equal segment ids), drawing
from ``(seed, step, row)`` so a batch stays a pure function of its step.
Evaluation uses plain positions, except where asked: the ``algorithmic``
evaluator's ``positions`` setting draws each example's positions from a
sampler (Ruoss et al. evaluate randomized positions that way).

``config.data.positions`` names one, as text with keyword parameters
(``"pose(max_position=1024)"``); :func:`from_text` parses it, and an unknown
name or parameter is one clear error.

* ``plain``: 0, 1, ..., n - 1 (no sampling).
* ``randomized`` (Ruoss et al. 2023, randomized positional encodings): a
  uniformly drawn sorted subset of n distinct values of [0, max_position)
  (the JAX form, for on-device use, is
  ``attention.positional.randomized_positions``).
* ``pose`` (Zhu et al. 2023, PoSE): two chunks with skip-wise offsets, as the
  authors' ``train_pose.py``: the first chunk's length r in [1, (n + 1) // 2],
  offsets u0 <= u1 in [0, max_position - n]; chunk one is ``u0 + [0, r)``,
  chunk two ``u1 + [r, n)``.
* ``cream`` (Wu et al. 2024, CREAM): head and tail pieces of k tokens keep
  the two ends of the target range (``[0, k)`` and ``[max_position - k,
  max_position)``); the middle piece is contiguous, its start drawn from a
  Gaussian over its allowed range truncated to it (mean the range's middle,
  standard deviation ``sigma`` times its width: our parameterisation of the
  paper's middle focus); k is ``head`` or ``n // 3`` with equal chance
  (the paper's continuity / relativity halves).
* ``e2`` (E^2-LLM, Liu et al. 2024): a scale g drawn from 1..max_scale and an
  offset delta: positions ``delta + g * [0, n)`` (integer positions: the
  stride g is the paper's scale augmentation, delta its position offset).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from extrapolax.common import checks

__all__ = ["PositionSampler", "Plain", "Randomized", "PoSE", "Cream", "E2",
           "names", "from_name", "from_text", "sample_rows",
           "PositionSampling"]


class PositionSampler:
  """Base: ``__call__(rng, n) -> int64 [n]`` strictly increasing, in
  ``[0, max_position)``."""
  name: ClassVar[str] = ""
  max_position: int = 0

  def _check(self):
    checks.check_int(f"{self.name} max_position", self.max_position, 1)

  def check_length(self, n: int) -> None:
    if n > self.max_position:
      raise ValueError(f"positions {self.name!r}: a {n}-token piece does not "
                       f"fit max_position={self.max_position}; give "
                       "max_position >= train_len")

  def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
    raise NotImplementedError


_SAMPLERS: dict[str, type] = {}


def _register(cls):
  _SAMPLERS[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  return tuple(_SAMPLERS)


def from_name(name: str, **params) -> PositionSampler:
  """The sampler ``name`` with ``params``; unknown names/parameters raise."""
  return checks.build_registered("positions", _SAMPLERS, name, params)


def from_text(text: str) -> PositionSampler:
  """``"name"`` or ``"name(key=value, ...)"`` -> the sampler."""
  if isinstance(text, PositionSampler):
    return text
  match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*",
                       text if isinstance(text, str) else "")
  if not match:
    raise ValueError(f"positions={text!r} must be 'name' or "
                     f"'name(key=value, ...)' with name in {names()}")
  params = {}
  for part in (p for p in (match.group(2) or "").split(",") if p.strip()):
    key, eq, value = part.partition("=")
    try:
      if not eq:
        raise ValueError
      params[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      raise ValueError(f"positions={text!r}: parameters are key=value "
                       f"numbers, got {part.strip()!r}") from None
  return from_name(match.group(1), **params)


@_register
@dataclasses.dataclass(frozen=True)
class Plain(PositionSampler):
  """0, 1, ..., n - 1."""
  name: ClassVar[str] = "plain"

  def check_length(self, n):
    del n

  def __call__(self, rng, n):
    del rng
    return np.arange(n)


@_register
@dataclasses.dataclass(frozen=True)
class Randomized(PositionSampler):
  """Ruoss et al.: a sorted uniform subset of [0, max_position)."""
  name: ClassVar[str] = "randomized"
  max_position: int = 2048

  def __post_init__(self):
    self._check()

  def __call__(self, rng, n):
    return np.sort(rng.choice(self.max_position, size=n, replace=False))


@_register
@dataclasses.dataclass(frozen=True)
class PoSE(PositionSampler):
  """PoSE: two chunks, skip-wise offsets u0 <= u1 (the authors' scheme)."""
  name: ClassVar[str] = "pose"
  max_position: int = 2048

  def __post_init__(self):
    self._check()

  def __call__(self, rng, n):
    room = self.max_position - n
    first = int(rng.integers(1, (n + 1) // 2 + 1))
    u0 = int(rng.integers(0, room + 1))
    u1 = int(rng.integers(u0, room + 1))
    pos = np.arange(n)
    return np.where(pos < first, pos + u0, pos + u1)


@_register
@dataclasses.dataclass(frozen=True)
class Cream(PositionSampler):
  """CREAM: head and tail at the range's ends, a Gaussian-placed middle."""
  name: ClassVar[str] = "cream"
  max_position: int = 2048
  head: int = 4
  sigma: float = 0.25

  def __post_init__(self):
    self._check()
    checks.check_int("cream head", self.head, 1)
    checks.check_number("cream sigma", self.sigma, positive=True)

  def __call__(self, rng, n):
    k = min(self.head if rng.random() < 0.5 else n // 3, n // 3)
    if k == 0:                      # too short for three pieces
      start = int(rng.integers(0, self.max_position - n + 1))
      return start + np.arange(n)
    mid = n - 2 * k
    lo, hi = k, self.max_position - k - mid     # the middle's start range
    width = hi - lo
    start = lo
    if width > 0:
      while True:                   # truncated Gaussian, by rejection
        x = rng.normal(lo + width / 2, self.sigma * width)
        if lo <= x <= hi:
          start = int(round(x))
          break
    return np.concatenate([np.arange(k), start + np.arange(mid),
                           self.max_position - k + np.arange(k)])


@_register
@dataclasses.dataclass(frozen=True)
class E2(PositionSampler):
  """E^2-LLM: ``delta + g * [0, n)``, g in 1..max_scale, delta uniform."""
  name: ClassVar[str] = "e2"
  max_position: int = 2048
  max_scale: int = 4

  def __post_init__(self):
    self._check()
    checks.check_int("e2 max_scale", self.max_scale, 1)

  def __call__(self, rng, n):
    top = max(1, min(self.max_scale, (self.max_position - 1) // max(n - 1, 1)))
    g = int(rng.integers(1, top + 1))
    delta = int(rng.integers(0, self.max_position - g * (n - 1)))
    return delta + g * np.arange(n)


def sample_rows(sampler: PositionSampler, segment_ids: np.ndarray, *,
                seed: int, step: int, row_offset: int = 0) -> np.ndarray:
  """Positions [B, L] for rows of ``segment_ids`` (each run of equal ids is
  one document piece), row b drawing from (seed, step, row_offset + b)."""
  segment_ids = np.asarray(segment_ids)
  out = np.zeros(segment_ids.shape, np.int64)
  for b, row in enumerate(segment_ids):
    rng = np.random.default_rng([seed, step, row_offset + b])
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(row)]):
      sampler.check_length(hi - lo)
      out[b, lo:hi] = sampler(rng, hi - lo)
  return out.astype(np.int32)


class PositionSampling:
  """A training source whose batches carry sampled positions.

  Wraps ``source`` (``.batch(step[, rows=])``, ``.state(step)``); tokens,
  targets, segment ids and weights are the source's.
  """

  def __init__(self, source, sampler: PositionSampler, *, seed: int):
    self.source, self.sampler, self.seed = source, sampler, int(seed)

  def batch(self, step: int, *, rows: Optional[tuple[int, int]] = None
            ) -> Mapping[str, Any]:
    batch = (self.source.batch(step) if rows is None
             else self.source.batch(step, rows=rows))
    out = {k: batch[k] for k in batch}
    segments = out.get("segment_ids")
    if segments is None:          # one document per row
      segments = np.zeros(np.shape(out["tokens"]), np.int32)
    out["positions"] = sample_rows(self.sampler, segments,
                                   seed=self.seed, step=step,
                                   row_offset=0 if rows is None else rows[0])
    return out

  def state(self, step: int):
    inner = self.source.state(step) if hasattr(self.source, "state") else None
    return {"source": inner, "positions": repr(self.sampler)}
