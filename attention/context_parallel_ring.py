"""The ring strategy of context-parallel attention (``context_parallel``).

Run inside the ``shard_map`` that ``context_parallel.ContextParallel`` builds;
``context_parallel`` explains the layout, the strategies and their limits, and
re-exports the public names below.

* The static plan: ``ring_plan`` / ``ring_steps`` give R, the number of
  key/value shards a device visits (its own included), and whether Lambda's
  sinks go apart from the ring (``RingPlan``); ``executed_permutes`` counts
  the collective-permutes a compiled module runs (the ring's loop counted
  once per trip).
* The per-device call both strategies make, one shard pair through the inner
  implementation at global positions (``_local``), and ``merge``, the
  float32 log-sum-exp combination of two partial softmaxes over disjoint key
  sets; ``add_sinks`` merges learned sinks as one more such key set.
* The ring itself (``_ring``): a ``lax.scan`` over the R shards with a
  ``ppermute`` a step and empty shard pairs skipped by ``lax.cond``, under a
  custom VJP that saves only the device's own shard and runs the ring again
  backward; ``_ring_with_sinks`` is Lambda's sinks gathered apart with the
  ring over the window only.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from extrapolax.common import geometry
from extrapolax.common.checks import check_int
from . import core
from . import masks as masks_lib


# --------------------------------------------------------------------------
# The static plan: how many ring steps, whether Lambda's sinks go apart.


@dataclasses.dataclass(frozen=True)
class RingPlan:
  """The static exchange schedule of one ring call.

  Attributes:
    steps: R, the number of key/value shards each device visits (its own
      included); the forward makes R - 1 ring exchanges.
    num_shards: C.
    sinks: number of Lambda sink keys sent to every device apart from the
      ring (0: none; the ring then covers the whole mask).
  """
  steps: int
  num_shards: int
  sinks: int = 0

  @property
  def exchanges(self) -> int:
    return self.steps - 1


def _steps_from_geometry(mask, seq_len: int, num_shards: int) -> int:
  """1 + the largest ring distance (i - j) mod C of a non-empty shard pair."""
  shard = seq_len // num_shards
  with jax.ensure_compile_time_eval():
    labels = np.asarray(masks_lib.classify_blocks(
        mask, q_len=seq_len, kv_len=seq_len, block_q=shard, block_k=shard))[0]
  i, j = np.nonzero(labels != masks_lib.EMPTY)
  if i.size == 0:
    return 1
  return int(((i - j) % num_shards).max()) + 1


def ring_plan(mask: Optional[masks_lib.Mask], *, seq_len: int,
              num_shards: int, explicit_positions: bool = False,
              has_segments: bool = False) -> RingPlan:
  """The ring schedule for ``mask`` on ``seq_len`` tokens over C shards.

  Args:
    mask: a Mask or None.
    seq_len: T (= S), a multiple of ``num_shards``.
    num_shards: C, the size of the context axis.
    explicit_positions: positions are data, not the default 0..T-1; the
      geometry is unknown at trace time and every shard is visited.
    has_segments: packed segment ids (they only remove pairs, so R is the
      mask's; Lambda's sinks stay in the ring).
  """
  masks_lib.as_mask(mask)
  num_shards = check_int("num_shards", num_shards, 1)
  seq_len = check_int("seq_len", seq_len, 1)
  if seq_len % num_shards:
    raise ValueError(f"seq_len={seq_len} must be a multiple of "
                     f"num_shards={num_shards}")
  if explicit_positions or mask is None:
    return RingPlan(num_shards, num_shards)
  steps = _steps_from_geometry(mask, seq_len, num_shards)
  if (isinstance(mask, masks_lib.Lambda) and not has_segments
      and 0 < mask.num_sinks <= seq_len // num_shards):
    window = _steps_from_geometry(masks_lib.SlidingWindow(mask.window),
                                  seq_len, num_shards)
    if window < steps:
      return RingPlan(window, num_shards, mask.num_sinks)
  return RingPlan(steps, num_shards)


def ring_steps(mask: Optional[masks_lib.Mask], *, seq_len: int,
               num_shards: int, explicit_positions: bool = False,
               has_segments: bool = False) -> int:
  """R, the static number of key/value shards a device visits; see ring_plan."""
  return ring_plan(mask, seq_len=seq_len, num_shards=num_shards,
                   explicit_positions=explicit_positions,
                   has_segments=has_segments).steps


def executed_permutes(hlo_text: str) -> int:
  """Collective-permutes a compiled HLO module runs (``compiled.as_text()``).

  Each computation's own, plus those of the while loops it calls times their
  known trip count: the ring is a loop, so the text holds its exchange once.
  """
  own, loops, name, entry = {}, {}, None, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      is_entry = line.startswith("ENTRY")
      name = line.split()[1 if is_entry else 0].lstrip("%")
      entry = name if is_entry else entry
      own[name], loops[name] = 0, []
    elif name is not None:
      own[name] += len(re.findall(r"collective-permute(?:-start)?\(", line))
      m = re.search(r'body=%([\w.\-]+).*"known_trip_count":\{"n":"(\d+)"',
                    line)
      if m:
        loops[name].append((m.group(1), int(m.group(2))))
  count = lambda c: own[c] + sum(n * count(b) for b, n in loops[c])
  return 0 if entry is None else count(entry)


# --------------------------------------------------------------------------
# Per-device pieces (run inside shard_map).


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable settings of the per-device computation: the call's shared
  statics and the mesh / ring settings."""
  call: geometry.AttentionStatics
  inner: Any
  axis: str
  num_shards: int
  steps: int


