"""Training batches as a pure function of (seed, step).

``TrainSource(store, seq_len=, batch_size=, seed=, packing=)`` serves
language-model batches from a TokenStore; ``TaskSource(task, ...)`` serves
synthetic-task batches. For both, ``batch(step)`` depends only on the
constructor arguments and ``step``, so a checkpoint stores the step
(``state(step)``) and a resumed run continues with exactly the batches an
uninterrupted run would have seen.

TrainSource fixes a set of rows once and walks them epoch by epoch in a
permutation drawn from (seed, epoch). Batch ``step`` holds the global rows
``step * batch_size ... + batch_size - 1``; row g is row ``g mod R`` of the
permutation of epoch ``g // R`` (R rows per epoch).

* ``packing="concat"``: a row is ``seq_len`` consecutive tokens of the
  documents concatenated in store order; each epoch shifts the grid of rows
  by an offset in [0, seq_len) drawn from (seed, epoch), so epochs see
  different cuts. Segment ids, positions and weights follow the documents
  as in ``packing`` (positions restart at each document start and at the
  row start; the target crossing into another document has weight 0).
* ``packing="first_fit" | "best_fit"``: ``packing.pack`` plans the rows once;
  each epoch permutes them.

The tokens are read into memory once (``in_memory=True``, the default); with
``in_memory=False`` each batch gathers its tokens from the zarr store.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional, Union

import numpy as np

from extrapolax.common.checks import check_int

from . import packing as packing_lib
from . import store as store_lib
from . import tasks as tasks_lib

__all__ = ["TrainSource", "TaskSource", "RetrievalMix"]

_PERMUTATION, _OFFSET = 0, 1      # streams of the per-epoch random draws
_RETRIEVAL = 2                    # the stream of RetrievalMix's examples


def _fingerprint(metadata: Mapping[str, Any]) -> str:
  text = json.dumps(metadata, sort_keys=True, default=str)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _row_range(rows, batch_size: int) -> tuple[int, int]:
  if rows is None:
    return 0, batch_size
  lo, hi = rows
  if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))
          and 0 <= lo < hi <= batch_size):
    raise ValueError(f"rows={rows!r} must be (lo, hi) with 0 <= lo < hi <= "
                     f"batch_size={batch_size}")
  return int(lo), int(hi)


class TrainSource:
  """Language-model batches from a TokenStore (see the module docstring)."""

  def __init__(self, store: store_lib.TokenStore, *, seq_len: int,
               batch_size: int, seed: int = 0, packing: str = "concat",
               in_memory: bool = True):
    if packing not in packing_lib.PACKING_METHODS:
      raise ValueError(f"packing must be one of "
                       f"{packing_lib.PACKING_METHODS}, got {packing!r}")
    self.store = store
    self.seq_len = check_int("seq_len", seq_len, 1)
    self.batch_size = check_int("batch_size", batch_size, 1)
    self.seed = check_int("seed", seed, 0)
    self.packing = packing
    self._offsets = store.offsets
    num_tokens = store.num_tokens
    if packing == "concat":
      if num_tokens < self.seq_len + 1:
        raise ValueError(f"the store holds {num_tokens} tokens; concat rows "
                         f"of seq_len={seq_len} need at least {seq_len + 1}")
      self._max_offset = min(self.seq_len - 1, num_tokens - 1 - self.seq_len)
      self.num_rows = (num_tokens - 1 - self._max_offset) // self.seq_len
      self._plan = None
    else:
      self._plan = packing_lib.pack(store.document_lengths, self.seq_len,
                                    packing)
      self.num_rows = self._plan.num_rows
      if not self.num_rows:
        raise ValueError("the store holds no tokens to pack")
    if in_memory:
      tokens = store.tokens()
      self._gather = tokens.__getitem__
    else:
      self._gather = store.gather
    self._permutations: dict[int, np.ndarray] = {}

  # -- the pure function of (seed, step) -------------------------------------

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) >= 4:
        self._permutations.pop(next(iter(self._permutations)))
      rng = np.random.default_rng([self.seed, epoch, _PERMUTATION])
      self._permutations[epoch] = rng.permutation(self.num_rows)
    return self._permutations[epoch]

  def _epoch_offset(self, epoch: int) -> int:
    rng = np.random.default_rng([self.seed, epoch, _OFFSET])
    return int(rng.integers(0, self._max_offset + 1))

  def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, row within the epoch's row set) of each row of batch step."""
    step = check_int("step", step, 0)
    global_rows = step * self.batch_size + np.arange(self.batch_size)
    epochs = global_rows // self.num_rows
    rows = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      rows[here] = self._permutation(int(epoch))[global_rows[here]
                                                 % self.num_rows]
    return epochs, rows

  def batch(self, step: int, *, rows: Optional[tuple[int, int]] = None
            ) -> packing_lib.PackedBatch:
    """Batch ``step``: [batch_size, seq_len] arrays (see ``packing``).

    ``rows=(lo, hi)``: only rows lo..hi-1 of it (what one host of a
    multi-host job reads), equal to those rows of the whole batch.
    """
    epochs, rows_ = self.rows(step)
    lo, hi = _row_range(rows, self.batch_size)
    epochs, rows = epochs[lo:hi], rows_[lo:hi]
    if self._plan is not None:
      return packing_lib.materialize(self._plan, rows, tokens=self._gather,
                                     offsets=self._offsets)
    starts = rows * self.seq_len + np.array(
        [self._epoch_offset(int(e)) for e in epochs], np.int64)
    return self._stream_rows(starts)

  def _stream_rows(self, starts: np.ndarray) -> packing_lib.PackedBatch:
    """Rows of seq_len stream tokens beginning at ``starts``."""
    index = starts[:, None] + np.arange(self.seq_len + 1)[None]
    values = self._gather(index)
    document = np.searchsorted(self._offsets, index, side="right") - 1
    same = document[:, 1:] == document[:, :-1]
    first = np.maximum(self._offsets[document[:, :-1]], starts[:, None])
    segment_ids = np.concatenate(
        [np.ones((len(starts), 1), np.int64),
         1 + np.cumsum(~same[:, :-1], axis=1)], axis=1)
    return packing_lib.PackedBatch(
        tokens=values[:, :-1].astype(np.int32),
        targets=np.where(same, values[:, 1:], 0).astype(np.int32),
        segment_ids=segment_ids.astype(np.int32),
        positions=(index[:, :-1] - first).astype(np.int32),
        weights=same.astype(np.float32))

  # -- checkpoints -----------------------------------------------------------

  def state(self, step: int) -> dict[str, Any]:
    """What a checkpoint stores: the step and what makes batches equal."""
    return {"kind": "lm", "step": check_int("step", step, 0), "seed": self.seed,
            "seq_len": self.seq_len, "batch_size": self.batch_size,
            "packing": self.packing, "num_tokens": self.store.num_tokens,
            "num_documents": self.store.num_documents,
            "store_fingerprint": _fingerprint(self.store.metadata)}

  @classmethod
  def from_state(cls, store: store_lib.TokenStore, state: Mapping[str, Any],
                 **kwargs) -> "TrainSource":
    """The source a ``state(step)`` came from (resume at ``state["step"]``).

    Raises:
      ValueError: ``store`` is not the store the state was made with.
    """
    if state.get("kind") != "lm":
      raise ValueError(f"not a TrainSource state: {dict(state)!r}")
    now = {"num_tokens": store.num_tokens,
           "num_documents": store.num_documents,
           "store_fingerprint": _fingerprint(store.metadata)}
    changed = {k: (state.get(k), v) for k, v in now.items()
               if state.get(k) != v}
    if changed:
      raise ValueError(f"the token store differs from the checkpointed one "
                       f"(saved, now): {changed}")
    return cls(store, seq_len=state["seq_len"],
               batch_size=state["batch_size"], seed=state["seed"],
               packing=state["packing"], **kwargs)

  def __repr__(self) -> str:
    return (f"TrainSource({self.store!r}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, seed={self.seed}, "
            f"packing={self.packing!r}, num_rows={self.num_rows})")


