"""Backward of the GPU flash kernels (``flash_gpu``): the dq and dk/dv passes.

``gradients`` is the custom VJP's backward: delta = rowsum(dO * O) - dLSE,
then two Pallas programs on the inputs of ``flash_gpu_layout.Inputs``. The
dq pass has one program per (query block, batch, query head) and walks that
query block's row of the block schedule; the dk/dv pass has one per (key
block, batch, query head) and walks the transposed schedule. Each walks its
FULL blocks without masking, then its PARTIAL blocks with the mask. The dq
pass also writes the ALiBi slope, far-query and position-bias gradients;
dk/dv are per query head and summed over the G heads of a key/value head
afterwards.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from . import flash_gpu_layout as layout
from . import tiles


def backward_dq(static, x: layout.Inputs, do, lse, delta):
  """The dq kernel (and d slope, d far query, d bias rows): one program per
  (query block, batch, query head)."""
  cfg, blocks = static.cfg, static.blocks
  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  sched = x.labels(cfg, bq, bk)
  precision = tiles.precision_for(x.q.dtype)

  def body(refs):
    i = pl.program_id(0)
    q = refs["q"][...]
    do_ = refs["do"][...]
    lse_ = refs["lse"][...]
    delta_ = refs["delta"][...]
    q_pos = refs["q_pos"][...]
    q_seg = refs["q_seg"][...] if cfg.has_segments else None
    far_q = refs["far_q"][...] if cfg.has_far else None
    slope = x.slope(refs)
    row = x.bias_row(refs)
    head = pl.program_id(2)
    q_index = i * bq + jnp.arange(bq)
    count, num_full = refs["sched"][0], refs["sched"][1]

    def step(masked_block, r, carry):
      dq, dfq, dsl, drow, visits = carry
      entry = refs["sched"][r + 2]
      start = pl.multiple_of(tiles.entry_block(entry) * bk, bk)
      ks = pl.ds(start, bk)
      k = refs["k"][ks, :]
      v = refs["v"][ks, :]
      far_k = refs["far_k"][ks, :] if cfg.has_far else None
      k_pos = refs["k_pos"][ks]
      dist = tiles.tile_distance(q_pos, k_pos)
      bias = bias_vjp = None
      if row is not None:
        bias, bias_vjp = x.bias.tile_and_vjp(row, q_pos[:, None],
                                             k_pos[None, :])
      s, aux = tiles.tile_logits(cfg, q, k, dist, slope=slope, far_q=far_q,
                                 far_k=far_k, bias=bias, precision=precision)

      def masked(s):
        k_seg = refs["kv_seg"][ks] if cfg.has_segments else None
        return layout.visible_masked(cfg, s, q_pos, k_pos, q_seg, k_seg,
                                     q_index, start + jnp.arange(bk), head)

      if masked_block:
        s = masked(s)
      p = tiles.tile_probs(s, lse_)
      dp = tiles.dot_nt(do_, v, precision)
      ds = p * (dp - delta_[:, None])
      if bias_vjp is not None:
        # d(logits) is the bias tile's cotangent (it is added after the
        # soft cap). Only this kernel emits it: each tile counted once.
        drow = drow + bias_vjp(ds)
      ds, ds_far, dsl_rows = tiles.tile_dlogits(cfg, ds, aux, dist)
      dq = dq + tiles.dot_nn(ds.astype(k.dtype), k, precision)
      if cfg.has_far:
        dfq = dfq + tiles.dot_nn(ds_far.astype(k.dtype), far_k, precision)
      if cfg.has_slopes:
        dsl = dsl + dsl_rows
      return dq, dfq, dsl, drow, visits + 1

    zeros = jnp.zeros((bq, x.hp), jnp.float32)
    init = (zeros, zeros if cfg.has_far else jnp.float32(0),
            jnp.zeros((bq,), jnp.float32),
            jnp.float32(0) if row is None else jnp.zeros_like(row),
            jnp.int32(0))
    carry = lax.fori_loop(0, num_full, functools.partial(step, False), init)
    dq, dfq, dsl, drow, visits = lax.fori_loop(
        num_full, count, functools.partial(step, True), carry)
    refs["dq"][...] = dq.astype(refs["dq"].dtype)
    if row is not None:
      refs["dbias_rows"][...] = drow
    if cfg.has_far:
      refs["dfar_q"][...] = dfq.astype(refs["dfar_q"].dtype)
    if cfg.has_slopes:
      refs["dslope_rows"][...] = dsl
    if static.debug:
      refs["visits"][...] = jnp.full((bq,), visits, jnp.int32)

  inputs = [("q", x.q, x.q_block(x.q, bq, x.hp)),
            ("k", x.k, x.kv_whole(x.hp)), ("v", x.v, x.kv_whole(x.hvp)),
            ("do", do, x.q_block(do, bq, x.hvp)),
            ("lse", lse, x.stat_block(bq)), ("delta", delta, x.stat_block(bq)),
            ("q_pos", x.q_pos, x.rows_block(x.q_pos, bq)),
            ("k_pos", x.k_pos, x.rows_whole(x.k_pos)),
            ("sched", sched, x.sched_spec(sched))]
  if cfg.has_segments:
    inputs += [("q_seg", x.q_seg, x.rows_block(x.q_seg, bq)),
               ("kv_seg", x.kv_seg, x.rows_whole(x.kv_seg))]
  if cfg.has_slopes:
    inputs.append(("slopes", x.slopes, x.slopes_spec()))
  if cfg.has_far:
    inputs += [("far_q", x.far_q, x.q_block(x.far_q, bq, x.hp)),
               ("far_k", x.far_k, x.kv_whole(x.hp))]
  inputs += x.bias_inputs()
  shape_q = jax.ShapeDtypeStruct((x.b, x.tp, x.n, x.hp), jnp.float32)
  outputs = [("dq", shape_q, x.q_block(x.q, bq, x.hp))]
  if cfg.has_far:
    outputs.append(("dfar_q", shape_q, x.q_block(x.q, bq, x.hp)))
  if x.bias is not None:
    # Per program (query block, batch, head): summed outside.
    width = x.bias.width
    outputs.append(("dbias_rows", jax.ShapeDtypeStruct(
        (x.b, x.n, x.tp // bq, width), jnp.float32), pl.BlockSpec(
            (None, None, None, width), lambda i, b, h: (b, h, i, 0))))
  stat = jax.ShapeDtypeStruct((x.b, x.n, x.tp), jnp.float32)
  if cfg.has_slopes:
    outputs.append(("dslope_rows", stat, x.stat_block(bq)))
  if static.debug:
    outputs.append(("visits", stat.update(dtype=jnp.int32), x.stat_block(bq)))
  res = layout.program(static, "dq", body, (x.tp // bq, x.b, x.n), inputs,
                       outputs, x.hp)
  res = dict(zip([name for name, _, _ in outputs], res))
  if static.debug:
    res["visits"] = res["visits"][:, :, ::bq]
  return res


def backward_dkv(static, x: layout.Inputs, do, lse, delta):
  """The dk/dv kernel (and d far key), per query head: one program per
  (key block, batch, query head)."""
  cfg, blocks = static.cfg, static.blocks
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  sched = x.labels(cfg, bq, bk, transpose=True)
  precision = tiles.precision_for(x.q.dtype)

  def body(refs):
    j = pl.program_id(0)
    k = refs["k"][...]
    v = refs["v"][...]
    far_k = refs["far_k"][...] if cfg.has_far else None
    k_pos = refs["k_pos"][...]
    k_seg = refs["kv_seg"][...] if cfg.has_segments else None
    slope = x.slope(refs)
    row = x.bias_row(refs)
    head = pl.program_id(2)
    k_index = j * bk + jnp.arange(bk)
    count, num_full = refs["sched"][0], refs["sched"][1]

    def step(masked_block, r, carry):
      dk, dv, dfk, visits = carry
      entry = refs["sched"][r + 2]
      start = pl.multiple_of(tiles.entry_block(entry) * bq, bq)
      qs = pl.ds(start, bq)
      q = refs["q"][qs, :]
      do_ = refs["do"][qs, :]
      far_q = refs["far_q"][qs, :] if cfg.has_far else None
      q_pos = refs["q_pos"][qs]
      dist = tiles.tile_distance(q_pos, k_pos)
      bias = None if row is None else x.bias.tile(row, q_pos[:, None],
                                                  k_pos[None, :])
      s, aux = tiles.tile_logits(cfg, q, k, dist, slope=slope, far_q=far_q,
                                 far_k=far_k, bias=bias, precision=precision)

      def masked(s):
        q_seg = refs["q_seg"][qs] if cfg.has_segments else None
        return layout.visible_masked(cfg, s, q_pos, k_pos, q_seg, k_seg,
                                     start + jnp.arange(bq), k_index, head)

      if masked_block:
        s = masked(s)
      p = tiles.tile_probs(s, refs["lse"][qs])
      dv = dv + tiles.dot_tn(p.astype(do_.dtype), do_, precision)
      dp = tiles.dot_nt(do_, v, precision)
      ds = p * (dp - refs["delta"][qs][:, None])
      ds, ds_far, _ = tiles.tile_dlogits(cfg, ds, aux, dist)
      dk = dk + tiles.dot_tn(ds.astype(q.dtype), q, precision)
      if cfg.has_far:
        dfk = dfk + tiles.dot_tn(ds_far.astype(q.dtype), far_q, precision)
      return dk, dv, dfk, visits + 1

    zeros = jnp.zeros((bk, x.hp), jnp.float32)
    init = (zeros, jnp.zeros((bk, x.hvp), jnp.float32),
            zeros if cfg.has_far else jnp.float32(0), jnp.int32(0))
    carry = lax.fori_loop(0, num_full, functools.partial(step, False), init)
    dk, dv, dfk, visits = lax.fori_loop(num_full, count,
                                        functools.partial(step, True), carry)
    refs["dk"][...] = dk
    refs["dv"][...] = dv
    if cfg.has_far:
      refs["dfar_k"][...] = dfk
    if static.debug:
      refs["visits"][...] = jnp.full((bk,), visits, jnp.int32)

  inputs = [("q", x.q, x.q_whole(x.hp)),
            ("k", x.k, x.kv_block(bk, x.hp)), ("v", x.v, x.kv_block(bk, x.hvp)),
            ("do", do, x.q_whole(x.hvp)),
            ("lse", lse, x.stat_whole()), ("delta", delta, x.stat_whole()),
            ("q_pos", x.q_pos, x.rows_whole(x.q_pos)),
            ("k_pos", x.k_pos, x.rows_block(x.k_pos, bk)),
            ("sched", sched, x.sched_spec(sched))]
  if cfg.has_segments:
    inputs += [("q_seg", x.q_seg, x.rows_whole(x.q_seg)),
               ("kv_seg", x.kv_seg, x.rows_block(x.kv_seg, bk))]
  if cfg.has_slopes:
    inputs.append(("slopes", x.slopes, x.slopes_spec()))
  if cfg.has_far:
    inputs += [("far_q", x.far_q, x.q_whole(x.hp)),
               ("far_k", x.far_k, x.kv_block(bk, x.hp))]
  inputs += x.bias_inputs()
  # Per query head; the G heads sharing a key/value head are summed after.
  per_head = lambda hp: pl.BlockSpec((None, bk, None, hp),
                                     lambda j, b, h: (b, j, h, 0))
  shape = lambda hp: jax.ShapeDtypeStruct((x.b, x.sp, x.n, hp), jnp.float32)
  outputs = [("dk", shape(x.hp), per_head(x.hp)),
             ("dv", shape(x.hvp), per_head(x.hvp))]
  if cfg.has_far:
    outputs.append(("dfar_k", shape(x.hp), per_head(x.hp)))
  if static.debug:
    outputs.append(("visits", jax.ShapeDtypeStruct((x.b, x.n, x.sp),
                                                   jnp.int32),
                    pl.BlockSpec((None, None, bk), lambda j, b, h: (b, h, j))))
  res = layout.program(static, "dkv", body, (x.sp // bk, x.b, x.n), inputs,
                       outputs, x.hp)
  res = dict(zip([name for name, _, _ in outputs], res))
  if static.debug:
    res["visits"] = res["visits"][:, :, ::bk]
  return res


def gradients(static, args, out_p, lse_p, cotangents):
  """d(q, k, v, ...) as a dict (and the visit counters when debugging)."""
  q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q, far_k, bias_rows = args
  d_out, d_lse = cotangents
  v = tiles.backward_values(v)
  x = layout.Inputs(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes,
                    far_q, far_k, bias_rows)
  b, t, n, h = q.shape
  s, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
  do = tiles.pad_to(tiles.pad_to(d_out.astype(q.dtype), 1, x.tp), 3, x.hvp)
  # delta = rowsum(dO * O) - dLSE, the softmax backward's per-row term.
  delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32),
                     out_p.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - tiles.pad_to(d_lse.astype(jnp.float32), 2, x.tp)
  lse_p, delta = tiles.backward_stats(lse_p, delta)
  dq_res = backward_dq(static, x, do, lse_p, delta)
  dkv_res = backward_dkv(static, x, do, lse_p, delta)

  def per_kv_head(g, width):
    g = g[:, :s, :, :width].reshape(b, s, kh, n // kh, width)
    return g.sum(3)

  grads = {"dq": dq_res["dq"][:, :t, :, :h].astype(q.dtype),
           "dk": per_kv_head(dkv_res["dk"], h).astype(k.dtype),
           "dv": per_kv_head(dkv_res["dv"], hv).astype(v.dtype)}
  if far_q is not None:
    grads["dfar_q"] = dq_res["dfar_q"][:, :t, :, :h].astype(far_q.dtype)
    grads["dfar_k"] = per_kv_head(dkv_res["dfar_k"], h).astype(far_k.dtype)
  if slopes is not None:
    grads["dslopes"] = tiles.slopes_grad(dq_res["dslope_rows"][:, :, :t],
                                         slopes)
  if bias_rows is not None:
    grads["dbias_rows"] = dq_res["dbias_rows"].sum((0, 2))
  if static.debug:
    grads["visits_dq"] = dq_res["visits"]
    grads["visits_dkv"] = dkv_res["visits"]
  return grads
