"""Attention masks as small composable value objects, and the block classifier.

A mask says which (query, key) pairs may attend, as a predicate on absolute
positions: query position ``i`` and key position ``j``. Without explicit
positions, query ``t`` of ``T`` sits at ``i = S - T + t`` and key ``j`` at ``j``
(bottom-right alignment, as in DESIGN.md).

Each mask offers three views of the same set:

* ``mask(q_pos, k_pos)``: a broadcasting ``jnp`` predicate, usable on index
  blocks inside a chunked loop or a kernel;
* ``mask.materialize(q_len, kv_len)``: the dense ``bool[q_len, kv_len]``;
* ``mask.block_visibility(q_lo, q_hi, k_lo, k_hi)``: for rectangles of
  positions (inclusive bounds), whether *some* pair may be visible and whether
  *all* pairs are. "some" may over-approximate and "all" may under-approximate;
  both are exact for the primitive masks on rectangles.

Masks combine with ``&`` and ``|``; they are frozen dataclasses, so equal masks
compare equal and hash alike (they are static arguments under ``jax.jit``).
Segment ids are not part of a mask: ``dot_product_attention`` applies them.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

EMPTY = 0     # no pair in the block is visible: skip it
PARTIAL = 1   # some pairs are visible: compute with the mask
FULL = 2      # every pair is visible: compute without masking

__all__ = [
    "Mask", "Causal", "SlidingWindow", "Lambda", "Chunked", "PrefixLM",
    "And", "Or", "EMPTY", "PARTIAL", "FULL", "classify_blocks",
    "block_minmax", "default_positions", "as_mask",
]


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


class Mask:
  """Base class. Subclasses are frozen dataclasses."""

  def __call__(self, q_pos, k_pos):
    """bool array: may query position ``q_pos`` see key position ``k_pos``."""
    raise NotImplementedError

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    """(some_visible, all_visible) for position rectangles (bounds inclusive)."""
    raise NotImplementedError

  def materialize(self, q_len: int, kv_len: int) -> jax.Array:
    """Dense ``bool[q_len, kv_len]`` with the bottom-right alignment."""
    q_pos, k_pos = default_positions(q_len, kv_len)
    return jnp.asarray(self(q_pos[:, None], k_pos[None, :]))

  def __and__(self, other: "Mask") -> "Mask":
    return And(self, as_mask(other, "right operand of &"))

  def __or__(self, other: "Mask") -> "Mask":
    return Or(self, as_mask(other, "right operand of |"))


def as_mask(mask, what: str = "mask") -> Optional[Mask]:
  """Validates that ``mask`` is a Mask (or None)."""
  if mask is None or isinstance(mask, Mask):
    return mask
  raise ValueError(
      f"{what} must be an extrapolax.attention.masks.Mask (Causal, "
      f"SlidingWindow, Lambda, Chunked, PrefixLM or a combination) or None, "
      f"got {mask!r}")


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Key ``j`` is visible to query ``i`` iff ``j <= i``."""

  def __call__(self, q_pos, k_pos):
    return k_pos <= q_pos

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    return k_lo <= q_hi, k_hi <= q_lo


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  """Causal window of ``window`` keys: visible iff ``0 <= i - j < window``."""
  window: int

  def __post_init__(self):
    object.__setattr__(self, "window", _check_int("window", self.window, 1))

  def __call__(self, q_pos, k_pos):
    d = q_pos - k_pos
    return (d >= 0) & (d < self.window)

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    d_min, d_max = q_lo - k_hi, q_hi - k_lo
    some = (d_max >= 0) & (d_min < self.window)
    return some, (d_min >= 0) & (d_max < self.window)


