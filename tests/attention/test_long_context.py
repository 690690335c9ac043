"""xla_chunked runs a 65,536-token causal sequence on the CPU in linear memory.

XLA's own buffer assignment (``memory_analysis``) shows that neither the
forward nor the backward ever holds a T x S array (one float32 T x S buffer
would be 17 GB); the forward is then run and a few rows are checked against
the dense oracle evaluated on just those rows (explicit positions).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax import attention
from extrapolax.attention import masks

T = 65536
H = 16


@pytest.mark.slow
def test_65k_causal_is_memory_linear_and_correct():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, T, 1, H)), jnp.float32)
             for _ in range(3))
  impl = attention.XlaChunked(block_q=1024, block_k=1024)

  def fwd(q, k, v):
    return attention.dot_product_attention(
        q, k, v, mask=masks.Causal(), implementation=impl,
        return_residuals=True)

  def loss(q, k, v):
    return fwd(q, k, v)[0].sum()

  dense_bytes = T * T * 4
  compiled = jax.jit(fwd).lower(q, k, v).compile()
  grad_compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      q, k, v).compile()
  for c in (compiled, grad_compiled):
    analysis = c.memory_analysis()
    if analysis is None:
      pytest.skip("this jaxlib gives no memory analysis")
    # Linear: a few dozen bytes per token, against 17 GB for one T x S array.
    assert analysis.temp_size_in_bytes < dense_bytes / 256, analysis

  out, lse = compiled(q, k, v)
  rows = np.array([0, 1, 1023, 1024, 40000, T - 1])
  want, want_lse = attention.dot_product_attention(
      q[:, rows], k, v, mask=masks.Causal(), implementation="xla",
      return_residuals=True, query_positions=rows,
      key_positions=np.arange(T))
  np.testing.assert_allclose(np.asarray(out[:, rows]), np.asarray(want),
                             rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse[:, :, rows]),
                             np.asarray(want_lse), rtol=1e-5, atol=1e-4)
  # Row 0 sees only key 0.
  np.testing.assert_allclose(np.asarray(out[0, 0, 0]), np.asarray(v[0, 0, 0]),
                             rtol=1e-6)