def _local(st: _Static, q, k, v, slopes, bias, pb, far_q, far_k, q_pos,
           k_pos, q_seg, kv_seg):
  """One shard pair through the inner implementation: (out, lse).

  ``pb`` (a RelativeBias or None) is evaluated at the pair's global
  positions: per tile by an inner implementation that takes it, else
  materialised by ``core.serve`` as this pair's [Bp, N, L, L] block."""
  segs = None if q_seg is None else (q_seg, kv_seg)
  return core.dot_product_attention(
      q, k, v, mask=st.call.mask, segment_ids=segs, alibi_slopes=slopes,
      bias=bias, scale=st.call.scale, logits_soft_cap=st.call.soft_cap,
      implementation=st.inner, return_residuals=True, query_positions=q_pos,
      key_positions=k_pos, far_query=far_q, far_key=far_k,
      far_window=st.call.far_window, position_bias=pb)


def _visits(st: _Static, q_pos, k_pos, q_seg, kv_seg):
  """Scalar bool: some query of the shard may see some visiting key."""
  length = q_pos.shape[-1]
  labels = masks_lib.classify_blocks(
      st.call.mask, q_len=length, kv_len=k_pos.shape[-1], block_q=length,
      block_k=k_pos.shape[-1], q_positions=q_pos, k_positions=k_pos,
      q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  return jnp.any(labels != masks_lib.EMPTY)


def merge(out_a, lse_a, out_b, lse_b):
  """Merges two partial softmaxes over disjoint key sets (differentiable).

  out [B, T, N, Hv], lse float32 [B, N, T]. Rows where both are empty stay
  zeros with lse -inf, and no NaN reaches the forward or the gradients.
  """
  # A part that saw a non-finite value row has lse nan (and its rows of out
  # nan): selected through explicitly, not left to max() and exp().
  poisoned = jnp.isnan(lse_a) | jnp.isnan(lse_b)
  lse_a = jnp.where(poisoned, -jnp.inf, lse_a)
  lse_b = jnp.where(poisoned, -jnp.inf, lse_b)
  m = jax.lax.stop_gradient(jnp.maximum(lse_a, lse_b))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
  total = w_a + w_b
  safe = jnp.where(total > 0, total, 1.0)
  lse = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)
  lse = jnp.where(poisoned, jnp.nan, lse)
  rows = lambda w: jnp.swapaxes(w / safe, 1, 2)[..., None]  # [B, T, N, 1]
  out = (jnp.where(rows(w_a) > 0, out_a.astype(jnp.float32), 0.0) * rows(w_a)
         + jnp.where(rows(w_b) > 0, out_b.astype(jnp.float32), 0.0)
         * rows(w_b))
  out = jnp.where(jnp.swapaxes(poisoned, 1, 2)[..., None], jnp.nan, out)
  return out, lse


def _shift(st: _Static, tree, offset: int):
  """Sends every array of ``tree`` ``offset`` devices on along the axis."""
  c = st.num_shards
  perm = [(j, (j + offset) % c) for j in range(c)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, st.axis, perm), tree)


