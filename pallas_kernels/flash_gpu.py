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

This module holds the block sizes, the forward kernel, the custom VJP and
the public functions; ``flash_gpu_layout`` the padded inputs, schedules,
BlockSpecs and the ``pallas_call`` wrapper; ``flash_gpu_backward`` the dq
and dk/dv kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from extrapolax.common.checks import check_int
from . import bias_params
from . import flash_gpu_backward
from . import flash_gpu_layout as layout
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


def _forward(static: _Static, x: layout.Inputs):
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
        return layout.visible_masked(cfg, s, q_pos, k_pos, q_seg, k_seg,
                                     q_index, start + jnp.arange(bk), head)

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
  res = layout.program(static, "fwd", body, (nq, x.b, x.n), inputs, outputs,
                       x.hp)
  visits = res[2][:, :, ::bq] if static.debug else None
  return res[0], res[1], visits


def _run_forward(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes, far_q,
                 far_k, bias_rows):
  k, v, far_k = tiles.forward_keys(k, v, far_k)
  x = layout.Inputs(static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes,
                    far_q, far_k, bias_rows)
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
  grads = flash_gpu_backward.gradients(static, args, out_p, lse_p,
                                       cotangents)
  return (grads["dq"], grads["dk"], grads["dv"], None, None, None, None,
          grads.get("dslopes"), grads.get("dfar_q"), grads.get("dfar_k"),
          grads.get("dbias_rows"))


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
  grads = flash_gpu_backward.gradients(
      static, args, out_p, lse_p, (jnp.ones_like(out), jnp.zeros_like(lse)))
  return {"fwd": visits, "dq": grads["visits_dq"],
          "dkv": grads["visits_dkv"]}
