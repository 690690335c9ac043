"""The papers' non-interval masks: Dilated (LongNet), Strided (LongGen /
Phi-3-small local + vertical stride), GlobalTokens (Longformer / ETC /
LongT5), the two-sided SlidingWindow (jax's local_window_size), and per-head
masks (LongLoRA's S^2-Attn, MoA's window per head, LongNet's head offsets).

Goldens are written out by hand from the papers' definitions; the classifier
is checked exact on each primitive and sound on combinations by brute force;
every implementation runs them against the float64 oracle (forward, lse,
gradients), packed segments and T != S included.
"""

import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax import attention
from extrapolax.attention import masks
from extrapolax.attention.masks import (EMPTY, FULL, Causal, Chunked,
                                        Dilated, GlobalTokens, PerHead,
                                        SlidingWindow, Strided)
from extrapolax.pallas_kernels import flash_gpu, tiles
from tests.attention import oracle
from tests.attention import test_context_parallel as cp_tests
from tests.attention.suite import IMPLEMENTATIONS, PALLAS_GPU, PALLAS_TPU
from tests.attention.test_implementations import check, make_case


def m(rows):
  return np.array([[c == "1" for c in r] for r in rows.split()])


# Each golden: (mask, T, S, rows). Derived by hand:
# * Dilated(4, 2): segments {0..3}, {4..7}; rows 0, 2 and 4, 6 take part,
#   causally among themselves; the other rows see nothing.
# * Strided(2, 2): blocks of 2; vertical blocks 1 and 3 ((b + 1) % 2 == 0);
#   each query sees its own block (causal) and earlier vertical blocks.
# * Strided(2, 3, local=2): own block and the one before; vertical block 2.
GOLDENS = [
    (Dilated(4, 2), 8, 8,
     "10000000 00000000 10100000 00000000 00001000 00000000 00001010 "
     "00000000"),
    (Dilated(4, 2, offset=1), 8, 8,
     "00000000 01000000 00000000 01010000 00000000 00000100 00000000 "
     "00000101"),
    (Dilated(3, 1), 5, 5, "10000 11000 11100 00010 00011"),
    (Dilated(4, 2), 3, 8, "00000000 00001010 00000000"),   # T < S
    (Strided(2, 2), 8, 8,
     "10000000 11000000 00100000 00110000 00111000 00111100 00110010 "
     "00110011"),
    (Strided(2, 3, local=2), 8, 8,
     "10000000 11000000 11100000 11110000 00111000 00111100 00001110 "
     "00001111"),
    (Strided(1, 2, local=0), 4, 4, "0000 0100 0100 0101"),
    (GlobalTokens(positions=(2,)), 4, 4, "0010 0010 1111 0010"),
    (GlobalTokens(count=1, every=3), 5, 5,
     "11111 10010 10010 11111 10010"),
    (GlobalTokens(count=2), 3, 4, "1111 1100 1100"),        # T < S
    (SlidingWindow(left=1, right=1), 4, 4, "1100 1110 0111 0011"),
    (SlidingWindow(left=0, right=2), 4, 4, "1110 0111 0011 0001"),
    (SlidingWindow(left=1, right=1), 2, 4, "0111 0011"),
    (Chunked(4, offset=2), 6, 6,
     "110000 110000 001111 001111 001111 001111"),
    (SlidingWindow(left=1, right=1) | GlobalTokens(positions=(0,)), 4, 4,
     "1111 1110 1111 1011"),
]


@pytest.mark.parametrize("mask,t,s,rows", GOLDENS,
                         ids=[f"{g[0]}-{g[1]}x{g[2]}" for g in GOLDENS])
def test_goldens(mask, t, s, rows):
  got = np.asarray(mask.materialize(t, s))
  assert got.dtype == bool and got.shape == (t, s)
  np.testing.assert_array_equal(got, m(rows))


