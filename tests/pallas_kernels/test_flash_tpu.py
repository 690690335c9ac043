"""The Mosaic TPU flash-attention kernels, in Pallas interpret mode on the CPU.

Every case runs through ``dot_product_attention`` with ``PallasTpu`` (small
blocks, so several blocks per axis, ragged edges and skipped blocks occur)
and is held to ``implementation="xla"``: output, log-sum-exp and the
gradients of every float input. Skipping is checked twice: the kernels'
debug counters equal the classifier's non-empty block counts, and the block
indices the K/V index maps name load only non-empty blocks. A last test
lowers the kernels for a TPU (jax.export) to catch Mosaic lowering errors
that interpret mode cannot see.
"""

import zlib

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax import attention
from extrapolax.attention import masks
from extrapolax.attention.pallas import PallasTpu
from extrapolax.pallas_kernels import flash_tpu
from extrapolax.pallas_kernels import flash_tpu_layout
from extrapolax.pallas_kernels import tiles
from tests.attention.suite import TOLERANCE, assert_close

# Different sizes per pass: the three schedules differ.
SMALL = flash_tpu.BlockSizes(block_q=8, block_k=16, block_q_dq=16,
                             block_k_dq=8, block_q_dkv=8, block_k_dkv=8)


def packed(rng, b, length, mean):
  rows = []
  for _ in range(b):
    ids, doc = [], 0
    while len(ids) < length:
      ids += [doc] * max(1, int(rng.exponential(mean)))
      doc += 1
    rows.append(ids[:length])
  return np.asarray(rows, np.int32)


def make_inputs(seed, *, b=2, t=21, s=None, n=4, k=2, h=12, hv=None,
                mask=None, seg_mean=None, alibi=None, soft_cap=None,
                far_window=None, explicit_positions=False,
                dtype=jnp.float32):
  """Random (never zero) differentiable inputs and static keyword args."""
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  hv = h if hv is None else hv
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  diff = dict(q=normal(b, t, n, h), k=normal(b, s, k, h),
              v=normal(b, s, k, hv))
  kw = dict(mask=mask, logits_soft_cap=soft_cap)
  if seg_mean is not None:
    kv_seg = packed(rng, b, s, seg_mean)
    q_seg = kv_seg[:, s - t:] if t <= s else np.concatenate(
        [np.full((b, t - s), -1, np.int32), kv_seg], 1)
    kw["segment_ids"] = (jnp.asarray(q_seg), jnp.asarray(kv_seg))
  if alibi is not None:
    shape = (n,) if alibi == "heads" else (b, n)
    diff["slopes"] = jnp.asarray(
        2.0 ** (-8.0 * np.arange(1, n + 1) / n) * rng.uniform(
            0.5, 2.0, size=shape), jnp.float32)
  if far_window is not None:
    diff["far_q"] = normal(b, t, n, h)
    diff["far_k"] = normal(b, s, k, h)
    kw["far_window"] = far_window
  if explicit_positions:
    kw["key_positions"] = jnp.asarray(
        np.stack([rng.permutation(s) for _ in range(b)]), jnp.int32)
    kw["query_positions"] = jnp.asarray(
        np.arange(t) + rng.integers(0, s, size=(b, 1)), jnp.int32)
  cot = (jnp.asarray(rng.normal(size=(b, t, n, hv)), jnp.float32),
         jnp.asarray(rng.normal(size=(b, n, t)), jnp.float32))
  return diff, kw, cot


def evaluate(f, diff, cot):
  """(out, lse, grads) of f(diff) -> (out, lse), in one compilation."""

  def fwd_and_grads(d):
    (out, lse), vjp = jax.vjp(f, d)
    # Rows that see nothing (lse -inf) get no lse cotangent.
    return out, lse, vjp((cot[0].astype(out.dtype),
                          jnp.where(jnp.isfinite(lse), cot[1], 0.0)))[0]

  return jax.jit(fwd_and_grads)(diff)


def run(implementation, diff, kw, cot):
  return evaluate(lambda d: attention.dot_product_attention(
      d["q"], d["k"], d["v"], alibi_slopes=d.get("slopes"),
      far_query=d.get("far_q"), far_key=d.get("far_k"),
      implementation=implementation, return_residuals=True, **kw), diff, cot)


