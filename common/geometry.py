"""Attention geometry shared by attention/ and pallas_kernels/.

* Block labels: ``EMPTY`` (skip), ``PARTIAL`` (compute with the mask),
  ``FULL`` (compute without masking).
* ``classify_blocks``: every (query block, key block) pair labelled from any
  mask with ``block_visibility(q_lo, q_hi, k_lo, k_hi)`` (the
  ``extrapolax.attention.masks`` objects), positions and segment ids; pure
  ``jnp``, so it runs on the device inside a jitted step or a kernel wrapper.
* ``default_positions``: the bottom-right alignment of T queries on S keys.
* ``AttentionStatics``: the hashable settings of one attention call that
  every implementation closes over (the xla_chunked loop, the Pallas kernels,
  context-parallel attention); each adds its own tiling or mesh settings
  beside it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from .checks import check_int

EMPTY = 0     # no pair in the block is visible: skip it
PARTIAL = 1   # some pairs are visible: compute with the mask
FULL = 2      # every pair is visible: compute without masking

__all__ = ["EMPTY", "PARTIAL", "FULL", "BlockMask", "AttentionStatics",
           "default_positions", "block_minmax", "classify_blocks",
           "mask_predicate", "mask_blocks", "head_grid"]


class BlockMask(Protocol):
  """What the classifier and the kernels need of a mask."""

  def __call__(self, q_pos, k_pos): ...

  def block_visibility(self, q_lo, q_hi, k_lo, k_hi): ...


def mask_predicate(mask, q_pos, k_pos, head=None):
  """``mask(q_pos, k_pos)``, passing ``head`` (an int array broadcasting with
  the positions, the query head) to a mask whose ``per_head`` is True."""
  if getattr(mask, "per_head", False):
    return mask(q_pos, k_pos, head=head)
  return mask(q_pos, k_pos)


def mask_blocks(mask, q_lo, q_hi, k_lo, k_hi, head=None):
  """``mask.block_visibility``, with ``head`` for per-head masks (None: the
  union over heads, which is what a label shared by all heads needs)."""
  if getattr(mask, "per_head", False):
    return mask.block_visibility(q_lo, q_hi, k_lo, k_hi, head=head)
  return mask.block_visibility(q_lo, q_hi, k_lo, k_hi)


def head_grid(mask):
  """int32 [K, G] query head indices of a bound per-head mask (the
  grouped-query layout, head n = k * G + g), or None."""
  layout = getattr(mask, "head_layout", None)
  if layout is None:
    return None
  n, k = layout
  return jnp.arange(n, dtype=jnp.int32).reshape(k, n // k)


@dataclasses.dataclass(frozen=True)
class AttentionStatics:
  """What one attention call computes, as hashable (static) settings.

  Attributes:
    mask: the mask object (or None), as given to ``dot_product_attention``.
    scale: the logit scale.
    soft_cap: None or the tanh soft cap.
    far_window: pairs at distance >= far_window use the far query / key
      (LM-Infinite's ceiling, Self-Extend), or None.
    q_len, kv_len: T and S.
    has_segments, has_slopes, has_far: which optional inputs are present.
  """
  mask: Optional[Any]
  scale: float
  soft_cap: Optional[float]
  far_window: Optional[int]
  q_len: int
  kv_len: int
  has_segments: bool = False
  has_slopes: bool = False
  has_far: bool = False

  @classmethod
  def of(cls, request) -> "AttentionStatics":
    """The statics of an ``attention.core.AttentionRequest``."""
    b, t, s, *_ = request.shape_info
    del b
    return cls(mask=request.mask, scale=float(request.scale),
               soft_cap=request.logits_soft_cap,
               far_window=request.far_window, q_len=t, kv_len=s,
               has_segments=request.q_segment_ids is not None,
               has_slopes=request.alibi_slopes is not None,
               has_far=request.far_query is not None)


def default_positions(q_len: int, kv_len: int):
  """Absolute positions with the bottom-right alignment: (int32[T], int32[S])."""
  q_len = check_int("q_len", q_len, 0)
  kv_len = check_int("kv_len", kv_len, 0)
  return (jnp.arange(q_len, dtype=jnp.int32) + (kv_len - q_len),
          jnp.arange(kv_len, dtype=jnp.int32))


def block_minmax(x: jax.Array, block: int):
  """Per-block min and max along the last axis of ``x`` ([..., L]).

  The last block may be ragged; its missing entries are ignored.
  Returns two arrays [..., ceil(L / block)].
  """
  length = x.shape[-1]
  num_blocks = -(-length // block)
  pad = num_blocks * block - length
  info = jnp.iinfo(x.dtype) if jnp.issubdtype(x.dtype, jnp.integer) else None
  big = info.max if info is not None else jnp.inf
  small = info.min if info is not None else -jnp.inf
  widths = [(0, 0)] * (x.ndim - 1) + [(0, pad)]
  x_lo = jnp.pad(x, widths, constant_values=big)
  x_hi = jnp.pad(x, widths, constant_values=small)
  shape = x.shape[:-1] + (num_blocks, block)
  return x_lo.reshape(shape).min(-1), x_hi.reshape(shape).max(-1)


def classify_blocks(mask: Optional[BlockMask], *, q_len: int, kv_len: int,
                    block_q: int, block_k: int,
                    q_positions: Optional[jax.Array] = None,
                    k_positions: Optional[jax.Array] = None,
                    q_segment_ids: Optional[jax.Array] = None,
                    kv_segment_ids: Optional[jax.Array] = None,
                    heads: Optional[int] = None) -> jax.Array:
  """Labels every (query block, key block) pair EMPTY, PARTIAL or FULL.

  Pure jnp and traceable: positions and segment ids may change every batch.

  Args:
    mask: a mask with ``block_visibility`` (``attention.masks``), or None
      for no positional mask.
    q_len, kv_len: T and S.
    block_q, block_k: block sizes; the last block of each axis may be ragged
      (a ragged block is never FULL, so callers that pad must mask it).
    q_positions, k_positions: optional int [B, T] / [B, S] (or [T] / [S])
      absolute positions; default: the bottom-right alignment.
    q_segment_ids, kv_segment_ids: optional int [B, T] / [B, S]; a query only
      sees keys of its own segment. Give both or neither.
    heads: None, or N: label every query head of a per-head mask apart
      (query head h is ``head=h`` of the mask's predicate).

  Returns:
    int32 [B, ceil(T / block_q), ceil(S / block_k)] with B = 1 when nothing
    carries a batch axis; with ``heads``, [B, N, nq, nk]. Without ``heads``
    a per-head mask is labelled by its union over heads (EMPTY only when no
    head sees anything, FULL only when every head sees everything).
  """
  if mask is not None and not hasattr(mask, "block_visibility"):
    raise ValueError(f"mask must have block_visibility (an "
                     f"extrapolax.attention.masks.Mask) or be None, got "
                     f"{mask!r}")
  block_q = check_int("block_q", block_q, 1)
  block_k = check_int("block_k", block_k, 1)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  default_q, default_k = default_positions(q_len, kv_len)
  q_pos = default_q if q_positions is None else jnp.asarray(q_positions)
  k_pos = default_k if k_positions is None else jnp.asarray(k_positions)
  q_pos = jnp.atleast_2d(q_pos)
  k_pos = jnp.atleast_2d(k_pos)
  if q_pos.shape[-1] != q_len or k_pos.shape[-1] != kv_len:
    raise ValueError(
        f"positions must end in (q_len={q_len}, kv_len={kv_len}), got "
        f"{q_pos.shape} and {k_pos.shape}")
  q_lo, q_hi = block_minmax(q_pos, block_q)        # [Bq, nq]
  k_lo, k_hi = block_minmax(k_pos, block_k)        # [Bk, nk]
  # [B?, 1?, nq, 1] and [B?, 1?, 1, nk]: a head axis only with ``heads``.
  lead = (slice(None),) if heads is None else (slice(None), None)
  as_rows = lambda x: x[lead + (slice(None), None)]
  as_cols = lambda x: x[lead + (None, slice(None))]
  q_lo, q_hi, k_lo, k_hi = (as_rows(q_lo), as_rows(q_hi), as_cols(k_lo),
                            as_cols(k_hi))
  head = None
  if heads is not None:
    heads = check_int("heads", heads, 1)
    head = jnp.arange(heads, dtype=jnp.int32)[None, :, None, None]
  if mask is None:
    some = jnp.ones(jnp.broadcast_shapes(q_lo.shape, k_lo.shape), bool)
    all_ = some
  else:
    some, all_ = mask_blocks(mask, q_lo, q_hi, k_lo, k_hi, head=head)
  if heads is not None:
    shape = jnp.broadcast_shapes(q_lo.shape, k_lo.shape)
    shape = shape[:1] + (heads,) + shape[2:]
    some, all_ = (jnp.broadcast_to(some, shape),
                  jnp.broadcast_to(all_, shape))
  if q_segment_ids is not None:
    qs_lo, qs_hi = block_minmax(jnp.atleast_2d(q_segment_ids), block_q)
    ks_lo, ks_hi = block_minmax(jnp.atleast_2d(kv_segment_ids), block_k)
    qs_lo, qs_hi = as_rows(qs_lo), as_rows(qs_hi)
    ks_lo, ks_hi = as_cols(ks_lo), as_cols(ks_hi)
    some = some & (qs_lo <= ks_hi) & (ks_lo <= qs_hi)
    all_ = all_ & (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
  # Ragged edge blocks hold padding that a caller must mask: never FULL.
  nq, nk = q_lo.shape[-2], k_lo.shape[-1]
  q_whole = (np.arange(nq) + 1) * block_q <= q_len
  k_whole = (np.arange(nk) + 1) * block_k <= kv_len
  all_ = all_ & jnp.asarray(q_whole)[:, None] & jnp.asarray(k_whole)[None, :]
  labels = jnp.where(some, jnp.where(all_, FULL, PARTIAL), EMPTY)
  return labels.astype(jnp.int32)
