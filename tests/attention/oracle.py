"""A float64 numpy oracle for attention, written from DESIGN.md's conventions.

Independent of the library: it re-states every mask from its definition and
computes the forward pass, the log-sum-exp and the analytic gradients with
explicit loops over batch and heads. Every implementation (xla, xla_chunked,
the kernels) is held to it by the shared suite.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from extrapolax.attention import masks


def visible(mask, i, j, head=None, num_heads=None):
  """bool array: the mask's definition on position arrays i, j.

  ``head`` of ``num_heads``: the query head, for per-head masks (head h of N
  uses ``masks[h * M // N]``).
  """
  if mask is None:
    return np.ones(np.broadcast_shapes(np.shape(i), np.shape(j)), bool)
  if isinstance(mask, masks.Causal):
    return j <= i
  if isinstance(mask, masks.SlidingWindow):
    # left keys before the query, itself, right keys after.
    return (j >= i - mask.left) & (j <= i + mask.right)
  if isinstance(mask, masks.Lambda):
    return (j <= i) & ((j < mask.num_sinks) | (i - j < mask.window))
  if isinstance(mask, masks.Chunked):
    return ((i - mask.offset) // mask.size) == ((j - mask.offset) // mask.size)
  if isinstance(mask, masks.PrefixLM):
    return (j <= i) | (j < mask.prefix_len)
  if isinstance(mask, masks.Dilated):
    # LongNet: rows offset, offset + r, ... of each segment of w, causal
    # among themselves.
    w, r = mask.segment, mask.rate
    chosen = lambda p: (p - (p // w) * w) % r == mask.offset
    return (i // w == j // w) & chosen(i) & chosen(j) & (j <= i)
  if isinstance(mask, masks.Strided):
    bi, bj = i // mask.block, j // mask.block
    return (j <= i) & ((bi - bj < mask.local)
                       | ((bj + 1 + mask.offset) % mask.stride == 0))
  if isinstance(mask, masks.GlobalTokens):
    def is_global(p):
      if mask.positions:
        return np.isin(p, mask.positions)
      if mask.every is None:
        return (p >= 0) & (p < mask.count)
      return np.mod(p, mask.every) < mask.count
    return is_global(i) | is_global(j)
  if isinstance(mask, masks.PerHead):
    chosen = mask.masks[head * len(mask.masks) // num_heads]
    return visible(chosen, i, j)
  if isinstance(mask, masks.And):
    return (visible(mask.left, i, j, head, num_heads)
            & visible(mask.right, i, j, head, num_heads))
  if isinstance(mask, masks.Or):
    return (visible(mask.left, i, j, head, num_heads)
            | visible(mask.right, i, j, head, num_heads))
  raise TypeError(mask)


@dataclasses.dataclass
class Case:
  """Inputs of one attention call (numpy; float arrays in float64)."""
  q: np.ndarray
  k: np.ndarray
  v: np.ndarray
  mask: Optional[masks.Mask] = None
  q_seg: Optional[np.ndarray] = None
  kv_seg: Optional[np.ndarray] = None
  q_pos: Optional[np.ndarray] = None       # explicit positions [B, T]
  k_pos: Optional[np.ndarray] = None
  slopes: Optional[np.ndarray] = None      # [N] or [B, N]
  bias: Optional[np.ndarray] = None        # 4-D, broadcastable
  scale: Optional[float] = None
  soft_cap: Optional[float] = None
  far_q: Optional[np.ndarray] = None
  far_k: Optional[np.ndarray] = None
  far_window: Optional[int] = None

  def positions(self):
    b, t = self.q.shape[:2]
    s = self.k.shape[1]
    if self.q_pos is not None:
      return (np.broadcast_to(self.q_pos, (b, t)),
              np.broadcast_to(self.k_pos, (b, s)))
    return (np.broadcast_to(np.arange(t) + s - t, (b, t)),
            np.broadcast_to(np.arange(s), (b, s)))


def _head_slopes(case, b):
  if case.slopes is None:
    return None
  sl = np.asarray(case.slopes, np.float64)
  return sl if sl.ndim == 1 else sl[b]


def forward_and_grad(case: Case, d_out=None, d_lse=None):
  """Returns out [B,T,N,Hv], lse [B,N,T] and, given cotangents, gradients.

  Gradients are those of sum(out * d_out) + sum(lse_finite * d_lse), where
  lse_finite is lse with -inf rows replaced by 0.
  """
  f64 = lambda x: None if x is None else np.asarray(x, np.float64)
  q, k, v = f64(case.q), f64(case.k), f64(case.v)
  fq, fk = f64(case.far_q), f64(case.far_k)
  b_, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  scale = 1.0 / np.sqrt(h) if case.scale is None else case.scale
  q_pos, k_pos = case.positions()
  bias = None if case.bias is None else np.broadcast_to(
      f64(case.bias), (b_, n, t, s))
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  lse = np.zeros((b_, n, t))
  grads = None
  if d_out is not None:
    grads = dict(q=np.zeros_like(q), k=np.zeros_like(k), v=np.zeros_like(v),
                 far_q=None if fq is None else np.zeros_like(fq),
                 far_k=None if fk is None else np.zeros_like(fk),
                 slopes=np.zeros((b_, n)), bias=np.zeros((b_, n, t, s)))
  for b in range(b_):
    i = q_pos[b][:, None].astype(np.int64)
    j = k_pos[b][None, :].astype(np.int64)
    same_doc = True
    if case.q_seg is not None:
      same_doc = case.q_seg[b][:, None] == case.kv_seg[b][None, :]
    dist = (i - j).astype(np.float64)
    far = None if fq is None else (dist >= case.far_window)
    slopes = _head_slopes(case, b)
    for hn in range(n):
      c = hn // g
      vis = visible(case.mask, i, j, hn, n) & same_doc
      raw = scale * q[b, :, hn] @ k[b, :, c].T
      pre = raw
      if far is not None:
        pre = np.where(far, scale * fq[b, :, hn] @ fk[b, :, c].T, raw)
      capped = pre if case.soft_cap is None else (
          case.soft_cap * np.tanh(pre / case.soft_cap))
      logits = capped.copy()
      if bias is not None:
        logits = logits + bias[b, hn]
      if slopes is not None:
        logits = logits - slopes[hn] * np.abs(dist)
      logits = np.where(vis, logits, -np.inf)
      m = logits.max(-1, keepdims=True)
      m = np.where(np.isfinite(m), m, 0.0)
      p = np.exp(logits - m)
      l = p.sum(-1, keepdims=True)
      p = p / np.where(l > 0, l, 1.0)
      o = p @ v[b, :, c]
      out[b, :, hn] = o
      row_lse = np.where(l[:, 0] > 0, m[:, 0] + np.log(np.where(l > 0, l, 1.0))[:, 0],
                         -np.inf)
      lse[b, hn] = row_lse
      if grads is None:
        continue
      do = np.asarray(d_out, np.float64)[b, :, hn]
      dl = 0.0 if d_lse is None else np.where(
          np.isfinite(row_lse), np.asarray(d_lse, np.float64)[b, hn], 0.0)
      grads["v"][b, :, c] += p.T @ do
      dp = do @ v[b, :, c].T
      ds = p * (dp - (do * o).sum(-1, keepdims=True)) + p * np.reshape(
          dl, (-1, 1))
      grads["bias"][b, hn] += ds
      if slopes is not None:
        grads["slopes"][b, hn] += (ds * -np.abs(dist)).sum()
      d_pre = ds if case.soft_cap is None else ds * (
          1 - np.tanh(pre / case.soft_cap) ** 2)
      d_raw = d_pre if far is None else np.where(far, 0.0, d_pre)
      grads["q"][b, :, hn] += scale * d_raw @ k[b, :, c]
      grads["k"][b, :, c] += scale * d_raw.T @ q[b, :, hn]
      if far is not None:
        d_far = np.where(far, d_pre, 0.0)
        grads["far_q"][b, :, hn] += scale * d_far @ fk[b, :, c]
        grads["far_k"][b, :, c] += scale * d_far.T @ fq[b, :, hn]
  if grads is not None:
    if case.bias is not None:
      grads["bias"] = _reduce_to(grads["bias"], np.shape(case.bias))
    else:
      grads["bias"] = None
    if case.slopes is not None:
      grads["slopes"] = _reduce_to(grads["slopes"], np.shape(case.slopes))
    else:
      grads["slopes"] = None
  return out, lse, grads


def _reduce_to(x, shape):
  """Sums ``x`` down to the broadcast ``shape`` it came from."""
  lead = x.ndim - len(shape)
  x = x.sum(axis=tuple(range(lead)))
  axes = tuple(a for a, d in enumerate(shape) if d == 1 and x.shape[a] != 1)
  return x.sum(axis=axes, keepdims=True).reshape(shape)