def check(diff, kw, cot, blocks=SMALL, interpret=True):
  dtype = diff["q"].dtype
  tol = TOLERANCE[jnp.bfloat16 if dtype == jnp.bfloat16 else jnp.float32]
  impl = PallasTpu(block_sizes=blocks, interpret=interpret)
  out, lse, grads = run(impl, diff, kw, cot)
  # The oracle runs in float32 on the same (possibly bf16-rounded) inputs.
  up = {nm: x.astype(jnp.float32) for nm, x in diff.items()}
  want_out, want_lse, want_grads = run("xla", up, kw, cot)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert_close(out, want_out, tol["fwd"], "out")
  assert_close(lse, want_lse, tol["fwd"], "lse")
  for nm, g in grads.items():
    assert g.dtype == diff[nm].dtype, nm
    assert np.isfinite(np.asarray(g, np.float32)).all(), f"d{nm} not finite"
    assert_close(g, want_grads[nm], tol["grad"], f"d{nm}")
  return out, lse


CASES = [
    ("causal_gqa_h12", dict(mask=masks.Causal())),
    ("lambda_far_hv20", dict(t=41, hv=20, mask=masks.Lambda(3, 7),
                             far_window=7)),
    ("chunked_or_prefix_mha", dict(
        t=35, k=4, mask=(masks.Causal() & masks.Chunked(12)) |
        masks.PrefixLM(10))),
    ("packed_causal_alibi", dict(t=47, n=6, k=3, mask=masks.Causal(),
                                 seg_mean=9, alibi="batch")),
    ("soft_cap_alibi_mqa", dict(t=26, n=4, k=1, alibi="heads", soft_cap=2.0)),
    ("explicit_positions", dict(t=9, s=30, mask=masks.SlidingWindow(12),
                                explicit_positions=True)),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_matches_xla(name, kwargs):
  check(*make_inputs(zlib.crc32(name.encode()), **kwargs))


def test_empty_rows_give_zeros_and_no_nan():
  # T > S, causal: the first T - S queries sit before every key.
  diff, kw, cot = make_inputs(1, t=29, s=13, mask=masks.Causal())
  out, lse = check(diff, kw, cot)
  assert np.all(np.asarray(out)[:, :16] == 0)
  assert np.all(np.isneginf(np.asarray(lse)[:, :, :16]))
  assert np.all(np.isfinite(np.asarray(lse)[:, :, 16:]))


def test_bfloat16_packed_far_alibi():
  check(*make_inputs(2, t=33, mask=masks.Lambda(2, 9), seg_mean=11,
                     alibi="heads", far_window=9, dtype=jnp.bfloat16))


def test_tpu_interpret_params():
  """Pallas's TPU interpreter: NaN-filled scratch, out-of-bounds checks."""
  check(*make_inputs(3, t=19, n=2, k=1, mask=masks.SlidingWindow(6),
                     seg_mean=7, alibi="heads"),
        blocks=flash_tpu.BlockSizes(8, 8, 8, 8, 8, 8),
        interpret=pltpu.InterpretParams())


def _static(blocks, kw, t, s, k, scale=0.5, **extra):
  return flash_tpu.make_static(
      mask=kw.get("mask"), scale=scale, soft_cap=None, far_window=None,
      has_segments="segment_ids" in kw, has_slopes=False, has_far=False,
      q_len=t, kv_len=s, num_kv_heads=k, block_sizes=blocks, interpret=True,
      **extra)


def test_default_positions_shrinks_the_grid():
  """With default positions the grid has as many slots as the busiest row
  of the static layout; results (forward and gradients) are unchanged."""
  diff, kw, cot = make_inputs(6, t=45, s=52, mask=masks.SlidingWindow(9),
                              seg_mean=10)
  b, t, n, _ = diff["q"].shape
  s, k = diff["k"].shape[1:3]
  static = _static(SMALL, kw, t, s, k, scale=1 / np.sqrt(12),
                   default_positions=True)
  q_pos, k_pos = masks.default_positions(t, s)
  # Padded to T = 48 and S = 64: the full grids have 4, 8 and 6 slots.
  for bq, bk, transpose, full in ((8, 16, False, 4), (16, 8, False, 8),
                                  (8, 8, True, 6)):
    slots = flash_tpu_layout.max_count(static.cfg.mask, t, s, bq, bk,
                                       transpose)
    assert slots < full, (bq, bk, transpose)

  out, lse, grads = evaluate(lambda d: flash_tpu.flash_attention(
      static, d["q"], d["k"], d["v"], q_pos[None], k_pos[None],
      *kw["segment_ids"]), diff, cot)
  want_out, want_lse, want_grads = run("xla", diff, kw, cot)
  tol = TOLERANCE[jnp.float32]
  assert_close(out, want_out, tol["fwd"], "out")
  assert_close(lse, want_lse, tol["fwd"], "lse")
  for nm, g in grads.items():
    assert_close(g, want_grads[nm], tol["grad"], f"d{nm}")


SKIP_CASES = [
    ("packed", dict(t=50, mask=masks.Causal(), seg_mean=8)),
    ("window", dict(t=45, s=52, mask=masks.SlidingWindow(9))),
]


@pytest.mark.parametrize("name,kwargs", SKIP_CASES,
                         ids=[c[0] for c in SKIP_CASES])
def test_visits_equal_nonempty_blocks(name, kwargs):
  diff, kw, _ = make_inputs(zlib.crc32(name.encode()), h=8, **kwargs)
  b, t, n, _ = diff["q"].shape
  s, k = diff["k"].shape[1:3]
  q_pos, k_pos = masks.default_positions(t, s)
  q_seg, kv_seg = kw.get("segment_ids", (None, None))
  # The window case also runs on the shrunk grid.
  static = _static(SMALL, kw, t, s, k, default_positions=name == "window")
  visits = jax.jit(lambda d: flash_tpu.visit_counts(
      static, d["q"], d["k"], d["v"], q_pos[None], k_pos[None], q_seg,
      kv_seg))(diff)
  for kind, bq, bk, transpose in (("fwd", 8, 16, False),
                                  ("dq", 16, 8, False),
                                  ("dkv", 8, 8, True)):
    labels = masks.classify_blocks(
        kw["mask"], q_len=t, kv_len=s, block_q=bq, block_k=bk,
        q_positions=q_pos, k_positions=k_pos, q_segment_ids=q_seg,
        kv_segment_ids=kv_seg)
    if transpose:
      labels = jnp.swapaxes(labels, 1, 2)
    want = np.broadcast_to(np.asarray(tiles.visited_blocks(labels))[:, None],
                           (b, n, labels.shape[1]))
    got = np.asarray(visits[kind])[:, :, :labels.shape[1]]
    np.testing.assert_array_equal(got, want, err_msg=kind)
    assert (want < labels.shape[2]).any(), f"{kind}: nothing was skipped"


def test_index_maps_load_only_nonempty_blocks():
  """Walks the forward grid in order: a K/V block is fetched only when the
  index map names a new block, and every fetched block is non-empty."""
  diff, kw, _ = make_inputs(4, t=70, mask=masks.SlidingWindow(11),
                            seg_mean=12)
  b, t, n, _ = diff["q"].shape
  q_pos, k_pos = masks.default_positions(t, t)
  q_seg, kv_seg = kw["segment_ids"]
  static = _static(SMALL, kw, t, t, 2)
  x = flash_tpu_layout.Inputs(static, diff["q"], diff["k"], diff["v"],
                              q_pos[None], k_pos[None], q_seg, kv_seg, None,
                              None, None)
  sched, rows = x.schedule(static.cfg, 8, 16)
  sched = np.asarray(sched)
  labels = np.asarray(masks.classify_blocks(
      kw["mask"], q_len=t, kv_len=t, block_q=8, block_k=16,
      q_segment_ids=q_seg, kv_segment_ids=kv_seg))
  nq, nk = x.tp // 8, x.sp // 16
  for bi in range(b):
    prev, fetched = None, 0
    for i in range(nq):
      named = [rows.block(sched, bi, i, slot) for slot in range(nk)]
      count = rows.count(sched, bi, i)
      for blk in named:
        if blk != prev:     # a DMA; consecutive rows may share a block
          fetched += 1
          assert i < labels.shape[1] and labels[bi, i, blk] != masks.EMPTY
        prev = blk
      # The computed slots name exactly the row's non-empty blocks.
      want = np.flatnonzero(labels[bi, i]) if i < labels.shape[1] else []
      np.testing.assert_array_equal(named[:count], want)
    assert 0 < fetched <= (labels[bi] != masks.EMPTY).sum()


def test_block_sizes_validation():
  with pytest.raises(ValueError, match="power of two"):
    flash_tpu.BlockSizes(block_q=24)
  with pytest.raises(ValueError, match=">= 8"):
    flash_tpu.BlockSizes(block_k=4)
  with pytest.raises(ValueError, match="multiple of 128"):
    flash_tpu.BlockSizes(block_q=64).check_hardware()
  flash_tpu.BlockSizes().check_hardware()
  _static(SMALL, {}, 8, 8, 1)           # small blocks: interpret mode only
  with pytest.raises(ValueError, match="multiple of 128"):
    flash_tpu.make_static(
        mask=None, scale=1.0, soft_cap=None, far_window=None,
        has_segments=False, has_slopes=False, has_far=False, q_len=8,
        kv_len=8, num_kv_heads=1, block_sizes=SMALL, interpret=False)
  with pytest.raises(ValueError, match="flash_tpu.BlockSizes"):
    attention.dot_product_attention(
        *[jnp.ones((1, 8, 1, 8))] * 3,
        implementation=PallasTpu(block_sizes=(8, 8), interpret=True))


def test_lowers_for_tpu(monkeypatch):
  """Pallas -> Mosaic lowering (forward, dq, dk/dv) through jax.export.

  Only JAX's side of the lowering runs here (block shapes, supported
  primitives); Mosaic's layout passes and compilation need a TPU.
  """
  from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top
  # Some lowering rules ask for the chip generation: pretend a v5e.
  monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                      lambda: tpu_info.get_tpu_info_for_chip(
                          tpu_info.ChipVersion.TPU_V5E, 1))
  tpu_info.get_tpu_info.cache_clear()
  diff, kw, cot = make_inputs(5, t=300, n=4, k=2, h=64,
                              mask=masks.Causal() & masks.Chunked(64),
                              seg_mean=80, alibi="heads", soft_cap=30.0,
                              far_window=100, dtype=jnp.bfloat16)
  impl = PallasTpu(block_sizes=flash_tpu.BlockSizes(128, 256, 256, 128, 128,
                                                    256), interpret=False)

  def grads(d):
    def loss(d):
      out, lse = attention.dot_product_attention(
          d["q"], d["k"], d["v"], alibi_slopes=d["slopes"],
          far_query=d["far_q"], far_key=d["far_k"], implementation=impl,
          return_residuals=True, **kw)
      return jnp.sum(out.astype(jnp.float32) * cot[0]) + jnp.sum(lse)
    return jax.grad(loss)(d)

  try:
    exported = jax.export.export(jax.jit(grads), platforms=["tpu"])(diff)
  finally:
    tpu_info.get_tpu_info.cache_clear()
  assert exported.mlir_module().count("tpu_custom_call") == 3


@pytest.mark.tpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_on_tpu(dtype):
  """Compiled by Mosaic on a TPU, with the smallest hardware blocks."""
  blocks = flash_tpu.BlockSizes(128, 128, 128, 128, 128, 128)
  check(*make_inputs(7, t=300, s=400, n=4, k=2, h=64, hv=96,
                     mask=masks.Lambda(16, 100), seg_mean=120, alibi="heads",
                     soft_cap=20.0, far_window=100, dtype=dtype),
        blocks=blocks, interpret=False)
  check(*make_inputs(8, t=256, mask=masks.Causal() & masks.Chunked(64),
                     h=128, dtype=dtype), blocks=blocks, interpret=False)