class TaskSource:
  """Synthetic-task batches: one example per row, padded to seq_len.

  Row b of batch ``step`` is an example of size drawn uniformly from
  [min_length, max_length] with the generator seeded by (seed, step);
  ``max_length`` defaults to the largest size that always fits seq_len.
  Weights are 1 only on answer targets.
  """

  def __init__(self, task: Union[str, tasks_lib.Task], *, seq_len: int,
               batch_size: int, seed: int = 0,
               min_length: Optional[int] = None,
               max_length: Optional[int] = None):
    self.task = tasks_lib.get_task(task) if isinstance(task, str) else task
    self.seq_len = check_int("seq_len", seq_len, 1)
    self.batch_size = check_int("batch_size", batch_size, 1)
    self.seed = check_int("seed", seed, 0)
    fits = self.task.max_length_for(self.seq_len)
    self.min_length = self.task.min_length if min_length is None else int(
        min_length)
    self.max_length = fits if max_length is None else int(max_length)
    if not self.task.min_length <= self.min_length <= self.max_length <= fits:
      raise ValueError(
          f"need {self.task.min_length} <= min_length <= max_length <= "
          f"{fits} (the largest {self.task.name} size fitting seq_len="
          f"{self.seq_len}), got {self.min_length}, {self.max_length}")

  def batch(self, step: int, *, rows: Optional[tuple[int, int]] = None
            ) -> packing_lib.PackedBatch:
    """Batch ``step``; ``rows=(lo, hi)``: only those rows (the generator
    still draws the rows before lo, so they equal the whole batch's)."""
    lo, hi = _row_range(rows, self.batch_size)
    rng = np.random.default_rng([self.seed, check_int("step", step, 0)])
    sizes = rng.integers(self.min_length, self.max_length + 1,
                         self.batch_size)
    examples = [self.task.sample(rng, int(n)) for n in sizes[:hi]]
    return tasks_lib.examples_to_batch(examples[lo:], width=self.seq_len)

  def state(self, step: int) -> dict[str, Any]:
    return {"kind": "task", "step": check_int("step", step, 0), "seed": self.seed,
            "task": self.task.name, "task_params": self.task.params(),
            "seq_len": self.seq_len, "batch_size": self.batch_size,
            "min_length": self.min_length, "max_length": self.max_length}

  @classmethod
  def from_state(cls, state: Mapping[str, Any]) -> "TaskSource":
    if state.get("kind") != "task":
      raise ValueError(f"not a TaskSource state: {dict(state)!r}")
    task = tasks_lib.get_task(state["task"], **state.get("task_params", {}))
    return cls(task, seq_len=state["seq_len"],
               batch_size=state["batch_size"], seed=state["seed"],
               min_length=state["min_length"],
               max_length=state["max_length"])


