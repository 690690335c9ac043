"""Masks that are not one key interval per row: the papers' sparse patterns.

Each is a frozen value object like the masks in ``masks.py`` (a predicate on
positions and an exact ``block_visibility`` on position rectangles), so the
block classifier, the kernels, xla_chunked and context parallelism skip
their empty blocks with no code of their own:

* ``Dilated(segment, rate, offset)``: LongNet's dilated attention.
* ``Strided(block, stride, local, offset)``: the local + vertical-stride
  block pattern (Sparse Transformer's strided pattern at block granularity,
  as LongGen / Phi-3-small's block-sparse attention uses it).
* ``GlobalTokens(positions=...)`` / ``GlobalTokens(count, every)``:
  Longformer / ETC / LongT5 global tokens, which see and are seen by all.
* ``PerHead(masks)``: a mask per query head (or per group of heads); with
  ``shifted_sparse`` (LongLoRA's S^2-Attn), ``window_per_head`` (MoA) and
  ``dilated_heads`` (LongNet's per-head offsets) built on it.

Imported by ``masks`` (which re-exports every name); defined here to keep
each file short.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp

from extrapolax.common.checks import check_int
from . import masks as base

MAX_SIZE = base.MAX_SIZE


@dataclasses.dataclass(frozen=True)
class Dilated(base.Mask):
  """LongNet's dilated attention (Ding et al. 2023), causal.

  The sequence is cut into segments of ``segment`` tokens; in each segment
  only the rows ``offset, offset + rate, offset + 2 rate, ...`` (counted from
  the segment's start) take part, and they attend among themselves,
  causally: visible iff ``i // segment == j // segment``,
  ``(i % segment) % rate == offset == (j % segment) % rate`` and ``j <= i``.
  Rows not selected see nothing (zeros): LongNet mixes several
  (segment, rate) pairs, with ``rate=1`` on the shortest segment, so every
  row is covered; ``Dilated(w1, 1) | Dilated(w2, r2) | ...`` attends over the
  union of their keys (LongNet's mixture weights each pattern by its softmax
  denominator, which counts a key twice where two patterns share it).
  LongNet gives head h the offset ``h % rate``: see ``dilated_heads``.
  """
  segment: int
  rate: int
  offset: int = 0

  def __post_init__(self):
    check_int("segment", self.segment, 1, MAX_SIZE)
    check_int("rate", self.rate, 1, self.segment)
    check_int("offset", self.offset, 0, self.rate - 1)

  def _selected(self, p):
    return (p % self.segment) % self.rate == self.offset

  def __call__(self, q_pos, k_pos):
    w = self.segment
    return ((q_pos // w == k_pos // w) & self._selected(q_pos)
            & self._selected(k_pos) & (k_pos <= q_pos))

  def _segment_some(self, c, q_lo, q_hi, k_lo, k_hi):
    """Some visible pair inside segment ``c`` (exact)."""
    w, r, o = self.segment, self.rate, self.offset
    start = c * w
    iq_lo, iq_hi = jnp.maximum(q_lo, start), jnp.minimum(q_hi, start + w - 1)
    ik_lo, ik_hi = jnp.maximum(k_lo, start), jnp.minimum(k_hi, start + w - 1)
    x = iq_hi - start - o          # the last selected query <= iq_hi
    i_max = start + o + (jnp.maximum(x, 0) // r) * r
    y = ik_lo - start - o          # the first selected key >= ik_lo
    j_min = start + o + jnp.maximum(-(-y // r), 0) * r
    return ((x >= 0) & (i_max >= iq_lo) & (j_min <= ik_hi) & (j_min <= i_max)
            & (iq_lo <= iq_hi) & (ik_lo <= ik_hi))

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    w = self.segment
    c_lo = jnp.maximum(q_lo // w, k_lo // w)
    c_hi = jnp.minimum(q_hi // w, k_hi // w)
    # A segment strictly between the two ends lies whole in both ranges
    # and holds a selected row that sees itself.
    some = (c_lo <= c_hi) & ((c_hi - c_lo >= 2)
                             | self._segment_some(c_lo, q_lo, q_hi, k_lo, k_hi)
                             | self._segment_some(c_hi, q_lo, q_hi, k_lo, k_hi))
    every = lambda lo, hi: (self.rate == 1) | ((lo == hi) & self._selected(lo))
    all_ = ((q_lo // w == q_hi // w) & (k_lo // w == k_hi // w)
            & (q_lo // w == k_lo // w) & (k_hi <= q_lo)
            & every(q_lo, q_hi) & every(k_lo, k_hi))
    return some, all_


@dataclasses.dataclass(frozen=True)
class Strided(base.Mask):
  """Local blocks plus every ``stride``-th key block, causal.

  Positions fall in blocks of ``block`` tokens (``b(p) = p // block``). Key
  ``j`` is visible to query ``i`` iff ``j <= i`` and (``b(i) - b(j) <
  local`` or ``(b(j) + 1 + offset) % stride == 0``): the query's own block
  and the ``local - 1`` before it, and the "vertical" blocks that close each
  run of ``stride`` blocks. This is the local-stride block-sparse pattern of
  LongGen's sparse layers and Phi-3-small (``local_blocks``,
  ``vert_stride``; their per-head variant shifts ``offset`` by head), the
  block form of the Sparse Transformer's strided pattern.
  """
  block: int
  stride: int
  local: int = 1
  offset: int = 0

  def __post_init__(self):
    check_int("block", self.block, 1, MAX_SIZE)
    check_int("stride", self.stride, 1, MAX_SIZE)
    check_int("local", self.local, 0, MAX_SIZE)
    check_int("offset", self.offset, 0, self.stride - 1)

  def _vertical(self, key_block):
    return (key_block + 1 + self.offset) % self.stride == 0

  def __call__(self, q_pos, k_pos):
    b = self.block
    return (k_pos <= q_pos) & ((q_pos // b - k_pos // b < self.local)
                               | self._vertical(k_pos // b))

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    b, s = self.block, self.stride
    causal = k_lo <= q_hi
    # Local: the latest causal key and the earliest query at or after it.
    j = jnp.minimum(k_hi, q_hi)
    i = jnp.maximum(q_lo, j)
    local_some = causal & (i // b - j // b < self.local)
    # Vertical: the first vertical block at or after k_lo's, among the keys
    # some query may see (<= q_hi).
    first, last = k_lo // b, j // b
    vertical = first + (-(first + 1 + self.offset)) % s
    some = local_some | (causal & (vertical <= last))
    # All: causal everywhere, and every key block too far for the latest
    # query's local band is vertical (two such blocks in a row only when
    # stride == 1).
    far_hi = jnp.minimum(k_hi // b, q_hi // b - self.local)
    far = first <= far_hi
    all_far_vertical = (~far) | (s == 1) | ((first == far_hi)
                                            & self._vertical(first))
    return some, (k_hi <= q_lo) & all_far_vertical


@dataclasses.dataclass(frozen=True)
class GlobalTokens(base.Mask):
  """Global tokens: they see every key and every query sees them.

  ``GlobalTokens(positions=(0, 17, 40))``: the tokens at those positions
  (Longformer's task tokens, ETC / LongT5 global tokens placed anywhere).
  ``GlobalTokens(count=n)``: the first ``n`` tokens (``0 <= p < n``; with
  packed rows, whose positions restart per document, the first ``n`` of each
  document); ``GlobalTokens(count=n, every=L)``: the first ``n`` of each
  segment of ``L`` tokens (``p % L < n``). Visible iff ``i`` or ``j`` is
  global. Not causal: combine, e.g. ``SlidingWindow(left=l, right=r) |
  GlobalTokens(count=1)`` (Longformer), or ``& Causal()`` in a decoder.
  """
  count: int = 0
  every: Optional[int] = None
  positions: tuple[int, ...] = ()

  def __post_init__(self):
    if not isinstance(self.positions, (tuple, list)):
      raise ValueError(f"positions must be a tuple of ints, got "
                       f"{self.positions!r}")
    positions = tuple(sorted(set(
        check_int("positions", p, 0, MAX_SIZE) for p in self.positions)))
    object.__setattr__(self, "positions", positions)
    check_int("count", self.count, 0, MAX_SIZE)
    if positions and (self.count or self.every is not None):
      raise ValueError(f"GlobalTokens takes positions=... or count=n "
                       f"(every=L), not both; got positions={positions}, "
                       f"count={self.count}, every={self.every}")
    if not positions and self.count < 1:
      raise ValueError(f"GlobalTokens needs count >= 1 or positions, got "
                       f"count={self.count}, positions=()")
    if self.every is not None:
      check_int("every", self.every, self.count + 1, MAX_SIZE)

  def is_global(self, p):
    """bool array: position ``p`` holds a global token."""
    if self.positions:
      out = p == self.positions[0]
      for g in self.positions[1:]:          # scalar compares: kernel-safe
        out = out | (p == g)
      return out
    if self.every is None:
      return (p >= 0) & (p < self.count)
    return p % self.every < self.count

  def __call__(self, q_pos, k_pos):
    return self.is_global(q_pos) | self.is_global(k_pos)

  def _any(self, lo, hi):
    """Some global position in [lo, hi] (exact)."""
    if self.positions:
      out = (lo <= self.positions[0]) & (self.positions[0] <= hi)
      for g in self.positions[1:]:
        out = out | ((lo <= g) & (g <= hi))
      return out
    if self.every is None:
      return (lo < self.count) & (hi >= 0)
    e, first = self.every, lo % self.every
    return (hi - lo >= e - 1) | (first < self.count) | (first + hi - lo >= e)

  def _all(self, lo, hi):
    """Every position in [lo, hi] global (exact)."""
    if self.positions:
      inside = sum(((lo <= g) & (g <= hi)).astype(jnp.int32)
                   for g in self.positions)
      return inside == hi - lo + 1
    if self.every is None:
      return (lo >= 0) & (hi < self.count)
    return (lo // self.every == hi // self.every) & (hi % self.every
                                                     < self.count)

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi):
    q_lo, q_hi, k_lo, k_hi = map(jnp.asarray, (q_lo, q_hi, k_lo, k_hi))
    return (self._any(q_lo, q_hi) | self._any(k_lo, k_hi),
            self._all(q_lo, q_hi) | self._all(k_lo, k_hi))


@dataclasses.dataclass(frozen=True)
class PerHead(base.Mask):
  """A mask per query head: head ``h`` of N uses ``masks[h * M // N]``.

  With M == N masks, one per head (MoA's window per head); with fewer, M
  must divide N and each mask covers a contiguous group of N / M heads
  (``PerHead((a, b))``: the first half of the heads use ``a``, the second
  half ``b``, whatever N is). The entries are head-independent masks.
  ``num_kv_heads`` is set by ``dot_product_attention`` when it binds the
  mask to its call (``for_heads``); leave it out.
  """
  masks: tuple
  num_kv_heads: Optional[int] = None

  per_head = True

  def __post_init__(self):
    if not isinstance(self.masks, (tuple, list)) or not self.masks:
      raise ValueError(f"PerHead needs a non-empty tuple of masks, got "
                       f"{self.masks!r}")
    masks = tuple(self.masks)
    for h, m in enumerate(masks):
      base.as_mask(m, f"PerHead masks[{h}]")
      if m is None or m.per_head:
        raise ValueError(f"PerHead masks[{h}] must be a head-independent "
                         f"mask, got {m!r}")
    object.__setattr__(self, "masks", masks)
    if self.num_kv_heads is not None:
      check_int("num_kv_heads", self.num_kv_heads, 1)

  @property
  def head_count(self):
    return len(self.masks)

  @property
  def head_layout(self):
    if self.num_kv_heads is None:
      return None
    return len(self.masks), self.num_kv_heads

  def for_heads(self, num_heads, num_kv_heads):
    m = len(self.masks)
    num_heads = check_int("num_heads", num_heads, 1)
    if num_heads % m:
      raise ValueError(f"a PerHead mask of {m} masks needs a number of query "
                       f"heads that {m} divides, got {num_heads} heads")
    expanded = tuple(self.masks[h * m // num_heads] for h in range(num_heads))
    return PerHead(expanded, num_kv_heads)

  def _runs(self):
    """(first head, mask) for each run of equal consecutive masks."""
    runs = []
    for h, m in enumerate(self.masks):
      if not runs or runs[-1][1] != m:
        runs.append((h, m))
    return runs

  def _need_head(self, head):
    if head is None:
      raise ValueError(f"{self!r} differs by head: its predicate needs "
                       f"head=<query head index>")

  def __call__(self, q_pos, k_pos, head=None):
    self._need_head(head)
    runs = self._runs()
    out = runs[0][1](q_pos, k_pos)
    for start, m in runs[1:]:      # later runs start at higher heads
      out = jnp.where(head >= start, m(q_pos, k_pos), out)
    return out

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi, head=None):
    runs = self._runs()
    some, all_ = runs[0][1].block_visibility(q_lo, q_hi, k_lo, k_hi)
    for start, m in runs[1:]:
      s, a = m.block_visibility(q_lo, q_hi, k_lo, k_hi)
      if head is None:             # the union over heads
        some, all_ = some | s, all_ & a
      else:
        some = jnp.where(head >= start, s, some)
        all_ = jnp.where(head >= start, a, all_)
    return some, all_


def shifted_sparse(group: int) -> base.Mask:
  """LongLoRA's S^2-Attn: causal groups, shifted by half a group in half the heads.

  Heads in the first half attend causally within groups of ``group``
  tokens; the second half within groups shifted by ``group // 2``. LongLoRA's
  code shifts by rolling the sequence, so its last half-group wraps round to
  the first tokens (which then see later ones); here the shifted groups stop
  at the sequence's start, which keeps every head causal.
  """
  group = check_int("group", group, 2, MAX_SIZE)
  if group % 2:
    raise ValueError(f"group must be even (shifted by group // 2), got {group}")
  return PerHead((base.Causal() & base.Chunked(group),
                  base.Causal() & base.Chunked(group, offset=group // 2)))


def window_per_head(windows: Sequence[int]) -> base.Mask:
  """MoA: a causal sliding window per head (or per group of heads)."""
  if not isinstance(windows, (tuple, list)) or not windows:
    raise ValueError(f"windows must be a non-empty tuple of window sizes, "
                     f"got {windows!r}")
  return PerHead(tuple(base.SlidingWindow(w) for w in windows))


def dilated_heads(segment: int, rate: int) -> base.Mask:
  """LongNet's multi-head dilation: ``rate`` head groups, offsets 0..rate-1.

  LongNet gives head h the offset ``h % rate`` (heads interleaved); here
  contiguous groups of N / rate heads share an offset (the same patterns on
  a permutation of the heads).
  """
  return PerHead(tuple(Dilated(segment, rate, o) for o in range(rate)))


def _two_sided(left: int, right: int) -> base.Mask:
  """A two-sided window: ``left`` keys before each query, ``right`` after."""
  return base.SlidingWindow(left=left, right=right)


def _global_tokens(count: int = 0, every: Optional[int] = None,
                   positions: tuple = ()) -> base.Mask:
  """Global tokens (Longformer / ETC / LongT5) that see and are seen by all."""
  return GlobalTokens(count=count, every=every, positions=tuple(positions))


def _local_global(left: int, right: int, count: int = 1,
                  every: Optional[int] = None) -> base.Mask:
  """Longformer / ETC: a two-sided window plus global tokens."""
  return (base.SlidingWindow(left=left, right=right)
          | GlobalTokens(count=count, every=every))


base.register("dilated", Dilated)
base.register("strided", Strided)
base.register("two_sided_window", _two_sided)
base.register("global_tokens", _global_tokens)
base.register("local_global", _local_global)
base.register("shifted_sparse", shifted_sparse)
base.register("window_per_head", window_per_head)
base.register("dilated_heads", dilated_heads)
