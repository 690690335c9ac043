"""Packing: rows hold whole document pieces, never mix documents.

Documents are made of tokens that name themselves (token = 1000 * (doc + 1)
+ position), so every row can be checked against the original documents
without trusting the packer's own bookkeeping.
"""

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax.experiments import data
from extrapolax.models import AttentionSpec, DecoderLM, ModelConfig


def _named_docs(lengths):
  return [1000 * (d + 1) + np.arange(n) for d, n in enumerate(lengths)]


def _check_rows(batch, lengths, seq_len):
  """Every document token appears exactly once; segments are contiguous runs
  of one document whose positions start at 0; targets and weights are the
  document's next token; padding is inert."""
  tokens, targets = batch["tokens"], batch["targets"]
  segments, positions = batch["segment_ids"], batch["positions"]
  weights = batch["weights"]
  assert tokens.shape[1] == seq_len
  for name in ("tokens", "targets", "segment_ids", "positions"):
    assert batch[name].dtype == np.int32, name
  assert weights.dtype == np.float32
  pad = segments == 0
  assert not tokens[pad].any() and not weights[pad].any()
  doc, pos = tokens // 1000 - 1, tokens % 1000
  seen = np.zeros(sum(lengths), int)
  starts = np.concatenate([[0], np.cumsum(lengths)])
  for row in range(len(tokens)):
    ids = segments[row][segments[row] > 0]
    # Segment ids are 1..n in order, padding only at the end of the row.
    assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
    assert ids.size == 0 or ids[0] == 1
    assert not segments[row][len(ids):].any()
    for seg in np.unique(ids):
      at = segments[row] == seg
      d, p = doc[row][at], pos[row][at]
      assert (d == d[0]).all(), f"row {row} segment {seg} mixes documents"
      np.testing.assert_array_equal(p, p[0] + np.arange(len(p)))
      np.testing.assert_array_equal(positions[row][at], np.arange(len(p)))
      seen[starts[d[0]] + p] += 1
      has_next = p + 1 < lengths[d[0]]
      np.testing.assert_array_equal(weights[row][at], has_next)
      np.testing.assert_array_equal(
          targets[row][at], np.where(has_next, tokens[row][at] + 1, 0))
  np.testing.assert_array_equal(seen, 1)


@pytest.mark.parametrize("method", data.PACKING_METHODS)
@hypothesis.given(lengths=st.lists(st.integers(0, 40), min_size=1,
                                   max_size=25),
                  seq_len=st.integers(1, 24))
