"""``dot_product_attention``: one call, several implementations.

What attention computes (the request) and which implementation computes it are
two separate choices. The request is validated once here and handed to an
implementation as an ``AttentionRequest``; implementations live in one
registry and raise ``NotImplementedError`` when they cannot serve a request.
With ``implementation=None`` the first implementation in the platform's order
that serves the request runs; an explicit implementation that cannot serve it
raises.

Semantics (every implementation obeys them; tests pin them):

* layout [B, T, N, H] for queries, [B, S, K, H] for keys and values; query
  head ``n`` reads key/value head ``n // (N // K)``;
* positions: query ``t`` at ``S - T + t``, key ``s`` at ``s`` unless
  ``query_positions`` / ``key_positions`` are given;
* logits = scale * q.k; then the soft cap ``c * tanh(logits / c)``; then
  ``+ bias`` and ``- alibi_slope * |i - j|`` (``-slope * (i - j)`` on causal
  pairs); then the mask and segment ids;
* ``far_query`` / ``far_key`` / ``far_window``: pairs with ``i - j >=
  far_window`` are scored with ``far_query . far_key`` instead (LM-Infinite's
  distance ceiling: far_query rotated at the ceiling, far_key un-rotated;
  Self-Extend: both rotated with grouped positions);
* ``sink_logits`` (float [N], gpt-oss's learned attention sinks): query
  head ``n`` adds ``exp(sink_n)`` to its softmax denominator, a key that
  takes probability but has no value: ``p_ij = exp(s_ij) / (exp(sink_n) +
  sum_j exp(s_ij))``, and the log-sum-exp includes the sink;
* softmax statistics in float32; a query row that sees no key gives zeros and
  log-sum-exp ``-inf`` (``sink_n`` with sinks), never NaN.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from extrapolax.common.checks import check_int, check_number
from . import masks as masks_lib
from . import relative_bias

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionRequest:
  """A validated attention request, as implementations receive it.

  Shapes: query [B, T, N, H]; key [B, S, K, H]; value [B, S, K, Hv];
  q_segment_ids [B, T] and kv_segment_ids [B, S] or None; query_positions
  [Bp, T] and key_positions [Bp, S] int32 (Bp in {1, B}), always set;
  alibi_slopes [Ba, N] float32 (Ba in {1, B}) or None; bias 4-D and
  broadcastable to [B, N, T, S] or None; position_bias a
  ``relative_bias.RelativeBias`` with N heads or None; far_query / far_key shaped like
  query / key or None.
  """
  query: Array
  key: Array
  value: Array
  mask: Optional[masks_lib.Mask]
  q_segment_ids: Optional[Array]
  kv_segment_ids: Optional[Array]
  query_positions: Array
  key_positions: Array
  explicit_positions: bool
  alibi_slopes: Optional[Array]
  bias: Optional[Array]
  scale: float
  logits_soft_cap: Optional[float]
  far_query: Optional[Array]
  far_key: Optional[Array]
  far_window: Optional[int]
  sink_logits: Optional[Array] = None
  position_bias: Optional[relative_bias.RelativeBias] = None

  @property
  def shape_info(self):
    b, t, n, h = self.query.shape
    _, s, k, hv = self.value.shape
    return b, t, s, n, k, h, hv


class Implementation:
  """An attention implementation: ``__call__(request) -> (out, lse)``.

  ``out`` is [B, T, N, Hv] in the query dtype, ``lse`` float32 [B, N, T].
  Raise NotImplementedError for a request it cannot serve. An
  implementation that reads ``request.sink_logits`` sets
  ``takes_sink_logits = True``; dispatch refuses sinks to any other (so a
  new implementation cannot ignore them silently). One that evaluates
  ``request.position_bias`` itself (per tile) sets ``takes_position_bias =
  True``; every other one is served it materialised into the dense
  ``request.bias`` (quadratic memory, same values and gradients).
  """
  name: str = "?"
  takes_sink_logits: bool = False
  takes_position_bias: bool = False

  def __call__(self, request: AttentionRequest):
    raise NotImplementedError

  def __repr__(self):
    return f"{type(self).__name__}()"


_REGISTRY: dict[str, Callable[[], Implementation]] = {}
# Order tried by implementation=None, per platform.
_AUTO_ORDER = {
    "gpu": ("pallas_gpu", "cudnn", "xla", "xla_chunked"),
    "tpu": ("pallas_tpu", "xla", "xla_chunked"),
    # On the CPU the chunked path beats the dense one from T = S = 128 up,
    # forward and backward (1.6x at 128, 8x at 1024); at 16 and 64 the
    # forward is faster chunked and the backward dense, by tens of
    # microseconds either way (benchmarks/attention_limit_cpu.py --dense,
    # BENCHMARKS.md). So it goes first at every length; "xla" stays the
    # oracle.
    "cpu": ("xla_chunked", "xla"),
}
# Auto mode only uses the dense path while its logits stay below this many
# float32 elements (B * N * T * S); past it the chunked path runs.
DENSE_AUTO_LIMIT = 1 << 26


def register_implementation(name: str, factory: Callable[[], Implementation]):
  """Registers ``factory()`` under ``name`` (the string users pass)."""
  _REGISTRY[name] = factory


def implementations() -> tuple[str, ...]:
  """Names accepted by ``implementation=``."""
  return tuple(sorted(_REGISTRY))


def _resolve(implementation) -> Implementation:
  if isinstance(implementation, Implementation):
    return implementation
  if isinstance(implementation, str) and implementation in _REGISTRY:
    return _REGISTRY[implementation]()
  raise ValueError(
      f"unknown implementation {implementation!r}; expected None, one of "
      f"{implementations()}, or an Implementation instance")


# use_implementation's value is part of jax.jit's cache key (a jax user
# context), so a function traced under one implementation is traced again
# under another instead of silently keeping the first.
class _ContextVarState:
  """The same interface over a context variable, for a jax without
  ``make_user_context`` (public in 0.10): there the choice is read when a
  function is traced, and a traced jit function keeps it."""

  def __init__(self):
    self._var = contextvars.ContextVar("extrapolax_implementation",
                                       default=None)

  @property
  def value(self):
    return self._var.get()

  @contextlib.contextmanager
  def __call__(self, value):
    token = self._var.set(value)
    try:
      yield
    finally:
      self._var.reset(token)


_CURRENT = (jax.make_user_context(default_value=None)
            if hasattr(jax, "make_user_context") else _ContextVarState())
# One instance per (name, registered factory): entering the same name again
# is a cache hit, not a retrace.
_NAMED: dict = {}


def _context_value(implementation) -> Implementation:
  if isinstance(implementation, str) and implementation in _REGISTRY:
    key = (implementation, _REGISTRY[implementation])
    if key not in _NAMED:
      _NAMED[key] = _REGISTRY[implementation]()
    return _NAMED[key]
  return _resolve(implementation)


@contextlib.contextmanager
def use_implementation(implementation: Union[str, Implementation, None]):
  """Within the block, attention runs on ``implementation``.

  The implementation is chosen at call time, the way ``jax.set_mesh`` sets
  the mesh: ``dot_product_attention(implementation=None)`` and every
  ``Attention`` layer (whatever implementation its model was built with)
  use it, so one trained model runs on xla, xla_chunked, a Pallas kernel or
  ``ContextParallel(inner=...)`` without being rebuilt. An explicit
  ``implementation=`` argument to ``dot_product_attention`` still wins.
  ``None`` sets nothing (the enclosing choice, else automatic, applies).
  The choice is part of ``jax.jit``'s cache key (``jax.make_user_context``):
  a jitted function called under another implementation is traced again
  (the same name, or an equal instance, reuses the trace).

  Raises:
    ValueError: an unknown implementation name.
  """
  if implementation is None:
    yield None
    return
  resolved = _context_value(implementation)
  with _CURRENT(resolved):
    yield resolved


def current_implementation() -> Optional[Implementation]:
  """The implementation ``use_implementation`` set, or None."""
  return _CURRENT.value


def _as_int_array(name, x, shape):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
  given = x.shape
  if x.ndim == 1:
    x = x[None]
  if x.ndim != 2 or x.shape[1] != shape[1] or x.shape[0] not in (1, shape[0]):
    raise ValueError(
        f"{name} must have shape {shape} or ({shape[1]},), got {given}")
  return x.astype(jnp.int32)


def _check_float(name, x, like_shape=None):
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating array, got dtype "
                     f"{jnp.asarray(x).dtype}")
  if like_shape is not None and tuple(x.shape) != tuple(like_shape):
    raise ValueError(f"{name} must have shape {tuple(like_shape)}, got "
                     f"{tuple(x.shape)}")


def _concrete(x) -> Optional[np.ndarray]:
  """``x`` as a NumPy array, or None while it is traced (under jit)."""
  try:
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None


def make_request(query, key, value, *, mask=None, segment_ids=None,
                 alibi_slopes=None, bias=None, scale=None,
                 logits_soft_cap=None, query_positions=None,
                 key_positions=None, far_query=None, far_key=None,
                 far_window=None, sink_logits=None,
                 position_bias=None) -> AttentionRequest:
  """Validates the arguments of ``dot_product_attention``; see there."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], "
                       f"got shape {getattr(x, 'shape', type(x))}")
    _check_float(name, x)
  b, t, n, h = query.shape
  bk, s, k, hk = key.shape
  if key.shape[:3] != value.shape[:3]:
    raise ValueError(f"key {key.shape} and value {value.shape} must agree in "
                     "batch, length and heads")
  if bk != b:
    raise ValueError(f"query batch {b} != key batch {bk}")
  if hk != h:
    raise ValueError(f"query head_dim {h} != key head_dim {hk}")
  hv = value.shape[3]
  if t < 1 or s < 1:
    raise ValueError(f"query length T={t} and key length S={s} must both be "
                     ">= 1 (empty sequences have no attention to compute)")
  if h < 1 or hv < 1:
    raise ValueError(f"head_dim must be >= 1, got query/key head_dim {h} and "
                     f"value head_dim {hv}")
  if k < 1 or n % k:
    raise ValueError(f"query heads N={n} must be a multiple of key/value "
                     f"heads K={k} (grouped-query attention)")
  mask = masks_lib.as_mask(mask)
  if mask is not None and mask.per_head:
    # Bound to this call's heads: query head h is the mask's head h.
    mask = mask.for_heads(n, k)

  q_seg = kv_seg = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      if len(segment_ids) != 2:
        raise ValueError("segment_ids must be an array [B, T] or a pair "
                         f"(q [B, T], kv [B, S]); got {len(segment_ids)} items")
      q_seg, kv_seg = segment_ids
    else:
      if t != s:
        raise ValueError(
            f"a single segment_ids array needs T == S (got T={t}, S={s}); "
            "pass a (q_segment_ids, kv_segment_ids) pair")
      q_seg = kv_seg = segment_ids
    q_seg = _as_int_array("q segment_ids", q_seg, (b, t))
    kv_seg = _as_int_array("kv segment_ids", kv_seg, (b, s))
    q_seg = jnp.broadcast_to(q_seg, (b, t))
    kv_seg = jnp.broadcast_to(kv_seg, (b, s))

  explicit = query_positions is not None or key_positions is not None
  if (query_positions is None) != (key_positions is None):
    raise ValueError("give both query_positions and key_positions, or neither")
  if explicit:
    q_pos = _as_int_array("query_positions", query_positions, (b, t))
    k_pos = _as_int_array("key_positions", key_positions, (b, s))
    if q_pos.shape[0] != k_pos.shape[0]:
      q_pos = jnp.broadcast_to(q_pos, (b, t))
      k_pos = jnp.broadcast_to(k_pos, (b, s))
  else:
    q_pos, k_pos = masks_lib.default_positions(t, s)
    q_pos, k_pos = q_pos[None], k_pos[None]

  if alibi_slopes is not None:
    alibi_slopes = jnp.asarray(alibi_slopes)
    _check_float("alibi_slopes", alibi_slopes)
    given = alibi_slopes.shape
    if alibi_slopes.ndim == 1:
      alibi_slopes = alibi_slopes[None]
    if (alibi_slopes.ndim != 2 or alibi_slopes.shape[1] != n
        or alibi_slopes.shape[0] not in (1, b)):
      raise ValueError(f"alibi_slopes must have shape ({n},) or ({b}, {n}), "
                       f"got {given}")
    alibi_slopes = alibi_slopes.astype(jnp.float32)
    concrete = _concrete(alibi_slopes)   # traced slopes are checked by no one
    if concrete is not None and not np.all(np.isfinite(concrete)):
      raise ValueError(f"alibi_slopes must be finite, got {concrete.ravel()}")

  if bias is not None:
    bias = jnp.asarray(bias)
    _check_float("bias", bias)
    if bias.ndim > 4:
      raise ValueError(f"bias must broadcast to [B, N, T, S]; got {bias.shape}")
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    for got, want, axis in zip(bias.shape, (b, n, t, s), "BNTS"):
      if got not in (1, want):
        raise ValueError(f"bias shape {bias.shape} does not broadcast to "
                         f"[B, N, T, S] = {(b, n, t, s)} (axis {axis})")

  if scale is None:
    scale = 1.0 / math.sqrt(h)
  else:
    scale = check_number("scale", scale)   # a finite Python number
  if logits_soft_cap is not None:
    # inf would give c * tanh(x / c) = inf * 0 = nan: refused, like nan.
    logits_soft_cap = check_number("logits_soft_cap", logits_soft_cap,
                                   positive=True)

  if (far_query is None) != (far_key is None) or (
      (far_query is None) != (far_window is None)):
    raise ValueError("far_query, far_key and far_window go together: give all "
                     "three or none")
  if far_query is not None:
    _check_float("far_query", far_query, query.shape)
    _check_float("far_key", far_key, key.shape)
    far_window = check_int("far_window", far_window, 1,
                           masks_lib.MAX_SIZE)

  if sink_logits is not None:
    sink_logits = jnp.asarray(sink_logits)
    _check_float("sink_logits", sink_logits)
    if sink_logits.shape != (n,):
      raise ValueError(f"sink_logits must have shape ({n},) (one per query "
                       f"head), got {sink_logits.shape}")
    sink_logits = sink_logits.astype(jnp.float32)
    concrete = _concrete(sink_logits)
    if concrete is not None and not np.all(np.isfinite(concrete)):
      raise ValueError(f"sink_logits must be finite, got {concrete}")

  if position_bias is not None:
    position_bias = relative_bias.check_position_bias(position_bias, n)

  return AttentionRequest(
      query=query, key=key, value=value, mask=mask, q_segment_ids=q_seg,
      kv_segment_ids=kv_seg, query_positions=q_pos, key_positions=k_pos,
      explicit_positions=explicit, alibi_slopes=alibi_slopes, bias=bias,
      scale=float(scale), logits_soft_cap=logits_soft_cap,
      far_query=far_query, far_key=far_key, far_window=far_window,
      sink_logits=sink_logits, position_bias=position_bias)


