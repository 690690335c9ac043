"""The dense XLA implementation (the oracle) and the per-block logit maths.

``block_logits`` and ``block_visible`` compute the logits and the visibility of
one (query block, key block) rectangle; the dense path calls them once on the
whole T x S rectangle, the chunked path once per block. Keeping one copy of the
maths is what makes "chunked equals dense" a test of the blocking alone.

Grouped-query layout inside: queries [B, T, K, G, H] with G = N // K, logits
[B, K, G, T, S].
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from extrapolax.common import geometry
from extrapolax.common import nonfinite
from . import core
from . import masks as masks_lib

Array = jax.Array


def split_heads(x: Array, num_kv_heads: int) -> Array:
  """[B, T, N, H] -> [B, T, K, G, H]."""
  b, t, n, h = x.shape
  return x.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def heads_bias(bias: Array, num_kv_heads: int) -> Array:
  """[Bb, Nb, T, S] -> [Bb, K or 1, G or 1, T, S] (Nb in {1, N})."""
  bb, nb, t, s = bias.shape
  if nb == 1:
    return bias[:, :, None]
  return bias.reshape(bb, num_kv_heads, nb // num_kv_heads, t, s)


# Grouped-query products as plain per-head batched matmuls: key/value heads
# are repeated G times (XLA on the CPU runs these about 2x faster than the
# same contraction written with a separate group axis).

def qk(q: Array, k: Array) -> Array:
  """q [B, T, K, G, H] . k [B, S, K, H] -> float32 [B, K, G, T, S]."""
  b, t, kh, g, h = q.shape
  s = jnp.einsum("btnh,bsnh->bnts", q.reshape(b, t, kh * g, h),
                 jnp.repeat(k, g, axis=2), preferred_element_type=jnp.float32)
  return s.reshape(b, kh, g, t, -1)


def pv(p: Array, v: Array) -> Array:
  """p [B, K, G, T, S] . v [B, S, K, Hv] -> float32 [B, T, K, G, Hv]."""
  b, kh, g, t, s = p.shape
  o = jnp.einsum("bnts,bsnh->btnh", p.reshape(b, kh * g, t, s),
                 jnp.repeat(v, g, axis=2), preferred_element_type=jnp.float32)
  return o.reshape(b, t, kh, g, -1)


def block_logits(q: Array, k: Array, q_pos: Array, k_pos: Array, *,
                 scale: float, soft_cap: Optional[float],
                 slopes: Optional[Array] = None, bias: Optional[Array] = None,
                 far_q: Optional[Array] = None, far_k: Optional[Array] = None,
                 far_window: Optional[int] = None) -> Array:
  """Float32 logits [B, K, G, Tb, Sb] of one block, before masking.

  Args:
    q: [B, Tb, K, G, H]; k: [B, Sb, K, H].
    q_pos, k_pos: int [Bp, Tb], [Bp, Sb].
    slopes: float32 [Ba, K, G] or None.
    bias: [Bb, K|1, G|1, Tb, Sb] or None.
    far_q, far_k: like q and k, or None; used where i - j >= far_window.
  """
  s = qk(q, k) * scale
  s_far = None if far_q is None else qk(far_q, far_k) * scale
  return finish_logits(s, s_far, q_pos, k_pos, soft_cap=soft_cap,
                       slopes=slopes, bias=bias, far_window=far_window)


def finish_logits(s: Array, s_far: Optional[Array], q_pos: Array,
                  k_pos: Array, *, soft_cap: Optional[float],
                  slopes: Optional[Array] = None,
                  bias: Optional[Array] = None,
                  far_window: Optional[int] = None) -> Array:
  """The elementwise part of ``block_logits``, from the scaled products.

  ``s`` (and ``s_far``, or None) [B, K, G, Tb, Sb]: ``scale * q.k`` (and
  ``scale * far_q.far_k``); then the far selection, the soft cap, the bias
  and ALiBi, as ``block_logits`` documents.
  """
  dist = None
  if s_far is not None or slopes is not None:
    dist = (q_pos[:, :, None] - k_pos[:, None, :])[:, None, None]  # [Bp,1,1,T,S]
  if s_far is not None:
    s = jnp.where(dist >= far_window, s_far, s)
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  if slopes is not None:
    s = s - slopes[:, :, :, None, None] * jnp.abs(dist).astype(jnp.float32)
  return s


def block_visible(mask: Optional[masks_lib.Mask], q_pos: Array, k_pos: Array,
                  q_seg: Optional[Array], kv_seg: Optional[Array],
                  k_valid: Optional[Array] = None) -> Optional[Array]:
  """bool [B?, K|1, G|1, Tb, Sb] visibility of one block, or None if all
  visible. A per-head mask (bound to the call's heads) gives K and G axes."""
  rows = lambda x: x[:, None, None, :, None]
  cols = lambda x: x[:, None, None, None, :]
  visible = None
  if mask is not None:
    heads = geometry.head_grid(mask)
    visible = geometry.mask_predicate(
        mask, rows(q_pos), cols(k_pos),
        None if heads is None else heads[None, :, :, None, None])
  if q_seg is not None:
    same = rows(q_seg) == cols(kv_seg)
    visible = same if visible is None else visible & same
  if k_valid is not None:
    valid = k_valid[None, None, None, None, :]
    visible = valid if visible is None else visible & valid
  return visible


def slopes_by_group(slopes: Optional[Array], num_kv_heads: int):
  """[Ba, N] -> [Ba, K, G]."""
  if slopes is None:
    return None
  ba, n = slopes.shape
  return slopes.reshape(ba, num_kv_heads, n // num_kv_heads)


def dense_attention(request: core.AttentionRequest):
  """Materialises the T x S logits; the oracle every other path is held to."""
  b, t, s, n, k, h, hv = request.shape_info
  q = split_heads(request.query, k)
  far_q = None if request.far_query is None else split_heads(
      request.far_query, k)
  bias = None if request.bias is None else heads_bias(request.bias, k)
  logits = block_logits(
      q, request.key, request.query_positions, request.key_positions,
      scale=request.scale, soft_cap=request.logits_soft_cap,
      slopes=slopes_by_group(request.alibi_slopes, k), bias=bias,
      far_q=far_q, far_k=request.far_key, far_window=request.far_window)
  visible = block_visible(request.mask, request.query_positions,
                          request.key_positions, request.q_segment_ids,
                          request.kv_segment_ids)
  if visible is not None:
    logits = jnp.where(visible, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  sink = None
  if request.sink_logits is not None:
    # The sink: one more logit per head in the denominator, with no value.
    sink = request.sink_logits.reshape(1, k, n // k, 1, 1)
    m = jnp.maximum(m, sink)
  m = jax.lax.stop_gradient(m)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  if sink is not None:
    l = l + jnp.exp(sink - m)
  l_safe = jnp.where(l > 0, l, 1.0)
  # Non-finite value rows are zeroed (0 * nan would reach rows the mask hides
  # them from); rows that do see one are selected to NaN afterwards.
  value, bad = nonfinite.clean_values(request.value)        # bad [B, S, K]
  out = pv((p / l_safe).astype(value.dtype), value)
  lse = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)[..., 0]  # [B,K,G,T]
  bad_cols = jnp.moveaxis(bad, 1, 2)[:, :, None, None, :]   # [B, K, 1, 1, S]
  sees_bad = jnp.any(bad_cols if visible is None else visible & bad_cols,
                     axis=-1)                                # [B, K, 1, T]
  lse = jnp.where(sees_bad, jnp.nan, lse)
  out = jnp.where(jnp.moveaxis(sees_bad, 3, 1)[..., None], jnp.nan, out)
  out = out.reshape(b, t, n, hv).astype(request.query.dtype)
  return out, lse.reshape(b, n, t)


class Xla(core.Implementation):
  """Dense XLA attention; memory quadratic in length."""
  name = "xla"
  takes_sink_logits = True

  def __call__(self, request):
    return dense_attention(request)


core.register_implementation("xla", Xla)
