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
import numpy as np

from extrapolax.common.checks import check_int
from . import bias_params
from . import tiles

Array = jax.Array

LANES = 128
SUBLANES = 8
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


def _round_up(x, m):
  return -(-x // m) * m


def _lanes(x, width):
  """(rows, 128) lane-replicated -> (rows, width), by tiling or slicing."""
  if width % LANES == 0:
    return x if width == LANES else jnp.tile(x, (1, width // LANES))
  assert width < LANES, width         # interpret-mode blocks only
  return x[:, :width]


def _sublanes(x, height):
  """(8, cols) sublane-replicated -> (height, cols), a sublane broadcast."""
  return jnp.broadcast_to(x[:1], (height, x.shape[1]))


def _as_rows(col):
  """(rows, 128) lane-replicated column -> (8, rows) for a row output."""
  return col.T[:SUBLANES]


@dataclasses.dataclass(frozen=True)
class _Rows:
  """Flat schedule (no SMEM padding): rows x (1 + C), per batch or not and
  per query head (``heads`` > 1: a per-head mask) or not."""
  rows: int
  width: int
  batched: bool
  heads: int = 1

  def base(self, b, row, h=0):
    lead = (b if self.batched else 0) * self.heads + (
        h if self.heads > 1 else 0)
    return (lead * self.rows + row) * self.width

  def count(self, sched, b, row, h=0):
    return sched[self.base(b, row, h)]

  def entry(self, sched, b, row, slot, h=0):
    return sched[self.base(b, row, h) + 1 + slot]

  def block(self, sched, b, row, slot, h=0):
    return tiles.entry_block(self.entry(sched, b, row, slot, h))


def _carry_empty_rows(sched):
  """Rows with nothing to visit name the last block of the last busy row.

  The grid walks the rows of one batch and head in order, so such a row
  names a block already in VMEM and costs no DMA either.
  """
  count, last = sched[..., 0], sched[..., -1]
  rows = jnp.arange(count.shape[1])[None, :]
  busy = lax.cummax(jnp.where(count > 0, rows, -1), axis=1)
  fill = jnp.where(busy >= 0, jnp.take_along_axis(
      last, jnp.maximum(busy, 0), axis=1), last)
  entries = jnp.where((count == 0)[..., None], fill[..., None], sched[..., 1:])
  return jnp.concatenate([count[..., None], entries], -1)


def _max_count(mask, q_len, kv_len, block_q, block_k, transpose):
  """Most non-empty blocks in a row for the default positions (static).

  The same "some pair visible" test as ``masks.classify_blocks``, on the
  host: default positions increase, so a block's bounds are its first and
  last positions. Segment ids only empty blocks, so this bounds every row
  of the runtime schedule.
  """
  def bounds(pos, block):
    last = np.minimum(np.arange(block - 1, pos.size + block - 1, block),
                      pos.size - 1)
    return pos[::block], pos[last]
  (q_lo, q_hi) = bounds(np.arange(q_len) + kv_len - q_len, block_q)
  (k_lo, k_hi) = bounds(np.arange(kv_len), block_k)
  with jax.ensure_compile_time_eval():   # jnp maths in a mask: concrete
    some, _ = tiles.geometry.mask_blocks(mask, q_lo[:, None], q_hi[:, None],
                                         k_lo[None], k_hi[None])
  some = np.broadcast_to(np.asarray(some), (q_lo.size, k_lo.size))
  return max(1, int(some.sum(0 if transpose else 1).max()))


def _bsel(x):
  return (lambda b: b) if x.shape[0] > 1 else (lambda b: 0)


class _Inputs:
  """Padded, TPU-laid-out kernel inputs shared by the three passes."""

  def __init__(self, static: _Static, q, k, v, q_pos, k_pos, q_seg, kv_seg,
               slopes, far_q, far_k, bias_rows=None):
    b, t, n, h = q.shape
    # Packed bias parameters [N, 1, width]: a head's row is a whole block.
    self.bias = static.bias
    self.bias_rows = None if bias_rows is None else bias_rows[:, None, :]
    s, hv = k.shape[1], v.shape[-1]
    self.cfg, self.default_positions = static.cfg, static.default_positions
    self.blocks = static.blocks.shrunk(
        t, s, SUBLANES if static.interpret else LANES)
    self.b, self.n, self.g = b, n, n // k.shape[2]
    self.tp = _round_up(t, self.blocks.q_multiple)
    self.sp = _round_up(s, self.blocks.k_multiple)
    self.hp, self.hvp = _round_up(h, LANES), _round_up(hv, LANES)
    self.q, self.far_q = (self.fuse(a, self.tp, self.hp) for a in (q, far_q))
    self.k, self.far_k = (self.fuse(a, self.sp, self.hp) for a in (k, far_k))
    self.v = self.fuse(v, self.sp, self.hvp)
    self.raw_pos = (q_pos, k_pos, q_seg, kv_seg)
    pad = lambda x, size: None if x is None else tiles.pad_to(x, 1, size)
    self.pos = dict(q_pos=pad(q_pos, self.tp), k_pos=pad(k_pos, self.sp),
                    q_seg=pad(q_seg, self.tp), kv_seg=pad(kv_seg, self.sp))
    self.slopes = self.slopes_batched = None
    if slopes is not None:
      self.slopes_batched = slopes.shape[0] > 1
      self.slopes = slopes.astype(jnp.float32).reshape(-1)

  @staticmethod
  def fuse(x, length, width):
    """[B, L, H, D] -> [B, L', H * D'] zero-padded (heads fused into lanes)."""
    if x is None:
      return None
    x = tiles.pad_to(tiles.pad_to(x, 1, length), 3, width)
    return x.reshape(x.shape[0], length, -1)

  def schedule(self, cfg, block_q, block_k, transpose=False):
    """(flat int32 schedule for scalar prefetch, its _Rows)."""
    q_pos, k_pos, q_seg, kv_seg = self.raw_pos
    labels = tiles.row_labels(cfg, block_q, block_k, q_pos, k_pos, q_seg,
                              kv_seg)                       # [Bl, Nl, ...]
    bl, nl = labels.shape[:2]
    nq, nk = self.tp // block_q, self.sp // block_k
    labels = jnp.pad(labels, ((0, 0), (0, 0), (0, nq - labels.shape[2]),
                              (0, nk - labels.shape[3])))   # EMPTY == 0
    if transpose:
      labels = jnp.swapaxes(labels, 2, 3)
    labels = labels.reshape((bl * nl,) + labels.shape[2:])
    sched = _carry_empty_rows(tiles.schedule(labels))
    return sched.reshape(-1), _Rows(sched.shape[1], sched.shape[2],
                                    bl > 1, nl)

  def slope(self, refs, b, h):
    if self.slopes is None:
      return None
    return refs["slopes"][(b if self.slopes_batched else 0) * self.n + h]


class _Pass:
  """One kernel's grid, schedule and BlockSpecs.

  Grid (b, h, r, slot) for the row passes (r: query block, the slots walk
  key blocks) and (b, r, h, slot) for the transposed dk/dv pass (r: key
  block, the slots walk query blocks). Index maps get (*grid, schedule).
  """

  def __init__(self, x: _Inputs, bq, bk, transpose):
    self.x, self.bq, self.bk, self.transpose = x, bq, bk, transpose
    self.nq, self.nk = x.tp // bq, x.sp // bk
    self.sched, self.rows = x.schedule(x.cfg, bq, bk, transpose)
    rows_n = self.nk if transpose else self.nq
    self.slots = self.nq if transpose else self.nk
    if x.default_positions and x.cfg.mask is not None:   # shrunk grid
      self.slots = min(self.slots, _max_count(
          x.cfg.mask, x.cfg.q_len, x.cfg.kv_len, bq, bk, transpose))
    self.grid = ((x.b, rows_n, x.n, self.slots) if transpose else
                 (x.b, x.n, rows_n, self.slots))
    # The tile is [bq, bk], or [bk, bq] when transposed.
    self.shape = (bk, bq) if transpose else (bq, bk)
    self.q_axis = 1 if transpose else 0

  def ids(self, *grid):
    """(b, h, r, slot) from grid indices."""
    b, u, w, t = grid[:4]
    return (b, w, u, t) if self.transpose else (b, u, w, t)

  def blocks(self, *args):
    """(query block, key block) at a grid point of an index map."""
    b, h, r, t = self.ids(*args)
    other = self.rows.block(args[4], b, r, t, h)
    return (other, r) if self.transpose else (r, other)

  def heads(self, side, width):
    """Spec of a fused-head array: side 'q' (query head) or 'k' (kv head)."""
    size = self.bq if side == "q" else self.bk
    g = 1 if side == "q" else self.x.g

    def index(*args):
      b, h, _, _ = self.ids(*args)
      # lax.div, not //: ids are >= 0, and floor division's sign fix-up
      # costs scalar instructions on every grid step.
      return (b, self.blocks(*args)[side == "k"],
              h if g == 1 else lax.div(h, g))
    return pl.BlockSpec((None, size, width), index)

  def positions(self, side, arr):
    """A position / segment array laid out as columns or rows for the tile."""
    if arr is None:
      return None, None
    size = self.bq if side == "q" else self.bk
    along_sublanes = (side == "q") != self.transpose
    sel = _bsel(arr)
    if along_sublanes:
      arr = jnp.broadcast_to(arr[:, :, None], arr.shape + (LANES,))
      index = lambda *a: (sel(a[0]), self.blocks(*a)[side == "k"], 0)
      return arr, pl.BlockSpec((None, size, LANES), index)
    arr = jnp.broadcast_to(arr[:, None, :],
                           (arr.shape[0], SUBLANES, arr.shape[1]))
    index = lambda *a: (sel(a[0]), 0, self.blocks(*a)[side == "k"])
    return arr, pl.BlockSpec((None, SUBLANES, size), index)

  def stat(self):
    """Per-query-row statistics [B, N, 8, Tp] (lse, delta, d slope)."""
    index = lambda *a: (a[0], self.ids(*a)[1], 0, self.blocks(*a)[0])
    return pl.BlockSpec((None, None, SUBLANES, self.bq), index)

  def inputs(self, do=None, lse_rows=None, delta_rows=None):
    """Every kernel's inputs, plus dO and the row statistics (backward)."""
    x, cfg = self.x, self.x.cfg
    ins = [("q", x.q, self.heads("q", x.hp)), ("k", x.k, self.heads("k", x.hp)),
           ("v", x.v, self.heads("k", x.hvp))]
    for name in ("q_pos", "k_pos") + (("q_seg", "kv_seg")
                                      if cfg.has_segments else ()):
      ins.append((name, *self.positions(name[0], x.pos[name])))
    if cfg.has_slopes:
      ins.append(("slopes", x.slopes, pl.BlockSpec(
          memory_space=pltpu.SMEM)))
    if cfg.has_far:
      ins += [("far_q", x.far_q, self.heads("q", x.hp)),
              ("far_k", x.far_k, self.heads("k", x.hp))]
    if x.bias is not None:
      ins.append(("bias_rows", x.bias_rows, pl.BlockSpec(
          (None, 1, x.bias.width), lambda *a: (self.ids(*a)[1], 0, 0))))
    if do is not None:
      ins += [("do", do, self.heads("q", x.hvp)), ("lse", lse_rows,
                                                   self.stat()),
              ("delta", delta_rows, self.stat())]
    return ins

  def tile(self, refs, masked, slope, bias_vjp=False):
    """(logits, backward aux, i - j) of the current tile; with
    ``bias_vjp``, also the position bias's VJP (d tile -> d row; None
    without a bias)."""
    cfg, (rows, cols) = self.x.cfg, self.shape
    spread = lambda nm, axis: (_lanes(refs[nm][...], cols) if axis == 0 else
                               _sublanes(refs[nm][...], rows))
    qa, ka = self.q_axis, 1 - self.q_axis
    q_pos, k_pos = spread("q_pos", qa), spread("k_pos", ka)
    dist = q_pos - k_pos
    bias = vjp = None
    if self.x.bias is not None:
      row = refs["bias_rows"][...]                        # (1, width)
      if bias_vjp:
        bias, vjp = self.x.bias.tile_and_vjp(row, q_pos, k_pos)
      else:
        bias = self.x.bias.tile(row, q_pos, k_pos)
    a, c = ("k", "q") if self.transpose else ("q", "k")
    far = lambda nm: refs[nm][...] if cfg.has_far else None
    s, aux = tiles.tile_logits(
        cfg, refs[a][...], refs[c][...], dist, slope=slope,
        far_q=far("far_" + a), far_k=far("far_" + c), bias=bias,
        precision=tiles.precision_for(self.x.q.dtype))
    if masked:
      qb, kb = refs["blocks"]
      index = lambda start, axis: start + lax.broadcasted_iota(
          jnp.int32, self.shape, axis)
      vis = [] if cfg.mask is None else [tiles.geometry.mask_predicate(
          cfg.mask, q_pos, k_pos, refs["head"])]
      if cfg.has_segments:
        vis.append(spread("q_seg", qa) == spread("kv_seg", ka))
      if self.x.tp > cfg.q_len:
        vis.append(index(qb * self.bq, qa) < cfg.q_len)
      if self.x.sp > cfg.kv_len:
        vis.append(index(kb * self.bk, ka) < cfg.kv_len)
      if vis:
        s = tiles.apply_visible(s, functools.reduce(jnp.logical_and, vis))
    return (s, aux, dist, vjp) if bias_vjp else (s, aux, dist)

  def call(self, static, kind, body, inputs, outputs, scratch):
    """pallas_call; body(refs, ids, step) with step(fn) running fn(masked)
    on scheduled slots only, and debug visit counters."""
    inputs = [(nm, a, sp) for nm, a, sp in inputs if a is not None]
    if static.debug:
      outputs = outputs + [("visits", jax.ShapeDtypeStruct(
          (self.x.b, self.x.n, SUBLANES, self.grid[2 - self.transpose] *
           LANES), jnp.int32), pl.BlockSpec(
               (None, None, SUBLANES, LANES),
               lambda *a: (a[0], self.ids(*a)[1], 0, self.ids(*a)[2])))]
      scratch = scratch + [("visit_count", pltpu.SMEM((1,), jnp.int32))]
    names = [nm for nm, *_ in inputs + outputs + scratch]

    def kernel(sched, *refs):
      refs = dict(zip(names, refs))
      b, h, r, t = self.ids(*(pl.program_id(a) for a in range(4)))
      count, entry = self.rows.count(sched, b, r, h), self.rows.entry(
          sched, b, r, t, h)
      other = tiles.entry_block(entry)
      refs["blocks"] = (other, r) if self.transpose else (r, other)
      refs["head"] = h
      if static.debug:
        pl.when(t == 0)(lambda: refs["visit_count"].__setitem__(0, 0))

      def step(fn):
        def run(masked):
          fn(masked)
          if static.debug:
            refs["visit_count"][0] += 1
        scheduled, full = t < count, tiles.entry_is_full(entry)
        pl.when(scheduled & full)(lambda: run(False))     # no mask maths
        pl.when(scheduled & jnp.logical_not(full))(lambda: run(True))

      body(refs, (b, h, r, t), step)
      if static.debug:
        pl.when(t == self.slots - 1)(lambda: refs["visits"].__setitem__(
            Ellipsis, jnp.full((SUBLANES, LANES), refs["visit_count"][0],
                               jnp.int32)))

    semantics = ("parallel", "parallel", "arbitrary" if self.transpose
                 else "parallel", "arbitrary")
    res = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=self.grid,
            in_specs=[sp for *_, sp in inputs],
            out_specs=[sp for *_, sp in outputs],
            scratch_shapes=[sh for _, sh in scratch]),
        out_shape=[sh for _, sh, _ in outputs],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=semantics,
            vmem_limit_bytes=static.blocks.vmem_limit_bytes),
        interpret=static.interpret or False,
        name=f"extrapolax_flash_tpu_{kind}")(self.sched,
                                             *[a for _, a, _ in inputs])
    res = dict(zip([nm for nm, *_ in outputs], res))
    if static.debug:
      res["visits"] = res["visits"][:, :, 0, ::LANES]
    return res


