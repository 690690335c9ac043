"""Host side and grid plumbing of the TPU flash kernels (``flash_tpu``).

* ``Inputs``: q, k, v and the far query / key zero-padded and with heads
  fused into lanes ([B, L, N * H], H a multiple of 128), positions and
  segment ids padded, and each pass's flat block schedule for scalar
  prefetch (``tiles.schedule``; rows with nothing to visit repeat the last
  busy row's block, so they cost no DMA).
* ``max_count``: the busiest schedule row for the default positions, found
  on the host: the shrunk slot axis of the grid.
* ``Pass``: one kernel's grid, its BlockSpecs (index maps name the current
  slot's block), the current tile's logits and mask (``Pass.tile``, called
  in the kernel body) and the ``pallas_call`` with debug visit counters.
* ``spread_lanes`` / ``spread_sublanes`` / ``as_rows``: reshapes between
  lane-replicated columns, sublane-replicated rows and tiles.

The kernel bodies (forward, dq, dk/dv) are in ``flash_tpu``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from . import tiles

LANES = 128
SUBLANES = 8


def _round_up(x, m):
  return -(-x // m) * m


def spread_lanes(x, width):
  """(rows, 128) lane-replicated -> (rows, width), by tiling or slicing."""
  if width % LANES == 0:
    return x if width == LANES else jnp.tile(x, (1, width // LANES))
  assert width < LANES, width         # interpret-mode blocks only
  return x[:, :width]


def spread_sublanes(x, height):
  """(8, cols) sublane-replicated -> (height, cols), a sublane broadcast."""
  return jnp.broadcast_to(x[:1], (height, x.shape[1]))


def as_rows(col):
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


def max_count(mask, q_len, kv_len, block_q, block_k, transpose):
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


class Inputs:
  """Padded, TPU-laid-out kernel inputs shared by the three passes
  (``static``: the call's ``flash_tpu._Static``)."""

  def __init__(self, static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes,
               far_q, far_k, bias_rows=None):
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


class Pass:
  """One kernel's grid, schedule and BlockSpecs.

  Grid (b, h, r, slot) for the row passes (r: query block, the slots walk
  key blocks) and (b, r, h, slot) for the transposed dk/dv pass (r: key
  block, the slots walk query blocks). Index maps get (*grid, schedule).
  """

  def __init__(self, x: Inputs, bq, bk, transpose):
    self.x, self.bq, self.bk, self.transpose = x, bq, bk, transpose
    self.nq, self.nk = x.tp // bq, x.sp // bk
    self.sched, self.rows = x.schedule(x.cfg, bq, bk, transpose)
    rows_n = self.nk if transpose else self.nq
    self.slots = self.nq if transpose else self.nk
    if x.default_positions and x.cfg.mask is not None:   # shrunk grid
      self.slots = min(self.slots, max_count(
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
    spread = lambda nm, axis: (spread_lanes(refs[nm][...], cols)
                               if axis == 0 else
                               spread_sublanes(refs[nm][...], rows))
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
