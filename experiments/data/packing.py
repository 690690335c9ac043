"""Packing documents into fixed-length rows with segment ids and positions.

Every method first cuts a document longer than ``seq_len`` into pieces of
``seq_len`` tokens (the last piece holds the rest). A piece is its own
segment: positions restart at 0 at the start of every piece, and a query
never sees a key of another piece. The target of a piece's last token is
still the document's next token (weight 1) when the document goes on, so no
training target is lost by cutting.

* ``"first_fit"`` / ``"best_fit"``: first-fit / best-fit *decreasing* bin
  packing of the pieces (longest first; ties by document order). Rows hold
  whole pieces and end in padding.
* ``"concat"``: the documents concatenated in order and the stream cut into
  rows of ``seq_len`` (only the last row is padded). Segment ids still mark
  the documents: a document that runs past a row's end continues in the
  next row as a new piece, with positions restarting at 0 there.

A row's arrays (``PackedBatch``):

* ``tokens`` int32: the pieces' tokens, 0 in padding.
* ``segment_ids`` int32: 1..n for the row's pieces in order, 0 in padding.
* ``positions`` int32: the offset inside the piece (0 at each piece start).
* ``targets`` int32: the document's next token, 0 where there is none.
* ``weights`` float32: 1 where the target is the next token of the same
  document, 0 at a document's last token and in padding.
"""

from __future__ import annotations

import bisect
import collections.abc
import dataclasses
from typing import Callable, Iterator, Sequence, Union

import numpy as np

__all__ = ["PackedBatch", "Packing", "pack", "materialize", "pack_documents",
           "PACKING_METHODS"]

PACKING_METHODS = ("concat", "first_fit", "best_fit")
FIELDS = ("tokens", "targets", "segment_ids", "positions", "weights")

Gather = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class PackedBatch(collections.abc.Mapping):
  """Rows of packed tokens; a read-only mapping of the five [B, L] arrays."""
  tokens: np.ndarray
  targets: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  weights: np.ndarray

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in FIELDS:
      raise KeyError(key)
    return getattr(self, key)

  def __iter__(self) -> Iterator[str]:
    return iter(FIELDS)

  def __len__(self) -> int:
    return len(FIELDS)

  @property
  def shape(self) -> tuple[int, int]:
    return self.tokens.shape


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Concatenation of arange(s, s + c) for each (s, c)."""
  counts = np.asarray(counts, np.int64)
  total = int(counts.sum())
  if not total:
    return np.zeros(0, np.int64)
  ends = np.cumsum(counts)
  return (np.repeat(np.asarray(starts, np.int64) - (ends - counts), counts)
          + np.arange(total, dtype=np.int64))


@dataclasses.dataclass(frozen=True, eq=False)
class Packing:
  """Which document pieces go where; independent of the tokens themselves.

  Piece p is tokens ``[piece_start[p], piece_start[p] + piece_length[p])``
  of document ``piece_document[p]``, placed at column ``piece_column[p]``;
  row r holds pieces ``row_splits[r]:row_splits[r + 1]`` in column order.
  """
  seq_len: int
  method: str
  document_lengths: np.ndarray
  row_splits: np.ndarray
  piece_document: np.ndarray
  piece_start: np.ndarray
  piece_length: np.ndarray
  piece_column: np.ndarray

  @property
  def num_rows(self) -> int:
    return len(self.row_splits) - 1

  @property
  def fill(self) -> float:
    """Fraction of the rows' slots holding tokens (1 - padding)."""
    slots = self.num_rows * self.seq_len
    return float(self.piece_length.sum()) / slots if slots else 0.0

  def row(self, index: int) -> list[tuple[int, int, int, int]]:
    """(document, start, length, column) of each piece in row ``index``."""
    lo, hi = self.row_splits[index], self.row_splits[index + 1]
    return [(int(self.piece_document[p]), int(self.piece_start[p]),
             int(self.piece_length[p]), int(self.piece_column[p]))
            for p in range(lo, hi)]


