"""Relative position biases as functions of (head, query pos, key pos).

``positional.t5_bias`` and friends materialise a dense [B, N, T, S] bias:
quadratic memory. A ``RelativeBias`` instead says how to compute the bias of
any rectangle of (query position, key position) pairs from its learned
parameters, so an implementation can evaluate it per tile:

  ``bias.tile(q_pos [Bp, Tb], k_pos [Bp, Sb]) -> float32 [Bp, N, Tb, Sb]``

Pass one as ``dot_product_attention(..., position_bias=...)``. ``xla_chunked``
evaluates it on each visited block in the forward and the backward and
returns the gradient of its parameters (memory linear in length); every
other implementation gets it materialised once as a dense ``bias`` (``xla``
is the reference). The dense ``bias`` argument stays for arbitrary biases;
both may be given (they add).

A bias is a JAX pytree: its learned parameters are the leaves (arrays, any
float dtype; they receive gradients), its settings (bucket counts, the
variant) are static. Values equal the dense helpers of ``positional``:

* ``T5BucketBias(table, ...)``: ``table[bucket(j - i), h]``;
* ``KerpleBias(r1, r2, variant)``: log ``-r1_h log(1 + r2_h |i - j|)``, power
  ``-r1_h |i - j| ** r2_h`` (Chi et al. 2022; the caller keeps r1 > 0 and,
  for power, 0 < r2 <= 2);
* ``FireBias(w_in, b_in, w_out, b_out, c, threshold)``: FIRE's MLP
  ``Linear(1, H), ReLU, Linear(H, N)`` of the progressively interpolated
  distance (``positional.fire_bias``);
* ``AlibiBias(slopes)``: ``-slope_h |i - j|``, the trivial case (the
  ``alibi_slopes`` argument computes the same fused everywhere).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from extrapolax.common import checks
from . import positional

Array = jax.Array

KERPLE_VARIANTS = ("log", "power")

__all__ = ["RelativeBias", "T5BucketBias", "KerpleBias", "FireBias",
           "AlibiBias", "KERPLE_VARIANTS", "check_position_bias"]


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _distance(q_pos, k_pos):
  """float32 i - j [Bp, Tb, Sb] (subtracted as integers: exact)."""
  return (q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)


class RelativeBias:
  """Base: a bias from (head, query position, key position) and parameters.

  Subclasses are frozen dataclasses registered as pytrees (parameters as
  data fields, named in ``param_names``; settings as meta fields) and define
  ``num_heads``, ``tile(q_pos, k_pos)`` and ``check()``, and
  ``param_head_axes`` (each parameter's head axis or None; without it,
  context-parallel attention keeps the heads whole on every device).
  """
  param_names: ClassVar[tuple[str, ...]] = ()
  # Per parameter: the axis that indexes the heads, or None (shared by all
  # heads); context-parallel attention splits parameters along it.
  param_head_axes: ClassVar[tuple] = ()

  @property
  def num_heads(self) -> int:
    raise NotImplementedError

  def tile(self, q_pos: Array, k_pos: Array) -> Array:
    """float32 [Bp, N, Tb, Sb] for int positions [Bp, Tb] / [Bp, Sb]."""
    raise NotImplementedError

  def check(self) -> None:
    """Raises ValueError on bad parameter shapes or settings."""
    for name in self.param_names:
      x = getattr(self, name)
      dtype = getattr(x, "dtype", None)
      if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{type(self).__name__}.{name} must be a floating "
                         f"array, got {type(x).__name__} of dtype {dtype}")

  def dense(self, q_pos: Array, k_pos: Array) -> Array:
    """The whole bias: ``tile`` on every position (quadratic memory)."""
    return self.tile(jnp.atleast_2d(q_pos), jnp.atleast_2d(k_pos))


def _pytree(cls, data, meta=()):
  return jax.tree_util.register_dataclass(
      cls, data_fields=list(data), meta_fields=list(meta))


@dataclasses.dataclass(frozen=True)
class T5BucketBias(RelativeBias):
  """T5's bucketed bias: ``table[bucket(j - i), h]``, table [num_buckets, N].

  Buckets as ``positional.t5_relative_bucket``; num_buckets is the table's
  first axis.
  """
  table: Array
  bidirectional: bool = False
  max_distance: int = 128
  param_names: ClassVar[tuple[str, ...]] = ("table",)
  param_head_axes: ClassVar[tuple] = (1,)

  @property
  def num_heads(self):
    return self.table.shape[1]

  def check(self):
    super().check()
    if self.table.ndim != 2:
      raise ValueError(f"T5BucketBias.table must be [num_buckets, num_heads],"
                       f" got shape {self.table.shape}")
    positional._check_t5_args(self.bidirectional, self.table.shape[0],
                              self.max_distance)

  def tile(self, q_pos, k_pos):
    buckets = positional._t5_bucket(
        k_pos[:, None, :] - q_pos[:, :, None], self.bidirectional,
        self.table.shape[0], self.max_distance)          # [Bp, Tb, Sb]
    # Gather per head from the transposed table: [N, Bp, Tb, Sb].
    values = jnp.take(_f32(self.table).T, buckets, axis=1)
    return jnp.swapaxes(values, 0, 1)


_pytree(T5BucketBias, ["table"], ["bidirectional", "max_distance"])


@dataclasses.dataclass(frozen=True)
class KerpleBias(RelativeBias):
  """Kerple: ``-r1 log(1 + r2 |i - j|)`` ("log") or ``-r1 |i - j|^r2``
  ("power"); r1, r2 [N]."""
  r1: Array
  r2: Array
  variant: str = "log"
  param_names: ClassVar[tuple[str, ...]] = ("r1", "r2")
  param_head_axes: ClassVar[tuple] = (0, 0)

  @property
  def num_heads(self):
    return self.r1.shape[0]

  def check(self):
    super().check()
    checks.check_choice("variant", self.variant, KERPLE_VARIANTS)
    if self.r1.ndim != 1 or self.r1.shape != self.r2.shape:
      raise ValueError(f"KerpleBias r1 and r2 must both be [num_heads], got "
                       f"{self.r1.shape} and {self.r2.shape}")

  def tile(self, q_pos, k_pos):
    dist = jnp.abs(_distance(q_pos, k_pos))[:, None]       # [Bp, 1, Tb, Sb]
    r1 = _f32(self.r1)[None, :, None, None]
    r2 = _f32(self.r2)[None, :, None, None]
    if self.variant == "log":
      return 0.0 - r1 * jnp.log1p(r2 * dist)
    # |d|^r2 with a finite gradient in r2 at d = 0 (where it is 0).
    positive = dist > 0
    safe = jnp.where(positive, dist, 1.0)
    return jnp.where(positive, 0.0 - r1 * jnp.exp(r2 * jnp.log(safe)), 0.0)


_pytree(KerpleBias, ["r1", "r2"], ["variant"])


@dataclasses.dataclass(frozen=True)
class FireBias(RelativeBias):
  """FIRE: ``w_out . relu(w_in * x + b_in) + b_out`` of the progressively
  interpolated distance ``x = psi(i - j) / psi(max(i, L))`` (see
  ``positional.fire_bias``; |c| and |threshold| are used).

  Shapes: w_in [1, Hf], b_in [Hf], w_out [Hf, N], b_out [N] (nnx.Linear's
  kernel and bias), c and threshold scalars.
  """
  w_in: Array
  b_in: Array
  w_out: Array
  b_out: Array
  c: Array
  threshold: Array
  eps: float = 1e-6
  param_names: ClassVar[tuple[str, ...]] = (
      "w_in", "b_in", "w_out", "b_out", "c", "threshold")
  param_head_axes: ClassVar[tuple] = (None, None, 1, 0, None, None)

  @property
  def num_heads(self):
    return self.w_out.shape[1]

  def check(self):
    super().check()
    hidden = self.w_in.shape[-1] if self.w_in.ndim == 2 else None
    want = dict(w_in=(1, hidden), b_in=(hidden,),
                w_out=(hidden, self.w_out.shape[-1]),
                b_out=(self.w_out.shape[-1],), c=(), threshold=())
    for name, shape in want.items():
      got = getattr(self, name).shape
      if hidden is None or got != shape:
        raise ValueError(f"FireBias.{name} must have shape {shape} (w_in "
                         f"[1, hidden], w_out [hidden, num_heads]), got {got}")
    checks.check_number("eps", self.eps, positive=True)

  def tile(self, q_pos, k_pos):
    x = positional._fire_distance(self.c, self.threshold, q_pos, k_pos,
                                  self.eps)                  # [Bp, Tb, Sb]
    # Hidden units first, as plain matmuls ([Hf, 1] x [1, P], then [N, Hf]
    # x [Hf, P]): their VJPs are matmuls too, about 7x faster on the CPU
    # than the same maths written pair-major with a broadcast product.
    hidden = jax.nn.relu(_f32(self.w_in).T @ x.reshape(1, -1)
                         + _f32(self.b_in)[:, None])            # [Hf, P]
    out = _f32(self.w_out).T @ hidden + _f32(self.b_out)[:, None]  # [N, P]
    return jnp.swapaxes(out.reshape((out.shape[0],) + x.shape), 0, 1)


_pytree(FireBias, ["w_in", "b_in", "w_out", "b_out", "c", "threshold"],
        ["eps"])


@dataclasses.dataclass(frozen=True)
class AlibiBias(RelativeBias):
  """ALiBi: ``-slope_h |i - j|``, slopes [N]."""
  slopes: Array
  param_names: ClassVar[tuple[str, ...]] = ("slopes",)
  param_head_axes: ClassVar[tuple] = (0,)

  @property
  def num_heads(self):
    return self.slopes.shape[0]

  def check(self):
    super().check()
    if self.slopes.ndim != 1:
      raise ValueError(f"AlibiBias.slopes must be [num_heads], got shape "
                       f"{self.slopes.shape}")

  def tile(self, q_pos, k_pos):
    dist = jnp.abs(_distance(q_pos, k_pos))[:, None]
    return 0.0 - _f32(self.slopes)[None, :, None, None] * dist


_pytree(AlibiBias, ["slopes"])


def check_position_bias(position_bias, num_heads: int) -> RelativeBias:
  """``position_bias`` validated for a call with ``num_heads`` query heads."""
  if not isinstance(position_bias, RelativeBias):
    raise ValueError(
        "position_bias must be a RelativeBias (T5BucketBias, KerpleBias, "
        f"FireBias, AlibiBias), got {type(position_bias).__name__}")
  position_bias.check()
  if position_bias.num_heads != num_heads:
    raise ValueError(f"position_bias has {position_bias.num_heads} heads; "
                     f"the query has N={num_heads}")
  return position_bias
