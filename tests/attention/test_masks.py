"""Masks: goldens, algebra, value semantics, and the block classifier."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax.attention import masks
from extrapolax.attention.masks import (EMPTY, FULL, PARTIAL, Causal,
                                        Chunked, Lambda, PrefixLM,
                                        SlidingWindow)
from tests.attention import oracle


def m(rows):
  return np.array([[c == "1" for c in r] for r in rows.split()])


GOLDENS = [
    (Causal(), 3, 3, "100 110 111"),
    (Causal(), 2, 4, "1110 1111"),            # bottom-right alignment
    (Causal(), 3, 2, "00 10 11"),             # the first query sees nothing
    (SlidingWindow(2), 4, 4, "1000 1100 0110 0011"),
    (SlidingWindow(1), 3, 3, "100 010 001"),
    (Lambda(1, 2), 5, 5, "10000 11000 11100 10110 10011"),
    (Lambda(2, 1), 4, 4, "1000 1100 1110 1101"),
    (Chunked(2), 4, 4, "1100 1100 0011 0011"),
    (Causal() & Chunked(2), 4, 4, "1000 1100 0010 0011"),
    (PrefixLM(2), 4, 4, "1100 1100 1110 1111"),
    (SlidingWindow(1) | Chunked(3), 3, 3, "111 111 111"),
    (Causal() & (SlidingWindow(1) | Chunked(2)), 4, 4,
     "1000 1100 0010 0011"),
]


@pytest.mark.parametrize("mask,t,s,rows", GOLDENS,
                         ids=[f"{g[0]}-{g[1]}x{g[2]}" for g in GOLDENS])
def test_materialize_goldens(mask, t, s, rows):
  got = np.asarray(mask.materialize(t, s))
  assert got.dtype == bool and got.shape == (t, s)
  np.testing.assert_array_equal(got, m(rows))


def test_lambda_is_causal_and_sinks_or_window():
  t = 50
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  want = (j <= i) & ((j < 4) | (i - j < 9))
  np.testing.assert_array_equal(np.asarray(Lambda(4, 9).materialize(t, t)),
                                want)
  # Lambda(0, w) is the sliding window.
  np.testing.assert_array_equal(
      np.asarray(Lambda(0, 9).materialize(t, t)),
      np.asarray(SlidingWindow(9).materialize(t, t)))


def test_value_semantics():
  assert Causal() == Causal() and hash(Causal()) == hash(Causal())
  assert SlidingWindow(3) == SlidingWindow(3)
  assert SlidingWindow(3) != SlidingWindow(4)
  assert Lambda(4, 8) != Lambda(8, 4)
  a, b = Causal() & Chunked(4), Causal() & Chunked(4)
  assert a == b and hash(a) == hash(b) and a != (Chunked(4) & Causal())
  assert len({Causal(), Causal(), SlidingWindow(2), SlidingWindow(2)}) == 2
  assert isinstance(SlidingWindow(2) | Chunked(2), masks.Or)
  # Usable as a static argument: equal masks share one compilation.
  calls = []

  @jax.jit
  def f(x, mask):
    calls.append(mask)
    return x + mask.materialize(4, 4).sum()
  f = jax.jit(f.__wrapped__, static_argnums=1)
  f(1.0, SlidingWindow(2))
  f(1.0, SlidingWindow(2))
  assert len(calls) == 1


@pytest.mark.parametrize("make,bad", [
    (SlidingWindow, 0), (SlidingWindow, -3), (SlidingWindow, 2.5),
    (SlidingWindow, True), (Chunked, 0), (PrefixLM, -1),
    (lambda v: Lambda(v, 4), -1), (lambda v: Lambda(2, v), 0),
])
def test_bad_parameters_raise(make, bad):
  with pytest.raises(ValueError, match=str(bad)):
    make(bad)


@pytest.mark.parametrize("make", [
    SlidingWindow, Chunked, PrefixLM, lambda v: Lambda(v, 4),
    lambda v: Lambda(2, v)])
def test_sizes_bounded_by_int32(make):
  """Issue 15 item 7: SlidingWindow(10**12) built, then overflowed in jax."""
  with pytest.raises(ValueError, match=f"<= {2**31 - 1}, got {10**12}"):
    make(10**12)
  make(2**31 - 1)   # the largest size int32 position maths holds


def test_combining_with_a_non_mask_raises():
  with pytest.raises(ValueError, match="Mask"):
    Causal() & 3
  with pytest.raises(ValueError, match="Mask"):
    masks.as_mask("causal")


# --- the block classifier ---------------------------------------------------

def _truth(mask, t, s, bq, bk, q_pos=None, k_pos=None, q_seg=None,
           kv_seg=None):
  """Per block: (any visible, all visible and block whole), from the dense mask."""
  if q_pos is None:
    q_pos, k_pos = np.arange(t) + s - t, np.arange(s)
  vis = oracle.visible(mask, np.asarray(q_pos)[:, None],
                       np.asarray(k_pos)[None, :])
  if q_seg is not None:
    vis = vis & (np.asarray(q_seg)[:, None] == np.asarray(kv_seg)[None, :])
  nq, nk = -(-t // bq), -(-s // bk)
  some = np.zeros((nq, nk), bool)
  full = np.zeros((nq, nk), bool)
  for a, b in itertools.product(range(nq), range(nk)):
    blk = vis[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
    some[a, b] = blk.any()
    full[a, b] = blk.all() and blk.shape == (bq, bk)
  return some, full


PRIMITIVES = [Causal(), SlidingWindow(1), SlidingWindow(7), SlidingWindow(40),
              Lambda(3, 5), Lambda(0, 6), Lambda(9, 1), Chunked(5),
              Chunked(16), PrefixLM(11), PrefixLM(0), None]


@pytest.mark.parametrize("mask", PRIMITIVES, ids=str)
@pytest.mark.parametrize("t,s,bq,bk", [(37, 37, 8, 8), (20, 45, 4, 16),
                                       (45, 20, 16, 3), (64, 64, 16, 16)])
def test_classifier_is_exact_for_primitives(mask, t, s, bq, bk):
  labels = np.asarray(masks.classify_blocks(mask, q_len=t, kv_len=s,
                                            block_q=bq, block_k=bk))
  some, full = _truth(mask, t, s, bq, bk)
  assert labels.shape == (1,) + some.shape
  np.testing.assert_array_equal(labels[0] != EMPTY, some)
  np.testing.assert_array_equal(labels[0] == FULL, full)


COMBINED = [Causal() & Chunked(8), Lambda(2, 6) & SlidingWindow(10),
            Causal() & (SlidingWindow(4) | Chunked(16)),
            Chunked(9) | SlidingWindow(4), PrefixLM(6) & Chunked(12)]


@pytest.mark.parametrize("mask", COMBINED, ids=str)
def test_classifier_is_sound_for_combinations(mask):
  t, s, bq, bk = 50, 50, 8, 8
  labels = np.asarray(masks.classify_blocks(mask, q_len=t, kv_len=s,
                                            block_q=bq, block_k=bk))[0]
  some, full = _truth(mask, t, s, bq, bk)
  assert not (labels == EMPTY)[some].any(), "skipped a visible block"
  assert full[labels == FULL].all(), "unmasked a block with hidden pairs"


def test_classifier_with_segments_and_positions_is_sound():
  rng = np.random.default_rng(0)
  for trial in range(12):
    t = int(rng.integers(5, 60))
    bq, bk = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    seg = np.sort(rng.integers(0, rng.integers(1, 8), size=(2, t)), axis=1)
    mask = [Causal(), SlidingWindow(5), Lambda(2, 4), None][trial % 4]
    labels = np.asarray(masks.classify_blocks(
        mask, q_len=t, kv_len=t, block_q=bq, block_k=bk,
        q_segment_ids=seg, kv_segment_ids=seg))
    assert labels.shape[0] == 2
    for b in range(2):
      some, full = _truth(mask, t, t, bq, bk, q_seg=seg[b], kv_seg=seg[b])
      assert not (labels[b] == EMPTY)[some].any()
      assert full[labels[b] == FULL].all()
    # Explicit (shuffled) key positions.
    k_pos = rng.permutation(t)
    q_pos = np.arange(t) + 3
    labels = np.asarray(masks.classify_blocks(
        mask, q_len=t, kv_len=t, block_q=bq, block_k=bk,
        q_positions=q_pos, k_positions=k_pos))[0]
    some, full = _truth(mask, t, t, bq, bk, q_pos=q_pos, k_pos=k_pos)
    assert not (labels == EMPTY)[some].any()
    assert full[labels == FULL].all()


def test_packed_documents_skip_off_diagonal_blocks():
  # Four documents of 16 tokens, blocks of 8: only blocks inside a document
  # survive, and the causal diagonal blocks are partial.
  seg = np.repeat(np.arange(4), 16)[None]
  labels = np.asarray(masks.classify_blocks(
      Causal(), q_len=64, kv_len=64, block_q=8, block_k=8,
      q_segment_ids=seg, kv_segment_ids=seg))[0]
  want = np.full((8, 8), EMPTY)
  for d in range(4):
    a = 2 * d
    want[a, a] = want[a + 1, a + 1] = PARTIAL
    want[a + 1, a] = FULL
  np.testing.assert_array_equal(labels, want)


def test_classifier_is_traceable_with_changing_segments():
  f = jax.jit(lambda seg: masks.classify_blocks(
      Causal(), q_len=32, kv_len=32, block_q=8, block_k=8,
      q_segment_ids=seg, kv_segment_ids=seg))
  one_doc = jnp.zeros((1, 32), jnp.int32)
  two_docs = jnp.repeat(jnp.arange(2), 16)[None]
  a, b = np.asarray(f(one_doc)), np.asarray(f(two_docs))
  assert (a[0] != EMPTY).sum() == 10       # lower triangle of 4 x 4 blocks
  assert (b[0] != EMPTY).sum() == 6        # two triangles of 2 x 2 blocks
  assert f._cache_size() == 1               # one compilation for both


def test_window_block_count():
  # T = 1024, window 128, blocks 64: each query block sees its own block,
  # the two before it (partially for the farthest).
  labels = np.asarray(masks.classify_blocks(
      SlidingWindow(128), q_len=1024, kv_len=1024, block_q=64, block_k=64))[0]
  per_row = (labels != EMPTY).sum(1)
  np.testing.assert_array_equal(per_row, [1, 2] + [3] * 14)
  assert (labels == FULL).sum() == 15


def test_block_minmax_ragged():
  lo, hi = masks.block_minmax(jnp.array([[3, 1, 4, 1, 5, 9, 2]]), 3)
  np.testing.assert_array_equal(lo, [[1, 1, 2]])
  np.testing.assert_array_equal(hi, [[4, 9, 2]])