def with_dense_position_bias(request: AttentionRequest) -> AttentionRequest:
  """``request`` with its ``position_bias`` materialised into ``bias``
  ([Bp, N, T, S] float32, added to a given bias); unchanged without one."""
  pb = request.position_bias
  if pb is None:
    return request
  dense = pb.tile(request.query_positions, request.key_positions)
  bias = dense if request.bias is None else (
      request.bias.astype(jnp.float32) + dense)
  return dataclasses.replace(request, bias=bias, position_bias=None)


# The mesh axis that context-parallel attention splits the sequence over.
CONTEXT_AXIS = "context"


def _context_axis_splits() -> bool:
  """Whether the ambient mesh (``jax.set_mesh``) splits the sequence.

  True when it has a ``"context"`` axis of size > 1 that is not manual; inside
  a ``shard_map`` over that axis (context_parallel's own local calls) the
  axis is manual and this is False.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or CONTEXT_AXIS not in mesh.axis_names:
    return False
  kind = dict(zip(mesh.axis_names, mesh.axis_types))[CONTEXT_AXIS]
  return (dict(mesh.shape)[CONTEXT_AXIS] > 1
          and kind != jax.sharding.AxisType.Manual)


def _auto_candidates(request: AttentionRequest) -> Sequence[str]:
  platform = jax.default_backend()
  order = _AUTO_ORDER.get(platform, _AUTO_ORDER["cpu"])
  b, t, s, n, *_ = request.shape_info
  if b * n * t * s > DENSE_AUTO_LIMIT:
    order = tuple(x for x in order if x != "xla")
  if _context_axis_splits():
    # Sequence split over the ambient mesh: context-parallel attention first
    # (it raises NotImplementedError, and auto falls through, when the
    # request does not fit its layout, e.g. T != S).
    order = ("context_parallel",) + order
  return order


def serve(impl: Implementation, request: AttentionRequest):
  """``impl(request)``, refusing sink_logits to an implementation that does
  not declare ``takes_sink_logits`` (NotImplementedError, one line), and
  materialising a ``position_bias`` for one that does not declare
  ``takes_position_bias``."""
  if request.position_bias is not None and not impl.takes_position_bias:
    request = with_dense_position_bias(request)
  if request.sink_logits is not None and not impl.takes_sink_logits:
    raise NotImplementedError(f"{impl.name} does not take sink_logits "
                              "(xla, xla_chunked, pallas_gpu, pallas_tpu and "
                              "context_parallel do)")
  return impl(request)


@dataclasses.dataclass(frozen=True)
class Auto(Implementation):
  """``implementation=None``: the platform's order, falling through.

  ``exclude`` names implementations never tried (context_parallel runs its
  per-device calls with ``Auto(exclude=("context_parallel",))``).
  """
  exclude: tuple[str, ...] = ()
  name = "auto"
  takes_sink_logits = True     # each candidate is checked by serve()
  takes_position_bias = True

  def __call__(self, request: AttentionRequest):
    errors = []
    for name in _auto_candidates(request):
      if name in self.exclude:
        continue
      try:
        return serve(_REGISTRY[name](), request)
      except NotImplementedError as e:
        errors.append(f"{name}: {e}")
    raise NotImplementedError("no implementation serves this request:\n  "
                              + "\n  ".join(errors))


def dot_product_attention(
    query: Array, key: Array, value: Array, *,
    mask: Optional[masks_lib.Mask] = None,
    segment_ids: Union[Array, tuple[Array, Array], None] = None,
    alibi_slopes: Optional[Array] = None,
    bias: Optional[Array] = None,
    scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None,
    implementation: Union[str, Implementation, None] = None,
    return_residuals: bool = False,
    query_positions: Optional[Array] = None,
    key_positions: Optional[Array] = None,
    far_query: Optional[Array] = None,
    far_key: Optional[Array] = None,
    far_window: Optional[int] = None,
    sink_logits: Optional[Array] = None,
    position_bias: Optional[relative_bias.RelativeBias] = None,
) -> Any:
  """Scaled dot-product attention with masks, ALiBi and relative biases.

  Args:
    query: [B, T, N, H].
    key: [B, S, K, H], N % K == 0 (grouped-query attention).
    value: [B, S, K, Hv].
    mask: a ``masks.Mask`` (Causal(), SlidingWindow(w), Lambda(sinks, w),
      Chunked(n), PrefixLM(p), Dilated, Strided, GlobalTokens, PerHead, or
      combinations with & and |), or None. A per-head mask's head h is
      query head h (its number of masks must divide N).
    segment_ids: int [B, T] (needs T == S) or a pair (q [B, T], kv [B, S]);
      a query sees only keys with its own id.
    alibi_slopes: float [N] or [B, N]; adds ``-slope * |i - j|``.
    bias: float, broadcastable to [B, N, T, S]; added to the logits.
    position_bias: a ``relative_bias.RelativeBias`` (T5BucketBias,
      KerpleBias, FireBias, AlibiBias) with N heads: a bias computed from
      (head, query position, key position) and learned parameters, added
      like ``bias`` and differentiable in its parameters. "xla_chunked",
      "pallas_gpu" and "pallas_tpu" evaluate it per block (memory linear in
      length); the others get it materialised as a dense bias.
    scale: logit scale; default 1 / sqrt(H).
    logits_soft_cap: c > 0 applies ``c * tanh(logits / c)`` before biases.
    implementation: None (the ``use_implementation`` block's, else automatic:
      falls through), "xla" (dense oracle),
      "xla_chunked" (online softmax, memory linear in length), "cudnn",
      "pallas_gpu", "pallas_tpu", "context_parallel" (the sequence split
      over the ambient mesh's "context" axis; auto tries it first when that
      axis has size > 1), or an ``Implementation`` instance (e.g.
      ``XlaChunked(block_q=256, block_k=256)``).
    return_residuals: also return the log-sum-exp, float32 [B, N, T].
    query_positions, key_positions: int [B, T] / [B, S] (or [T] / [S])
      absolute positions used by the mask and ALiBi instead of the
      bottom-right alignment (KV caches, rolling buffers).
    far_query, far_key, far_window: score pairs with ``i - j >= far_window``
      as ``far_query . far_key`` (LM-Infinite distance ceiling, Self-Extend).
    sink_logits: float [N], one learned sink logit per query head (gpt-oss):
      joins the softmax denominator, takes no value; differentiable. Served
      by "xla" and "xla_chunked" (others raise NotImplementedError; auto
      falls through).

  Returns:
    [B, T, N, Hv] in the query dtype, or (that, lse) with return_residuals.
  """
  request = make_request(
      query, key, value, mask=mask, segment_ids=segment_ids,
      alibi_slopes=alibi_slopes, bias=bias, scale=scale,
      logits_soft_cap=logits_soft_cap, query_positions=query_positions,
      key_positions=key_positions, far_query=far_query, far_key=far_key,
      far_window=far_window, sink_logits=sink_logits,
      position_bias=position_bias)
  if implementation is None:
    impl = current_implementation() or Auto()
  else:
    impl = _resolve(implementation)
  out, lse = serve(impl, request)
  return (out, lse) if return_residuals else out
