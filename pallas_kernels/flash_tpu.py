"""Flash attention for TPUs in Pallas (Mosaic), forward and backward.

The maths and public surface of ``flash_gpu`` (``tiles`` holds the shared
pieces), structured the way Mosaic TPU kernels are:

* Grid (batch, query head, query block, slot) for the forward and dq passes,
  (batch, key block, query head, slot) for dk/dv. The innermost "arbitrary"
  slot axis walks one row of the block schedule (``tiles.schedule`` of the
  on-device ``masks.classify_blocks`` labels), passed by scalar prefetch: the
  K/V (dk/dv: Q/dO) index maps name the current slot's block. Slots past the
  row's count repeat its last block (no new DMA) and ``pl.when(slot <
  count)`` skips their compute: an EMPTY block is neither loaded nor
  computed. FULL blocks take a branch without mask arithmetic.
* Softmax statistics and accumulators live in VMEM scratch (init at slot 0,
  finalised at the last slot); dk/dv also accumulate over the G query heads
  of a key/value head (consecutive grid steps).
* Heads are fused into lanes ([B, T, N * H], H zero-padded to a multiple of
  128): lane-dense blocks, no transposes. Positions and segment ids are
  128-lane columns [B, T, 128] on a tile's sublane side and 8-sublane rows
  [B, 8, S] on its lane side, so tiles are built by tiling and broadcasts;
  log-sum-exp and delta travel as rows [B, N, 8, T]; the dk/dv pass works on
  transposed tiles [keys, queries].

Blocks are powers of two, multiples of 128 on a TPU (>= 8 in interpret mode).
``interpret=True`` runs Pallas interpret mode on any backend (the tests); a
``pltpu.InterpretParams`` runs Pallas's TPU interpreter (NaN-filled scratch,
out-of-bounds checks; slower).

This module holds the block sizes, the three kernel bodies, the custom VJP
and the public functions; ``flash_tpu_layout`` the lane-fused inputs, the
scalar-prefetched schedule and each pass's grid, BlockSpecs, tile logits
and ``pallas_call``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from extrapolax.common.checks import check_int
from . import bias_params
from . import flash_tpu_layout as layout
from . import tiles
from .flash_tpu_layout import LANES, SUBLANES

Array = jax.Array

_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dq", "block_k_dq",
                 "block_q_dkv", "block_k_dkv")
_check_int = check_int


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the TPU kernels (powers of two; multiples of 128 on a TPU).

  block_q, block_k: forward. block_q_dq, block_k_dq: the dq pass.
  block_q_dkv, block_k_dkv: the dk/dv pass. A block longer than its sequence
  (rounded up to a power of two) is shrunk to it. vmem_limit_bytes: Mosaic's
  scoped VMEM limit (None: the compiler's default). The defaults are the
  usual splash-attention settings, not tuned here (no TPU).
  """
  block_q: int = 512
  block_k: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 512
  block_q_dkv: int = 512
  block_k_dkv: int = 512
  vmem_limit_bytes: Optional[int] = None

  def __post_init__(self):
    for f in _BLOCK_FIELDS:
      value = _check_int(f, getattr(self, f), SUBLANES)
      if value & (value - 1):
        raise ValueError(f"{f} must be a power of two, got {value}")
    if self.vmem_limit_bytes is not None:
      _check_int("vmem_limit_bytes", self.vmem_limit_bytes, 1)

  def check_hardware(self):
    """Every block runs along lanes in some pass: multiples of 128."""
    for f in _BLOCK_FIELDS:
      if getattr(self, f) % LANES:
        raise ValueError(f"{f}={getattr(self, f)} must be a multiple of "
                         f"{LANES} on a TPU (smaller tiles only run in "
                         "interpret mode)")

  @property
  def q_multiple(self):
    return max(self.block_q, self.block_q_dq, self.block_q_dkv)

  @property
  def k_multiple(self):
    return max(self.block_k, self.block_k_dq, self.block_k_dkv)

  def shrunk(self, q_len, kv_len, floor):
    qcap = max(floor, tiles.next_power_of_2(q_len))
    kcap = max(floor, tiles.next_power_of_2(kv_len))
    return dataclasses.replace(self, **{
        f: min(getattr(self, f), qcap if f.startswith("block_q") else kcap)
        for f in _BLOCK_FIELDS})


