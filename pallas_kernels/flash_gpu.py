"""Flash attention for GPUs in Pallas (Triton lowering), forward and backward.

One program per (query block, batch, query head) for the forward and dq
passes, one per (key block, batch, query head) for the dk/dv pass. Each
program walks only its row (column) of the block schedule
(``tiles.split_schedule``): first its FULL blocks in a loop without masking,
then its PARTIAL blocks in a loop with the mask (no branch inside a loop, so
Triton can pipeline the loads). EMPTY blocks are never loaded or computed. The labels come
from ``masks.classify_blocks`` on the device (mask geometry plus per-block
position and segment min/max), so a new packing every batch costs no host
work and no recompilation.

In the kernel: the mask predicate, segment ids, ALiBi from the slope (never a
T x S tensor), soft cap, LM-Infinite's far query / key for distant pairs,
grouped-query attention (key/value head = query head // G), T != S and
ragged lengths (inputs are padded to whole blocks; padded rows and keys are
masked). Softmax statistics are float32.

Inputs are BTNH like ``dot_product_attention``. With ``interpret=True`` the
same kernels run in Pallas interpret mode on any backend (the tests).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from extrapolax.common.checks import check_int
from . import bias_params
from . import tiles

Array = jax.Array


def _check_block(name, value):
  check_int(name, value, 1)
  if value & (value - 1):
    raise ValueError(f"{name} must be a power of two, got {value}")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the GPU kernels (powers of two; 16 or more on a GPU).

  block_q, block_k: forward. block_q_dq, block_k_dq: the dq pass.
  block_q_dkv, block_k_dkv: the dk/dv pass. num_warps / num_stages: Triton
  launch settings of the forward, ``*_bwd`` of the two backward passes
  (num_warps None: 4 for head_dim <= 64, else 8).
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  # Defaults from benchmarks/attention_gpu.py --tune on an H100 (causal,
  # T = 16k, bf16, head_dim 128 and 64; benchmarks/results/
  # attention_gpu_tune.json): 4 warps beat 8 by 2x in the backward.
  num_warps: Optional[int] = 4
  num_stages: int = 3
  num_warps_bwd: Optional[int] = 4
  num_stages_bwd: int = 2

  def __post_init__(self):
    for f in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv",
              "block_k_dkv"):
      _check_block(f, getattr(self, f))
    for f in ("num_warps", "num_warps_bwd"):
      if getattr(self, f) is not None:
        _check_block(f, getattr(self, f))
    for f in ("num_stages", "num_stages_bwd"):
      check_int(f, getattr(self, f), 1)

  def check_hardware(self):
    """Triton's matrix units need tiles of at least 16."""
    for f in ("block_q", "block_k", "block_q_dq", "block_k_dq",
              "block_q_dkv", "block_k_dkv"):
      if getattr(self, f) < 16:
        raise ValueError(f"{f}={getattr(self, f)} must be >= 16 on a GPU "
                         "(smaller tiles only run in interpret mode)")

  @property
  def q_multiple(self):
    return max(self.block_q, self.block_q_dq, self.block_q_dkv)

  @property
  def k_multiple(self):
    return max(self.block_k, self.block_k_dq, self.block_k_dkv)


@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: tiles.TileConfig
  blocks: BlockSizes
  num_kv_heads: int
  interpret: bool
  debug: bool
  bias: Optional[bias_params.BiasLayout] = None


def _program(static: _Static, kind: str, body, grid, inputs, outputs,
             head_dim):
  """pallas_call over named (array, BlockSpec) inputs and outputs."""
  names = [name for name, _, _ in inputs]
  arrays = [a for _, a, _ in inputs]
  in_specs = [spec for _, _, spec in inputs]
  out_names = [name for name, _, _ in outputs]

  def kernel(*refs):
    refs = dict(zip(names + out_names, refs))
    body(refs)

  blocks = static.blocks
  warps, stages = ((blocks.num_warps, blocks.num_stages) if kind == "fwd" else
                   (blocks.num_warps_bwd, blocks.num_stages_bwd))
  warps = warps or (4 if head_dim <= 64 else 8)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs,
      out_specs=[spec for _, _, spec in outputs],
      out_shape=[shape for _, shape, _ in outputs],
      compiler_params=pltriton.CompilerParams(
          num_warps=warps, num_stages=stages),
      interpret=static.interpret, name=f"extrapolax_flash_{kind}")(*arrays)