def test_per_head_goldens():
  # LongLoRA, group 4: heads 0-1 causal in {0..3}, {4..7}; heads 2-3 in the
  # groups shifted by 2: {0, 1}, {2..5}, {6, 7}.
  got = np.asarray(masks.shifted_sparse(4).materialize(8, 8, num_heads=4))
  plain = m("10000000 11000000 11100000 11110000 00001000 00001100 00001110 "
            "00001111")
  shifted = m("10000000 11000000 00100000 00110000 00111000 00111100 "
              "00000010 00000011")
  np.testing.assert_array_equal(got, np.stack([plain, plain, shifted,
                                               shifted]))
  moa = np.asarray(masks.window_per_head((1, 3)).materialize(4, 4))
  np.testing.assert_array_equal(moa[0], np.eye(4, dtype=bool))
  np.testing.assert_array_equal(moa[1], m("1000 1100 1110 0111"))
  heads = np.asarray(masks.dilated_heads(4, 2).materialize(4, 4))
  np.testing.assert_array_equal(heads[0], m("1000 0000 1010 0000"))
  np.testing.assert_array_equal(heads[1], m("0000 0100 0000 0101"))


def test_causal_window_unchanged_and_two_sided_equality():
  assert SlidingWindow(5) == SlidingWindow(left=4, right=0)
  assert SlidingWindow(5).window == 5 and repr(SlidingWindow(5)) == (
      "SlidingWindow(5)")
  assert SlidingWindow(left=2, right=3).window == 6
  i, j = np.arange(9)[:, None], np.arange(9)[None]
  np.testing.assert_array_equal(np.asarray(SlidingWindow(3).materialize(9, 9)),
                                (i - j >= 0) & (i - j < 3))


@pytest.mark.parametrize("window", [(3, 2), (0, 4), (2, 0), 2])
def test_two_sided_window_is_jax_local_window_size(window):
  """jax.nn.dot_product_attention(local_window_size=(l, r)): key j visible
  to query i iff i - l <= j <= i + r; an int w means (w, w). Read off jax's
  own attention weights: zero logits, one-hot values."""
  t = 10
  q = jnp.zeros((1, t, 1, t))
  v = jnp.eye(t)[None, :, None, :]
  out = jax.nn.dot_product_attention(q, q, v, local_window_size=window,
                                     implementation="xla")
  jax_mask = np.asarray(out[0, :, 0] > 0)
  left, right = window if isinstance(window, tuple) else (window, window)
  ours = np.asarray(SlidingWindow(left=left, right=right).materialize(t, t))
  np.testing.assert_array_equal(ours, jax_mask)


# --- the classifier ---------------------------------------------------------

# One compilation per shape instead of dozens of eager ops per call.
_classify = jax.jit(masks.classify_blocks, static_argnums=0, static_argnames=(
    "q_len", "kv_len", "block_q", "block_k", "heads"))