@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: tiles.TileConfig
  blocks: BlockSizes
  num_kv_heads: int
  interpret: Any
  debug: bool
  default_positions: bool
  bias: Optional[bias_params.BiasLayout] = None


def _zero(refs, names):
  for nm in names:
    refs[nm][...] = jnp.zeros_like(refs[nm])


def _flush(refs, names):
  """Accumulators (float32 scratch) to their outputs."""
  for nm in names:
    refs[nm][...] = refs[nm + "_acc"][...].astype(refs[nm].dtype)


def _forward(static: _Static, x: layout.Inputs):
  p = layout.Pass(x, x.blocks.block_q, x.blocks.block_k, transpose=False)
  precision = tiles.precision_for(x.q.dtype)

  def body(refs, ids, step):
    b, h, _, t = ids
    m_ref, l_ref, acc_ref = refs["m"], refs["l"], refs["acc"]

    @pl.when(t == 0)
    def _():
      m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
      _zero(refs, ("l", "acc"))

    @step
    def _(masked):
      s, _, _ = p.tile(refs, masked, x.slope(refs, b, h))
      m_prev = m_ref[...]                      # (bq, 128), lane-replicated
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      m_safe = tiles.safe_max(m_next)
      probs = jnp.exp(s - layout.spread_lanes(m_safe, p.bk))
      alpha = jnp.exp(m_prev - m_safe)
      l_ref[...] = alpha * l_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
      m_ref[...] = m_next
      v = refs["v"][...]
      acc_ref[...] = (layout.spread_lanes(alpha, x.hvp) * acc_ref[...] +
                      tiles.dot_nn(probs.astype(v.dtype), v, precision))

    @pl.when(t == p.slots - 1)
    def _():
      l, m = l_ref[...], m_ref[...]
      seen = l > 0                             # rows that saw nothing: 0
      l_safe = jnp.where(seen, l, 1.0)
      out = acc_ref[...] / layout.spread_lanes(l_safe, x.hvp)
      refs["o"][...] = out.astype(refs["o"].dtype)
      lse = jnp.where(seen, tiles.safe_max(m) + jnp.log(l_safe), -jnp.inf)
      # A row that saw a flagged value row (tiles.forward_keys): l is nan.
      lse = jnp.where(jnp.isnan(l), jnp.nan, lse)
      refs["lse"][...] = layout.as_rows(lse)

  outputs = [
      ("o", jax.ShapeDtypeStruct((x.b, x.tp, x.n * x.hvp), x.q.dtype),
       p.heads("q", x.hvp)),
      ("lse", jax.ShapeDtypeStruct((x.b, x.n, SUBLANES, x.tp), jnp.float32),
       p.stat())]
  scratch = [("m", pltpu.VMEM((p.bq, LANES), jnp.float32)),
             ("l", pltpu.VMEM((p.bq, LANES), jnp.float32)),
             ("acc", pltpu.VMEM((p.bq, x.hvp), jnp.float32))]
  res = p.call(static, "fwd", body, p.inputs(), outputs, scratch)
  return res["o"], res["lse"][:, :, 0, :], res.get("visits")


