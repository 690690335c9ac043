"""A non-finite value row reaches only the output rows that see it.

Issue 15 item 5: ``p @ v`` multiplies a masked probability (exactly 0) by its
value row, and ``0 * nan = nan``, so one NaN in a future key's value or in
another packed document's used to turn every output row into NaN. Every
implementation that runs on the CPU is held to the property: for random
masks and packed segment layouts, NaN planted in random value rows changes
no output row that does not see one of them (bit for bit against the run
without the NaN), rows that do see one are NaN, and the gradients of a loss
on the clean rows stay finite and unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax import attention
from extrapolax.attention import masks
from extrapolax.attention.pallas import PallasGpu, PallasTpu
from extrapolax.pallas_kernels import flash_gpu, flash_tpu

B, T, N, K, H = 2, 16, 2, 1, 8

MASKS = [None, masks.Causal(), masks.SlidingWindow(3), masks.Lambda(2, 4),
         masks.Chunked(5), masks.PrefixLM(4),
         masks.Causal() & masks.SlidingWindow(6)]


def _ring_mesh():
  return jax.make_mesh((8,), ("context",),
                       axis_types=(jax.sharding.AxisType.Auto,))


IMPLEMENTATIONS = {
    "xla": lambda: "xla",
    "xla_chunked": lambda: attention.XlaChunked(block_q=4, block_k=4),
    "pallas_tpu": lambda: PallasTpu(block_sizes=flash_tpu.BlockSizes(
        8, 8, 8, 8, 8, 8), interpret=True),
    "pallas_gpu": lambda: PallasGpu(block_sizes=flash_gpu.BlockSizes(
        block_q=8, block_k=16, block_q_dq=16, block_k_dq=8, block_q_dkv=8,
        block_k_dkv=16), interpret=True),
    "context_parallel": lambda: attention.ContextParallel(
        "xla", mesh=_ring_mesh()),
    "context_parallel_all_gather": lambda: attention.ContextParallel(
        attention.XlaChunked(block_q=4, block_k=4), strategy="all_gather",
        mesh=_ring_mesh()),
}
# Interpret mode is slow: fewer random layouts for the kernels.
SEEDS = {"xla": 8, "xla_chunked": 8, "pallas_tpu": 2, "pallas_gpu": 2,
         "context_parallel": 3, "context_parallel_all_gather": 3}


def _layout(seed):
  """(mask, segment ids or None, bool[B, T, S] visibility, bad rows)."""
  rng = np.random.default_rng(seed)
  mask = MASKS[seed % len(MASKS)]
  seg = None
  if seed % 2:
    seg = np.sort(rng.integers(0, 3, size=(B, T)), axis=1).astype(np.int32)
  vis = np.ones((B, T, T), bool)
  if mask is not None:
    vis &= np.asarray(mask.materialize(T, T))[None]
  if seg is not None:
    vis &= seg[:, :, None] == seg[:, None, :]
  bad = rng.random((B, T)) < 0.25
  return mask, seg, vis, bad


def _run(impl, mask, seg, q, k, v, d_out):
  def f(q, k, v):
    return attention.dot_product_attention(
        q, k, v, mask=mask, segment_ids=seg, implementation=impl)

  def loss(q, k, v):
    return jnp.sum(f(q, k, v) * d_out)

  return jax.jit(lambda *a: (f(*a), jax.grad(loss, (0, 1, 2))(*a)))(q, k, v)


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_nan_in_hidden_value_rows_stays_hidden(name):
  impl = IMPLEMENTATIONS[name]()
  for seed in range(SEEDS[name]):
    mask, seg, vis, bad = _layout(seed)
    rng = np.random.default_rng(100 + seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32)
               for n in (N, K, K))
    v_nan = jnp.where(jnp.asarray(bad)[:, :, None, None], jnp.nan, v)
    sees_bad = np.any(vis & bad[:, None, :], axis=-1)          # [B, T]
    # Loss on the clean rows only: their gradients must stay finite.
    d_out = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    d_out = jnp.where(jnp.asarray(sees_bad)[:, :, None, None], 0.0, d_out)
    out, grads = _run(impl, mask, seg, q, k, v, d_out)
    out_nan, grads_nan = _run(impl, mask, seg, q, k, v_nan, d_out)
    out, out_nan = np.asarray(out), np.asarray(out_nan)
    clean = ~sees_bad
    where = f"{name} seed {seed} mask {mask} packed {seg is not None}"
    np.testing.assert_array_equal(out_nan[clean], out[clean], err_msg=where)
    assert np.all(np.isnan(out_nan[sees_bad])), where
    for arg, g, g_nan in zip("qkv", grads, grads_nan):
      g, g_nan = np.asarray(g), np.asarray(g_nan)
      assert np.all(np.isfinite(g_nan)), f"d{arg} not finite: {where}"
      if arg == "q":
        np.testing.assert_allclose(g_nan[clean], g[clean], rtol=1e-5,
                                   atol=1e-6, err_msg=where)