def _ring_loop(st: _Static, step, stay, moving, shard):
  """Runs ``step`` on the R key/value shards a device visits, in a loop.

  ``step(stay, moving, shard) -> (stay, moving)``; ``shard`` (and ``moving``,
  state that travels with it) pass one device on after every step but the
  last. A loop rather than R unrolled copies: the loop carry bounds what is
  alive to the current and the incoming shard (unrolled, XLA issues every
  exchange early and keeps all visited shards), and the step compiles once.
  """
  def body(state, _):
    stay, moving, shard = state
    following = _shift(st, shard, 1)   # before the math, so the two overlap
    stay, moving = step(stay, moving, shard)
    return (stay, _shift(st, moving, 1), following), None

  if st.steps > 1:
    (stay, moving, shard), _ = jax.lax.scan(
        body, (stay, moving, shard), length=st.steps - 1)
  return step(stay, moving, shard)


def _ring_forward(st: _Static, q, k, v, slopes, bias, pb, far_q, far_k,
                  q_pos, k_pos, q_seg, kv_seg):
  b, length, n, _ = q.shape
  out = jnp.zeros_like(q, jnp.float32, shape=(b, length, n, v.shape[-1]))
  lse = jnp.full_like(q, -jnp.inf, jnp.float32, shape=(b, n, length))

  def step(carry, moving, shard):
    k_b, v_b, fk_b, kp_b, ks_b = shard

    def compute(carry):
      o_b, lse_b = _local(st, q, k_b, v_b, slopes, bias, pb, far_q, fk_b,
                          q_pos, kp_b, q_seg, ks_b)
      return merge(*carry, o_b, lse_b)

    carry = jax.lax.cond(_visits(st, q_pos, kp_b, q_seg, ks_b), compute,
                         lambda carry: carry, carry)
    return carry, moving

  (out, lse), _ = _ring_loop(st, step, (out, lse), None,
                             (k, v, far_k, k_pos, kv_seg))
  return out.astype(q.dtype), lse


def _pack(arrays, dtype):
  """[B, L, ...] arrays (None skipped) -> one [B, L, F] buffer of ``dtype``."""
  return jnp.concatenate([x.reshape(x.shape[:2] + (-1,)).astype(dtype)
                          for x in arrays if x is not None], axis=-1)


def _unpack(buffer, likes):
  """Inverse of _pack: arrays shaped and typed like ``likes`` (None kept)."""
  out, start = [], 0
  for like in likes:
    if like is None:
      out.append(None)
      continue
    size = int(np.prod(like.shape[2:]))
    part = buffer[..., start:start + size]
    out.append(part.reshape(part.shape[:2] + like.shape[2:]).astype(
        like.dtype))
    start += size
  return out