@dataclasses.dataclass(frozen=True)
class Lambda(Mask):
  """LM-Infinite's Lambda mask: causal and (``j < num_sinks`` or ``i - j < window``)."""
  num_sinks: int
  window: int

  def __post_init__(self):
    object.__setattr__(self, "num_sinks",
                       _check_int("num_sinks", self.num_sinks, 0))
    object.__setattr__(self, "window", _check_int("window", self.window, 1))

  def __call__(self, q_pos, k_pos):
    d = q_pos - k_pos
    return (d >= 0) & ((k_pos < self.num_sinks) | (d < self.window))

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    d_min, d_max = q_lo - k_hi, q_hi - k_lo
    band_some = (d_max >= 0) & (d_min < self.window)
    sink_some = (k_lo <= q_hi) & (k_lo < self.num_sinks)
    # Every key is causal, and every key past the sinks is within the window
    # of the farthest query.
    first_non_sink = jnp.maximum(k_lo, self.num_sinks)
    all_ = (d_min >= 0) & ((k_hi < self.num_sinks) |
                           (q_hi - first_non_sink < self.window))
    return band_some | sink_some, all_


@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
  """Block-diagonal chunks: visible iff ``i // size == j // size``.

  Not causal by itself (Llama 4's chunked attention is ``Causal() & Chunked(n)``).
  """
  size: int

  def __post_init__(self):
    object.__setattr__(self, "size", _check_int("size", self.size, 1))

  def __call__(self, q_pos, k_pos):
    return (q_pos // self.size) == (k_pos // self.size)

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    c = self.size
    some = (q_lo // c <= k_hi // c) & (k_lo // c <= q_hi // c)
    all_ = ((q_lo // c) == (q_hi // c)) & ((k_lo // c) == (k_hi // c)) & (
        (q_lo // c) == (k_lo // c))
    return some, all_


@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
  """Bidirectional over the first ``prefix_len`` keys, causal after: ``j <= i or j < prefix_len``."""
  prefix_len: int

  def __post_init__(self):
    object.__setattr__(self, "prefix_len",
                       _check_int("prefix_len", self.prefix_len, 0))

  def __call__(self, q_pos, k_pos):
    return (k_pos <= q_pos) | (k_pos < self.prefix_len)

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    return ((k_lo <= q_hi) | (k_lo < self.prefix_len),
            (k_hi <= q_lo) | (k_hi < self.prefix_len))


@dataclasses.dataclass(frozen=True)
class And(Mask):
  """Intersection of two masks."""
  left: Mask
  right: Mask

  def __call__(self, q_pos, k_pos):
    return self.left(q_pos, k_pos) & self.right(q_pos, k_pos)

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    s1, a1 = self.left.block_visibility(q_lo, q_hi, k_lo, k_hi)
    s2, a2 = self.right.block_visibility(q_lo, q_hi, k_lo, k_hi)
    return s1 & s2, a1 & a2


@dataclasses.dataclass(frozen=True)
class Or(Mask):
  """Union of two masks."""
  left: Mask
  right: Mask

  def __call__(self, q_pos, k_pos):
    return self.left(q_pos, k_pos) | self.right(q_pos, k_pos)

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    s1, a1 = self.left.block_visibility(q_lo, q_hi, k_lo, k_hi)
    s2, a2 = self.right.block_visibility(q_lo, q_hi, k_lo, k_hi)
    return s1 | s2, a1 | a2


def default_positions(q_len: int, kv_len: int):
  """Absolute positions with the bottom-right alignment: (int32[T], int32[S])."""
  q_len = _check_int("q_len", q_len, 0)
  kv_len = _check_int("kv_len", kv_len, 0)
  return (jnp.arange(q_len, dtype=jnp.int32) + (kv_len - q_len),
          jnp.arange(kv_len, dtype=jnp.int32))


def block_minmax(x: jax.Array, block: int):
  """Per-block min and max along the last axis of ``x`` ([..., L]).

  The last block may be ragged; its missing entries are ignored.
  Returns two arrays [..., ceil(L / block)].
  """
  length = x.shape[-1]
  num_blocks = -(-length // block)
  pad = num_blocks * block - length
  info = jnp.iinfo(x.dtype) if jnp.issubdtype(x.dtype, jnp.integer) else None
  big = info.max if info is not None else jnp.inf
  small = info.min if info is not None else -jnp.inf
  widths = [(0, 0)] * (x.ndim - 1) + [(0, pad)]
  x_lo = jnp.pad(x, widths, constant_values=big)
  x_hi = jnp.pad(x, widths, constant_values=small)
  shape = x.shape[:-1] + (num_blocks, block)
  return x_lo.reshape(shape).min(-1), x_hi.reshape(shape).max(-1)


def classify_blocks(mask: Optional[Mask], *, q_len: int, kv_len: int,
                    block_q: int, block_k: int,
                    q_positions: Optional[jax.Array] = None,
                    k_positions: Optional[jax.Array] = None,
                    q_segment_ids: Optional[jax.Array] = None,
                    kv_segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """Labels every (query block, key block) pair EMPTY, PARTIAL or FULL.

  Pure jnp and traceable: positions and segment ids may change every batch.

  Args:
    mask: a Mask, or None for no positional mask.
    q_len, kv_len: T and S.
    block_q, block_k: block sizes; the last block of each axis may be ragged
      (a ragged block is never FULL, so callers that pad must mask it).
    q_positions, k_positions: optional int [B, T] / [B, S] (or [T] / [S])
      absolute positions; default: the bottom-right alignment.
    q_segment_ids, kv_segment_ids: optional int [B, T] / [B, S]; a query only
      sees keys of its own segment. Give both or neither.

  Returns:
    int32 [B, ceil(T / block_q), ceil(S / block_k)] with B = 1 when nothing
    carries a batch axis.
  """
  mask = as_mask(mask)
  block_q = _check_int("block_q", block_q, 1)
  block_k = _check_int("block_k", block_k, 1)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  default_q, default_k = default_positions(q_len, kv_len)
  q_pos = default_q if q_positions is None else jnp.asarray(q_positions)
  k_pos = default_k if k_positions is None else jnp.asarray(k_positions)
  q_pos = jnp.atleast_2d(q_pos)
  k_pos = jnp.atleast_2d(k_pos)
  if q_pos.shape[-1] != q_len or k_pos.shape[-1] != kv_len:
    raise ValueError(
        f"positions must end in (q_len={q_len}, kv_len={kv_len}), got "
        f"{q_pos.shape} and {k_pos.shape}")
  q_lo, q_hi = block_minmax(q_pos, block_q)        # [Bq, nq]
  k_lo, k_hi = block_minmax(k_pos, block_k)        # [Bk, nk]
  q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]
  k_lo, k_hi = k_lo[:, None, :], k_hi[:, None, :]
  if mask is None:
    some = jnp.ones(jnp.broadcast_shapes(q_lo.shape, k_lo.shape), bool)
    all_ = some
  else:
    some, all_ = mask.block_visibility(q_lo, q_hi, k_lo, k_hi)
  if q_segment_ids is not None:
    qs_lo, qs_hi = block_minmax(jnp.atleast_2d(q_segment_ids), block_q)
    ks_lo, ks_hi = block_minmax(jnp.atleast_2d(kv_segment_ids), block_k)
    qs_lo, qs_hi = qs_lo[:, :, None], qs_hi[:, :, None]
    ks_lo, ks_hi = ks_lo[:, None, :], ks_hi[:, None, :]
    some = some & (qs_lo <= ks_hi) & (ks_lo <= qs_hi)
    all_ = all_ & (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
  # Ragged edge blocks hold padding that a caller must mask: never FULL.
  nq, nk = q_lo.shape[1], k_lo.shape[2]
  q_whole = (np.arange(nq) + 1) * block_q <= q_len
  k_whole = (np.arange(nk) + 1) * block_k <= kv_len
  all_ = all_ & jnp.asarray(q_whole)[:, None] & jnp.asarray(k_whole)[None, :]
  labels = jnp.where(some, jnp.where(all_, FULL, PARTIAL), EMPTY)
  return labels.astype(jnp.int32)
