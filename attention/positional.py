"""Position encodings as plain functions on ``jax.Array``.

Axis legend: B batch, T query length, S key length, N heads, H head dim.

Conventions (DESIGN.md):

* Without explicit positions, query ``t`` of ``T`` sits at absolute position
  ``S - T + t`` and key ``j`` at ``j`` (bottom-right alignment); see
  :func:`default_positions`. ``i`` is a query position and ``j`` a key
  position; ``i - j >= 0`` for keys in the query's past.
* Bias functions return float32 ``[N, T, S]`` for positions ``[T]`` / ``[S]``,
  or ``[B, N, T, S]`` when either position array carries a batch axis
  (``[B, T]`` / ``[B, S]``; a 1-D array is shared across the batch). They are
  dense helpers (plots, tests, the ``xla`` oracle); the fused implementations
  compute ALiBi themselves.
* Learned schemes (T5, Kerple, FIRE) take their parameters as arrays; the nnx
  layer that owns them lives elsewhere. Only static properties (shapes,
  dtypes, Python hyper-parameters) are validated here; values of traced arrays
  are the caller's responsibility (e.g. Kerple's r1, r2 > 0).

Every function is usable under ``jax.jit`` with its Python integer arguments
static.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from extrapolax.common import checks

from . import masks

__all__ = [
    "alibi_slopes",
    "alibi_bias",
    "relative_positions",
    "default_positions",
    "t5_relative_bucket",
    "t5_bias",
    "kerple_log_bias",
    "fire_bias",
    "sinusoidal_embedding",
    "randomized_positions",
    "self_extend_positions",
    "length_logit_scale",
]


# ----------------------------------------------------------------------------
# Validation helpers.
# ----------------------------------------------------------------------------


_check_int = checks.check_int


def _check_float(name: str, value, *, positive: bool = False) -> float:
  return checks.check_number(name, value, positive=positive)


def _as_array(x):
  """Arrays pass through; anything else becomes a NumPy array.

  The jitted cores take NumPy arrays directly (canonicalising int64/float64 to
  32 bits), which avoids a conversion dispatch per new shape in eager use.
  """
  return x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x)


def _numeric_positions(positions):
  """Positions as an array with an integer or float dtype."""
  positions = _as_array(positions)
  if not (jnp.issubdtype(positions.dtype, jnp.integer)
          or jnp.issubdtype(positions.dtype, jnp.floating)):
    raise ValueError(
        f"positions must have an integer or float dtype, got {positions.dtype}")
  return positions


def _check_positions(name: str, positions, *, integer: bool = False):
  positions = _as_array(positions)
  if positions.ndim not in (1, 2):
    raise ValueError(
        f"{name} must have shape [length] or [batch, length], got shape "
        f"{positions.shape}")
  kind = positions.dtype
  if integer and not jnp.issubdtype(kind, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {kind}")
  if not (jnp.issubdtype(kind, jnp.integer)
          or jnp.issubdtype(kind, jnp.floating)):
    raise ValueError(f"{name} must have an integer or float dtype, got {kind}")
  return positions


def _validate_pair(q_positions, k_positions, *, integer: bool = False):
  """Validates a (query, key) pair of position arrays; returns the arrays."""
  q = _check_positions("q_positions", q_positions, integer=integer)
  k = _check_positions("k_positions", k_positions, integer=integer)
  if q.ndim == 2 and k.ndim == 2 and q.shape[0] != k.shape[0]:
    raise ValueError(
        "q_positions and k_positions must have the same batch size, got "
        f"shapes {q.shape} and {k.shape}")
  return q, k


def _expand_pair(q: jax.Array, k: jax.Array):
  """(q [..., T, 1], k [..., 1, S]), broadcastable; int32 if both are integer.

  Called inside jitted code, on validated positions.
  """
  both_int = (jnp.issubdtype(q.dtype, jnp.integer)
              and jnp.issubdtype(k.dtype, jnp.integer))
  dtype = jnp.int32 if both_int else jnp.float32
  return q.astype(dtype)[..., :, None], k.astype(dtype)[..., None, :]


def _distance(q: jax.Array, k: jax.Array):
  """float32 i - j ([..., T, S]) and the query position i ([..., T, 1])."""
  q, k = _expand_pair(q, k)
  # Subtract before the cast so large integer positions stay exact.
  return (q - k).astype(jnp.float32), q.astype(jnp.float32)


def _check_per_head(name: str, value):
  value = _as_array(value)
  if value.ndim != 1 or value.shape[0] < 1:
    raise ValueError(f"{name} must have shape [num_heads], got {value.shape}")
  return value


@jax.jit
def _heads_first(per_pair: jax.Array) -> jax.Array:
  """float32 [..., T, S, N] -> [..., N, T, S]."""
  return jnp.moveaxis(per_pair.astype(jnp.float32), -1, -3)


# ----------------------------------------------------------------------------
# Positions.
# ----------------------------------------------------------------------------


# The bottom-right alignment lives in masks.py; re-exported here.
default_positions = masks.default_positions


def relative_positions(q_len: int, kv_len: int) -> jax.Array:
  """``i - j`` for the bottom-right aligned positions: int32 [T, S]."""
  q_len = _check_int("q_len", q_len, 0)
  kv_len = _check_int("kv_len", kv_len, 0)
  return _relative_positions(q_len, kv_len)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _relative_positions(q_len, kv_len):
  q_positions, k_positions = masks.default_positions(q_len, kv_len)
  return q_positions[:, None] - k_positions[None, :]


# ----------------------------------------------------------------------------
# ALiBi (Press et al. 2022).
# ----------------------------------------------------------------------------


def _alibi_slopes_list(n: int) -> list[float]:
  if n & (n - 1) == 0:   # a power of two: m_h = 2^(-8h/n), h = 1..n
    return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
  k = 1 << (n.bit_length() - 1)   # the largest power of two below n
  return _alibi_slopes_list(k) + _alibi_slopes_list(2 * k)[0::2][:n - k]


def alibi_slopes(num_heads: int) -> jax.Array:
  """ALiBi head slopes for any head count: float32 [num_heads].

  A power of two n gives ``m_h = 2^(-8h/n)``, h = 1..n. Otherwise the slopes
  of the largest power of two k below n come first, then every other slope
  (indices 0, 2, 4, ...) of the 2k-head set until there are n, as ``get_slopes``
  in ofirpress/attention_with_linear_biases does. n = 6 gives
  0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125.
  """
  num_heads = _check_int("num_heads", num_heads, 1)
  return jax.device_put(np.asarray(_alibi_slopes_list(num_heads), np.float32))


def alibi_bias(slopes, q_positions, k_positions) -> jax.Array:
  """Dense ALiBi bias ``-slope_h * |i - j|``.

  Equal to ``-slope_h * (i - j)`` on causally visible pairs (i >= j) and
  symmetric for bidirectional use (as flash-attention's non-causal ALiBi).

  Args:
    slopes: [N], e.g. :func:`alibi_slopes`.
    q_positions: [T] or [B, T] query positions (integer or float).
    k_positions: [S] or [B, S] key positions.

  Returns:
    float32 [N, T, S], or [B, N, T, S] with batched positions.
  """
  slopes = _check_per_head("slopes", slopes)
  return _alibi_bias(slopes, *_validate_pair(q_positions, k_positions))


@jax.jit
def _alibi_bias(slopes, q, k):
  rel, _ = _distance(q, k)
  slopes = slopes.astype(jnp.float32)[:, None, None]
  return 0.0 - slopes * jnp.abs(rel)[..., None, :, :]   # 0.0 - x: +0, not -0


# ----------------------------------------------------------------------------
# T5 relative bias (Raffel et al. 2020).
# ----------------------------------------------------------------------------


def _t5_max_exact(bidirectional: bool, num_buckets: int) -> int:
  return (num_buckets // 2 if bidirectional else num_buckets) // 2


def _check_t5_args(bidirectional, num_buckets, max_distance):
  if not isinstance(bidirectional, (bool, np.bool_)):
    raise ValueError(f"bidirectional must be a bool, got {bidirectional!r}")
  num_buckets = _check_int("num_buckets", num_buckets,
                           4 if bidirectional else 2)
  max_exact = _t5_max_exact(bool(bidirectional), num_buckets)
  max_distance = _check_int("max_distance", max_distance, max_exact + 1)
  return bool(bidirectional), num_buckets, max_distance


def t5_relative_bucket(relative_position, *, bidirectional: bool = True,
                       num_buckets: int = 32,
                       max_distance: int = 128) -> jax.Array:
  """T5's bucket of a relative position: int32, the shape of the input.

  ``relative_position`` is ``key_pos - query_pos`` (memory minus query), as in
  mesh-tensorflow and transformers' ``T5Attention._relative_position_bucket``,
  which this reproduces bucket for bucket. Bidirectional: half the buckets
  are for keys in the past or at the query (``<= 0``), half (offset by
  ``num_buckets // 2``) for future keys. Causal (``bidirectional=False``):
  future keys all fall in bucket 0. Within a side, distances below
  ``max_exact`` (half the side's buckets) get a bucket each; larger ones are
  binned logarithmically up to ``max_distance``, beyond which they share the
  side's last bucket. (Distance 0 is on the past side, so bidirectional
  bucket ``num_buckets // 2`` is never produced, as in T5.)

  Args:
    relative_position: integer array of ``key_pos - query_pos``.
    bidirectional: whether keys after the query get their own buckets.
    num_buckets: total buckets (>= 4 bidirectional, >= 2 causal).
    max_distance: distance at which buckets saturate (> max_exact).
  """
  bidirectional, num_buckets, max_distance = _check_t5_args(
      bidirectional, num_buckets, max_distance)
  rel = _as_array(relative_position)
  if not jnp.issubdtype(rel.dtype, jnp.integer):
    raise ValueError(
        f"relative_position must have an integer dtype, got {rel.dtype}")
  return _t5_bucket(rel, bidirectional, num_buckets, max_distance)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _t5_bucket(rel, bidirectional, num_buckets, max_distance):
  rel = rel.astype(jnp.int32)
  if bidirectional:
    side = num_buckets // 2
    offset = jnp.where(rel > 0, side, 0).astype(jnp.int32)
    distance = jnp.abs(rel)
  else:
    side = num_buckets
    offset = jnp.zeros_like(rel)
    distance = jnp.maximum(-rel, 0)
  max_exact = side // 2
  # Same float32 arithmetic as transformers; the maximum keeps log() finite
  # on the small distances, which the where() discards anyway.
  ratio = jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact
  log_bucket = (jnp.log(ratio) / math.log(max_distance / max_exact)
                * (side - max_exact))
  large = jnp.minimum(max_exact + log_bucket.astype(jnp.int32), side - 1)
  return offset + jnp.where(distance < max_exact, distance, large)


def t5_bias(table, q_positions, k_positions, *, bidirectional: bool,
            num_buckets: int, max_distance: int) -> jax.Array:
  """Dense T5 bias ``table[bucket(j - i), h]``.

  Args:
    table: [num_buckets, N] learned scalar per (bucket, head).
    q_positions: integer [T] or [B, T].
    k_positions: integer [S] or [B, S].
    bidirectional, num_buckets, max_distance: as :func:`t5_relative_bucket`.

  Returns:
    float32 [N, T, S], or [B, N, T, S] with batched positions.
  """
  bidirectional, num_buckets, max_distance = _check_t5_args(
      bidirectional, num_buckets, max_distance)
  table = _as_array(table)
  if table.ndim != 2 or table.shape[0] != num_buckets or table.shape[1] < 1:
    raise ValueError(
        f"table must have shape [num_buckets={num_buckets}, num_heads], got "
        f"{table.shape}")
  q, k = _validate_pair(q_positions, k_positions, integer=True)
  return _t5_bias(table, q, k, bidirectional, num_buckets, max_distance)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _t5_bias(table, q, k, bidirectional, num_buckets, max_distance):
  q, k = _expand_pair(q, k)
  buckets = _t5_bucket(k - q, bidirectional, num_buckets, max_distance)
  return _heads_first(table[buckets])


# ----------------------------------------------------------------------------
# Kerple, log variant (Chi et al. 2022).
# ----------------------------------------------------------------------------


def kerple_log_bias(r1, r2, q_positions, k_positions) -> jax.Array:
  """Dense Kerple-log bias ``-r1_h * log(1 + r2_h * |i - j|)``.

  Args:
    r1: [N], positive (the caller keeps it so, e.g. by a softplus or clip).
    r2: [N], positive.
    q_positions: [T] or [B, T].
    k_positions: [S] or [B, S].

  Returns:
    float32 [N, T, S], or [B, N, T, S] with batched positions.
  """
  r1 = _check_per_head("r1", r1)
  r2 = _check_per_head("r2", r2)
  if r1.shape != r2.shape:
    raise ValueError(
        f"r1 and r2 must have the same shape [num_heads], got {r1.shape} and "
        f"{r2.shape}")
  return _kerple_log_bias(r1, r2, *_validate_pair(q_positions, k_positions))


@jax.jit
def _kerple_log_bias(r1, r2, q, k):
  rel, _ = _distance(q, k)
  dist = jnp.abs(rel)[..., None, :, :]
  r1 = r1.astype(jnp.float32)[:, None, None]
  r2 = r2.astype(jnp.float32)[:, None, None]
  return 0.0 - r1 * jnp.log1p(r2 * dist)


# ----------------------------------------------------------------------------
# FIRE (Li et al. 2024, "Functional Interpolation for Relative Positions").
# ----------------------------------------------------------------------------


def fire_bias(mlp: Callable[[jax.Array], jax.Array], c, threshold,
              q_positions, k_positions, *, eps: float = 1e-6) -> jax.Array:
  """Dense FIRE bias ``f(psi(i - j) / psi(max(i, L)))``.

  The paper's formula with ``psi(x) = log(c * x + 1)``, computed as the
  PyTorch FIRE module that public re-implementations reproduce from the paper
  (c initialised to 0.1; ``L = |L_multiplier * init_L|`` with init_L = 512;
  MLP Linear(1, 32), ReLU, Linear(32, N)): ``|c|`` is used, ``L =
  |threshold|`` (pass the product ``L_multiplier * init_L``), and ``eps`` is
  added to the normaliser outside the log, ``psi(max(i, L)) + eps``. ``i`` is
  the query's absolute position, so progressive interpolation maps every
  distance a query sees into [0, 1], at any length. One deviation: that code
  takes ``|c * (i - j)|``, so a future key mirrors a past one; here future
  keys use ``max(i - j, 0)`` (distance 0). Both are finite, and causal masks
  remove those pairs either way.

  Args:
    mlp: maps float32 [..., 1] to [..., N] (the paper: Linear(1, 32), ReLU,
      Linear(32, N)); its parameters belong to the caller.
    c: scalar log-transform parameter (paper init 0.1); its abs is used.
    threshold: scalar L (paper init 512); its abs is used.
    q_positions: [T] or [B, T].
    k_positions: [S] or [B, S].
    eps: > 0, keeps the normaliser away from 0 at ``i = L = 0``.

  Returns:
    float32 [N, T, S], or [B, N, T, S] with batched positions.
  """
  if not callable(mlp):
    raise ValueError(f"mlp must be callable, got {mlp!r}")
  eps = _check_float("eps", eps, positive=True)
  c = _as_array(c)
  threshold = _as_array(threshold)
  if c.shape != ():
    raise ValueError(f"c must be a scalar, got shape {c.shape}")
  if threshold.shape != ():
    raise ValueError(f"threshold must be a scalar, got shape {threshold.shape}")
  q, k = _validate_pair(q_positions, k_positions)
  normalised = _fire_distance(c, threshold, q, k, eps)    # [..., T, S]
  out = _as_array(mlp(normalised[..., None]))
  if out.shape[:-1] != normalised.shape or out.ndim != normalised.ndim + 1:
    raise ValueError(
        f"mlp must map [..., 1] to [..., num_heads]; for input shape "
        f"{normalised.shape + (1,)} it returned shape {out.shape}")
  return _heads_first(out)


@jax.jit
def _fire_distance(c, threshold, q, k, eps):
  c = jnp.abs(c.astype(jnp.float32))
  threshold = jnp.abs(threshold.astype(jnp.float32))
  rel, query = _distance(q, k)
  psi_rel = jnp.log1p(c * jnp.maximum(rel, 0.0))
  normaliser = jnp.log1p(c * jnp.maximum(query, threshold)) + eps
  return psi_rel / normaliser


# ----------------------------------------------------------------------------
# Absolute sinusoidal (Vaswani et al. 2017).
# ----------------------------------------------------------------------------


def sinusoidal_embedding(positions, dim: int, *,
                         base: float = 10000.0) -> jax.Array:
  """Sinusoidal absolute embedding: float32 [..., dim].

  ``PE[p, 2i] = sin(p / base^(2i/dim))``, ``PE[p, 2i+1] = cos(...)``,
  interleaved as in the paper.

  Args:
    positions: integer or float array of any shape [...].
    dim: even embedding width >= 2.
    base: wavelength base > 0.
  """
  dim = _check_int("dim", dim, 2)
  if dim % 2:
    raise ValueError(f"dim must be even, got {dim}")
  base = _check_float("base", base, positive=True)
  positions = _numeric_positions(positions)
  return _sinusoidal(positions, dim, base)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _sinusoidal(positions, dim, base):
  exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
  inv_freq = np.asarray(base ** -exponents, np.float32)        # [dim / 2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return pe.reshape(positions.shape + (dim,))


# ----------------------------------------------------------------------------
# Randomized positions (Ruoss et al. 2023).
# ----------------------------------------------------------------------------


def randomized_positions(rng: jax.Array, seq_len: int, max_len: int, *,
                         batch_shape: Sequence[int] = ()) -> jax.Array:
  """Sorted random subsets of [0, max_len): int32 [*batch_shape, seq_len].

  Each row is an independent, uniformly drawn subset of ``seq_len`` distinct
  positions, sorted increasingly, so training sees position values up to
  ``max_len - 1`` (randomized positional encodings, Ruoss et al. 2023).

  Args:
    rng: a JAX PRNG key.
    seq_len: positions per row, 1 <= seq_len <= max_len.
    max_len: size of the position range.
    batch_shape: leading shape; each row gets its own subset.
  """
  seq_len = _check_int("seq_len", seq_len, 1)
  max_len = _check_int("max_len", max_len, 1)
  if seq_len > max_len:
    raise ValueError(
        f"seq_len must be <= max_len ({max_len}), got seq_len={seq_len}")
  if isinstance(batch_shape, numbers.Integral):
    batch_shape = (batch_shape,)
  try:
    batch_shape = tuple(batch_shape)
  except TypeError:
    raise ValueError(
        f"batch_shape must be a tuple of integers >= 0, got {batch_shape!r}"
    ) from None
  batch_shape = tuple(_check_int("batch_shape entry", d, 0)
                      for d in batch_shape)
  return _randomized(rng, seq_len, max_len, batch_shape)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _randomized(rng, seq_len, max_len, batch_shape):
  everything = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32),
                                batch_shape + (max_len,))
  shuffled = jax.random.permutation(rng, everything, axis=-1, independent=True)
  return jnp.sort(shuffled[..., :seq_len], axis=-1)


# ----------------------------------------------------------------------------
# Self-Extend (Jin et al. 2024, "LLM Maybe LongLM").
# ----------------------------------------------------------------------------


def self_extend_positions(positions, *, group_size: int, window: int):
  """Grouped RoPE positions for Self-Extend's far pairs.

  Keys: ``p // group_size``. Queries: ``p // group_size + window -
  window // group_size``, the shift of the paper and of datamllab/LongLM
  (``group_size_1`` = group size, ``group_size_2`` = neighbour window). The
  attention uses ordinary positions for pairs with ``i - j < window`` and
  these for ``i - j >= window``, as LongLM's masks do. For a fixed query the
  grouped distance ``i // G - j // G + window - window // G`` grows
  monotonically with ``i - j``; at ``i - j = window`` it is exactly ``window``
  when ``window % group_size == 0`` (neighbour distances end at
  ``window - 1``: no gap, no overlap), and ``window`` or ``window + 1``
  otherwise. Two small differences from LongLM's code: its non-flash prefill
  path shifts by the float ``window / group_size`` (same value when divisible;
  we use the integer shift of its decoding path), and it drops the shift when
  every query position is below ``window``, where no pair is far anyway.

  Args:
    positions: integer array of absolute positions, any shape.
    group_size: G >= 1.
    window: neighbour window >= 0 (0 groups every pair).

  Returns:
    (far_q_positions, far_k_positions), int32, the shape of ``positions``.
  """
  group_size = _check_int("group_size", group_size, 1)
  window = _check_int("window", window, 0)
  positions = _as_array(positions)
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(
        f"positions must have an integer dtype, got {positions.dtype}")
  return _self_extend(positions, group_size, window)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _self_extend(positions, group_size, window):
  grouped = positions.astype(jnp.int32) // group_size
  return grouped + (window - window // group_size), grouped


# ----------------------------------------------------------------------------
# Length-dependent logit scaling (log-n attention).
# ----------------------------------------------------------------------------


def length_logit_scale(positions, train_len: int, *,
                       min_scale: Optional[float] = 1.0) -> jax.Array:
  """Query scale ``log(p + 1) / log(train_len)``: float32, the input's shape.

  The caller multiplies the query at position ``p`` (``p + 1`` keys visible
  under a causal mask) by it. ``min_scale=1.0`` floors it so positions inside
  the training range are unchanged, as Qwen's logn attention and LongLM's
  ``scale_base`` option do; ``min_scale=None`` returns the raw ratio.

  Args:
    positions: integer or float array of positions >= 0, any shape.
    train_len: training length >= 2.
    min_scale: floor, or None for none.
  """
  train_len = _check_int("train_len", train_len, 2)
  if min_scale is not None:
    min_scale = _check_float("min_scale", min_scale)
  positions = _numeric_positions(positions)
  return _length_logit_scale(positions, train_len, min_scale)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _length_logit_scale(positions, train_len, min_scale):
  scale = jnp.log1p(positions.astype(jnp.float32)) / math.log(train_len)
  if min_scale is not None:
    scale = jnp.maximum(scale, min_scale)
  return scale
