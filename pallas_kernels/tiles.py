"""Backend-neutral pieces of the flash-attention kernels.

Everything here is plain ``jnp`` on 2-D tiles (one head, one query block x one
key block) or on whole label grids, so the Triton, Mosaic TPU and a future
Mosaic GPU kernel share one copy of the maths:

* ``schedule``: the block classifier's labels turned into, per query block
  (or per key block for the dk/dv pass), the list of non-empty blocks with
  their FULL / PARTIAL label, non-empty first. A kernel loops over exactly
  ``count`` entries, so an EMPTY block is never loaded or computed.
* ``tile_logits`` / ``tile_visible``: one tile's logits and visibility, in the
  library's order of operations (``scale * q.k`` -> soft cap -> relative
  position bias (``bias_params``) and ALiBi -> mask and segments), with
  LM-Infinite's far query for distant pairs.
* ``online_softmax_step`` / ``finish``: the forward's running max/sum update.
* ``tile_dlogits``: the backward from d(logits) to the inputs of the logits.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from extrapolax.common import geometry
from extrapolax.common import nonfinite

Array = jax.Array

# A schedule entry packs a block index and its label: index * 4 + label.
LABEL_BITS = 2
LABEL_MASK = (1 << LABEL_BITS) - 1


# What one attention call computes, closed over by every kernel body: the
# settings record all implementations share.
TileConfig = geometry.AttentionStatics


def next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def schedule(labels: Array, width: Optional[int] = None) -> Array:
  """Per row of ``labels`` [B, R, C]: count, then the non-empty entries.

  Returns int32 [B, R, W] (W = ``width`` or 1 + C): ``[..., 0]`` is the number
  of non-empty blocks in the row, ``[..., 1 + r]`` for r < count is
  ``block_index * 4 + label`` of the r-th non-empty block, in increasing block
  order. Entries past ``count`` repeat the last non-empty block (or block 0),
  so a back end that must name a block for every grid step names one it has
  already loaded.
  """
  b, r, c = labels.shape
  width = 1 + c if width is None else width
  if width < 1 + c:
    raise ValueError(f"schedule width={width} must be >= 1 + {c}")
  nonempty = labels != geometry.EMPTY
  count = nonempty.sum(-1).astype(jnp.int32)                    # [B, R]
  order = jnp.argsort(~nonempty, axis=-1, stable=True).astype(jnp.int32)
  label = jnp.take_along_axis(labels, order, axis=-1).astype(jnp.int32)
  entry = order * (1 << LABEL_BITS) + label
  last = jnp.take_along_axis(entry, jnp.maximum(count - 1, 0)[..., None], -1)
  keep = jnp.arange(c)[None, None, :] < count[..., None]
  entry = jnp.where(keep, entry, jnp.where(count[..., None] > 0, last, 0))
  pad = width - 1 - c
  if pad:
    entry = jnp.concatenate(
        [entry, jnp.broadcast_to(entry[..., -1:], (b, r, pad))], -1)
  return jnp.concatenate([count[..., None], entry], -1)


def split_schedule(labels: Array, width: Optional[int] = None) -> Array:
  """Like ``schedule`` but FULL blocks first: ``[count, num_full, entries]``.

  A kernel runs two loops without a branch inside: entries [0, num_full)
  unmasked, then [num_full, count) masked (a branch per block would keep the
  compiler from pipelining the loads). Each group is in increasing block
  order. Returns int32 [B, R, W] with W = ``width`` or 2 + C.
  """
  b, r, c = labels.shape
  width = 2 + c if width is None else width
  if width < 2 + c:
    raise ValueError(f"split_schedule width={width} must be >= 2 + {c}")
  full = labels == geometry.FULL
  empty = labels == geometry.EMPTY
  rank = jnp.where(full, 0, jnp.where(empty, 2, 1))
  count = (~empty).sum(-1).astype(jnp.int32)
  num_full = full.sum(-1).astype(jnp.int32)
  order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
  label = jnp.take_along_axis(labels, order, axis=-1).astype(jnp.int32)
  entry = order * (1 << LABEL_BITS) + label
  pad = width - 2 - c
  if pad:
    entry = jnp.concatenate(
        [entry, jnp.broadcast_to(entry[..., -1:], (b, r, pad))], -1)
  return jnp.concatenate([count[..., None], num_full[..., None], entry], -1)


def entry_block(entry):
  return entry >> LABEL_BITS


def entry_is_full(entry):
  return (entry & LABEL_MASK) == geometry.FULL


def _dot_nt(a, b, precision):
  """a [M, H] . b [N, H]^T -> float32 [M, N]."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             precision=precision,
                             preferred_element_type=jnp.float32)


