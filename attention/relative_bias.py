"""Relative position biases as functions of (head, query pos, key pos).

``positional.t5_bias`` and friends materialise a dense [B, N, T, S] bias:
quadratic memory. A ``RelativeBias`` instead says how to compute the bias of
any rectangle of (query position, key position) pairs from its learned
parameters, so an implementation can evaluate it per tile:

  ``bias.tile(q_pos [Bp, Tb], k_pos [Bp, Sb]) -> float32 [Bp, N, Tb, Sb]``

Pass one as ``dot_product_attention(..., position_bias=...)``.
``xla_chunked`` and the Pallas kernels (``pallas_gpu``, ``pallas_tpu``)
evaluate it on each visited block in the forward and the backward and return
the gradient of its parameters (memory linear in length); every other
implementation gets it materialised once as a dense ``bias`` (``xla`` is the
reference). The dense ``bias`` argument stays for arbitrary biases; both may
be given (they add; the Pallas kernels take no dense bias).

Inside a kernel a bias is evaluated one head at a time by ``kernel_tile``:
the same values as ``tile`` written with elementwise maths and static loops
only (no gather, no matmul, no reshape: T5's table lookup becomes a select
over the buckets), reading its parameters through an accessor. ``head_axes``
says, per parameter, which axis indexes heads (None: shared by all heads),
so a kernel receives one row of scalars per head
(``pallas_kernels/bias_params.py``). A bias without ``kernel_tile`` is
refused by the Pallas kernels (NotImplementedError; auto falls through).

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
import functools
from typing import Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

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


# kernel_tile's parameter accessor: param(name, *index) -> float32 scalar,
# entry ``index`` of parameter ``name`` for the current head (head axis
# dropped).
ParamFn = Callable[..., Array]


class RelativeBias:
  """Base: a bias from (head, query position, key position) and parameters.

  Subclasses are frozen dataclasses registered as pytrees (parameters as
  data fields, named in ``param_names``; settings as meta fields) and define
  ``num_heads``, ``tile(q_pos, k_pos)`` and ``check()``, and
  ``head_axes`` (each parameter's head axis or None: the Pallas kernels
  slice parameters per head along it, context-parallel attention splits
  them across devices along it; without it, context-parallel attention
  keeps the heads whole on every device).
  """
  param_names: ClassVar[tuple[str, ...]] = ()
  # Per parameter (``param_names`` order): the axis that indexes heads, or
  # None for a parameter every head shares.  The Pallas kernels and
  # context-parallel attention both read it.
  head_axes: ClassVar[tuple[Optional[int], ...]] = ()

  @property
  def num_heads(self) -> int:
    raise NotImplementedError

  def tile(self, q_pos: Array, k_pos: Array) -> Array:
    """float32 [Bp, N, Tb, Sb] for int positions [Bp, Tb] / [Bp, Sb]."""
    raise NotImplementedError

  def kernel_tile(self, param: ParamFn, q_pos: Array, k_pos: Array) -> Array:
    """One head's bias inside a kernel: float32, the broadcast shape of
    int32 ``q_pos`` and ``k_pos`` ([r, 1] and [1, c], or both [r, c]; the
    maths is elementwise, so a transposed tile works too).

    ``param(name, *index)`` returns entry ``index`` of parameter ``name``
    for the current head (its head axis dropped) as a float32 scalar. Only
    settings and shapes may be read from ``self`` (its leaves are shape
    placeholders here), and only elementwise maths and static Python loops
    used, so that the body lowers in Pallas (Triton, Mosaic TPU) and
    ``jax.vjp`` of it with respect to the parameters does too. Values equal
    ``tile`` (up to float rounding where a sum is reordered).
    """
    raise NotImplementedError(
        f"{type(self).__name__} defines no kernel_tile (the Pallas kernels "
        "cannot evaluate it per tile)")

  @classmethod
  def has_kernel_tile(cls) -> bool:
    return cls.kernel_tile is not RelativeBias.kernel_tile

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
  head_axes: ClassVar[tuple[Optional[int], ...]] = (1,)

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

  def kernel_tile(self, param, q_pos, k_pos):
    """``table[bucket(j - i)]`` by comparisons and selects: within a side
    the bucket is a staircase in the distance, whose steps (``_t5_steps``)
    are found once on the host by the same ``_t5_bucket``; the last step a
    distance reaches picks the table entry, so values equal ``tile``'s
    exactly. Cost: one compare and one or two selects per bucket."""
    side, steps = _t5_steps(self.bidirectional, self.table.shape[0],
                            self.max_distance)
    rel = k_pos - q_pos
    if self.bidirectional:
      future = rel > 0
      distance = jnp.abs(rel)
      entry = lambda b: jnp.where(future, param("table", side + b),
                                  param("table", b))
    else:
      distance = jnp.maximum(-rel, 0)
      entry = lambda b: param("table", b)
    out = jnp.broadcast_to(entry(0), distance.shape)
    for b in range(1, side):
      out = jnp.where(distance >= steps[b], entry(b), out)
    return out


_pytree(T5BucketBias, ["table"], ["bidirectional", "max_distance"])


@functools.lru_cache(maxsize=None)
def _t5_steps(bidirectional: bool, num_buckets: int, max_distance: int):
  """(side, steps): ``steps[b]`` is the smallest distance whose bucket
  within a side is >= b (b < side), from ``positional._t5_bucket`` itself
  on distances 0..max_distance (the bucket is non-decreasing in the
  distance and saturates at ``side - 1`` by max_distance)."""
  side = num_buckets // 2 if bidirectional else num_buckets
  distance = np.arange(max_distance + 1, dtype=np.int32)
  with jax.ensure_compile_time_eval():
    buckets = np.asarray(positional._t5_bucket(
        jnp.asarray(-distance), bidirectional, num_buckets, max_distance))
  steps = tuple(int(np.argmax(buckets >= b)) for b in range(side))
  assert buckets[-1] == side - 1 and np.all(np.diff(buckets) >= 0), buckets
  return side, steps


@dataclasses.dataclass(frozen=True)
class KerpleBias(RelativeBias):
  """Kerple: ``-r1 log(1 + r2 |i - j|)`` ("log") or ``-r1 |i - j|^r2``
  ("power"); r1, r2 [N]."""
  r1: Array
  r2: Array
  variant: str = "log"
  param_names: ClassVar[tuple[str, ...]] = ("r1", "r2")
  head_axes: ClassVar[tuple[Optional[int], ...]] = (0, 0)

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
    return self._formula(r1, r2, dist)

  def _formula(self, r1, r2, dist):
    if self.variant == "log":
      return 0.0 - r1 * jnp.log1p(r2 * dist)
    # |d|^r2 with a finite gradient in r2 at d = 0 (where it is 0).
    positive = dist > 0
    safe = jnp.where(positive, dist, 1.0)
    return jnp.where(positive, 0.0 - r1 * jnp.exp(r2 * jnp.log(safe)), 0.0)

  def kernel_tile(self, param, q_pos, k_pos):
    dist = jnp.abs((q_pos - k_pos).astype(jnp.float32))
    return self._formula(param("r1"), param("r2"), dist)


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
  head_axes: ClassVar[tuple[Optional[int], ...]] = (
      None, None, 1, 0, None, None)

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

  def kernel_tile(self, param, q_pos, k_pos):
    """The MLP as a static loop over hidden units (scalar weights times
    the tile; ReLU as a select, whose gradient at 0 is 0 like relu's)."""
    c = jnp.abs(param("c"))
    threshold = jnp.abs(param("threshold"))
    rel = (q_pos - k_pos).astype(jnp.float32)
    query = q_pos.astype(jnp.float32)
    psi_rel = jnp.log1p(c * jnp.maximum(rel, 0.0))
    normaliser = jnp.log1p(c * jnp.maximum(query, threshold)) + self.eps
    x = psi_rel / normaliser
    out = jnp.broadcast_to(param("b_out"), x.shape)
    for u in range(self.w_in.shape[1]):
      h = param("w_in", 0, u) * x + param("b_in", u)
      out = out + param("w_out", u) * jnp.where(h > 0, h, 0.0)
    return out


_pytree(FireBias, ["w_in", "b_in", "w_out", "b_out", "c", "threshold"],
        ["eps"])


@dataclasses.dataclass(frozen=True)
class AlibiBias(RelativeBias):
  """ALiBi: ``-slope_h |i - j|``, slopes [N]."""
  slopes: Array
  param_names: ClassVar[tuple[str, ...]] = ("slopes",)
  head_axes: ClassVar[tuple[Optional[int], ...]] = (0,)

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

  def kernel_tile(self, param, q_pos, k_pos):
    return 0.0 - param("slopes") * jnp.abs((q_pos - k_pos).astype(
        jnp.float32))


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
