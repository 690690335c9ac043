"""What the shared implementation suite runs against, and how closely.

Later issues add their implementations to IMPLEMENTATIONS (a kernel in
interpret mode on the CPU, with small blocks so that several blocks, ragged
edges and skipped blocks all occur at test sizes).

Tolerances, with the reason:
* float32: the implementations accumulate in float32 while the oracle runs in
  float64; over a few dozen keys the error is a few ulp of the largest value,
  so 2e-5 relative to the output's scale (gradients, which sum products over
  both T and S, get 2x that).
* bfloat16: inputs and the probabilities fed to the P.V matmul are rounded to
  8 bits of mantissa (relative 4e-3), so 2e-2 (gradients 4e-2).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax.attention import PallasGpu, PallasTpu, XlaChunked
from extrapolax.pallas_kernels import flash_gpu, flash_tpu

# The Pallas kernels run in interpret mode on the CPU, with small blocks that
# differ per pass (forward / dq / dk-dv), so that several blocks, ragged
# edges, FULL / PARTIAL / EMPTY blocks and padding all occur at test sizes.
PALLAS_GPU = PallasGpu(block_sizes=flash_gpu.BlockSizes(
    block_q=8, block_k=16, block_q_dq=16, block_k_dq=8, block_q_dkv=8,
    block_k_dkv=16))
PALLAS_TPU = PallasTpu(block_sizes=flash_tpu.BlockSizes(
    block_q=16, block_k=8, block_q_dq=8, block_k_dq=16, block_q_dkv=16,
    block_k_dkv=8))

IMPLEMENTATIONS = [
    pytest.param("xla", id="xla"),
    # Small blocks: several blocks per axis, ragged last blocks, skipping.
    pytest.param(XlaChunked(block_q=8, block_k=16), id="xla_chunked-8x16"),
    pytest.param(XlaChunked(block_q=16, block_k=8), id="xla_chunked-16x8"),
    # Pairs listed on the device even where the host could list them (the
    # default "auto" lists them on the host for default positions and no
    # segment ids); and the default block sizes (one block at test sizes).
    pytest.param(XlaChunked(block_q=8, block_k=16, schedule="device"),
                 id="xla_chunked-8x16-device"),
    pytest.param(XlaChunked(), id="xla_chunked-default"),
    pytest.param(PALLAS_GPU, id="pallas_gpu-interpret"),
    pytest.param(PALLAS_TPU, id="pallas_tpu-interpret"),
]

# The fused kernels compute biases from ALiBi slopes and masks in the kernel
# and refuse a dense T x S bias (NotImplementedError; auto falls through).
NO_DENSE_BIAS = (PallasGpu, PallasTpu)


def skip_unserved(implementation, bias):
  """Skips a case the implementation refuses by design."""
  if bias and isinstance(implementation, NO_DENSE_BIAS):
    pytest.skip(f"{implementation.name} takes no dense bias (by design)")

TOLERANCE = {
    jnp.float32: dict(fwd=2e-5, grad=4e-5),
    jnp.bfloat16: dict(fwd=2e-2, grad=4e-2),
}


def assert_close(actual, expected, tol, what):
  """max |actual - expected| <= tol * max(1, max |expected|), ignoring -inf."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  both_inf = np.isneginf(actual) & np.isneginf(expected)
  assert not np.isnan(actual).any(), f"{what}: NaN"
  diff = np.abs(np.where(both_inf, 0.0, actual) - np.where(both_inf, 0.0,
                                                          expected))
  ref = np.max(np.abs(np.where(np.isfinite(expected), expected, 0.0)),
               initial=0.0)
  bound = tol * max(1.0, ref)
  worst = np.nanmax(diff, initial=0.0)
  assert worst <= bound, (
      f"{what}: max abs error {worst:.3g} > {bound:.3g} at "
      f"{np.unravel_index(np.nanargmax(diff), diff.shape)}")
