"""Memory-linear attention in plain XLA: online softmax over blocks.

Queries and keys are cut into blocks of ``block_q`` x ``block_k``. Every
(query block, key block) pair is labelled EMPTY, PARTIAL or FULL by
``masks.classify_blocks`` (mask geometry plus per-block segment min/max). The
forward and the backward are each two loops over a list of visited pairs:
one over the FULL pairs (no mask arithmetic at all) and one over the PARTIAL
ones (masked); EMPTY pairs are never visited, and no ``lax.cond`` /
``lax.switch`` is left in the loop body. With default positions and no
segment ids the labels depend only on shapes, so the lists are computed once
on the host and the loops have static trip counts; otherwise (explicit
positions, packed segments, whose labels change every batch) the lists are
built on the device with ``jnp.nonzero`` and the loops run ``count`` times.

Layout (one transpose of each input per call, none per block): queries are
``[nq, B, K, G * bq, H]`` with the scale folded in, so a block's grouped
query heads share one ``[G * bq, H] x [H, bk]`` matmul per key/value head;
keys and values ``[nk, B, K, bk, H]``; the running max / sum / accumulator
(forward) and dq / dk / dv (backward) are full-length float32 buffers that
the loops update in place, block by block. Nothing of size T x S is ever
built. The backward recomputes each visited block's probabilities once from
the saved log-sum-exp, key-major (five products per block: K.Q^T, V.dO^T,
P^T.dO, dS^T.Q and K^T.dS^T for dQ^T, none contracting the leading axis of
both operands, which XLA's CPU dot runs about 3x slower).

A dense ``bias`` is read block by block (its own memory is the caller's), and
gets a gradient like every other float input. A ``position_bias``
(``relative_bias.RelativeBias``: T5 buckets, Kerple, FIRE, ALiBi) is
computed on each visited block from the block's positions, in the forward
and again in the backward, where the VJP of that per-block computation
gives its parameters' cotangent, summed over blocks in a carry of the
parameters' size: T5, Kerple and FIRE run memory-linear. ``sink_logits`` join the
softmax denominator at the final normalisation (the log-sum-exp the backward
reads includes them) and get their gradient from the rows' delta.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from extrapolax.common import geometry
from extrapolax.common import nonfinite
from extrapolax.common.checks import check_choice, check_optional_int
from . import core
from . import masks as masks_lib
from . import xla as xla_lib

Array = jax.Array
SCHEDULES = ("auto", "device")


def default_block_sizes(head_dim: int, dtype) -> tuple[int, int]:
  """(block_q, block_k) used when XlaChunked leaves them None.

  Measured on the shared 2-core CPU (benchmarks/attention_limit_cpu.py
  --blocks, BENCHMARKS.md): at head_dim 64 and 128 in float32, 256 x 256,
  256 x 512 and 512 x 256 came within the load's noise of 512 x 512, which
  stays the default for every head_dim and dtype (bfloat16 not swept).
  """
  del head_dim, dtype
  return 512, 512


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable settings closed over by the custom VJP: the call's shared
  statics, the block sizes and, when the labels depend only on shapes, the
  visited pairs (flat indices ``i * nk + j``) as host tuples."""
  call: geometry.AttentionStatics
  block_q: int
  block_k: int
  full_pairs: Optional[tuple] = None
  partial_pairs: Optional[tuple] = None

  @property
  def q_len(self):
    return self.call.q_len

  @property
  def kv_len(self):
    return self.call.kv_len

  @property
  def num_blocks(self):
    return -(-self.q_len // self.block_q), -(-self.kv_len // self.block_k)


def _pad_axis(x, axis, size, value=0):
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _blocks(x, axis, block):
  """Splits ``axis`` into [num_blocks, block] and moves num_blocks first."""
  shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _q_blocks(x, kv_heads, block, padded):
  """[B, T, N, H] -> [nq, B, K, G * bq, H] (one transpose)."""
  b, _, n, h = x.shape
  x = _pad_axis(x, 1, padded).reshape(b, padded // block, block, kv_heads,
                                      n // kv_heads, h)
  x = x.transpose(1, 0, 3, 4, 2, 5)
  return x.reshape(x.shape[:3] + (-1, h))


def _q_unblocks(x, groups, length):
  """Inverse of _q_blocks: [nq, B, K, G * bq, H] -> [B, T, N, H]."""
  nq, b, kh, _, h = x.shape
  x = x.reshape(nq, b, kh, groups, -1, h).transpose(1, 0, 4, 2, 3, 5)
  return x.reshape(b, -1, kh * groups, h)[:, :length]


def _k_blocks(x, block, padded):
  """[B, S, K, H] -> [nk, B, K, bk, H]."""
  b, _, kh, h = x.shape
  x = _pad_axis(x, 1, padded).reshape(b, padded // block, block, kh, h)
  return x.transpose(1, 0, 3, 2, 4)


def _k_unblocks(x, length):
  nk, b, kh, bk, h = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, nk * bk, kh, h)[:, :length]


def _row_blocks(x, block, padded, value=0.0):
  """Row statistics [B, K, G, T] -> [nq, B, K, G, bq]."""
  return _blocks(_pad_axis(x, 3, padded, value), 3, block)


def _get(x, i):
  return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _put(x, i, y):
  return jax.lax.dynamic_update_index_in_dim(x, y, i, 0)


def _add(x, i, y):
  return _put(x, i, _get(x, i) + y)


class _Layout:
  """Inputs padded and laid out in blocks, plus per-block helpers."""

  def __init__(self, st: _Static, q, k, v, q_pos, k_pos, q_seg, kv_seg,
               slopes, bias, far_q, far_k, pos_bias=None, *,
               forward: bool = False):
    bq, bk = st.block_q, st.block_k
    nq, nk = st.num_blocks
    tp, sp = nq * bq, nk * bk
    self.st, self.nq, self.nk, self.tp, self.sp = st, nq, nk, tp, sp
    self.b, _, n, _ = q.shape
    self.kv_heads = k.shape[2]
    self.groups = n // self.kv_heads
    scale = st.call.scale
    fold = lambda x: None if x is None else (
        x.astype(jnp.float32) * scale).astype(x.dtype)
    # A value row holding a non-finite entry is zeroed (0 * nan would reach
    # every row the mask hides it from). In the forward its key (and far
    # key) row becomes NaN, so its logits are NaN exactly where the mask
    # lets them through: rows that see it come out NaN (lse nan), the others
    # as without it. The backward keeps the keys (see _backward).
    v, bad = nonfinite.clean_values(v)
    if forward:
      k, far_k = nonfinite.poison_keys(bad, k, far_k)
    self.q = _q_blocks(fold(q), self.kv_heads, bq, tp)
    self.far_q = None if far_q is None else _q_blocks(
        fold(far_q), self.kv_heads, bq, tp)
    self.k = _k_blocks(k, bk, sp)
    self.v = _k_blocks(v, bk, sp)
    self.far_k = None if far_k is None else _k_blocks(far_k, bk, sp)
    self.q_pos = _blocks(_pad_axis(q_pos, 1, tp), 1, bq)
    self.k_pos = _blocks(_pad_axis(k_pos, 1, sp), 1, bk)
    self.q_seg = None if q_seg is None else _blocks(_pad_axis(q_seg, 1, tp),
                                                    1, bq)
    self.kv_seg = None if kv_seg is None else _blocks(
        _pad_axis(kv_seg, 1, sp), 1, bk)
    self.k_valid = _blocks(jnp.arange(sp) < st.kv_len, 0, bk)
    self.slopes = xla_lib.slopes_by_group(slopes, self.kv_heads)
    self.bias = None
    if bias is not None:
      bias = xla_lib.heads_bias(bias, self.kv_heads)  # [Bb,K|1,G|1,T|1,S|1]
      self.bias_full_t = bias.shape[3] > 1
      self.bias_full_s = bias.shape[4] > 1
      if self.bias_full_t:
        bias = _pad_axis(bias, 3, tp)
      if self.bias_full_s:
        bias = _pad_axis(bias, 4, sp)
      self.bias = bias
    self.pos_bias = pos_bias
    call = st.call
    # Only the elementwise terms need finish_logits (and its VJP).
    # (The position bias is added apart, see pos_tile.)
    self.plain = (far_q is None and call.soft_cap is None and slopes is None
                  and bias is None)
    if st.full_pairs is None:
      labels = masks_lib.classify_blocks(
          call.mask, q_len=st.q_len, kv_len=st.kv_len, block_q=bq,
          block_k=bk, q_positions=q_pos, k_positions=k_pos,
          q_segment_ids=q_seg, kv_segment_ids=kv_seg)
      self.schedule = _device_schedule(labels)
    else:
      self.schedule = [(jnp.asarray(np.asarray(p, np.int32)), len(p))
                       for p in (st.full_pairs, st.partial_pairs)]

  def visit(self, body, carry):
    """Runs ``body(i, j, use_mask, carry)`` over the FULL, then the PARTIAL
    pairs."""
    for (pairs, count), use_mask in zip(self.schedule, (False, True)):
      if isinstance(count, int) and count == 0:
        continue

      def step(c, carry, pairs=pairs, use_mask=use_mask):
        flat = pairs[c]
        return body(flat // self.nk, flat % self.nk, use_mask, carry)

      carry = jax.lax.fori_loop(0, count, step, carry)
    return carry

  def _bias_start(self, i, j):
    st = self.st
    return (0, 0, 0, i * st.block_q if self.bias_full_t else 0,
            j * st.block_k if self.bias_full_s else 0)

  def bias_block(self, i, j):
    """The bias entries of block (i, j) ([Bb, K|1, G|1, bq|1, bk|1])."""
    if self.bias is None:
      return None
    st = self.st
    size = self.bias.shape[:3] + (
        st.block_q if self.bias_full_t else 1,
        st.block_k if self.bias_full_s else 1)
    return jax.lax.dynamic_slice(self.bias, self._bias_start(i, j), size)

  def bias_add(self, acc, grad, i, j):
    """Adds a block's bias gradient into the full accumulator."""
    start = self._bias_start(i, j)
    block = jax.lax.dynamic_slice(acc, start, grad.shape)
    return jax.lax.dynamic_update_slice(acc, block + grad, start)

  def products(self, qi, kj):
    """[B, K, G * bq, H] . [B, K, bk, H] -> float32 [B, K, G, bq, bk]."""
    s = jnp.einsum("bkqh,bksh->bkqs", qi, kj,
                   preferred_element_type=jnp.float32)
    return s.reshape(self.b, self.kv_heads, self.groups, -1, s.shape[-1])

  def finish(self, i, j):
    """The elementwise logit terms of block (i, j) as a function
    ``(s, s_far, slopes, bias_block) -> logits``."""
    call = self.st.call
    return lambda s, s_far, slopes, bias_blk: xla_lib.finish_logits(
        s, s_far, self.q_pos[i], self.k_pos[j], soft_cap=call.soft_cap,
        slopes=slopes, bias=bias_blk, far_window=call.far_window)

  def pos_tile(self, i, j, pos_bias, key_major=False):
    """The position bias of block (i, j), float32 [Bp, K, G, bq, bk] (or
    key-major [Bp, K, bk, G * bq], the backward's layout: the transpose
    fuses into the bias's own elementwise computation). It is added after
    the other elementwise terms (all of them additive after the soft
    cap), so it needs no VJP of theirs."""
    tile = pos_bias.tile(self.q_pos[i], self.k_pos[j])     # [Bp, N, bq, bk]
    tile = tile.reshape((tile.shape[0], self.kv_heads, self.groups)
                        + tile.shape[2:])
    return self.to_kq(tile) if key_major else tile

  def visible(self, i, j):
    return xla_lib.block_visible(
        self.st.call.mask, self.q_pos[i], self.k_pos[j],
        None if self.q_seg is None else self.q_seg[i],
        None if self.kv_seg is None else self.kv_seg[j], self.k_valid[j])

  def visible_t(self, i, j):
    """Block (i, j)'s visibility in key-major order: bool [B?, K|1, bk, G|1,
    bq], to select logits laid out [B, K, bk, G, bq] (per-head masks give
    the K and G axes)."""
    return self.visible(i, j).transpose(0, 1, 4, 2, 3)

  def to_qk(self, x):
    """Key-major [B, K, bk, G * bq] -> [B, K, G, bq, bk]."""
    b, kh, bk, _ = x.shape
    return x.reshape(b, kh, bk, self.groups, -1).transpose(0, 1, 3, 4, 2)

  def to_kq(self, x):
    """[B, K, G, bq, bk] -> key-major [B, K, bk, G * bq]."""
    b, kh, g, bq, bk = x.shape
    return x.transpose(0, 1, 4, 2, 3).reshape(b, kh, bk, g * bq)

  def flat(self, x):
    """[B, K, G, bq, bk] -> [B, K, G * bq, bk] (a free reshape)."""
    return x.reshape(x.shape[:2] + (-1, x.shape[-1]))


def _device_schedule(labels):
  """[(flat indices of FULL pairs, count), (PARTIAL ones, count)] from
  per-batch labels [B, nq, nk]; a pair is visited if any row needs it and
  unmasked only if every row sees all of it."""
  some = jnp.any(labels != masks_lib.EMPTY, axis=0).reshape(-1)
  full = jnp.all(labels == masks_lib.FULL, axis=0).reshape(-1)
  out = []
  for sel in (full, some & ~full):
    idx = jnp.nonzero(sel, size=sel.shape[0], fill_value=0)[0]
    out.append((idx.astype(jnp.int32), jnp.sum(sel, dtype=jnp.int32)))
  return out


def _static_pairs(mask, t, s, bq, bk):
  """(FULL, PARTIAL) flat pair indices computed on the host (default
  positions, no segment ids: the labels depend only on the shapes)."""
  with jax.ensure_compile_time_eval():
    labels = np.asarray(masks_lib.classify_blocks(
        mask, q_len=t, kv_len=s, block_q=bq, block_k=bk))[0].reshape(-1)
  return (tuple(int(x) for x in np.flatnonzero(labels == masks_lib.FULL)),
          tuple(int(x) for x in np.flatnonzero(labels == masks_lib.PARTIAL)))


def _logits(lay, i, j, use_mask):
  """Logits of block (i, j) (masked if ``use_mask``), and the VJP of their
  elementwise terms (None when there are none)."""
  s = lay.products(_get(lay.q, i), _get(lay.k, j))
  vjp = None
  if not lay.plain:
    s_far = None if lay.far_q is None else lay.products(
        _get(lay.far_q, i), _get(lay.far_k, j))
    s, vjp = jax.vjp(lay.finish(i, j), s, s_far, lay.slopes,
                     lay.bias_block(i, j))
  if lay.pos_bias is not None:
    s = s + lay.pos_tile(i, j, lay.pos_bias)
  if use_mask:
    s = jnp.where(lay.visible(i, j), s, -jnp.inf)
  return s, vjp


def _forward(st: _Static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias,
             far_q, far_k, sinks, pos_bias):
  lay = _Layout(st, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias,
                far_q, far_k, pos_bias, forward=True)
  b, kh, g, bq, hv = lay.b, lay.kv_heads, lay.groups, st.block_q, v.shape[-1]

  def body(i, j, use_mask, carry):
    m, l, acc = carry
    s, _ = _logits(lay, i, j, use_mask)
    m_i = _get(m, i)
    m_new = jnp.maximum(m_i, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    alpha = jnp.exp(m_i - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    l_i = alpha * _get(l, i) + p.sum(-1)
    pv = jnp.einsum("bkqs,bksh->bkqh", lay.flat(p).astype(v.dtype),
                    _get(lay.v, j), preferred_element_type=jnp.float32)
    acc_i = alpha.reshape(b, kh, g * bq, 1) * _get(acc, i) + pv
    return _put(m, i, m_new), _put(l, i, l_i), _put(acc, i, acc_i)

  init = (jnp.full((lay.nq, b, kh, g, bq), -jnp.inf, jnp.float32),
          jnp.zeros((lay.nq, b, kh, g, bq), jnp.float32),
          jnp.zeros((lay.nq, b, kh, g * bq, hv), jnp.float32))
  m, l, acc = lay.visit(body, init)
  if sinks is not None:
    # The sink joins the denominator at the final normalisation: one more
    # term exp(sink - m) with no value (rows that saw no key get l = 1 at
    # m = sink, output 0 and lse = sink).
    sink = sinks.reshape(1, 1, kh, g, 1)
    m_all = jnp.maximum(m, sink)
    rescale = jnp.exp(m - m_all)
    l = l * rescale + jnp.exp(sink - m_all)
    acc = acc * rescale.reshape(rescale.shape[:3] + (-1, 1))
    m = m_all
  l_safe = jnp.where(l > 0, l, 1.0)
  out = acc / l_safe.reshape(l.shape[:3] + (-1, 1))
  lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)
  # A row that saw a flagged value row has l = nan: keep the NaN.
  lse = jnp.where(jnp.isnan(l), jnp.nan, lse)
  out = _q_unblocks(out, g, st.q_len).astype(q.dtype)
  # lse [nq, B, K, G, bq] -> [B, N, T]
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh * g, -1)[..., :st.q_len]
  return out, lse


def _backward(st: _Static, res, cotangents):
  (q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias, far_q, far_k, sinks,
   pos_bias, out, lse) = res
  d_out, d_lse = cotangents
  lay = _Layout(st, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias,
                far_q, far_k, pos_bias)
  b, kh, g, bq = lay.b, lay.kv_heads, lay.groups, st.block_q
  do = _q_blocks(d_out, kh, bq, lay.tp)          # [nq, B, K, G * bq, Hv]
  o = _q_blocks(out, kh, bq, lay.tp)
  # delta = rowsum(dO * O) - dLSE: the softmax backward's per-row term.
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)
  delta = delta.reshape(lay.nq, b, kh, g, bq)
  lse_b = _row_blocks(lse.reshape(b, kh, g, -1), bq, lay.tp, -jnp.inf)
  if d_lse is not None:
    delta = delta - _row_blocks(d_lse.reshape(b, kh, g, -1), bq, lay.tp)
  lse_safe = jnp.where(jnp.isfinite(lse_b), lse_b, 0.0)
  # Rows whose forward is NaN (they saw a non-finite value row) pass no
  # gradient: lse +inf makes their probabilities exactly 0 (the backward's
  # logits are finite: it keeps the keys) and delta is selected to 0, so
  # their NaN reaches no other row's inputs.
  row_bad = jnp.isnan(lse_b)
  lse_safe = jnp.where(row_bad, jnp.inf, lse_safe)
  delta = jnp.where(row_bad, 0.0, delta)
  mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  # Key-major blocks: S^T = K.Q^T is [bk, G * bq], so that dV = P^T.dO and
  # dK = dS^T.Q are plain (non-transposed) products, and dQ^T = K^T.dS^T
  # with K^T laid out once: XLA on the CPU runs a product that contracts
  # the leading axis of both operands about 3x slower.
  row = lambda x, i: _get(x, i).reshape(b, kh, 1, g * bq)
  k_t = jnp.swapaxes(lay.k, -1, -2)                # [nk, B, K, H, bk]
  fk_t = None if far_k is None else jnp.swapaxes(lay.far_k, -1, -2)

  def body(i, j, use_mask, carry):
    dq_t, dk, dv, dfq_t, dfk, dsl, dbias, dpb = carry
    q_i, k_j, v_j, do_i = (_get(lay.q, i), _get(lay.k, j), _get(lay.v, j),
                           _get(do, i))
    s_t = mm("bksh,bkqh->bksq", k_j, q_i)
    vjp = None
    if not lay.plain:
      s_far = None if lay.far_q is None else lay.products(
          _get(lay.far_q, i), _get(lay.far_k, j))
      s, vjp = jax.vjp(lay.finish(i, j), lay.to_qk(s_t), s_far, lay.slopes,
                       lay.bias_block(i, j))
      s_t = lay.to_kq(s)
    pb_vjp = None
    if lay.pos_bias is not None:
      tile_t, pb_vjp = jax.vjp(
          lambda pb: lay.pos_tile(i, j, pb, key_major=True), lay.pos_bias)
      s_t = s_t + tile_t
    if use_mask:
      shape = s_t.shape
      s_t = jnp.where(lay.visible_t(i, j), s_t.reshape(shape[:3] + (g, bq)),
                      -jnp.inf).reshape(shape)
    p_t = jnp.exp(s_t - row(lse_safe, i))
    dv = _add(dv, j, mm("bksq,bkqh->bksh", p_t.astype(do.dtype), do_i))
    ds_t = p_t * (mm("bksh,bkqh->bksq", v_j, do_i) - row(delta, i))
    ds_far = gsl = gbias = gpb = None
    if pb_vjp is not None:
      # Summed over the batch where the positions are shared (Bp = 1).
      (gpb,) = pb_vjp(ds_t if q_pos.shape[0] == b else ds_t.sum(
          0, keepdims=True))
    if vjp is not None:
      ds, ds_far, gsl, gbias = vjp(lay.to_qk(ds_t))
      ds_t = lay.to_kq(ds)
    ds_t = ds_t.astype(q_i.dtype)
    dk = _add(dk, j, mm("bksq,bkqh->bksh", ds_t, q_i))
    dq_t = _add(dq_t, i, mm("bkhs,bksq->bkhq", _get(k_t, j), ds_t))
    if ds_far is not None:
      fq_i = _get(lay.far_q, i)
      ds_far = lay.to_kq(ds_far).astype(fq_i.dtype)
      dfq_t = _add(dfq_t, i, mm("bkhs,bksq->bkhq", _get(fk_t, j), ds_far))
      dfk = _add(dfk, j, mm("bksq,bkqh->bksh", ds_far, fq_i))
    if gsl is not None:
      dsl = dsl + gsl
    if gbias is not None:
      dbias = lay.bias_add(dbias, gbias.astype(jnp.float32), i, j)
    if gpb is not None:
      dpb = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), dpb, gpb)
    return dq_t, dk, dv, dfq_t, dfk, dsl, dbias, dpb

  zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)
  zeros_t = lambda x: None if x is None else jnp.zeros(
      x.shape[:3] + x.shape[:2:-1], jnp.float32)
  init = (zeros_t(lay.q), zeros(lay.k), zeros(lay.v), zeros_t(lay.far_q),
          zeros(lay.far_k), zeros(lay.slopes), zeros(lay.bias),
          jax.tree.map(zeros, pos_bias))
  dq_t, dk, dv, dfq_t, dfk, dsl, dbias, dpb = lay.visit(body, init)
  scale = st.call.scale

  def unq(x_t, like):   # dS . k is d(scale * q): times scale for dq.
    x = jnp.swapaxes(x_t, -1, -2) * scale
    return _q_unblocks(x, g, st.q_len).astype(like.dtype)

  def unk(x, like):
    return _k_unblocks(x, st.kv_len).astype(like.dtype)

  d_bias = None
  if bias is not None:
    # [Bb, K|1, G|1, Tp|1, Sp|1] -> bias's own shape [Bb, Nb, T|1, S|1]
    dbias = dbias[..., :bias.shape[2], :bias.shape[3]]
    d_bias = dbias.reshape(bias.shape).astype(bias.dtype)
  d_slopes = None if slopes is None else dsl.reshape(slopes.shape)
  d_pos_bias = None if pos_bias is None else jax.tree.map(
      lambda g, x: g.astype(x.dtype), dpb, pos_bias)
  return (unq(dq_t, q), unk(dk, k), unk(dv, v), None, None, None, None,
          d_slopes, d_bias, None if far_q is None else unq(dfq_t, far_q),
          None if far_k is None else unk(dfk, far_k),
          _sink_grad(sinks, out, lse, d_out, d_lse), d_pos_bias)