def _cut(lengths: np.ndarray, seq_len: int):
  """(document, start, length) of every piece, in document order."""
  num_pieces = -(-lengths // seq_len)          # ceil; 0 for empty documents
  document = np.repeat(np.arange(len(lengths)), num_pieces)
  index = _ranges(np.zeros(len(lengths), np.int64), num_pieces)
  start = index * seq_len
  return document, start, np.minimum(seq_len, lengths[document] - start)


def _first_fit(lengths: Sequence[int], seq_len: int) -> list[int]:
  """Row of each item (given in placement order); a max segment tree over
  the rows' free space finds the lowest row with room."""
  size = 1
  while size < max(1, len(lengths)):
    size *= 2
  free = [seq_len] * (2 * size)
  rows = []
  for length in lengths:
    node = 1
    while node < size:
      node = 2 * node if free[2 * node] >= length else 2 * node + 1
    row = node - size
    rows.append(row)
    free[node] -= length
    node //= 2
    while node:
      free[node] = max(free[2 * node], free[2 * node + 1])
      node //= 2
  return rows


def _best_fit(lengths: Sequence[int], seq_len: int) -> list[int]:
  """Row of each item: the fullest row with room (lowest index on ties)."""
  open_rows: list[tuple[int, int]] = []     # sorted (free space, row)
  rows, num_rows = [], 0
  for length in lengths:
    at = bisect.bisect_left(open_rows, (length, -1))
    if at < len(open_rows):
      free, row = open_rows.pop(at)
    else:
      free, row = seq_len, num_rows
      num_rows += 1
    rows.append(row)
    if free - length:
      bisect.insort(open_rows, (free - length, row))
  return rows


def pack(doc_lengths: Union[Sequence[int], np.ndarray], seq_len: int,
         method: str = "first_fit") -> Packing:
  """Plans rows of ``seq_len`` tokens for documents of the given lengths.

  Args:
    doc_lengths: tokens per document (empty documents get no piece).
    seq_len: tokens per row.
    method: one of PACKING_METHODS (see the module docstring).
  """
  if method not in PACKING_METHODS:
    raise ValueError(f"packing method must be one of {PACKING_METHODS}, got "
                     f"{method!r}")
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
  lengths = np.asarray(doc_lengths, np.int64).reshape(-1)
  if lengths.size and lengths.min() < 0:
    raise ValueError(f"document lengths must be >= 0, got {lengths.min()}")
  seq_len = int(seq_len)
  if method == "concat":
    return _pack_concat(lengths, seq_len)
  document, start, length = _cut(lengths, seq_len)
  order = np.lexsort((np.arange(len(length)), -length))    # longest first
  place = _first_fit if method == "first_fit" else _best_fit
  # Full pieces come first and each fills a row of its own.
  num_full = int(np.sum(length == seq_len))
  row_of = np.empty(len(length), np.int64)
  row_of[order[:num_full]] = np.arange(num_full)
  row_of[order[num_full:]] = num_full + np.asarray(
      place(length[order[num_full:]].tolist(), seq_len), np.int64)
  # Within a row, pieces keep their placement order; columns follow.
  placed = np.empty(len(length), np.int64)
  placed[order] = np.arange(len(length))
  by_row = np.lexsort((placed, row_of))
  document, start, length, row_of = (
      document[by_row], start[by_row], length[by_row], row_of[by_row])
  num_rows = int(row_of.max()) + 1 if row_of.size else 0
  counts = np.bincount(row_of, minlength=num_rows)
  row_splits = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  ends = np.cumsum(length)
  column = ends - length - np.repeat(ends[row_splits[:-1]] -
                                     length[row_splits[:-1]], counts)
  return Packing(seq_len, method, lengths, row_splits, document, start,
                 length, column)


def _pack_concat(lengths: np.ndarray, seq_len: int) -> Packing:
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  total = int(offsets[-1])
  num_rows = -(-total // seq_len)
  row_starts = np.arange(num_rows, dtype=np.int64) * seq_len
  # Boundaries inside the stream: document starts and row starts.
  cuts = np.union1d(offsets[:-1][lengths > 0], row_starts)
  piece_end = np.append(cuts[1:], total)
  document = np.searchsorted(offsets, cuts, side="right") - 1
  start = cuts - offsets[document]
  row = cuts // seq_len
  counts = np.bincount(row, minlength=num_rows)
  row_splits = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return Packing(seq_len, "concat", lengths, row_splits,
                 document.astype(np.int64), start.astype(np.int64),
                 (piece_end - cuts).astype(np.int64),
                 (cuts - row * seq_len).astype(np.int64))


def materialize(packing: Packing, rows: Union[Sequence[int], np.ndarray], *,
                tokens: Union[np.ndarray, Gather],
                offsets: np.ndarray) -> PackedBatch:
  """The PackedBatch of the given rows of ``packing``.

  Args:
    packing: from ``pack`` over the same documents.
    rows: row indices (repeats allowed), one batch row each.
    tokens: the documents' tokens concatenated (int array), or a function
      from flat indices to tokens (e.g. ``TokenStore.gather``).
    offsets: int [num_documents + 1]; document i is tokens[o[i]:o[i + 1]].
  """
  rows = np.asarray(rows, np.int64).reshape(-1)
  offsets = np.asarray(offsets, np.int64)
  if len(offsets) != len(packing.document_lengths) + 1 or np.any(
      np.diff(offsets) != packing.document_lengths):
    raise ValueError("offsets do not describe the documents this packing "
                     "was planned for")
  if rows.size and (rows.min() < 0 or rows.max() >= packing.num_rows):
    raise ValueError(f"rows must lie in [0, {packing.num_rows}), got "
                     f"[{rows.min()}, {rows.max()}]")
  gather = tokens if callable(tokens) else np.asarray(tokens).__getitem__
  batch, seq_len = len(rows), packing.seq_len
  first, counts = packing.row_splits[rows], np.diff(packing.row_splits)[rows]
  piece = _ranges(first, counts)
  piece_row = np.repeat(np.arange(batch), counts)
  piece_segment = _ranges(np.ones(batch, np.int64), counts)
  length = packing.piece_length[piece]
  token_piece = np.repeat(np.arange(len(piece)), length)
  within = _ranges(np.zeros(len(piece), np.int64), length)
  document = packing.piece_document[piece][token_piece]
  flat = offsets[document] + packing.piece_start[piece][token_piece] + within
  has_next = flat + 1 < offsets[document + 1]
  where = (piece_row[token_piece],
           packing.piece_column[piece][token_piece] + within)
  out = {name: np.zeros((batch, seq_len), np.int32)
         for name in ("tokens", "targets", "segment_ids", "positions")}
  out["tokens"][where] = gather(flat)
  out["targets"][where] = np.where(
      has_next, gather(np.where(has_next, flat + 1, flat)), 0)
  out["segment_ids"][where] = piece_segment[token_piece]
  out["positions"][where] = within
  weights = np.zeros((batch, seq_len), np.float32)
  weights[where] = has_next
  return PackedBatch(weights=weights, **out)


def pack_documents(token_docs: Sequence[Sequence[int]], seq_len: int,
                   method: str = "first_fit") -> PackedBatch:
  """Packs and materializes all rows of small in-memory documents."""
  docs = [np.asarray(d, np.int32).reshape(-1) for d in token_docs]
  lengths = np.array([len(d) for d in docs], np.int64)
  packing = pack(lengths, seq_len, method)
  flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  return materialize(packing, np.arange(packing.num_rows), tokens=flat,
                     offsets=offsets)
