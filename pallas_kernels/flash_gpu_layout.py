"""Host side of the GPU flash kernels (``flash_gpu``): inputs and BlockSpecs.

``Inputs`` pads q, k, v, positions, segment ids, ALiBi slopes and the far
query / key to whole blocks (head dims to powers of two, as Triton tensors
need), builds each pass's block schedule (``tiles.row_labels`` ->
``tiles.split_schedule``) and names the BlockSpecs of the grid (block,
batch, query head) that the forward (``flash_gpu``) and the dq and dk/dv
kernels (``flash_gpu_backward``) share. ``program`` is their ``pallas_call``
over named inputs and outputs with the Triton launch settings;
``visible_masked`` masks one PARTIAL tile's logits.
"""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from . import tiles


def program(static, kind: str, body, grid, inputs, outputs, head_dim):
  """pallas_call over named (array, BlockSpec) inputs and outputs.

  static: the call's ``flash_gpu._Static``; kind: "fwd", "dq" or "dkv".
  """
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


class Inputs:
  """Padded kernel inputs shared by the three passes (``static``: the
  call's ``flash_gpu._Static``)."""

  def __init__(self, static, q, k, v, q_pos, k_pos, q_seg, kv_seg, slopes,
               far_q, far_k, bias_rows=None):
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


def visible_masked(cfg, s, q_pos, k_pos, q_seg, k_seg, q_index, k_index,
                   head):
  visible = tiles.tile_visible(cfg, q_pos, k_pos, q_seg, k_seg, k_index,
                               head=head)
  inside_q = jnp.broadcast_to((q_index < cfg.q_len)[:, None], s.shape)
  visible = inside_q if visible is None else visible & inside_q
  return tiles.apply_visible(s, visible)
