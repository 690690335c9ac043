"""xla_chunked's visited-pair lists: listed on the host (default positions, no
segment ids) they are exactly the pairs the device lists, FULL and PARTIAL
apart; the numerics of both schedules are in the shared suite
(tests/attention/suite.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax.attention import masks
from extrapolax.attention import xla_chunked
from tests.attention import test_implementations as impl_tests


@pytest.mark.parametrize("mask", [
    None, masks.Causal(), masks.SlidingWindow(20), masks.Lambda(4, 17),
    masks.Causal() & masks.Chunked(24), masks.PrefixLM(30)], ids=repr)
@pytest.mark.parametrize("t,s,bq,bk", [(96, 96, 16, 32), (37, 101, 8, 16),
                                       (101, 37, 16, 8)])
def test_host_pairs_equal_device_pairs(mask, t, s, bq, bk):
  full, partial = xla_chunked._static_pairs(mask, t, s, bq, bk)
  labels = masks.classify_blocks(mask, q_len=t, kv_len=s, block_q=bq,
                                 block_k=bk)
  (f_idx, f_n), (p_idx, p_n) = xla_chunked._device_schedule(labels)
  assert tuple(np.asarray(f_idx)[:int(f_n)]) == full
  assert tuple(np.asarray(p_idx)[:int(p_n)]) == partial
  # Every visited pair once; the empty ones never.
  lab = np.asarray(labels)[0].reshape(-1)
  assert sorted(full + partial) == list(np.flatnonzero(lab != masks.EMPTY))
  if mask is not None and not isinstance(mask, masks.PrefixLM):
    assert len(full) + len(partial) < lab.size   # some pairs skipped


def test_default_block_sizes_are_used_and_clamped():
  impl = xla_chunked.XlaChunked()
  assert impl.block_sizes(64, jnp.float32) == (
      xla_chunked.default_block_sizes(64, jnp.float32))
  assert xla_chunked.XlaChunked(block_k=64).block_sizes(64, jnp.float32)[1] == 64


@pytest.mark.parametrize("jump,v_scale", [(150.0, 1.0), (-150.0, 1.0),
                                          (25.0, 1e31)],
                         ids=["up", "down", "up_huge_values"])
@pytest.mark.parametrize("schedule", ["auto", "device"])
def test_forward_follows_logit_jumps_between_blocks(jump, v_scale, schedule):
  """The online softmax across blocks whose logits differ by more than
  float32's exponent range: the keys of the last two key blocks move every
  logit by ``jump`` (exp(150) overflows float32, exp(-150) underflows), so
  the running max and the rescaling of the earlier blocks' sums must follow
  (a forward that kept a stale max, or skipped a block's max pass on a
  bound that misses the jump, gives inf or NaN here); with values near 1e31
  a stale max 25 below the block's would overflow the float32 sums. All
  match the float64 oracle, forward and gradients."""
  h = 8
  case = impl_tests.make_case(3, b=1, t=48, n=2, k=1, h=h,
                              mask=masks.Causal())
  u = np.ones(h) / np.sqrt(h)
  case.q = case.q + 5.0 * u                 # every query: q . u ~ 5
  shift = jump * np.sqrt(h) / 5.0           # scale * shift * (q . u) ~ jump
  case.k[:, 32:] += shift * u
  case.v = case.v * v_scale
  impl_tests.check(case, xla_chunked.XlaChunked(block_q=8, block_k=8,
                                                schedule=schedule))