def _backward_dq(static: _Static, x: layout.Inputs, do, lse_rows, delta_rows):
  cfg = static.cfg
  p = layout.Pass(x, x.blocks.block_q_dq, x.blocks.block_k_dq, transpose=False)
  precision = tiles.precision_for(x.q.dtype)
  acc_names = ["dq"] + (["dfar_q"] if cfg.has_far else [])
  no_slope_grad = dataclasses.replace(cfg, has_slopes=False)

  has_bias = x.bias is not None

  def body(refs, ids, step):
    b, h, _, t = ids
    pl.when(t == 0)(lambda: _zero(refs, [nm + "_acc" for nm in acc_names] + (
        ["dslope_acc"] if cfg.has_slopes else []) + (
            ["dbias_acc"] if has_bias else [])))

    @step
    def _(masked):
      s, aux, dist, bias_vjp = p.tile(refs, masked, x.slope(refs, b, h),
                                      bias_vjp=True)
      k, v, do_ = refs["k"][...], refs["v"][...], refs["do"][...]
      # Row statistics as (bq, 1) columns at once (the splash relayout), so
      # no elementwise maths runs on 1-D vectors.
      column = lambda nm: refs[nm][0][:, None]
      probs = jnp.exp(s - tiles.safe_max(column("lse")))
      ds = probs * (tiles.dot_nt(do_, v, precision) - column("delta"))
      if has_bias:   # d(logits) is the bias tile's cotangent (dq pass only)
        refs["dbias_acc"][...] += bias_vjp(ds)
      if cfg.has_slopes:     # tiles.tile_dlogits's d slope, kept 2-D
        refs["dslope_acc"][...] -= jnp.sum(
            ds * jnp.abs(dist).astype(jnp.float32), axis=1, keepdims=True)
      ds, ds_far, _ = tiles.tile_dlogits(no_slope_grad, ds, aux, dist)
      refs["dq_acc"][...] += tiles.dot_nn(ds.astype(k.dtype), k, precision)
      if cfg.has_far:
        far_k = refs["far_k"][...]
        refs["dfar_q_acc"][...] += tiles.dot_nn(ds_far.astype(far_k.dtype),
                                                far_k, precision)

    @pl.when(t == p.slots - 1)
    def _():
      _flush(refs, acc_names)
      if cfg.has_slopes:
        refs["dslope_rows"][...] = layout.as_rows(refs["dslope_acc"][...])
      if has_bias:
        refs["dbias_rows"][...] = refs["dbias_acc"][...]

  inputs = p.inputs(do, lse_rows, delta_rows)
  outputs = [(nm, jax.ShapeDtypeStruct(x.q.shape, x.q.dtype),
              p.heads("q", x.hp)) for nm in acc_names]
  scratch = [(f"{nm}_acc", pltpu.VMEM((p.bq, x.hp), jnp.float32))
             for nm in acc_names]
  if cfg.has_slopes:
    outputs.append(("dslope_rows", jax.ShapeDtypeStruct(
        lse_rows.shape, jnp.float32), p.stat()))
    scratch.append(("dslope_acc", pltpu.VMEM((p.bq, LANES), jnp.float32)))
  if has_bias:
    # Per program (batch, head, query block): summed outside.
    width = x.bias.width
    outputs.append(("dbias_rows", jax.ShapeDtypeStruct(
        (x.b, x.n, p.nq, 1, width), jnp.float32), pl.BlockSpec(
            (None, None, None, 1, width),
            lambda *a: (a[0], p.ids(*a)[1], p.ids(*a)[2], 0, 0))))
    scratch.append(("dbias_acc", pltpu.VMEM((1, width), jnp.float32)))
  return p.call(static, "dq", body, inputs, outputs, scratch)