def _sink_grad(sinks, out, lse, d_out, d_lse):
  """d sink_n = -sum over rows of p_sink * delta (the sink's logit gets
  p * (dO . v - delta) with a zero value); None without sinks."""
  if sinks is None:
    return None
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  delta = jnp.swapaxes(delta, 1, 2)                    # [B, N, T]
  if d_lse is not None:
    delta = delta - d_lse
  p_sink = jnp.exp(sinks[None, :, None] - lse)
  # Rows whose forward is NaN pass no gradient (as in _backward).
  p_sink = jnp.where(jnp.isnan(lse), 0.0, p_sink)
  delta = jnp.where(jnp.isnan(lse), 0.0, delta)
  return -jnp.sum(p_sink * delta, axis=(0, 2)).astype(sinks.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(st, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias, far_q,
             far_k, sinks, pos_bias):
  return _forward(st, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias,
                  far_q, far_k, sinks, pos_bias)


def _chunked_fwd(st, *args):
  out, lse = _forward(st, *args)
  return (out, lse), args + (out, lse)


_chunked.defvjp(_chunked_fwd, _backward)


@dataclasses.dataclass(frozen=True)
class XlaChunked(core.Implementation):
  """Online-softmax attention over ``block_q`` x ``block_k`` blocks.

  Attributes:
    block_q, block_k: block sizes; None: ``default_block_sizes(head_dim,
      dtype)``.
    schedule: "auto" (visited pairs listed on the host when the labels
      depend only on shapes: default positions, no segment ids; else on the
      device) or "device" (always on the device; for tests).
  """
  block_q: Optional[int] = None
  block_k: Optional[int] = None
  schedule: str = "auto"
  name = "xla_chunked"
  takes_sink_logits = True
  takes_position_bias = True

  def __post_init__(self):
    check_optional_int("block_q", self.block_q, 1)
    check_optional_int("block_k", self.block_k, 1)
    check_choice("schedule", self.schedule, SCHEDULES)

  def block_sizes(self, head_dim: int, dtype) -> tuple[int, int]:
    """The (block_q, block_k) this instance uses for that head_dim/dtype."""
    dq, dk = default_block_sizes(head_dim, dtype)
    return (dq if self.block_q is None else self.block_q,
            dk if self.block_k is None else self.block_k)

  def __call__(self, request: core.AttentionRequest):
    b, t, s, n, k, h, hv = request.shape_info
    bq, bk = self.block_sizes(h, request.query.dtype)
    bq, bk = min(bq, max(t, 1)), min(bk, max(s, 1))
    full = partial = None
    if (self.schedule == "auto" and not request.explicit_positions
        and request.q_segment_ids is None):
      full, partial = _static_pairs(request.mask, t, s, bq, bk)
    st = _Static(call=geometry.AttentionStatics.of(request), block_q=bq,
                 block_k=bk, full_pairs=full, partial_pairs=partial)
    return _chunked(st, request.query, request.key, request.value,
                    request.query_positions, request.key_positions,
                    request.q_segment_ids, request.kv_segment_ids,
                    request.alibi_slopes, request.bias, request.far_query,
                    request.far_key, request.sink_logits,
                    request.position_bias)


core.register_implementation("xla_chunked", XlaChunked)