def test_rows_match_the_documents(method, lengths, seq_len):
  batch = data.pack_documents(_named_docs(lengths), seq_len, method)
  _check_rows(batch, lengths, seq_len)
  plan = data.pack(lengths, seq_len, method)
  assert plan.num_rows == len(batch["tokens"])
  if method == "concat":   # no padding except at the very end
    assert plan.num_rows == -(-sum(lengths) // seq_len)
  else:   # a row is opened only for a piece no earlier row had room for
    room = seq_len - (batch["segment_ids"] > 0).sum(1)
    opener = [plan.row(r)[0][2] for r in range(plan.num_rows)]
    for r in range(plan.num_rows):
      assert all(opener[later] > room[r]
                 for later in range(r + 1, plan.num_rows))


def test_concat_is_the_stream_cut_into_rows():
  lengths = [5, 0, 3, 12, 7, 1, 2]
  batch = data.pack_documents(_named_docs(lengths), 6, "concat")
  stream = np.concatenate(_named_docs(lengths))
  rows = np.zeros(5 * 6, np.int64)
  rows[:len(stream)] = stream
  np.testing.assert_array_equal(batch["tokens"], rows.reshape(5, 6))
  # Row 1 starts inside document 2 ([201..203] continues at 202): positions
  # restart at the row start, and document 3 starts a new segment.
  np.testing.assert_array_equal(batch["segment_ids"][1], [1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(batch["positions"][1], [0, 1, 0, 1, 2, 3])


def test_first_fit_and_best_fit_choose_different_rows():
  # Longest first: 5 -> row 0 (2 left), 3 -> row 1 (4 left), 3 -> row 1
  # (1 left). The last item (1 token) goes to the lowest row with room under
  # first fit (row 0) and to the fullest row with room under best fit (1).
  first = data.pack([1, 3, 3, 5], 7, "first_fit")
  best = data.pack([1, 3, 3, 5], 7, "best_fit")
  assert first.row(0) == [(3, 0, 5, 0), (0, 0, 1, 5)]
  assert first.row(1) == [(1, 0, 3, 0), (2, 0, 3, 3)]
  assert best.row(0) == [(3, 0, 5, 0)]
  assert best.row(1) == [(1, 0, 3, 0), (2, 0, 3, 3), (0, 0, 1, 6)]


def test_long_documents_are_cut_into_full_rows():
  plan = data.pack([25, 3], 10, "best_fit")
  pieces = sorted(p for r in range(plan.num_rows) for p in plan.row(r))
  assert pieces == [(0, 0, 10, 0), (0, 10, 10, 0), (0, 20, 5, 0),
                    (1, 0, 3, 5)]
  assert plan.fill == pytest.approx(28 / 30)


def test_bad_arguments():
  with pytest.raises(ValueError, match="packing method"):
    data.pack([3], 4, "next_fit")
  with pytest.raises(ValueError, match="seq_len"):
    data.pack([3], 0)
  with pytest.raises(ValueError, match="lengths"):
    data.pack([3, -1], 4)


# -- the model sees each packed document as if it were alone -----------------


def _tiny_model(**kwargs):
  # The dense "xla" implementation: the fastest to run eagerly on the CPU.
  config = ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4,
                       mlp_dim=64, max_len=16, implementation="xla", **kwargs)
  return DecoderLM(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("model_kwargs", [
    dict(attention=(AttentionSpec(position="rope"),)),
    dict(attention=(AttentionSpec(position="alibi"),)),
    dict(attention=(AttentionSpec(position="nope"),), absolute="learned"),
], ids=["rope", "alibi", "learned"])
def test_packed_logits_equal_each_document_alone(model_kwargs):
  model = _tiny_model(**model_kwargs)
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, 256, n) for n in (5, 9, 3, 20, 6)]
  seq_len = 16
  batch = data.pack_documents(docs, seq_len, "best_fit")
  plan = data.pack([len(d) for d in docs], seq_len, "best_fit")
  packed = np.asarray(model(jnp.asarray(batch["tokens"]),
                            positions=jnp.asarray(batch["positions"]),
                            segment_ids=jnp.asarray(batch["segment_ids"])))
  unmasked = np.asarray(model(jnp.asarray(batch["tokens"])))
  pieces = [(row, seg, docs[d][start:start + n], column)
            for row in range(plan.num_rows)
            for seg, (d, start, n, column) in enumerate(plan.row(row), 1)]
  assert len(pieces) > plan.num_rows          # some rows hold several
  # Each piece alone, one per row from position 0 (right padding is
  # invisible to a causal model), in one call.
  alone_tokens = np.zeros((len(pieces), seq_len), np.int32)
  for i, (_, _, piece, _) in enumerate(pieces):
    alone_tokens[i, :len(piece)] = piece
  alone = np.asarray(model(jnp.asarray(alone_tokens)))
  crossed = 0
  for i, (row, seg, piece, column) in enumerate(pieces):
    at = batch["segment_ids"][row] == seg
    np.testing.assert_array_equal(batch["tokens"][row][at], piece)
    np.testing.assert_allclose(packed[row][at], alone[i, :len(piece)],
                               atol=2e-5, rtol=2e-5)
    if column:       # without segment ids this piece would see others
      crossed += not np.allclose(unmasked[row][at], alone[i, :len(piece)],
                                 atol=1e-3)
  assert crossed, "the check would not notice cross-document attention"