def _truth(vis, bq, bk):
  t, s = vis.shape
  nq, nk = -(-t // bq), -(-s // bk)
  some, full = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
  for a, b in itertools.product(range(nq), range(nk)):
    blk = vis[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
    some[a, b], full[a, b] = blk.any(), blk.all() and blk.shape == (bq, bk)
  return some, full


PRIMITIVES = [
    Dilated(8, 2), Dilated(8, 2, offset=1), Dilated(5, 3, offset=2),
    Dilated(6, 1), Dilated(16, 4, offset=3), Dilated(3, 3),
    Strided(4, 3), Strided(3, 2, local=2, offset=1), Strided(5, 1),
    Strided(2, 4, local=0, offset=3), Strided(7, 3, local=3),
    GlobalTokens(positions=(0, 5, 6, 7, 23)), GlobalTokens(count=3),
    GlobalTokens(count=2, every=7), GlobalTokens(count=1, every=2),
    SlidingWindow(left=3, right=2), SlidingWindow(left=0, right=5),
    SlidingWindow(left=9, right=9), Chunked(6, offset=4),
]


@pytest.mark.parametrize("mask", PRIMITIVES, ids=repr)
def test_classifier_exact_on_primitives(mask):
  rng = np.random.default_rng(zlib.crc32(repr(mask).encode()))
  for _ in range(8):
    t, s = (int(x) for x in rng.integers(1, 50, size=2))
    bq, bk = (int(x) for x in rng.integers(1, 12, size=2))
    labels = np.asarray(_classify(mask, q_len=t, kv_len=s, block_q=bq,
                                  block_k=bk))[0]
    some, full = _truth(np.asarray(mask.materialize(t, s)), bq, bk)
    np.testing.assert_array_equal(labels != EMPTY, some, err_msg=f"{t, s, bq, bk}")
    np.testing.assert_array_equal(labels == FULL, full, err_msg=f"{t, s, bq, bk}")


PER_HEAD = [masks.shifted_sparse(6), masks.window_per_head((1, 4, 9, 30)),
            masks.dilated_heads(8, 2),
            PerHead((Strided(4, 3), GlobalTokens(count=2),
                     Dilated(6, 2), SlidingWindow(left=2, right=1)))]


@pytest.mark.parametrize("mask", PER_HEAD, ids=repr)
def test_classifier_per_head_exact_and_union_sound(mask):
  n = 4
  bound = mask.for_heads(n, 2)
  rng = np.random.default_rng(3)
  for _ in range(3):
    t, s = (int(x) for x in rng.integers(1, 45, size=2))
    bq, bk = (int(x) for x in rng.integers(1, 10, size=2))
    kw = dict(q_len=t, kv_len=s, block_q=bq, block_k=bk)
    per_head = np.asarray(_classify(bound, heads=n, **kw))[0]
    union = np.asarray(_classify(bound, **kw))[0]
    dense = np.asarray(mask.materialize(t, s, num_heads=n))
    for h in range(n):
      some, full = _truth(dense[h], bq, bk)
      np.testing.assert_array_equal(per_head[h] != EMPTY, some)
      np.testing.assert_array_equal(per_head[h] == FULL, full)
      assert not (union == EMPTY)[some].any()
      assert full[union == FULL].all()


COMBINED = [
    Causal() & (SlidingWindow(4) | GlobalTokens(positions=(2, 17))),
    Dilated(4, 1) | Dilated(8, 2) | Dilated(16, 4),
    SlidingWindow(left=3, right=3) | GlobalTokens(count=2, every=10),
    Strided(4, 3) & SlidingWindow(20), Causal() & Chunked(8, offset=4),
    Strided(3, 2, local=2) | Dilated(12, 3, offset=1),
]


@pytest.mark.parametrize("mask", COMBINED + PER_HEAD, ids=repr)
def test_classifier_sound_with_segments_and_positions(mask):
  rng = np.random.default_rng(zlib.crc32(repr(mask).encode()))
  n = 4
  bound = mask.for_heads(n, 1)
  for trial in range(4):
    t = int(rng.integers(5, 50))
    bq, bk = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    seg = np.sort(rng.integers(0, rng.integers(1, 6), size=(1, t)), axis=1)
    q_pos = k_pos = None
    if trial % 2:
      k_pos = rng.permutation(t + 5)[:t][None]
      q_pos = (np.arange(t) + int(rng.integers(0, 8)))[None]
    heads = n if mask.per_head else None
    labels = np.asarray(_classify(
        bound, q_len=t, kv_len=t, block_q=bq, block_k=bk, q_positions=q_pos,
        k_positions=k_pos, q_segment_ids=seg, kv_segment_ids=seg,
        heads=heads))[0]
    qp = np.arange(t) if q_pos is None else q_pos[0]
    kp = np.arange(t) if k_pos is None else k_pos[0]
    for h in range(n if heads else 1):
      vis = oracle.visible(mask, qp[:, None], kp[None], h, n) & (
          seg[0][:, None] == seg[0][None])
      some, full = _truth(vis, bq, bk)
      lab = labels[h] if heads else labels
      assert not (lab == EMPTY)[some].any(), "skipped a visible block"
      assert full[lab == FULL].all(), "unmasked a block with hidden pairs"


def test_skipping_is_real():
  # T = 4096, blocks 128: the fraction of blocks skipped.
  kw = dict(q_len=4096, kv_len=4096, block_q=128, block_k=128)
  empty = lambda mask: float(np.mean(np.asarray(
      _classify(mask, **kw)) == EMPTY))
  # Segments of 8 blocks: 4 triangles of 36 blocks out of 1024.
  assert empty(Dilated(1024, 4)) == 1 - 4 * 36 / 1024
  # A dilation finer than a block leaves every causal block PARTIAL: only
  # the segments skip (LongNet's mixture keeps a causal triangle).
  assert empty(Dilated(256, 1) | Dilated(1024, 4) | Dilated(4096, 16)) == (
      1 - 32 * 33 / 2 / 1024)
  assert empty(Strided(128, 8)) > 0.8
  assert empty(SlidingWindow(left=256, right=256)
               | GlobalTokens(count=1)) > 0.75


# --- every implementation against the float64 oracle ------------------------

SCENARIOS = [
    ("dilated_mix", dict(t=37, mask=Dilated(4, 1) | Dilated(8, 2)
                         | Dilated(16, 4))),
    ("dilated_alone_T<S", dict(t=13, s=29, mask=Dilated(8, 2, offset=1))),
    ("strided_packed", dict(t=41, mask=Strided(4, 3, local=2), packed=12)),
    ("strided_T>S", dict(t=30, s=19, mask=Strided(3, 2))),
    ("two_sided_window_T<S", dict(t=26, s=34,
                                  mask=SlidingWindow(left=3, right=2))),
    ("longformer_packed", dict(t=35, mask=SlidingWindow(left=2, right=2)
                               | GlobalTokens(count=2, every=16), packed=14)),
    ("global_positions_causal", dict(t=29, mask=Causal() & (
        SlidingWindow(4) | GlobalTokens(positions=(1, 9, 20))))),
    ("shifted_sparse_gqa_packed", dict(t=33, n=4, k=2,
                                       mask=masks.shifted_sparse(8),
                                       packed=20)),
    ("window_per_head_T<S", dict(t=19, s=40, n=4, k=1,
                                 mask=masks.window_per_head((2, 5, 11, 40)))),
    ("dilated_heads_explicit", dict(t=17, s=30, n=4, k=2,
                                    mask=masks.dilated_heads(8, 2),
                                    explicit_positions=True)),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name,kwargs", SCENARIOS,
                         ids=[s[0] for s in SCENARIOS])
def test_matches_oracle(implementation, name, kwargs):
  check(make_case(zlib.crc32(name.encode()), **kwargs), implementation)


@pytest.mark.parametrize("implementation", [
    pytest.param(attention.XlaChunked(block_q=8, block_k=8), id="xla_chunked"),
    pytest.param(PALLAS_GPU, id="pallas_gpu-interpret"),
    pytest.param(PALLAS_TPU, id="pallas_tpu-interpret"),
])
def test_window_per_head_equals_each_head_alone(implementation):
  windows = (3, 7, 12, 30)
  rng = np.random.default_rng(7)
  b, t, n, k, h = 2, 29, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  kk = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
  seg = jnp.asarray(np.repeat([[0] * 18 + [1] * 11], b, 0), jnp.int32)
  run = functools.partial(attention.dot_product_attention, segment_ids=seg,
                          implementation=implementation,
                          return_residuals=True)
  out, lse = jax.jit(lambda q, kk, v: run(
      q, kk, v, mask=masks.window_per_head(windows)))(q, kk, v)
  for head, w in enumerate(windows):
    c = head // (n // k)
    one, one_lse = run(q[:, :, head:head + 1], kk[:, :, c:c + 1],
                       v[:, :, c:c + 1], mask=SlidingWindow(w))
    np.testing.assert_allclose(out[:, :, head:head + 1], one, atol=2e-6)
    np.testing.assert_allclose(lse[:, head:head + 1], one_lse, atol=2e-6)


def test_kernel_visits_each_heads_own_blocks():
  """The GPU kernel skips per head: its loop-trip counters equal the
  per-head classifier's non-empty block counts, and the heads differ."""
  b, t, n, k, h = 1, 64, 4, 2, 8
  rng = np.random.default_rng(0)
  q, kk, v = (jnp.asarray(rng.normal(size=(b, t, x, h)), jnp.float32)
              for x in (n, k, k))
  mask = masks.window_per_head((4, 40)).for_heads(n, k)
  blocks = flash_gpu.BlockSizes(block_q=8, block_k=8, block_q_dq=8,
                                block_k_dq=8, block_q_dkv=8, block_k_dkv=8)
  static = flash_gpu.make_static(
      mask=mask, scale=h ** -0.5, soft_cap=None, far_window=None,
      has_segments=False, has_slopes=False, has_far=False, q_len=t,
      kv_len=t, num_kv_heads=k, block_sizes=blocks, interpret=True)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  counts = jax.jit(functools.partial(flash_gpu.visit_counts, static))(
      q, kk, v, pos, pos)
  labels = masks.classify_blocks(mask, q_len=t, kv_len=t, block_q=8,
                                 block_k=8, heads=n)[0]          # [N, 8, 8]
  for kind, transpose in (("fwd", False), ("dq", False), ("dkv", True)):
    lab = jnp.swapaxes(labels, 1, 2) if transpose else labels
    want = np.asarray(tiles.visited_blocks(lab))                  # [N, 8]
    np.testing.assert_array_equal(np.asarray(counts[kind])[0, :, :8], want,
                                  err_msg=kind)
  fwd = np.asarray(counts["fwd"])[0]
  assert fwd[0].sum() < fwd[3].sum()      # window 4 visits fewer blocks


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
@pytest.mark.parametrize("mesh,kwargs", [
    ("c8", dict(mask=Strided(8, 3, local=2))),
    ("tp", dict(mask=masks.shifted_sparse(16), docs=13)),
    ("dp", dict(mask=SlidingWindow(left=5, right=4)
                | GlobalTokens(positions=(3, 40)))),
], ids=["strided", "shifted_sparse_packed", "longformer"])
def test_context_parallel(mesh, kwargs, strategy):
  case = cp_tests.make_case(zlib.crc32(repr(kwargs).encode()), **kwargs)
  impl = attention.ContextParallel("xla", strategy=strategy,
                                   mesh=cp_tests.mesh_of(mesh))
  cp_tests.check(case, impl)


# --- errors and the registry ------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: Dilated(4, 0), "rate"), (lambda: Dilated(4, 8), "rate"),
    (lambda: Dilated(4, 2, offset=2), "offset"),
    (lambda: Dilated(0, 1), "segment"),
    (lambda: Strided(0, 2), "block"), (lambda: Strided(4, 0), "stride"),
    (lambda: Strided(4, 2, offset=2), "offset"),
    (lambda: Strided(4, 2, local=-1), "local"),
    (lambda: GlobalTokens(), "count >= 1 or positions"),
    (lambda: GlobalTokens(count=2, positions=(1,)), "not both"),
    (lambda: GlobalTokens(count=3, every=3), "every"),
    (lambda: GlobalTokens(positions=(-1,)), "positions"),
    (lambda: GlobalTokens(positions=5), "tuple"),
    (lambda: SlidingWindow(3, left=1, right=1), "not both"),
    (lambda: SlidingWindow(left=1), "both left= and right="),
    (lambda: SlidingWindow(left=-1, right=0), "left"),
    (lambda: Chunked(4, offset=4), "offset"),
    (lambda: PerHead(()), "non-empty"),
    (lambda: PerHead((masks.shifted_sparse(4),)), "head-independent"),
    (lambda: PerHead((Causal(), "causal")), "Mask"),
    (lambda: masks.shifted_sparse(5), "even"),
    (lambda: masks.window_per_head(()), "windows"),
    (lambda: masks.window_per_head((4, 0)), "window"),
])
def test_bad_parameters_give_one_clear_line(make, match):
  with pytest.raises(ValueError, match=match) as info:
    make()
  assert "\n" not in str(info.value)