def _dot_nn(a, b, precision):
  """a [M, K] . b [K, N] -> float32 [M, N]."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             precision=precision,
                             preferred_element_type=jnp.float32)


def _dot_tn(a, b, precision):
  """a [K, M]^T . b [K, N] -> float32 [M, N]."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             precision=precision,
                             preferred_element_type=jnp.float32)


def precision_for(dtype):
  """Full float32 products for float32 inputs (no tf32), default otherwise."""
  return (jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
          else jax.lax.Precision.DEFAULT)


dot_nt, dot_nn, dot_tn = _dot_nt, _dot_nn, _dot_tn


def tile_distance(q_pos: Array, k_pos: Array) -> Array:
  """int32 [bq, bk]: i - j."""
  return q_pos[:, None] - k_pos[None, :]


def tile_logits(cfg: TileConfig, q, k, dist, *, slope=None, far_q=None,
                far_k=None, bias=None, precision=None):
  """Float32 logits [bq, bk] of one tile before masking, plus backward aux.

  ``bias``: a float32 tile added after the soft cap (a relative position
  bias evaluated in the kernel, ``bias_params``); its gradient is the
  logits' gradient, so tile_dlogits needs nothing of it.

  Returns (logits, aux) where aux = (capped, far) holds what tile_dlogits
  needs: the soft-capped scores (or None) and the far selector (or None).
  """
  s = _dot_nt(q, k, precision) * cfg.scale
  far = None
  if cfg.has_far:
    far = dist >= cfg.far_window
    s = jnp.where(far, _dot_nt(far_q, far_k, precision) * cfg.scale, s)
  capped = None
  if cfg.soft_cap is not None:
    s = cfg.soft_cap * jnp.tanh(s / cfg.soft_cap)
    capped = s
  if bias is not None:
    s = s + bias
  if cfg.has_slopes:
    s = s - slope * jnp.abs(dist).astype(jnp.float32)
  return s, (capped, far)


def tile_visible(cfg: TileConfig, q_pos, k_pos, q_seg=None, k_seg=None,
                 k_index=None, head=None) -> Array:
  """bool [bq, bk]: mask predicate, same segment, key inside kv_len.

  ``head``: the query head (a scalar), read by per-head masks only.
  """
  visible = None
  if cfg.mask is not None:
    visible = geometry.mask_predicate(cfg.mask, q_pos[:, None],
                                      k_pos[None, :], head)
  if cfg.has_segments:
    same = q_seg[:, None] == k_seg[None, :]
    visible = same if visible is None else visible & same
  if k_index is not None:
    inside = jnp.broadcast_to((k_index < cfg.kv_len)[None, :],
                              (q_pos.shape[0], k_index.shape[0]))
    visible = inside if visible is None else visible & inside
  return visible


def apply_visible(s, visible):
  return s if visible is None else jnp.where(visible, s, -jnp.inf)


def safe_max(m):
  """-inf (a row that has seen nothing) -> 0, so exp(x - m) stays finite."""
  return jnp.where(m == -jnp.inf, 0.0, m)


def online_softmax_step(m, l, acc, s, v, precision):
  """One key tile of the forward: running max m, sum l, accumulator acc."""
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  m_safe = safe_max(m_new)
  alpha = jnp.exp(m - m_safe)
  p = jnp.exp(s - m_safe[:, None])
  l = alpha * l + jnp.sum(p, axis=1)
  acc = alpha[:, None] * acc + _dot_nn(p.astype(v.dtype), v, precision)
  return m_new, l, acc


