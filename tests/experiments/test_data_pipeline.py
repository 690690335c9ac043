"""TrainSource / TaskSource: batches are a pure function of (seed, step)."""

import numpy as np
import pytest

from extrapolax.experiments import data

from .test_data_packing import _check_rows, _named_docs

LENGTHS = [37, 5, 0, 120, 64, 9, 1, 73, 30, 18]
SEQ_LEN, BATCH = 16, 4


@pytest.fixture(name="store")
def _store(tmp_path):
  return data.TokenStore.create(str(tmp_path / "s"), _named_docs(LENGTHS),
                                metadata={"corpus": "named"})


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("packing", data.PACKING_METHODS)
def test_batches_are_a_pure_function_of_seed_and_step(store, packing):
  make = lambda seed, **kw: data.TrainSource(
      store, seq_len=SEQ_LEN, batch_size=BATCH, seed=seed, packing=packing,
      **kw)
  source, twin = make(0), make(0)
  steps = [0, 1, 7, 3, 40]
  first = {s: source.batch(s) for s in steps}
  for s in reversed(steps):          # any order, a fresh object: same batch
    assert _equal(twin.batch(s), first[s])
  assert not _equal(first[0], first[1])
  assert not _equal(make(1).batch(0), first[0])
  assert _equal(make(0, in_memory=False).batch(7), first[7])
  for s in steps:
    batch = first[s]
    assert set(batch) == {"tokens", "targets", "segment_ids", "positions",
                          "weights"}
    assert batch["tokens"].shape == (BATCH, SEQ_LEN)
  # Resume from a checkpointed state: the same batches from there on.
  state = source.state(7)
  resumed = data.TrainSource.from_state(store, state)
  assert state["step"] == 7
  assert _equal(resumed.batch(state["step"]), first[7])


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_an_epoch_visits_every_packed_row_once(store, packing):
  source = data.TrainSource(store, seq_len=SEQ_LEN, batch_size=BATCH,
                            seed=5, packing=packing)
  rows = source.num_rows
  steps = -(-2 * rows // BATCH)
  batches = [source.batch(s) for s in range(steps)]
  merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  # Rows 0..R-1 of the walk are epoch 0, R..2R-1 epoch 1.
  for epoch in range(2):
    part = {k: v[epoch * rows:(epoch + 1) * rows] for k, v in merged.items()}
    _check_rows(part, LENGTHS, SEQ_LEN)      # every token exactly once
  assert not np.array_equal(merged["tokens"][:rows],
                            merged["tokens"][rows:2 * rows])


def test_concat_rows_are_stream_windows(store):
  source = data.TrainSource(store, seq_len=SEQ_LEN, batch_size=BATCH,
                            seed=2, packing="concat")
  stream = np.concatenate(_named_docs(LENGTHS))
  assert source.num_rows == (len(stream) - SEQ_LEN) // SEQ_LEN
  doc_of = np.repeat(np.arange(len(LENGTHS)), LENGTHS)
  starts_by_epoch = {}
  for step in range(-(-2 * source.num_rows // BATCH)):
    batch = source.batch(step)
    epochs, _ = source.rows(step)
    for row, epoch in enumerate(epochs):
      tokens = batch["tokens"][row]
      start = int(np.flatnonzero(stream == tokens[0])[0])
      np.testing.assert_array_equal(tokens, stream[start:start + SEQ_LEN])
      starts_by_epoch.setdefault(int(epoch), []).append(start)
      docs = doc_of[start:start + SEQ_LEN + 1]
      same = docs[1:] == docs[:-1]
      np.testing.assert_array_equal(batch["weights"][row], same)
      np.testing.assert_array_equal(
          batch["targets"][row],
          np.where(same, stream[start + 1:start + SEQ_LEN + 1], 0))
      # Positions restart at each document start and at the row start.
      first = np.maximum.accumulate(np.where(
          np.r_[True, docs[1:-1] != docs[:-2]], np.arange(SEQ_LEN), 0))
      np.testing.assert_array_equal(batch["positions"][row],
                                    np.arange(SEQ_LEN) - first)
      np.testing.assert_array_equal(
          batch["segment_ids"][row],
          1 + np.r_[0, np.cumsum(docs[1:-1] != docs[:-2])])
  for epoch in (0, 1):   # an epoch: one grid of windows, offset < seq_len
    starts = np.sort(starts_by_epoch[epoch][:source.num_rows])
    assert starts[0] < SEQ_LEN
    np.testing.assert_array_equal(
        starts, starts[0] + SEQ_LEN * np.arange(source.num_rows))


def test_train_source_errors(store, tmp_path):
  with pytest.raises(ValueError, match="packing"):
    data.TrainSource(store, seq_len=8, batch_size=2, packing="random")
  with pytest.raises(ValueError, match="seq_len"):
    data.TrainSource(store, seq_len=0, batch_size=2)
  with pytest.raises(ValueError, match="step"):
    data.TrainSource(store, seq_len=8, batch_size=2).batch(-1)
  with pytest.raises(ValueError, match="need at least"):
    data.TrainSource(store, seq_len=10_000, batch_size=2)
  other = data.TokenStore.create(str(tmp_path / "o"), [[1, 2, 3] * 20])
  state = data.TrainSource(store, seq_len=8, batch_size=2).state(3)
  with pytest.raises(ValueError, match="differs from the checkpointed"):
    data.TrainSource.from_state(other, state)


def test_task_source():
  source = data.TaskSource("addition", seq_len=32, batch_size=8, seed=3)
  task = data.get_task("addition")
  assert source.max_length == task.max_length_for(32) == 9
  batch = source.batch(4)
  again = data.TaskSource.from_state(source.state(4)).batch(4)
  assert _equal(batch, again)
  assert not _equal(batch, source.batch(5))
  assert batch["tokens"].shape == (8, 32)
  for row in range(8):
    n = int((batch["segment_ids"][row] > 0).sum())
    text = bytes(batch["tokens"][row][:n].astype(np.uint8)).decode()
    a, rest = text.split("+")
    b, c = rest.split("=")
    assert int(a) + int(b) == int(c) and len(a) == len(b)
    # Weights: exactly the targets that are answer characters.
    answer_start = text.index("=") + 1
    expected = np.zeros(32)
    expected[answer_start - 1:n - 1] = 1
    np.testing.assert_array_equal(batch["weights"][row], expected)
    np.testing.assert_array_equal(batch["positions"][row][:n], np.arange(n))
    assert not batch["tokens"][row][n:].any()
  with pytest.raises(ValueError, match="max_length"):
    data.TaskSource("copy", seq_len=32, batch_size=2, max_length=16)