class _Inputs:
  """Padded kernel inputs shared by the three passes."""

  def __init__(self, static: _Static, q, k, v, q_pos, k_pos, q_seg, kv_seg,
               slopes, far_q, far_k, bias_rows=None):
    blocks = static.blocks
    self.bias, self.bias_rows = static.bias, bias_rows
    b, t, n, h = q.shape
    s, hv = k.shape[1], v.shape[-1]
    self.b, self.n, self.kh = b, n, k.shape[2]
    self.g = n // self.kh
    self.tp = -(-t // blocks.q_multiple) * blocks.q_multiple
    self.sp = -(-s // blocks.k_multiple) * blocks.k_multiple
    self.hp = max(tiles.next_power_of_2(h), 16)
    self.hvp = max(tiles.next_power_of_2(hv), 16)
    pad_q = lambda x, hp: tiles.pad_to(tiles.pad_to(x, 1, self.tp), 3, hp)
    pad_k = lambda x, hp: tiles.pad_to(tiles.pad_to(x, 1, self.sp), 3, hp)
    self.q, self.k, self.v = pad_q(q, self.hp), pad_k(k, self.hp), pad_k(
        v, self.hvp)
    self.far_q = None if far_q is None else pad_q(far_q, self.hp)
    self.far_k = None if far_k is None else pad_k(far_k, self.hp)
    self.raw_pos = (q_pos, k_pos, q_seg, kv_seg)
    self.q_pos = tiles.pad_to(q_pos, 1, self.tp)
    self.k_pos = tiles.pad_to(k_pos, 1, self.sp)
    self.q_seg = None if q_seg is None else tiles.pad_to(q_seg, 1, self.tp)
    self.kv_seg = None if kv_seg is None else tiles.pad_to(kv_seg, 1, self.sp)
    self.slopes = None
    self.slopes_batched = False
    if slopes is not None:
      self.slopes_batched = slopes.shape[0] > 1
      flat = slopes.astype(jnp.float32).reshape(-1)
      self.slopes = tiles.pad_to(flat, 0, tiles.next_power_of_2(flat.size))

  def labels(self, cfg, block_q, block_k, transpose=False):
    """Schedule [Bl, Nl, rows, W] for a pass's block sizes (grid-shaped;
    Nl = N for a per-head mask, else 1)."""
    q_pos, k_pos, q_seg, kv_seg = self.raw_pos
    labels = tiles.row_labels(cfg, block_q, block_k, q_pos, k_pos, q_seg,
                              kv_seg)
    bl, nl = labels.shape[:2]
    nq, nk = self.tp // block_q, self.sp // block_k
    labels = jnp.pad(labels, ((0, 0), (0, 0), (0, nq - labels.shape[2]),
                              (0, nk - labels.shape[3])))   # EMPTY == 0
    if transpose:
      labels = jnp.swapaxes(labels, 2, 3)
    rows, cols = labels.shape[2:]
    sched = tiles.split_schedule(labels.reshape(bl * nl, rows, cols),
                                 tiles.next_power_of_2(cols + 2))
    return sched.reshape(bl, nl, rows, -1)

  # BlockSpec helpers. Grid axes are (block, batch, query head).
  def bsel(self, x):
    """Batch index for an input with a batch axis of 1 or B."""
    return (lambda b: b) if x.shape[0] > 1 else (lambda b: 0)

  def q_block(self, x, block, hp):
    return pl.BlockSpec((None, block, None, hp),
                        lambda i, b, h: (b, i, h, 0))

  def q_whole(self, hp):
    return pl.BlockSpec((None, self.tp, None, hp),
                        lambda j, b, h: (b, 0, h, 0))

  def kv_block(self, block, hp):
    g = self.g
    return pl.BlockSpec((None, block, None, hp),
                        lambda j, b, h: (b, j, h // g, 0))

  def kv_whole(self, hp):
    g = self.g
    return pl.BlockSpec((None, self.sp, None, hp),
                        lambda i, b, h: (b, 0, h // g, 0))

  def rows_block(self, x, block):
    sel = self.bsel(x)
    return pl.BlockSpec((None, block), lambda i, b, h: (sel(b), i))

  def rows_whole(self, x):
    sel = self.bsel(x)
    return pl.BlockSpec((None, x.shape[1]), lambda i, b, h: (sel(b), 0))

  def sched_spec(self, sched):
    sel = self.bsel(sched)
    hsel = (lambda h: h) if sched.shape[1] > 1 else (lambda h: 0)
    return pl.BlockSpec((None, None, None, sched.shape[3]),
                        lambda i, b, h: (sel(b), hsel(h), i, 0))

  def slopes_spec(self):
    return pl.BlockSpec((self.slopes.shape[0],), lambda i, b, h: (0,))

  def bias_spec(self):
    """Query head h's packed bias parameters (bias_params), [width]."""
    return pl.BlockSpec((None, self.bias.width), lambda i, b, h: (h, 0))

  def bias_inputs(self):
    if self.bias is None:
      return []
    return [("bias_rows", self.bias_rows, self.bias_spec())]

  def bias_row(self, refs):
    return refs["bias_rows"][...] if self.bias is not None else None

  def slope(self, refs):
    if self.slopes is None:
      return None
    b, h = pl.program_id(1), pl.program_id(2)
    row = b if self.slopes_batched else 0
    return refs["slopes"][row * self.n + h]

  def stat_block(self, block):
    return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))

  def stat_whole(self):
    return pl.BlockSpec((None, None, self.tp), lambda j, b, h: (b, h, 0))


def _visible_masked(cfg, s, q_pos, k_pos, q_seg, k_seg, q_index, k_index,
                    head):
  visible = tiles.tile_visible(cfg, q_pos, k_pos, q_seg, k_seg, k_index,
                               head=head)
  inside_q = jnp.broadcast_to((q_index < cfg.q_len)[:, None], s.shape)
  visible = inside_q if visible is None else visible & inside_q
  return tiles.apply_visible(s, visible)


def _forward(static: _Static, x: _Inputs):
  cfg, blocks = static.cfg, static.blocks
  bq, bk = blocks.block_q, blocks.block_k
  nq = x.tp // bq
  sched = x.labels(cfg, bq, bk)
  precision = tiles.precision_for(x.q.dtype)

  def body(refs):
    i = pl.program_id(0)
    q = refs["q"][...]
    q_pos = refs["q_pos"][...]
    q_seg = refs["q_seg"][...] if cfg.has_segments else None
    far_q = refs["far_q"][...] if cfg.has_far else None
    slope = x.slope(refs)
    row = x.bias_row(refs)
    head = pl.program_id(2)
    q_index = i * bq + jnp.arange(bq)
    count, num_full = refs["sched"][0], refs["sched"][1]

    def step(masked_block, r, carry):
      m, l, acc, visits = carry
      entry = refs["sched"][r + 2]
      start = pl.multiple_of(tiles.entry_block(entry) * bk, bk)
      ks = pl.ds(start, bk)
      k_pos = refs["k_pos"][ks]
      dist = tiles.tile_distance(q_pos, k_pos)
      bias = None if row is None else x.bias.tile(row, q_pos[:, None],
                                                  k_pos[None, :])
      s, _ = tiles.tile_logits(
          cfg, q, refs["k"][ks, :], dist, slope=slope, far_q=far_q,
          far_k=refs["far_k"][ks, :] if cfg.has_far else None, bias=bias,
          precision=precision)

      def masked(s):
        k_seg = refs["kv_seg"][ks] if cfg.has_segments else None
        return _visible_masked(cfg, s, q_pos, k_pos, q_seg, k_seg, q_index,
                               start + jnp.arange(bk), head)

      if masked_block:
        s = masked(s)
      m, l, acc = tiles.online_softmax_step(m, l, acc, s, refs["v"][ks, :],
                                            precision)
      return m, l, acc, visits + 1

    init = (jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, x.hvp), jnp.float32), jnp.int32(0))
    carry = lax.fori_loop(0, num_full, functools.partial(step, False), init)
    m, l, acc, visits = lax.fori_loop(num_full, count,
                                      functools.partial(step, True), carry)
    out, lse = tiles.finish(m, l, acc)
    refs["o"][...] = out.astype(refs["o"].dtype)
    refs["lse"][...] = lse
    if static.debug:
      refs["visits"][...] = jnp.full((bq,), visits, jnp.int32)

  inputs = [("q", x.q, x.q_block(x.q, bq, x.hp)),
            ("k", x.k, x.kv_whole(x.hp)), ("v", x.v, x.kv_whole(x.hvp)),
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
  outputs = [
      ("o", jax.ShapeDtypeStruct((x.b, x.tp, x.n, x.hvp), x.q.dtype),
       x.q_block(x.q, bq, x.hvp)),
      ("lse", jax.ShapeDtypeStruct((x.b, x.n, x.tp), jnp.float32),
       x.stat_block(bq))]
  if static.debug:
    outputs.append(("visits", jax.ShapeDtypeStruct((x.b, x.n, x.tp),
                                                   jnp.int32),
                    x.stat_block(bq)))
  res = _program(static, "fwd", body, (nq, x.b, x.n), inputs, outputs, x.hp)
  visits = res[2][:, :, ::bq] if static.debug else None
  return res[0], res[1], visits


def _backward_dq(static: _Static, x: _Inputs, do, lse, delta):
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
        return _visible_masked(cfg, s, q_pos, k_pos, q_seg, k_seg, q_index,
                               start + jnp.arange(bk), head)

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
  res = _program(static, "dq", body, (x.tp // bq, x.b, x.n), inputs, outputs,
                 x.hp)
  res = dict(zip([name for name, _, _ in outputs], res))
  if static.debug:
    res["visits"] = res["visits"][:, :, ::bq]
  return res


def _backward_dkv(static: _Static, x: _Inputs, do, lse, delta):
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
        return _visible_masked(cfg, s, q_pos, k_pos, q_seg, k_seg,
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
  res = _program(static, "dkv", body, (x.sp // bk, x.b, x.n), inputs,
                 outputs, x.hp)
  res = dict(zip([name for name, _, _ in outputs], res))
  if static.debug:
    res["visits"] = res["visits"][:, :, ::bk]
  return res


def _run_forward(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q,
                 far_k, bias_rows):
  k, v, far_k = tiles.forward_keys(k, v, far_k)
  x = _Inputs(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q,
              far_k, bias_rows)
  out, lse, visits = _forward(static, x)
  t, hv = q.shape[1], v.shape[-1]
  return out[:, :t, :, :hv], lse[:, :, :t], visits, (out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q,
           far_k, bias_rows):
  out, lse, _, _ = _run_forward(static, q, k, v, q_pos, k_pos, q_seg, kv_seg,
                                slopes, far_q, far_k, bias_rows)
  return out, lse


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
  x = _Inputs(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q,
              far_k, bias_rows)
  b, t, n, h = q.shape
  s, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
  do = tiles.pad_to(tiles.pad_to(d_out.astype(q.dtype), 1, x.tp), 3, x.hvp)
  # delta = rowsum(dO * O) - dLSE, the softmax backward's per-row term.
  delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32),
                     out_p.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - tiles.pad_to(d_lse.astype(jnp.float32), 2, x.tp)
  lse_p, delta = tiles.backward_stats(lse_p, delta)
  dq_res = _backward_dq(static, x, do, lse_p, delta)
  dkv_res = _backward_dkv(static, x, do, lse_p, delta)

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


_flash.defvjp(_flash_fwd, _flash_bwd)


def make_static(*, mask, scale, soft_cap, far_window, has_segments,
                has_slopes, has_far, q_len, kv_len, num_kv_heads,
                block_sizes: BlockSizes, interpret: bool, debug: bool = False,
                position_bias=None):
  """Static configuration of one call. ``position_bias``: a RelativeBias
  (its structure and shapes are kept; ``flash_attention`` takes its values)
  or None."""
  cfg = tiles.TileConfig(mask=mask, scale=float(scale), soft_cap=soft_cap,
                         far_window=far_window, has_segments=has_segments,
                         has_slopes=has_slopes, has_far=has_far, q_len=q_len,
                         kv_len=kv_len)
  # Triton tensors have power-of-two sizes.
  bias = bias_params.layout_for(position_bias, lanes=16, power_of_2=True)
  return _Static(cfg=cfg, blocks=block_sizes, num_kv_heads=num_kv_heads,
                 interpret=interpret, debug=debug, bias=bias)


def flash_attention(static: _Static, q, k, v, q_pos, k_pos, q_seg=None,
                    kv_seg=None, slopes=None, far_q=None, far_k=None,
                    position_bias=None):
  """(out [B, T, N, Hv], lse float32 [B, N, T]); differentiable in q, k, v,
  slopes, far_q, far_k and position_bias's parameters (the bias given to
  make_static, evaluated per tile in the kernels)."""
  return _flash(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q,
                far_k, bias_params.pack_for(static.bias, position_bias))


def visit_counts(static: _Static, q, k, v, q_pos, k_pos, q_seg=None,
                 kv_seg=None, slopes=None, far_q=None, far_k=None,
                 position_bias=None):
  """Blocks each program of the three kernels actually computed (debug).

  Returns dict fwd [B, N, nq], dq [B, N, nq_dq], dkv [B, N, nk_dkv]: the
  loop-trip counters of the kernels, for tests that prove skipping.
  """
  static = dataclasses.replace(static, debug=True)
  args = (q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q, far_k,
          bias_params.pack_for(static.bias, position_bias))
  out, lse, visits, (out_p, lse_p) = _run_forward(static, *args)
  grads = _gradients(static, args, out_p, lse_p,
                     (jnp.ones_like(out), jnp.zeros_like(lse)))
  return {"fwd": visits, "dq": grads["visits_dq"],
          "dkv": grads["visits_dkv"]}