def finish(m, l, acc):
  """Normalised output and log-sum-exp; rows with l == 0 give zeros, -inf;
  rows that saw a flagged value row (l nan) keep lse nan."""
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  out = acc / l_safe[:, None]
  lse = jnp.where(seen, safe_max(m) + jnp.log(l_safe), -jnp.inf)
  return out, jnp.where(jnp.isnan(l), jnp.nan, lse)


def forward_keys(k, v, far_k):
  """(k, v, far_k) as the forward kernels take them.

  A value row holding a non-finite entry is zeroed (``0 * nan`` would reach
  every row the mask hides it from) and its key rows are set to NaN, so the
  logits of that column are NaN exactly where the mask lets them through
  (``apply_visible`` selects hidden pairs to -inf): rows that see the bad
  value come out NaN, the others exactly as without it.
  """
  v, bad = nonfinite.clean_values(v)
  k, far_k = nonfinite.poison_keys(bad, k, far_k)
  return k, v, far_k


def backward_stats(lse, delta):
  """(lse, delta) for the backward kernels: rows whose forward is NaN
  (they saw a non-finite value row) get lse +inf and delta 0, so their
  probabilities are exactly 0 and they pass no gradient to any input."""
  bad = jnp.isnan(lse)
  return jnp.where(bad, jnp.inf, lse), jnp.where(bad, 0.0, delta)


def backward_values(v):
  """v as the backward kernels take it: non-finite rows zeroed."""
  return nonfinite.clean_values(v)[0]


def tile_probs(s, lse):
  """exp(s - lse) with rows of lse -inf (nothing seen) giving zeros."""
  return jnp.exp(s - safe_max(lse)[:, None])


def tile_dlogits(cfg: TileConfig, ds, aux, dist):
  """Backward through scaling, far split, soft cap and ALiBi.

  Args:
    ds: float32 [bq, bk], the gradient of the final logits.
    aux: from tile_logits.
    dist: i - j.

  Returns (ds_near, ds_far, dslope_rows): gradients of the q.k and far
  products, already multiplied by ``scale`` (ds_far None without far), and
  the per-row contribution to d(slope) (None without ALiBi).
  """
  capped, far = aux
  dslope_rows = None
  if cfg.has_slopes:
    dslope_rows = -jnp.sum(ds * jnp.abs(dist).astype(jnp.float32), axis=1)
  if cfg.soft_cap is not None:
    ds = ds * (1.0 - jnp.square(capped / cfg.soft_cap))
  ds = ds * cfg.scale
  ds_far = None
  if cfg.has_far:
    ds_far = jnp.where(far, ds, 0.0)
    ds = jnp.where(far, 0.0, ds)
  return ds, ds_far, dslope_rows


def slopes_grad(rows: Array, slopes: Array) -> Array:
  """d(slopes) from per-row sums [B, N, T]: summed over rows (and batch)."""
  grad = rows.sum(2)                                         # [B, N]
  if slopes.shape[0] == 1:
    grad = grad.sum(0, keepdims=True)
  return grad.astype(slopes.dtype)


def pad_to(x: Optional[Array], axis: int, size: int, value=0):
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def row_labels(cfg: TileConfig, block_q: int, block_k: int, q_pos, k_pos,
               q_seg, kv_seg) -> Array:
  """Labels [Bl, Nl, nq, nk] for (query block, key block) pairs on the
  device: Nl = N for a per-head mask (each head skips its own empty
  blocks), else 1."""
  layout = getattr(cfg.mask, "head_layout", None)
  labels = geometry.classify_blocks(
      cfg.mask, q_len=cfg.q_len, kv_len=cfg.kv_len, block_q=block_q,
      block_k=block_k, q_positions=q_pos, k_positions=k_pos,
      q_segment_ids=q_seg, kv_segment_ids=kv_seg,
      heads=None if layout is None else layout[0])
  return labels if layout is not None else labels[:, None]


def visited_blocks(labels: Array) -> Array:
  """What a kernel that skips EMPTY blocks visits: non-empty count per row."""
  return jnp.sum(labels != geometry.EMPTY, axis=-1)


DotFn = Callable[..., Array]