def test_per_head_mask_needs_heads_it_divides():
  q = jnp.ones((1, 8, 3, 4))
  with pytest.raises(ValueError, match="2 masks.*got 3 heads"):
    attention.dot_product_attention(q, q, q,
                                    mask=masks.shifted_sparse(4))
  with pytest.raises(ValueError, match="needs head="):
    masks.shifted_sparse(4)(jnp.arange(3), jnp.arange(3))


@pytest.mark.parametrize("text,want", [
    ("dilated(segment=64, rate=2)", Dilated(64, 2)),
    ("dilated(16, 4, 1)", Dilated(16, 4, 1)),
    ("strided(block=64, stride=8, local=2)", Strided(64, 8, local=2)),
    ("two_sided_window(left=3, right=2)", SlidingWindow(left=3, right=2)),
    ("global_tokens(positions=(0, 17, 40))",
     GlobalTokens(positions=(0, 17, 40))),
    ("global_tokens(count=1, every=512)", GlobalTokens(count=1, every=512)),
    ("local_global(left=4, right=4, count=2)",
     SlidingWindow(left=4, right=4) | GlobalTokens(count=2)),
    ("shifted_sparse(group=8)", masks.shifted_sparse(8)),
    ("window_per_head(windows=(64, 128, 256, 4096))",
     masks.window_per_head((64, 128, 256, 4096))),
    ("dilated_heads(segment=32, rate=4)", masks.dilated_heads(32, 4)),
])
def test_registry_parse_label_round_trip(text, want):
  name, params = masks.parse(text)
  mask = masks.from_name(name, **params)
  assert mask == want
  text_again = masks.label(name, params)
  assert masks.parse(text_again) == (name, params)
  assert name in masks.describe_names() or any(
      key.startswith(name + "(") for key in masks.describe_names())


def test_registry_unknown_parameter_is_one_line():
  with pytest.raises(ValueError, match="stride") as info:
    masks.from_name("dilated", segment=8, stride=2)
  assert "\n" not in str(info.value)