def _ring_backward(st: _Static, residuals, cotangents):
  (q, k, v, slopes, bias, pb, far_q, far_k, q_pos, k_pos, q_seg, kv_seg,
   out, lse) = residuals
  d_out, d_lse = cotangents
  d_out = d_out.astype(jnp.float32)
  d_lse = jnp.where(jnp.isfinite(lse), d_lse.astype(jnp.float32), 0.0)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  row_ok = ~jnp.isnan(lse)
  out32 = out.astype(jnp.float32)

  def block_cotangents(o_b, lse_b):
    # out = sum_b w_b o_b and lse = logsumexp_b lse_b with w_b = exp(lse_b -
    # lse): d o_b = w_b dO, d lse_b = w_b (dlse + sum_h dO (o_b - out)).
    # Rows whose merged forward is NaN (they saw a non-finite value row)
    # pass no gradient: selected away, not multiplied by a zero weight.
    w = jnp.where(jnp.isfinite(lse_b) & row_ok, jnp.exp(lse_b - lse_safe),
                  0.0)
    d_o = (jnp.swapaxes(w, 1, 2)[..., None] * d_out).astype(o_b.dtype)
    row = jnp.einsum("btnh,btnh->bnt", d_out, o_b.astype(jnp.float32) - out32)
    return d_o, jnp.where(row_ok, w * (d_lse + row), 0.0)

  # Keys, values and far keys travel as one buffer (one message a step), and
  # so do their float32 gradients, which go home after the last step.
  floats = (k, v, far_k)
  packed = _pack(floats, jnp.result_type(*[x for x in floats
                                           if x is not None]))
  zeros = lambda x: None if x is None else jnp.zeros_like(x, jnp.float32)
  # The bias parameters' gradient stays with the queries, like the slopes'
  # (shard_map's transpose then sums it over the context axis, once).
  q_side = (zeros(q), zeros(slopes), zeros(bias),
            jax.tree.map(zeros, pb), zeros(far_q))
  k_side = jnp.zeros(packed.shape, jnp.float32)
  add = lambda acc, g: jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc,
                                    g)

  def step(q_side, k_side, shard):
    packed_b, kp_b, ks_b = shard

    def compute(acc):
      k_b, v_b, fk_b = _unpack(packed_b, floats)
      fn = lambda q, k, v, sl, bi, p, fq, fk: _local(
          st, q, k, v, sl, bi, p, fq, fk, q_pos, kp_b, q_seg, ks_b)
      (o_b, lse_b), vjp = jax.vjp(fn, q, k_b, v_b, slopes, bias, pb, far_q,
                                  fk_b)
      gq, gk, gv, gsl, gbi, gpb, gfq, gfk = vjp(block_cotangents(o_b, lse_b))
      return add(acc, ((gq, gsl, gbi, gpb, gfq),
                       _pack((gk, gv, gfk), jnp.float32)))

    return jax.lax.cond(_visits(st, q_pos, kp_b, q_seg, ks_b), compute,
                        lambda acc: acc, (q_side, k_side))

  q_side, k_side = _ring_loop(st, step, q_side, k_side,
                              (packed, k_pos, kv_seg))
  if st.steps > 1:
    k_side = _shift(st, k_side, 1 - st.steps)  # home
  cast = lambda g, x: None if x is None else g.astype(x.dtype)
  dq, dsl, dbi, dpb, dfq = q_side
  dk, dv, dfk = _unpack(k_side, floats)
  return (cast(dq, q), dk, dv, cast(dsl, slopes), cast(dbi, bias),
          jax.tree.map(cast, dpb, pb), cast(dfq, far_q), dfk, None, None,
          None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st, q, k, v, slopes, bias, pb, far_q, far_k, q_pos, k_pos, q_seg,
          kv_seg):
  return _ring_forward(st, q, k, v, slopes, bias, pb, far_q, far_k, q_pos,
                       k_pos, q_seg, kv_seg)


def _ring_fwd(st, *args):
  out, lse = _ring_forward(st, *args)
  return (out, lse), args + (out, lse)


_ring.defvjp(_ring_fwd, _ring_backward)


def _ring_with_sinks(st: _Static, plan: RingPlan, q, k, v, slopes, bias, pb,
                     far_q, far_k, q_pos, k_pos):
  """Lambda(sinks, w): sinks gathered apart, the ring over the window only.

  The sink part scores keys 0..sinks-1 (all of them, causally) and the ring
  scores SlidingWindow(w) with the sink keys masked out by a segment id, so
  the two key sets are disjoint and their union is exactly the Lambda mask.
  """
  ns = plan.sinks
  # The first ``ns`` keys of shard 0, on every device.
  take = lambda x: None if x is None else jax.lax.all_gather(
      x[:, :ns], st.axis)[0]
  sink_pos = jnp.arange(ns, dtype=jnp.int32)[None]
  out_s, lse_s = _local(st, q, take(k), take(v), slopes, bias, pb, far_q,
                        take(far_k), q_pos, sink_pos, None, None)
  b, length = q.shape[:2]
  q_seg = jnp.zeros((b, length), jnp.int32)
  kv_seg = jnp.broadcast_to(k_pos < ns, (b, length)).astype(jnp.int32)
  window = dataclasses.replace(st, call=dataclasses.replace(
      st.call, mask=masks_lib.SlidingWindow(st.call.mask.window)))
  out_w, lse_w = _ring(window, q, k, v, slopes, bias, pb, far_q, far_k,
                       q_pos, k_pos, q_seg, kv_seg)
  out, lse = merge(out_w, lse_w, out_s, lse_s)
  return out.astype(q.dtype), lse


def add_sinks(out, lse, sink_logits):
  """Learned sinks (gpt-oss) joined after the keys: a key set of its own
  whose log-sum-exp is the sink logit and whose value is zero, merged like
  any other block (so every strategy and inner implementation serves them,
  and autodiff gives the sinks' gradient)."""
  lse_s = jnp.broadcast_to(sink_logits.astype(jnp.float32)[None, :, None],
                           lse.shape)
  merged, lse = merge(out, lse, jnp.zeros_like(out), lse_s)
  return merged.astype(out.dtype), lse
