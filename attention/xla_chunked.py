"""Memory-linear attention in plain XLA: online softmax over blocks.

Queries and keys are cut into blocks of ``block_q`` x ``block_k``. Every
(query block, key block) pair is labelled EMPTY, PARTIAL or FULL on the device
by ``masks.classify_blocks`` (mask geometry plus per-block segment min/max);
EMPTY pairs are skipped with ``lax.cond`` (no compute), FULL ones skip the mask
arithmetic. Nothing of size T x S is ever built: the forward keeps a running
max, sum and accumulator per query block (FlashAttention), and a custom VJP
recomputes each block's probabilities from the saved log-sum-exp in one
backward sweep (outer loop over key blocks, dq accumulated in place).

A dense ``bias`` is read block by block (its own memory is the caller's), and
gets a gradient like every other float input.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from extrapolax.common import geometry
from extrapolax.common import nonfinite
from extrapolax.common.checks import check_int
from . import core
from . import masks as masks_lib
from . import xla as xla_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable settings closed over by the custom VJP: the call's shared
  statics and this implementation's block sizes."""
  call: geometry.AttentionStatics
  block_q: int
  block_k: int

  @property
  def q_len(self):
    return self.call.q_len

  @property
  def kv_len(self):
    return self.call.kv_len


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


def _unblocks(x, axis):
  """Inverse of _blocks."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


class _Blocked:
  """Inputs padded and split into blocks, plus per-block slicing helpers."""

  def __init__(self, st: _Static, q, k, v, q_pos, k_pos, q_seg, kv_seg,
               slopes, bias, far_q, far_k, *, forward: bool = False):
    bq, bk = st.block_q, st.block_k
    nq, nk = -(-st.q_len // bq), -(-st.kv_len // bk)
    tp, sp = nq * bq, nk * bk
    self.st, self.nq, self.nk = st, nq, nk
    kv_heads = k.shape[2]
    self.q = _blocks(_pad_axis(xla_lib.split_heads(q, kv_heads), 1, tp), 1, bq)
    self.far_q = None if far_q is None else _blocks(
        _pad_axis(xla_lib.split_heads(far_q, kv_heads), 1, tp), 1, bq)
    # A value row holding a non-finite entry is zeroed (0 * nan would reach
    # every row the mask hides it from). In the forward its key (and far
    # key) row becomes NaN, so its logits are NaN exactly where the mask
    # lets them through: rows that see it come out NaN (lse nan), the others
    # as without it. The backward keeps the keys (see _backward).
    v, bad = nonfinite.clean_values(v)
    if forward:
      k, far_k = nonfinite.poison_keys(bad, k, far_k)
    self.k = _blocks(_pad_axis(k, 1, sp), 1, bk)
    self.v = _blocks(_pad_axis(v, 1, sp), 1, bk)
    self.far_k = None if far_k is None else _blocks(_pad_axis(far_k, 1, sp),
                                                    1, bk)
    self.q_pos = _blocks(_pad_axis(q_pos, 1, tp), 1, bq)
    self.k_pos = _blocks(_pad_axis(k_pos, 1, sp), 1, bk)
    self.q_seg = None if q_seg is None else _blocks(_pad_axis(q_seg, 1, tp),
                                                    1, bq)
    self.kv_seg = None if kv_seg is None else _blocks(
        _pad_axis(kv_seg, 1, sp), 1, bk)
    self.k_valid = _blocks(jnp.arange(sp) < st.kv_len, 0, bk)
    self.slopes = xla_lib.slopes_by_group(slopes, kv_heads)
    self.bias = None
    if bias is not None:
      bias = xla_lib.heads_bias(bias, kv_heads)  # [Bb, K|1, G|1, T|1, S|1]
      self.bias_full_t = bias.shape[3] > 1
      self.bias_full_s = bias.shape[4] > 1
      if self.bias_full_t:
        bias = _pad_axis(bias, 3, tp)
      if self.bias_full_s:
        bias = _pad_axis(bias, 4, sp)
      self.bias = bias
    labels = masks_lib.classify_blocks(
        st.call.mask, q_len=st.q_len, kv_len=st.kv_len, block_q=bq, block_k=bk,
        q_positions=q_pos, k_positions=k_pos, q_segment_ids=q_seg,
        kv_segment_ids=kv_seg)
    # One label per block pair for the whole batch.
    some = jnp.any(labels != masks_lib.EMPTY, axis=0)   # [nq, nk]
    full = jnp.all(labels == masks_lib.FULL, axis=0)
    # 0: skip, 1: masked, 2: unmasked (the lax.switch branch index).
    self.branch = jnp.where(some, jnp.where(full, 2, 1), 0)

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

  def logits(self, i, j, q, k, far_q, far_k, slopes, bias_blk):
    """Logits of block (i, j) as a function of the differentiable inputs."""
    st = self.st
    return xla_lib.block_logits(
        q, k, self.q_pos[i], self.k_pos[j], scale=st.call.scale,
        soft_cap=st.call.soft_cap, slopes=slopes, bias=bias_blk,
        far_q=far_q, far_k=far_k, far_window=st.call.far_window)

  def visible(self, i, j):
    return xla_lib.block_visible(
        self.st.call.mask, self.q_pos[i], self.k_pos[j],
        None if self.q_seg is None else self.q_seg[i],
        None if self.kv_seg is None else self.kv_seg[j], self.k_valid[j])

  def q_inputs(self, i):
    return self.q[i], None if self.far_q is None else self.far_q[i]

  def k_inputs(self, j):
    return self.k[j], None if self.far_k is None else self.far_k[j]


def _masked(logits, visible):
  return logits if visible is None else jnp.where(visible, logits, -jnp.inf)


def _forward(st: _Static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias,
             far_q, far_k):
  bl = _Blocked(st, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias,
                far_q, far_k, forward=True)
  b, _, kv_heads, g, _ = bl.q.shape[1:]
  hv = v.shape[-1]

  def q_block(i):
    qi, fqi = bl.q_inputs(i)

    def k_step(carry, j):
      def compute(carry, use_mask):
        m, l, acc = carry
        kj, fkj = bl.k_inputs(j)
        s = bl.logits(i, j, qi, kj, fqi, fkj, bl.slopes, bl.bias_block(i, j))
        if use_mask:
          s = _masked(s, bl.visible(i, j))
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        l = alpha * l + p.sum(-1)
        pv = jnp.moveaxis(xla_lib.pv(p.astype(v.dtype), bl.v[j]), 1, 3)
        return m_new, l, alpha[..., None] * acc + pv

      carry = jax.lax.switch(bl.branch[i, j], [
          lambda c: c,
          lambda c: compute(c, True),
          lambda c: compute(c, False)], carry)
      return carry, None

    init = (jnp.full((b, kv_heads, g, st.block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, kv_heads, g, st.block_q), jnp.float32),
            jnp.zeros((b, kv_heads, g, st.block_q, hv), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(k_step, init, jnp.arange(bl.nk))
    l_safe = jnp.where(l > 0, l, 1.0)
    out = acc / l_safe[..., None]
    lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)
    # A row that saw a flagged value row has l = nan: keep the NaN.
    return out, jnp.where(jnp.isnan(l), jnp.nan, lse)

  out, lse = jax.lax.map(q_block, jnp.arange(bl.nq))
  # out [nq, B, K, G, bq, Hv] -> [B, T, N, Hv]; lse [nq, B, K, G, bq] -> [B, N, T]
  out = jnp.moveaxis(out, 4, 2).reshape(bl.nq, b, st.block_q, kv_heads * g,
                                         hv)
  out = _unblocks(out, 1)[:, :st.q_len].astype(q.dtype)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv_heads * g, -1)[..., :st.q_len]
  return out, lse


def _backward(st: _Static, res, cotangents):
  (q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias, far_q, far_k,
   out, lse) = res
  d_out, d_lse = cotangents
  bl = _Blocked(st, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias,
                far_q, far_k)
  b, _, kv_heads, g, _ = bl.q.shape[1:]
  tp = bl.nq * st.block_q
  do = _blocks(_pad_axis(xla_lib.split_heads(d_out, kv_heads), 1, tp), 1,
               st.block_q)                                # [nq,B,bq,K,G,Hv]
  o = _blocks(_pad_axis(xla_lib.split_heads(out, kv_heads), 1, tp), 1,
              st.block_q)
  # delta = rowsum(dO * O) - dLSE: the softmax backward's per-row term.
  delta = jnp.einsum("nbtkgh,nbtkgh->nbkgt", do.astype(jnp.float32),
                     o.astype(jnp.float32))
  lse_b = _blocks(_pad_axis(lse.reshape(b, kv_heads, g, -1), 3, tp,
                            -jnp.inf), 3, st.block_q)    # [nq,B,K,G,bq]
  if d_lse is not None:
    d_lse_b = _blocks(_pad_axis(d_lse.reshape(b, kv_heads, g, -1), 3, tp),
                      3, st.block_q)
    delta = delta - d_lse_b
  lse_safe = jnp.where(jnp.isfinite(lse_b), lse_b, 0.0)
  # Rows whose forward is NaN (they saw a non-finite value row) pass no
  # gradient: lse +inf makes their probabilities exactly 0 (the backward's
  # logits are finite: it keeps the keys) and delta is selected to 0, so
  # their NaN reaches no other row's inputs.
  row_bad = jnp.isnan(lse_b)
  lse_safe = jnp.where(row_bad, jnp.inf, lse_safe)
  delta = jnp.where(row_bad, 0.0, delta)

  def block_grads(i, j, use_mask):
    """Gradients from block (i, j): (q side, k side) tuples."""
    qi, fqi = bl.q_inputs(i)
    kj, fkj = bl.k_inputs(j)
    fn = lambda *xs: bl.logits(i, j, *xs)
    s, vjp = jax.vjp(fn, qi, kj, fqi, fkj, bl.slopes, bl.bias_block(i, j))
    if use_mask:
      s = _masked(s, bl.visible(i, j))
    p = jnp.exp(s - lse_safe[i][..., None])
    b_, kh, g_, t_, s_ = p.shape
    dv = jnp.einsum("bnts,btnh->bsnh", p.astype(do.dtype).reshape(
        b_, kh * g_, t_, s_), do[i].reshape(b_, t_, kh * g_, -1),
                    preferred_element_type=jnp.float32)
    dv = dv.reshape(b_, s_, kh, g_, -1).sum(3)
    dp = xla_lib.qk(do[i], bl.v[j])
    gq, gk, gfq, gfk, gsl, gbias = vjp(p * (dp - delta[i][..., None]))
    return (gq, gfq, gsl, gbias), (gk, gfk, dv)

  def skip_or(branch_out, zeros_like_out, i, j):
    """lax.switch over the block's label; a skipped block gives zeros."""
    zero = lambda: jax.tree_util.tree_map(jnp.zeros_like, zeros_like_out)
    return jax.lax.switch(bl.branch[i, j], [
        lambda: zero(),
        lambda: branch_out(True),
        lambda: branch_out(False)])

  # Two sweeps with block-sized carries only (a full-size accumulator passed
  # through lax.switch would be copied at every step): dq, dfar_q, dslopes
  # and dbias with queries outside; dk, dfar_k and dv with keys outside.
  def q_sweep(i):
    qi, fqi = bl.q_inputs(i)

    def step(acc, j):
      shape = jax.eval_shape(lambda: block_grads(i, j, True)[0])
      g = skip_or(lambda m: block_grads(i, j, m)[0], shape, i, j)
      gq, gfq, gsl, gbias = g
      add = lambda a, b: None if a is None else a + b
      return (acc[0] + gq, add(acc[1], gfq), add(acc[2], gsl)), gbias

    zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)
    init = (zeros(qi), zeros(fqi), zeros(bl.slopes))
    return jax.lax.scan(step, init, jnp.arange(bl.nk))

  def k_sweep(j):
    kj, fkj = bl.k_inputs(j)

    def step(acc, i):
      shape = jax.eval_shape(lambda: block_grads(i, j, True)[1])
      g = skip_or(lambda m: block_grads(i, j, m)[1], shape, i, j)
      add = lambda a, b: None if a is None else a + b
      return tuple(add(a, b) for a, b in zip(acc, g)), None

    init = (jnp.zeros(kj.shape, jnp.float32),
            None if fkj is None else jnp.zeros(fkj.shape, jnp.float32),
            jnp.zeros(bl.v[j].shape, jnp.float32))
    return jax.lax.scan(step, init, jnp.arange(bl.nq))[0]

  (dq, dfq, dsl), dbias = jax.lax.map(q_sweep, jnp.arange(bl.nq))
  dk, dfk, dv = jax.lax.map(k_sweep, jnp.arange(bl.nk))

  def unq(x, like):
    # [nq, B, bq, K, G, H] -> [B, T, N, H]
    x = _unblocks(x, 1)[:, :st.q_len]
    return x.reshape(like.shape).astype(like.dtype)

  def unk(x, like):
    return _unblocks(x, 1)[:, :st.kv_len].astype(like.dtype)

  d_bias = None
  if bias is not None:
    # [nq, nk, Bb, K|1, G|1, bq|1, bk|1] -> [Bb, K|1, G|1, T|1, S|1]
    g = dbias.transpose(2, 3, 4, 0, 5, 1, 6)
    if not bl.bias_full_t:
      g = g.sum(3, keepdims=True)
    if not bl.bias_full_s:
      g = g.sum(5, keepdims=True)
    g = g.reshape(g.shape[:3] + (g.shape[3] * g.shape[4],
                                 g.shape[5] * g.shape[6]))
    g = g[..., :bias.shape[2], :bias.shape[3]]
    d_bias = g.reshape(bias.shape).astype(bias.dtype)
  d_slopes = None if slopes is None else dsl.sum(0).reshape(slopes.shape)
  return (unq(dq, q), unk(dk, k), unk(dv, v), None, None, None, None,
          d_slopes, d_bias, None if far_q is None else unq(dfq, far_q),
          None if far_k is None else unk(dfk, far_k))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(st, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias, far_q,
             far_k):
  return _forward(st, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, bias,
                  far_q, far_k)


def _chunked_fwd(st, *args):
  out, lse = _forward(st, *args)
  return (out, lse), args + (out, lse)


_chunked.defvjp(_chunked_fwd, _backward)


@dataclasses.dataclass(frozen=True)
class XlaChunked(core.Implementation):
  """Online-softmax attention over ``block_q`` x ``block_k`` blocks."""
  block_q: int = 512
  block_k: int = 512
  name = "xla_chunked"

  def __post_init__(self):
    check_int("block_q", self.block_q, 1)
    check_int("block_k", self.block_k, 1)

  def __call__(self, request: core.AttentionRequest):
    b, t, s, *_ = request.shape_info
    st = _Static(call=geometry.AttentionStatics.of(request),
                 block_q=min(self.block_q, max(t, 1)),
                 block_k=min(self.block_k, max(s, 1)))
    return _chunked(st, request.query, request.key, request.value,
                    request.query_positions, request.key_positions,
                    request.q_segment_ids, request.kv_segment_ids,
                    request.alibi_slopes, request.bias, request.far_query,
                    request.far_key)


core.register_implementation("xla_chunked", XlaChunked)