def _backward_dkv(static: _Static, x: layout.Inputs, do, lse_rows, delta_rows):
  """Transposed tiles [bk, bq]; accumulates over the G heads of a kv head."""
  cfg, g = static.cfg, x.g
  p = layout.Pass(x, x.blocks.block_q_dkv, x.blocks.block_k_dkv, transpose=True)
  precision = tiles.precision_for(x.q.dtype)
  acc_names = ["dk", "dv"] + (["dfar_k"] if cfg.has_far else [])
  no_slope_grad = dataclasses.replace(cfg, has_slopes=False)  # dq pass's

  def body(refs, ids, step):
    b, h, _, t = ids
    member = lax.rem(h, g)        # position among the kv head's query heads

    pl.when((t == 0) & (member == 0))(
        lambda: _zero(refs, [nm + "_acc" for nm in acc_names]))

    @step
    def _(masked):
      s, aux, dist = p.tile(refs, masked, x.slope(refs, b, h))
      v, q, do_ = refs["v"][...], refs["q"][...], refs["do"][...]
      row = lambda nm: layout.spread_sublanes(refs[nm][...], p.bk)  # (bk, bq)
      probs = jnp.exp(s - tiles.safe_max(row("lse")))
      refs["dv_acc"][...] += tiles.dot_nn(probs.astype(do_.dtype), do_,
                                          precision)
      ds = probs * (tiles.dot_nt(v, do_, precision) - row("delta"))
      ds, ds_far, _ = tiles.tile_dlogits(no_slope_grad, ds, aux, dist)
      refs["dk_acc"][...] += tiles.dot_nn(ds.astype(q.dtype), q, precision)
      if cfg.has_far:
        far_q = refs["far_q"][...]
        refs["dfar_k_acc"][...] += tiles.dot_nn(ds_far.astype(far_q.dtype),
                                                far_q, precision)

    pl.when((t == p.slots - 1) & (member == g - 1))(
        lambda: _flush(refs, acc_names))

  inputs = p.inputs(do, lse_rows, delta_rows)
  like = {"dk": x.k, "dv": x.v, "dfar_k": x.far_k}
  outputs = [(nm, jax.ShapeDtypeStruct(like[nm].shape, like[nm].dtype),
              p.heads("k", like[nm].shape[2] // (x.n // g)))
             for nm in acc_names]
  scratch = [(f"{nm}_acc", pltpu.VMEM((p.bk, sp.block_shape[-1]),
                                      jnp.float32))
             for nm, _, sp in outputs]
  return p.call(static, "dkv", body, inputs, outputs, scratch)


def _unfuse(x, length, heads, width):
  """[B, L', H * D'] -> [B, length, H, width]."""
  return x.reshape(x.shape[0], x.shape[1], heads, -1)[:, :length, :, :width]


def _run_forward(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q,
                 far_k, bias_rows):
  k, v, far_k = tiles.forward_keys(k, v, far_k)
  x = layout.Inputs(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes,
                    far_q, far_k, bias_rows)
  out, lse, visits = _forward(static, x)
  t, n, hv = q.shape[1], q.shape[2], v.shape[-1]
  return _unfuse(out, t, n, hv), lse[:, :, :t], visits, (out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, *args):
  return _run_forward(static, *args)[:2]


def _flash_fwd(static, *args):
  out, lse, _, padded = _run_forward(static, *args)
  return (out, lse), (args, padded)


def _flash_bwd(static, res, cotangents):
  args, (out_p, lse_p) = res
  grads = _gradients(static, args, out_p, lse_p, cotangents)
  return (grads["dq"], grads["dk"], grads["dv"], None, None, None, None,
          grads.get("dslopes"), grads.get("dfar_q"), grads.get("dfar_k"),
          grads.get("dbias_rows"))


def _gradients(static, args, out_p, lse_p, cotangents):
  q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q, far_k, bias_rows = args
  d_out, d_lse = cotangents
  v = tiles.backward_values(v)
  x = layout.Inputs(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes,
                    far_q, far_k, bias_rows)
  t, n, h = q.shape[1:]
  s, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
  do = x.fuse(d_out.astype(q.dtype), x.tp, x.hvp)
  # delta = rowsum(dO * O) - dLSE, the softmax backward's per-row term.
  split = lambda a: a.reshape(x.b, x.tp, n, x.hvp).astype(jnp.float32)
  delta = jnp.einsum("btnh,btnh->bnt", split(do), split(out_p))
  if d_lse is not None:
    delta = delta - tiles.pad_to(d_lse.astype(jnp.float32), 2, x.tp)
  lse_p, delta = tiles.backward_stats(lse_p, delta)
  as_rows = lambda a: jnp.broadcast_to(a[:, :, None, :], (
      x.b, n, SUBLANES, x.tp))
  stats = (as_rows(lse_p), as_rows(delta))
  dq_res = _backward_dq(static, x, do, *stats)
  dkv_res = _backward_dkv(static, x, do, *stats)
  grads = {"dq": _unfuse(dq_res["dq"], t, n, h),
           "dk": _unfuse(dkv_res["dk"], s, kh, h),
           "dv": _unfuse(dkv_res["dv"], s, kh, hv)}
  if far_q is not None:
    grads["dfar_q"] = _unfuse(dq_res["dfar_q"], t, n, h)
    grads["dfar_k"] = _unfuse(dkv_res["dfar_k"], s, kh, h)
  if slopes is not None:
    grads["dslopes"] = tiles.slopes_grad(
        dq_res["dslope_rows"][:, :, 0, :t], slopes)
  if bias_rows is not None:
    grads["dbias_rows"] = dq_res["dbias_rows"].sum((0, 2, 3))
  if static.debug:
    grads["visits_dq"] = dq_res["visits"]
    grads["visits_dkv"] = dkv_res["visits"]
  return grads


_flash.defvjp(_flash_fwd, _flash_bwd)


def make_static(*, mask, scale, soft_cap, far_window, has_segments,
                has_slopes, has_far, q_len, kv_len, num_kv_heads,
                block_sizes: BlockSizes, interpret, debug: bool = False,
                default_positions: bool = False, position_bias=None):
  """Static configuration of one call; validates the block sizes.

  interpret: False (Mosaic on a TPU), True (Pallas interpret mode on any
  backend) or a ``pltpu.InterpretParams`` (Pallas's TPU interpreter).
  default_positions: the caller promises the positions are the default
  bottom-right alignment (no explicit positions); the grid then has only as
  many slots as the busiest row of the mask's static block layout (for a
  window mask far fewer than the key blocks), instead of one per key block.
  position_bias: a RelativeBias evaluated per tile (its structure and
  shapes are kept; ``flash_attention`` takes its values) or None.
  """
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a flash_tpu.BlockSizes, got "
                     f"{block_sizes!r}")
  if not interpret:
    block_sizes.check_hardware()
  cfg = tiles.TileConfig(mask=mask, scale=float(scale), soft_cap=soft_cap,
                         far_window=far_window, has_segments=has_segments,
                         has_slopes=has_slopes, has_far=has_far, q_len=q_len,
                         kv_len=kv_len)
  bias = bias_params.layout_for(position_bias, lanes=LANES, power_of_2=False)
  return _Static(cfg=cfg, blocks=block_sizes, num_kv_heads=num_kv_heads,
                 interpret=interpret, debug=debug,
                 default_positions=default_positions, bias=bias)


def flash_attention(static: _Static, q, k, v, q_pos, k_pos, q_seg=None,
                    kv_seg=None, slopes=None, far_q=None, far_k=None,
                    position_bias=None):
  """(out [B, T, N, Hv], lse float32 [B, N, T]); differentiable in q, k, v,
  slopes, far_q, far_k and position_bias's parameters (the bias given to
  make_static, evaluated per tile in the kernels)."""
  if not static.interpret and q.dtype == jnp.float16:
    raise NotImplementedError("the Mosaic TPU kernels take float32 or "
                              "bfloat16, not float16")
  return _flash(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q,
                far_k, bias_params.pack_for(static.bias, position_bias))


def visit_counts(static: _Static, q, k, v, q_pos, k_pos, q_seg=None,
                 kv_seg=None, slopes=None, far_q=None, far_k=None,
                 position_bias=None):
  """Blocks each program of the three kernels actually computed (debug).

  Returns dict fwd [B, N, nq], dq [B, N, nq_dq], dkv [B, N, nk_dkv]: counters
  incremented inside the kernels' compute branches, for tests that prove
  skipping.
  """
  static = dataclasses.replace(static, debug=True)
  args = (q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q, far_k,
          bias_params.pack_for(static.bias, position_bias))
  out, lse, visits, (out_p, lse_p) = _run_forward(static, *args)
  grads = _gradients(static, args, out_p, lse_p,
                     (jnp.ones_like(out), jnp.zeros_like(lse)))
  return {"fwd": visits, "dq": grads["visits_dq"],
          "dkv": grads["visits_dkv"]}
