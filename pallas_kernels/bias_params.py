"""A relative position bias evaluated per tile inside the flash kernels.

A ``position_bias`` (``attention.relative_bias.RelativeBias``: T5 buckets,
Kerple, FIRE, ALiBi) travels into a kernel as its parameters, packed into
one float32 row per query head: the head's slice of every per-head
parameter and a copy of every shared one (``BiasLayout.pack``, plain JAX
outside the kernel, so autodiff of the packing returns each leaf's gradient
from the rows' gradient: per-head slices scattered back, shared ones summed
over heads). The bias object itself is static: its structure and shapes
(``skeleton``, leaves replaced by ``jax.ShapeDtypeStruct``) go in the
kernel's static settings.

In the kernel body, ``tile`` calls the bias's ``kernel_tile`` on the
current head's row and the tile's positions; ``tile_and_vjp`` also returns
the VJP with respect to the row, so the dq kernel turns a tile's d(logits)
into that tile's contribution to the row's gradient (summed per program,
written per program, summed outside). Each scalar is read from the row by a
masked sum (``_pick``): no slicing or scalar extraction, and its VJP is a
select, so the body and its VJP use only elementwise maths and reductions.

This module reads only the bias's public attributes (``param_names``,
``head_axes``, ``num_heads``, ``kernel_tile``); it imports nothing from
``attention``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BiasLayout:
  """Where each parameter entry of one head sits in its packed row.

  Attributes:
    skeleton: the bias with its leaves replaced by ShapeDtypeStructs (its
      settings and shapes; hashable).
    num_heads: N.
    fields: per parameter (name, offset in the row, per-head shape, head
      axis or None).
    width: the row length (entries past the parameters are zero).
  """
  skeleton: Any
  num_heads: int
  fields: tuple[tuple[str, int, tuple[int, ...], Optional[int]], ...]
  width: int

  @classmethod
  def of(cls, bias, *, lanes: int, power_of_2: bool) -> "BiasLayout":
    """The layout of ``bias``; rows padded to a multiple of ``lanes`` (and
    to a power of two where ``power_of_2``: Triton's tensors need it)."""
    names, axes = type(bias).param_names, type(bias).head_axes
    if len(axes) != len(names):
      raise ValueError(f"{type(bias).__name__}.head_axes {axes} must give "
                       f"one axis (or None) per parameter {names}")
    n = bias.num_heads
    fields, offset = [], 0
    for name, axis in zip(names, axes):
      shape = tuple(getattr(bias, name).shape)
      if axis is not None and shape[axis] != n:
        raise ValueError(f"{type(bias).__name__}.{name} has shape {shape}; "
                         f"its axis {axis} must be the {n} heads")
      per_head = shape if axis is None else shape[:axis] + shape[axis + 1:]
      fields.append((name, offset, per_head, axis))
      offset += math.prod(per_head)
    width = -(-max(offset, 1) // lanes) * lanes
    if power_of_2:
      width = 1 << (width - 1).bit_length()
    leaves, treedef = jax.tree.flatten(bias)
    skeleton = jax.tree.unflatten(treedef, [
        jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves])
    return cls(skeleton=skeleton, num_heads=n, fields=tuple(fields),
               width=width)

  def pack(self, bias) -> Array:
    """float32 [N, width]: row h holds head h's parameters."""
    n, cols = self.num_heads, []
    for name, _, per_head, axis in self.fields:
      x = jnp.asarray(getattr(bias, name)).astype(jnp.float32)
      if axis is None:
        cols.append(jnp.broadcast_to(x.reshape(1, -1),
                                     (n, math.prod(per_head))))
      else:
        cols.append(jnp.moveaxis(x, axis, 0).reshape(n, -1))
    rows = jnp.concatenate(cols, axis=1)
    return jnp.pad(rows, ((0, 0), (0, self.width - rows.shape[1])))

  def _param_fn(self, row):
    offsets = {name: (offset, per_head)
               for name, offset, per_head, _ in self.fields}

    def param(name, *index):
      offset, per_head = offsets[name]
      flat = int(np.ravel_multi_index(index, per_head)) if per_head else 0
      return _pick(row, offset + flat)
    return param

  def tile(self, row, q_pos, k_pos) -> Array:
    """float32 tile (the broadcast shape of q_pos and k_pos) of the head
    whose packed ``row`` ([width] or [1, width]) is given."""
    shape = jnp.broadcast_shapes(q_pos.shape, k_pos.shape)
    out = self.skeleton.kernel_tile(self._param_fn(row), q_pos, k_pos)
    return jnp.broadcast_to(out, shape).astype(jnp.float32)

  def tile_and_vjp(self, row, q_pos, k_pos):
    """(tile, vjp) with vjp(d_tile) -> d_row (row's shape)."""
    tile, vjp = jax.vjp(lambda r: self.tile(r, q_pos, k_pos), row)
    return tile, lambda d: vjp(d)[0]


def _pick(row, index: int) -> Array:
  """Entry ``index`` of ``row`` (any rank; its last axis indexed) as a
  float32 scalar: a masked sum."""
  lane = jax.lax.broadcasted_iota(jnp.int32, row.shape, row.ndim - 1)
  return jnp.sum(jnp.where(lane == index, row, 0.0))


def layout_for(position_bias, *, lanes: int, power_of_2: bool):
  """The layout of ``position_bias`` (None for None)."""
  if position_bias is None:
    return None
  return BiasLayout.of(position_bias, lanes=lanes, power_of_2=power_of_2)


def pack_for(layout: Optional[BiasLayout], position_bias) -> Optional[Array]:
  """``layout.pack(position_bias)``; both None or both given."""
  if (layout is None) != (position_bias is None):
    raise ValueError("position_bias must be given to both make_static and "
                     "flash_attention, or to neither")
  return None if layout is None else layout.pack(position_bias)