def _zero(refs, names):
  for nm in names:
    refs[nm][...] = jnp.zeros_like(refs[nm])


def _flush(refs, names):
  """Accumulators (float32 scratch) to their outputs."""
  for nm in names:
    refs[nm][...] = refs[nm + "_acc"][...].astype(refs[nm].dtype)


def _forward(static: _Static, x: _Inputs):
  p = _Pass(x, x.blocks.block_q, x.blocks.block_k, transpose=False)
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
      probs = jnp.exp(s - _lanes(m_safe, p.bk))
      alpha = jnp.exp(m_prev - m_safe)
      l_ref[...] = alpha * l_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
      m_ref[...] = m_next
      v = refs["v"][...]
      acc_ref[...] = (_lanes(alpha, x.hvp) * acc_ref[...] +
                      tiles.dot_nn(probs.astype(v.dtype), v, precision))

    @pl.when(t == p.slots - 1)
    def _():
      l, m = l_ref[...], m_ref[...]
      seen = l > 0                             # rows that saw nothing: 0
      l_safe = jnp.where(seen, l, 1.0)
      out = acc_ref[...] / _lanes(l_safe, x.hvp)
      refs["o"][...] = out.astype(refs["o"].dtype)
      lse = jnp.where(seen, tiles.safe_max(m) + jnp.log(l_safe), -jnp.inf)
      # A row that saw a flagged value row (tiles.forward_keys): l is nan.
      lse = jnp.where(jnp.isnan(l), jnp.nan, lse)
      refs["lse"][...] = _as_rows(lse)

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


def _backward_dq(static: _Static, x: _Inputs, do, lse_rows, delta_rows):
  cfg = static.cfg
  p = _Pass(x, x.blocks.block_q_dq, x.blocks.block_k_dq, transpose=False)
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
        refs["dslope_rows"][...] = _as_rows(refs["dslope_acc"][...])
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


def _backward_dkv(static: _Static, x: _Inputs, do, lse_rows, delta_rows):
  """Transposed tiles [bk, bq]; accumulates over the G heads of a kv head."""
  cfg, g = static.cfg, x.g
  p = _Pass(x, x.blocks.block_q_dkv, x.blocks.block_k_dkv, transpose=True)
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
      row = lambda nm: _sublanes(refs[nm][...], p.bk)      # (bk, bq)
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
  x = _Inputs(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q,
              far_k, bias_rows)
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
  x = _Inputs(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q,
              far_k, bias_rows)
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
