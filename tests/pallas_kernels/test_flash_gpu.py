"""The GPU (Triton) kernels beyond the shared suite: skipping, schedule, errors.

The shared suite (tests/attention/test_implementations.py) already runs
``pallas_gpu`` in interpret mode against the float64 oracle on every
scenario; here: the kernels' own loop-trip counters prove that EMPTY blocks
are never visited, the schedule's layout, block-size validation, and a
hardware test that runs where a GPU exists.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax import attention
from extrapolax.attention import masks
from extrapolax.pallas_kernels import flash_gpu, tiles
from tests.attention.suite import assert_close
from tests.attention.test_implementations import packed_segments

BLOCKS = flash_gpu.BlockSizes(block_q=8, block_k=16, block_q_dq=16,
                              block_k_dq=8, block_q_dkv=8, block_k_dkv=16)


def _inputs(b, t, n, k, h, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return f(b, t, n, h), f(b, t, k, h), f(b, t, k, h), rng


@pytest.mark.parametrize("layout", ["packed", "window", "lambda_packed"])
def test_visited_blocks_equal_classifier_nonempty_blocks(layout):
  b, t, n, k, h = 2, 70, 2, 1, 8
  q, kk, v, rng = _inputs(b, t, n, k, h)
  seg = None
  if layout == "packed":
    mask, seg = masks.Causal(), jnp.asarray(packed_segments(rng, b, t, 9))
  elif layout == "window":
    mask = masks.SlidingWindow(12)
  else:
    mask = masks.Lambda(3, 10)
    seg = jnp.asarray(packed_segments(rng, b, t, 25))
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  static = flash_gpu.make_static(
      mask=mask, scale=h ** -0.5, soft_cap=None, far_window=None,
      has_segments=seg is not None, has_slopes=False, has_far=False,
      q_len=t, kv_len=t, num_kv_heads=k, block_sizes=BLOCKS, interpret=True)
  counts = jax.jit(functools.partial(flash_gpu.visit_counts, static))(
      q, kk, v, pos, pos, seg, seg)
  for kind, bq, bk, transpose in (
      ("fwd", BLOCKS.block_q, BLOCKS.block_k, False),
      ("dq", BLOCKS.block_q_dq, BLOCKS.block_k_dq, False),
      ("dkv", BLOCKS.block_q_dkv, BLOCKS.block_k_dkv, True)):
    labels = masks.classify_blocks(mask, q_len=t, kv_len=t, block_q=bq,
                                   block_k=bk, q_segment_ids=seg,
                                   kv_segment_ids=seg)
    if transpose:
      labels = jnp.swapaxes(labels, 1, 2)
    want = np.asarray(tiles.visited_blocks(labels))
    want = np.broadcast_to(want, (b, want.shape[1]))
    got = np.asarray(counts[kind])                      # [B, N, rows (padded)]
    rows = want.shape[1]
    np.testing.assert_array_equal(got[:, :, :rows],
                                  np.broadcast_to(want[:, None], got[:, :, :rows].shape),
                                  err_msg=kind)
    assert (got[:, :, rows:] == 0).all(), kind     # padding rows: nothing
    # Skipping is real: far fewer blocks than the whole grid.
    assert got.sum() < 0.6 * b * n * labels.shape[1] * labels.shape[2], kind


def test_split_schedule_full_first_then_partial():
  e, p, f = masks.EMPTY, masks.PARTIAL, masks.FULL
  labels = jnp.asarray([[[p, f, e, f, p, e]]], jnp.int32)
  sched = np.asarray(tiles.split_schedule(labels, width=8))[0, 0]
  count, num_full, entries = sched[0], sched[1], sched[2:]
  assert (count, num_full) == (4, 2)
  blocks = entries[:count] >> tiles.LABEL_BITS
  kinds = entries[:count] & tiles.LABEL_MASK
  np.testing.assert_array_equal(blocks, [1, 3, 0, 4])
  np.testing.assert_array_equal(kinds, [f, f, p, p])
  with pytest.raises(ValueError, match="width=3"):
    tiles.split_schedule(labels, width=3)


def test_schedule_repeats_last_block_past_count():
  e, p, f = masks.EMPTY, masks.PARTIAL, masks.FULL
  labels = jnp.asarray([[[e, p, e, f], [e, e, e, e]]], jnp.int32)
  sched = np.asarray(tiles.schedule(labels))[0]
  assert sched[0, 0] == 2 and sched[1, 0] == 0
  np.testing.assert_array_equal(sched[0, 1:] >> tiles.LABEL_BITS,
                                [1, 3, 3, 3])


def test_block_sizes_validation():
  with pytest.raises(ValueError, match="block_k must be a power of two"):
    flash_gpu.BlockSizes(block_k=48)
  with pytest.raises(ValueError, match="block_q_dq"):
    flash_gpu.BlockSizes(block_q_dq=0)
  with pytest.raises(ValueError, match="num_warps_bwd"):
    flash_gpu.BlockSizes(num_warps_bwd=3)
  with pytest.raises(ValueError, match=r"block_q=8 must be >= 16 on a GPU"):
    BLOCKS.check_hardware()
  flash_gpu.BlockSizes().check_hardware()
  with pytest.raises(ValueError, match="block_sizes must be a flash_gpu"):
    q, k, v, _ = _inputs(1, 8, 2, 1, 8)
    attention.dot_product_attention(
        q, k, v, implementation=attention.PallasGpu(block_sizes=(8, 8)))


def test_auto_dispatch_on_cpu_does_not_pick_kernels():
  q, k, v, _ = _inputs(1, 16, 2, 1, 8)
  from extrapolax.attention import core  # pylint: disable=g-import-not-at-top
  request = core.make_request(q, k, v, mask=masks.Causal())
  assert not any(name.startswith("pallas")
                 for name in core._auto_candidates(request))  # pylint: disable=protected-access


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5),
                                       (jnp.bfloat16, 2e-2)])
def test_compiled_kernel_matches_oracle_on_gpu(dtype, tol):
  """Real Triton lowering (default block sizes) against the dense oracle."""
  b, t, n, k, h = 2, 333, 4, 2, 64
  q, kk, v, rng = _inputs(b, t, n, k, h, seed=3)
  seg = jnp.asarray(packed_segments(rng, b, t, 80))
  cast = lambda x: x.astype(dtype)
  kw = dict(mask=masks.Lambda(4, 100), segment_ids=seg,
            alibi_slopes=attention.alibi_slopes(n), logits_soft_cap=20.0)

  def loss(impl, q, kk, v):
    out = attention.dot_product_attention(q, kk, v, implementation=impl,
                                          **kw)
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32)))

  got = jax.grad(functools.partial(loss, "pallas_gpu"), argnums=(0, 1, 2))(
      cast(q), cast(kk), cast(v))
  with jax.default_matmul_precision("highest"):
    want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(
        *(cast(x).astype(jnp.float32) for x in (q, kk, v)))
  for g, w, name in zip(got, want, "qkv"):
    assert_close(g, np.asarray(w, np.float64), 2 * tol, f"d{name}")