class RetrievalMix:
  """A source's batches with their last rows replaced by short passkey
  examples (``tasks.short_passkey_prompt``): a task-mixed corpus.

  ``rows = max(1, round(fraction * batch_size))`` rows of every batch (the
  last ones) each hold one example: a prompt of a length drawn uniformly
  from [the shortest prompt, seq_len - key tokens], the needle at a depth
  drawn uniformly from [0, 1], a ``key_digits``-digit key (first digit
  nonzero), then the key; its weights are 1 on the key's tokens only (as
  the passkey evaluator grades it), padding after it has segment id 0. The
  examples are a pure function of (seed, step, row), so a resumed run sees
  the same batches. ``state(step)`` is the inner source's plus the mix's
  settings.
  """

  def __init__(self, source, *, fraction: float, seq_len: int, seed: int = 0,
               key_digits: int = 5, tokenizer=None):
    if isinstance(fraction, bool) or not isinstance(
        fraction, (int, float, np.floating)) or not 0.0 < fraction <= 1.0:
      raise ValueError(f"retrieval fraction={fraction!r} must be a number "
                       "in (0, 1]")
    self.source = source
    self.fraction = float(fraction)
    self.seq_len = check_int("seq_len", seq_len, 1)
    self.seed = check_int("seed", seed, 0)
    self.key_digits = check_int("key_digits", key_digits, 1)
    if tokenizer is None:
      from . import tokenizers  # pylint: disable=import-outside-toplevel
      tokenizer = tokenizers.get_tokenizer("byte")
    self.tokenizer = tokenizer
    self.batch_size = int(source.batch_size)
    self.rows = max(1, int(round(self.fraction * self.batch_size)))
    self.min_tokens = tasks_lib.short_passkey_min_tokens(self.key_digits,
                                                         tokenizer)
    _, key_ids = tasks_lib.short_passkey_prompt(
        self.min_tokens, 0.0, "9" * self.key_digits, tokenizer)
    self.max_tokens = self.seq_len - len(key_ids)
    if self.max_tokens < self.min_tokens:
      raise ValueError(f"seq_len={seq_len} is too short for a short passkey "
                       f"example: it needs {self.min_tokens + len(key_ids)} "
                       "tokens")

  def example(self, step: int, row: int) -> tasks_lib.TaskExample:
    """The example of row ``row`` of batch ``step`` (any row index)."""
    rng = np.random.default_rng([self.seed, step, row, _RETRIEVAL])
    length = int(rng.integers(self.min_tokens, self.max_tokens + 1))
    depth = float(rng.random())
    key = str(rng.integers(10**(self.key_digits - 1), 10**self.key_digits))
    prompt, key_ids = tasks_lib.short_passkey_prompt(length, depth, key,
                                                     self.tokenizer)
    tokens = np.concatenate([prompt, key_ids]).astype(np.int32)
    mask = np.arange(len(tokens)) >= len(prompt)
    return tasks_lib.TaskExample(tokens=tokens, answer_mask=mask,
                                 text=f"{length}:{depth}:{key}")

  def batch(self, step: int, *, rows: Optional[tuple[int, int]] = None
            ) -> packing_lib.PackedBatch:
    """Batch ``step`` (``rows=(lo, hi)``: only those rows, equal to the
    whole batch's)."""
    lo, hi = _row_range(rows, self.batch_size)
    step = check_int("step", step, 0)
    inner = (self.source.batch(step) if rows is None
             else self.source.batch(step, rows=(lo, hi)))
    arrays = {k: np.array(inner[k]) for k in packing_lib.FIELDS}
    first = self.batch_size - self.rows
    mine = list(range(max(lo, first), hi))
    if mine:
      mixed = tasks_lib.examples_to_batch(
          [self.example(step, g) for g in mine], width=self.seq_len)
      for k in packing_lib.FIELDS:
        arrays[k][mine[0] - lo:] = mixed[k].astype(arrays[k].dtype)
    return packing_lib.PackedBatch(**arrays)

  def state(self, step: int) -> dict[str, Any]:
    return dict(self.source.state(step), retrieval={
        "fraction": self.fraction, "rows": self.rows,
        "key_digits": self.key_digits, "seed": self.seed,
        "prompt": "short_passkey"})

  def __repr__(self) -> str:
    return (f"RetrievalMix({self.source!r}, fraction={self.fraction}, "
            f"rows={self.rows}, key_digits={self.key_digits})")
