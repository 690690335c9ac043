"""The one Flax piece of ``extrapolax.attention``: an nnx attention layer.

``Attention`` holds the q/k/v/o projections and whatever a position scheme
learns; everything else is the pure functions of this package. A position
scheme is a small frozen dataclass (the semantics axis); ``implementation``
picks who computes (the other axis, see ``core``).

Schemes: ``NoPE()``, ``Rope(...)`` (any Hugging Face rope_scaling, both
layouts, partial rotary, per-head bases (HARPE), p-RoPE, Giraffe's
truncated basis, optional Self-Extend, STRING or LM-Infinite distance
ceiling), ``Alibi()``, ``T5Bias(...)``, ``Kerple()``, ``Fire(...)``.
The layer also takes a query ``temperature`` (``temperature.py``:
head_scale, ssmax, llama4), ``qk_norm`` (RMSNorm on each head's q and k
before RoPE, Qwen3 / OLMo 2) and ``sink_logits`` (gpt-oss: a learned
``sinks`` logit per query head in the softmax denominator).
Absolute encodings are added to token embeddings, not inside attention:
``sinusoidal_embedding`` (positional.py) and ``LearnedPositionEmbedding`` here.

Relative biases (T5, Kerple, FIRE) reach ``dot_product_attention`` as a
``position_bias`` (``relative_bias.py``): xla_chunked and the Pallas kernels
compute them per block (memory linear in length, their parameters'
gradients included); the other implementations get them materialised as a
dense [B, N, T, S] bias.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from extrapolax.common import checks
from extrapolax.common.checks import check_int
from . import core
from . import masks as masks_lib
from . import positional
from . import relative_bias
from . import rope as rope_lib
from . import rope_remaps
from . import temperature as temperature_lib

Array = jax.Array


_ONCE: contextvars.ContextVar = contextvars.ContextVar(
    "extrapolax_rope_tables", default=None)


@contextlib.contextmanager
def rope_tables_once():
  """Within the block (one model forward), RoPE's cos/sin tables and the
  default positions are computed once and shared by every layer (per scheme,
  head_dim and positions array) instead of once per layer."""
  token = _ONCE.set({})
  try:
    yield
  finally:
    _ONCE.reset(token)


def _once(key, inputs: tuple, make):
  """``make()``, or its value cached under ``key`` inside rope_tables_once()
  for these very ``inputs`` (compared by identity)."""
  cache = _ONCE.get()
  if cache is None:
    return make()
  key = key + tuple(id(x) for x in inputs)
  hit = cache.get(key)
  if hit is None or any(a is not b for a, b in zip(hit[0], inputs)):
    hit = cache[key] = (inputs, make())
  return hit[1]


class PositionScheme:
  """Base of the position schemes: frozen dataclasses of static settings.

  A scheme owns everything it does in the layer, so adding one is one class
  here (or in a user's module) registered with :func:`register_position`:

  * ``spec_fields``: which ``AttentionSpec`` fields feed which of its
    parameters (e.g. ``rope_base -> base``); a spec may also pass any
    parameter through ``position_args``.
  * ``check(head_dim, mask)``: bad settings fail when the layer is built.
  * ``init_params(layer, ...)``: learned parameters, set on the layer.
  * ``rotate(layer, q, k, q_pos, k_pos)``: q and k changed by position
    (RoPE), plus the far query/key inputs of an inference transform.
  * ``position_bias(layer)`` (a ``relative_bias.RelativeBias`` of the
    layer's parameters, computed per tile where the implementation can),
    ``bias(layer, q_pos, k_pos)`` (its dense form, or any dense bias) and
    ``alibi_slopes(num_heads)``: what is added to the logits. The layer
    passes ``position_bias`` when a scheme gives one, else ``bias``.
  """
  name: ClassVar[str] = ""
  spec_fields: ClassVar[Mapping[str, str]] = {}

  def check(self, head_dim: int, mask) -> None:
    del head_dim, mask

  def init_params(self, layer, *, num_heads: int, rngs: nnx.Rngs,
                  param_dtype) -> None:
    del layer, num_heads, rngs, param_dtype

  def rotate(self, layer, q, k, q_positions, k_positions):
    del layer, q_positions, k_positions
    return q, k, {}

  def position_bias(self, layer):
    del layer
    return None

  def bias(self, layer, q_positions, k_positions):
    pb = self.position_bias(layer)
    if pb is None:
      return None
    return pb.dense(q_positions, k_positions)

  def alibi_slopes(self, num_heads: int):
    del num_heads
    return None


_POSITIONS: dict[str, type] = {}


def register_position(cls):
  """Class decorator: names a PositionScheme subclass by its ``name``."""
  if not (isinstance(cls, type) and issubclass(cls, PositionScheme)
          and cls.name):
    raise ValueError(f"register_position takes a PositionScheme subclass "
                     f"with a name, got {cls!r}")
  _POSITIONS[cls.name] = cls
  return cls


def position_names() -> tuple[str, ...]:
  """Every registered position scheme name."""
  return tuple(_POSITIONS)


def position_class(name: str) -> type:
  if name not in _POSITIONS:
    raise ValueError(f"position must be one of {position_names()}, got "
                     f"{name!r}{checks.close_matches(name, position_names())}")
  return _POSITIONS[name]


def position_parameters(name: str) -> tuple[str, ...]:
  """The parameters of a named scheme (its dataclass fields)."""
  return tuple(f.name for f in dataclasses.fields(position_class(name)))


def position_from_name(name: str, **params) -> PositionScheme:
  """The named scheme with ``params``; an unknown parameter raises."""
  cls = position_class(name)
  checks.check_parameters(f"position {name!r}", params,
                          position_parameters(name))
  return cls(**params)


@register_position
@dataclasses.dataclass(frozen=True)
class NoPE(PositionScheme):
  """No positional signal (a causal decoder still infers order)."""
  name: ClassVar[str] = "nope"


@register_position
@dataclasses.dataclass(frozen=True)
class Rope(PositionScheme):
  """Rotary embeddings, optionally scaled.

  Attributes:
    base: rope_theta, or a tuple of one base per key/value head (HARPE;
      query heads rotate with their key/value head's base, so grouped heads
      stay relative).
    rope_scaling: a Hugging Face rope_scaling dict, verbatim, or None.
    max_position_embeddings: what the scaling methods that need it read.
    partial_rotary_factor: fraction of head_dim that rotates.
    layout: "half" (Llama) or "interleaved" (GPT-J).
    self_extend: (group_size, window): Self-Extend's grouped positions for
      pairs at distance >= window (inference only, no training).
    distance_ceiling: LM-Infinite: with a ``Lambda`` mask, the sink keys past
      the window are scored at this fixed distance (query rotated at the
      ceiling, keys un-rotated).
    string: (shift, local_window): STRING (inference only): pairs at
      distance d >= shift are scored at d - shift + local_window.
    p_rope: p-RoPE's fraction p of (highest) frequencies that rotate; the
      rest are zero (NoPE dims). None or 1: RoPE.
    truncated_basis: Giraffe's (a, b, rho) truncation of the frequencies.

  self_extend, distance_ceiling and string re-score far pairs through
  ``dot_product_attention``'s far query: the xla, xla_chunked, pallas_* and
  context_parallel implementations run them; cudnn refuses them.
  """
  name: ClassVar[str] = "rope"
  spec_fields: ClassVar[Mapping[str, str]] = {
      "rope_base": "base", "rope_scaling": "rope_scaling",
      "rope_max_position_embeddings": "max_position_embeddings",
      "partial_rotary_factor": "partial_rotary_factor",
      "rope_layout": "layout", "self_extend": "self_extend",
      "distance_ceiling": "distance_ceiling", "string": "string",
      "p_rope": "p_rope", "truncated_basis": "truncated_basis"}
  base: Union[float, tuple[float, ...]] = 10000.0
  rope_scaling: Optional[Mapping[str, Any]] = None
  max_position_embeddings: Optional[int] = None
  partial_rotary_factor: float = 1.0
  layout: str = "half"
  self_extend: Optional[tuple[int, int]] = None
  distance_ceiling: Optional[int] = None
  string: Optional[tuple[int, int]] = None
  p_rope: Optional[float] = None
  truncated_basis: Optional[tuple[float, float, float]] = None

  def __post_init__(self):
    if self.layout not in rope_lib.ROPE_LAYOUTS:
      raise ValueError(f"layout must be one of {rope_lib.ROPE_LAYOUTS}, got "
                       f"{self.layout!r}")
    far = [n for n in ("self_extend", "distance_ceiling", "string")
           if getattr(self, n) is not None]
    if len(far) > 1:
      raise ValueError(f"{' and '.join(far)} all re-score far pairs; choose "
                       "one")
    if not isinstance(self.base, (int, float)):
      if isinstance(self.base, (str, bytes)) or not len(self.base):
        raise ValueError("base must be a number or a non-empty tuple of "
                         f"per-head bases, got {self.base!r}")
      object.__setattr__(self, "base", tuple(
          checks.check_number("per-head base", b) for b in self.base))
    if self.string is not None:
      object.__setattr__(self, "string",
                         rope_remaps.check_string(self.string))
    if self.p_rope is not None:
      rope_remaps.p_rope_frequencies(jnp.ones(2), self.p_rope)  # in [0, 1]
    if self.truncated_basis is not None:
      if (isinstance(self.truncated_basis, (str, bytes))
          or len(self.truncated_basis) != 3):
        raise ValueError("truncated_basis must be (a, b, rho), got "
                         f"{self.truncated_basis!r}")
      object.__setattr__(self, "truncated_basis", rope_remaps.check_truncation(
          *self.truncated_basis))
    if self.self_extend is not None:
      if len(self.self_extend) != 2:
        raise ValueError("self_extend must be (group_size, window), got "
                         f"{self.self_extend!r}")
      object.__setattr__(self, "self_extend", (
          check_int("self_extend group_size", self.self_extend[0], 1),
          check_int("self_extend window", self.self_extend[1], 1)))
    if self.distance_ceiling is not None:
      check_int("distance_ceiling", self.distance_ceiling, 0)
    if self.rope_scaling is not None:
      # Hashable, so the scheme can be a static argument.
      object.__setattr__(self, "rope_scaling",
                         _FrozenDict(self.rope_scaling))

  def frequencies(self, head_dim: int, seq_len=None):
    """(inv_freq, attention_scaling): inv_freq [R/2], or [K, R/2] with
    per-head bases; p-RoPE and the truncated basis applied."""
    bases = self.base if isinstance(self.base, tuple) else (self.base,)
    pairs = [rope_lib.rope_frequencies(
        head_dim, base=base,
        rope_scaling=None if self.rope_scaling is None else dict(
            self.rope_scaling),
        max_position_embeddings=self.max_position_embeddings,
        seq_len=seq_len, partial_rotary_factor=self.partial_rotary_factor)
             for base in bases]
    att = pairs[0][1]
    inv_freq = (jnp.stack([f for f, _ in pairs])
                if isinstance(self.base, tuple) else pairs[0][0])
    if self.p_rope is not None:
      inv_freq = rope_remaps.p_rope_frequencies(inv_freq, self.p_rope)
    if self.truncated_basis is not None:
      a, b, rho = self.truncated_basis
      inv_freq = rope_remaps.truncated_basis(inv_freq, a=a, b=b, rho=rho)
    return inv_freq, att

  def check(self, head_dim, mask):
    self.frequencies(head_dim)   # bad rope settings fail here
    if self.distance_ceiling is not None and not isinstance(
        mask, masks_lib.Lambda):
      raise ValueError("Rope(distance_ceiling=...) needs a Lambda mask, got "
                       f"{mask!r}")

  def init_params(self, layer, *, num_heads, rngs, param_dtype):
    del num_heads, rngs, param_dtype
    if isinstance(self.base, tuple) and len(self.base) != layer.num_kv_heads:
      raise ValueError(
          f"per-head RoPE bases: give one per key/value head "
          f"(num_kv_heads={layer.num_kv_heads}), got {len(self.base)}: "
          f"{self.base!r}")

  def rotate(self, layer, q, k, q_positions, k_positions):
    group = q.shape[2] // k.shape[2]

    def tables(pos, heads):   # shared by every layer inside rope_tables_once()
      def make():
        inv_freq, att = self.frequencies(layer.head_dim,
                                         seq_len=jnp.max(q_positions) + 1)
        if inv_freq.ndim == 2 and heads == "q":   # per key/value head
          inv_freq = jnp.repeat(inv_freq, group, axis=0)
        return rope_lib.rope_cos_sin(pos, inv_freq, att)
      return _once(("rope", self, layer.head_dim, heads, group),
                   (pos, q_positions), make)

    def rot(y, pos, heads):
      cos, sin = tables(pos, heads)
      return rope_lib.apply_rope_tables(
          y, cos, sin, layout=self.layout,
          per_head=cos.ndim == jnp.ndim(pos) + 2)

    rot_q = lambda pos: rot(q, pos, "q")
    rot_k = lambda pos: rot(k, pos, "k")
    q_rot, k_rot = rot_q(q_positions), rot_k(k_positions)
    far = {}
    if self.self_extend is not None:
      group, window = self.self_extend
      far_q_pos, _ = positional.self_extend_positions(
          q_positions, group_size=group, window=window)
      _, far_k_pos = positional.self_extend_positions(
          k_positions, group_size=group, window=window)
      far = dict(far_query=rot_q(far_q_pos), far_key=rot_k(far_k_pos),
                 far_window=window)
    elif self.string is not None:
      # Far pairs: the query moved nearer by shift - local_window.
      shift, local = self.string
      far = dict(far_query=rot_q(rope_remaps.string_far_positions(
          q_positions, shift=shift, local_window=local)),
                 far_key=k_rot, far_window=shift)
    elif self.distance_ceiling is not None:
      # Row i's far (sink) keys sit at distance min(ceiling, i).
      far = dict(
          far_query=rot_q(jnp.minimum(self.distance_ceiling, q_positions)),
          far_key=k, far_window=layer.mask.window)
    return q_rot, k_rot, far


class _FrozenDict(dict):
  """A dict that hashes by content (rope_scaling values are numbers/lists)."""

  def __hash__(self):
    return hash(repr(sorted(self.items())))

  def __setitem__(self, key, value):
    raise TypeError("rope_scaling is frozen")


@register_position
@dataclasses.dataclass(frozen=True)
class Alibi(PositionScheme):
  """ALiBi: ``-slope_h * |i - j|`` with the paper's slopes."""
  name: ClassVar[str] = "alibi"

  def alibi_slopes(self, num_heads):
    return positional.alibi_slopes(num_heads)


@register_position
@dataclasses.dataclass(frozen=True)
class T5Bias(PositionScheme):
  """T5's learned bucketed relative bias (one scalar per head and bucket)."""
  name: ClassVar[str] = "t5"
  spec_fields: ClassVar[Mapping[str, str]] = {
      "t5_num_buckets": "num_buckets", "t5_max_distance": "max_distance"}
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = False

  def init_params(self, layer, *, num_heads, rngs, param_dtype):
    layer.t5_table = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (self.num_buckets, num_heads), param_dtype))

  def position_bias(self, layer):
    return relative_bias.T5BucketBias(
        layer.t5_table[...], bidirectional=self.bidirectional,
        max_distance=self.max_distance)


@register_position
@dataclasses.dataclass(frozen=True)
class Kerple(PositionScheme):
  """Kerple: ``-r1_h * log(1 + r2_h * |i - j|)`` (variant "log") or
  ``-r1_h * |i - j| ** r2_h`` ("power", r2 capped at 2 as the paper's
  constraint 0 < r2 <= 2); r1, r2 learned > 0 (softplus)."""
  name: ClassVar[str] = "kerple"
  variant: str = "log"

  def __post_init__(self):
    checks.check_choice("variant", self.variant, relative_bias.KERPLE_VARIANTS)

  def init_params(self, layer, *, num_heads, rngs, param_dtype):
    del rngs
    # softplus(raw) keeps r1, r2 > 0; r1 starts near 1, r2 near 1.
    layer.kerple_raw = nnx.Param(jnp.full((2, num_heads), 0.5413,
                                          param_dtype))

  def position_bias(self, layer):
    r = jax.nn.softplus(layer.kerple_raw[...])
    r2 = r[1] if self.variant == "log" else jnp.minimum(r[1], 2.0)
    return relative_bias.KerpleBias(r[0], r2, variant=self.variant)


@register_position
@dataclasses.dataclass(frozen=True)
class Fire(PositionScheme):
  """FIRE: a small MLP of the log-normalised distance, per head."""
  name: ClassVar[str] = "fire"
  hidden: int = 32
  init_threshold: float = 512.0

  def init_params(self, layer, *, num_heads, rngs, param_dtype):
    layer.fire_in = nnx.Linear(1, self.hidden, param_dtype=param_dtype,
                               rngs=rngs)
    layer.fire_out = nnx.Linear(self.hidden, num_heads,
                                param_dtype=param_dtype, rngs=rngs)
    layer.fire_c = nnx.Param(jnp.asarray(1.0, param_dtype))
    layer.fire_threshold = nnx.Param(
        jnp.asarray(self.init_threshold, param_dtype))

  def position_bias(self, layer):
    # FireBias uses |c| and |threshold|, as positional.fire_bias.
    return relative_bias.FireBias(
        layer.fire_in.kernel[...], layer.fire_in.bias[...],
        layer.fire_out.kernel[...], layer.fire_out.bias[...],
        layer.fire_c[...], layer.fire_threshold[...])


class LearnedPositionEmbedding(nnx.Module):
  """A learned absolute table [max_len, dim]; it cannot run past max_len.

  Positions past the table raise when they are known at trace time and give
  NaN (loudly wrong, never silently clipped) when they are traced.
  """

  def __init__(self, max_len: int, dim: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.max_len = check_int("max_len", max_len, 1)
    self.table = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (max_len, dim), param_dtype))

  def __call__(self, positions: Array) -> Array:
    try:
      top = int(jnp.max(positions)) if jnp.size(positions) else 0
    except jax.errors.ConcretizationTypeError:
      top = None      # traced: out-of-table rows come back as NaN
    if top is not None and top >= self.max_len:
      raise ValueError(f"position {top} is past the learned table "
                       f"(max_len={self.max_len}); learned absolute "
                       "embeddings cannot extrapolate")
    return jnp.take(self.table[...], positions, axis=0, mode="fill",
                    fill_value=jnp.nan)


class Attention(nnx.Module):
  """Multi-head (grouped-query) self-attention with a position scheme.

  ``__call__(x [B, T, D], *, positions=None, segment_ids=None) -> [B, T, D]``.
  ``positions`` ([B, T] or [T], default 0..T-1) are per-document in packed
  rows; they drive RoPE, the relative biases and the mask (so a Lambda mask's
  sinks are each document's first tokens).
  """

  def __init__(self, features: int, num_heads: int, *,
               num_kv_heads: Optional[int] = None,
               head_dim: Optional[int] = None,
               position: Union[PositionScheme, str] = NoPE(),
               mask: Optional[masks_lib.Mask] = masks_lib.Causal(),
               implementation: Union[str, core.Implementation, None] = None,
               logits_soft_cap: Optional[float] = None,
               length_scaling: Optional[int] = None,
               temperature: Union[temperature_lib.Temperature, str,
                                  None] = None,
               qk_norm: bool = False, qk_norm_eps: float = 1e-6,
               sink_logits: bool = False,
               qkv_bias: bool = False, out_bias: bool = False, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    check_int("num_heads", num_heads, 1)
    check_int("num_kv_heads", num_kv_heads, 1)
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of "
                       f"num_kv_heads={num_kv_heads}")
    if head_dim is None:
      if features % num_heads:
        raise ValueError(f"features={features} is not divisible by "
                         f"num_heads={num_heads}; give head_dim")
      head_dim = features // num_heads
    if isinstance(position, str):
      position = position_from_name(position)
    if not isinstance(position, PositionScheme):
      raise ValueError(f"position must be a PositionScheme (one of "
                       f"{position_names()} or a registered one), got "
                       f"{position!r}")
    self.mask = masks_lib.as_mask(mask)
    position.check(head_dim, self.mask)
    if length_scaling is not None:
      check_int("length_scaling", length_scaling, 2)
    if isinstance(temperature, str):
      temperature = temperature_lib.temperature_from_name(temperature)
    if temperature is not None and not isinstance(
        temperature, temperature_lib.Temperature):
      raise ValueError(f"temperature must be None, a Temperature or one of "
                       f"{temperature_lib.temperature_names()}, got "
                       f"{temperature!r}")
    if not isinstance(qk_norm, bool):
      raise ValueError(f"qk_norm must be a bool, got {qk_norm!r}")
    if not isinstance(sink_logits, bool):
      raise ValueError(f"sink_logits must be a bool, got {sink_logits!r}")
    self.num_heads, self.num_kv_heads, self.head_dim = (
        num_heads, num_kv_heads, head_dim)
    self.position = position
    self.implementation = implementation
    self.logits_soft_cap = logits_soft_cap
    self.length_scaling = length_scaling
    self.temperature = temperature
    self.dtype = dtype
    dense = lambda n: nnx.LinearGeneral(
        features, (n, head_dim), use_bias=qkv_bias, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.q_proj = dense(num_heads)
    self.k_proj = dense(num_kv_heads)
    self.v_proj = dense(num_kv_heads)
    self.o_proj = nnx.LinearGeneral(
        (num_heads, head_dim), features, axis=(-2, -1), use_bias=out_bias,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if qk_norm:   # Qwen3 / OLMo 2: RMSNorm over each head's dims
      norm = lambda: nnx.RMSNorm(head_dim, epsilon=qk_norm_eps, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
      self.q_norm, self.k_norm = norm(), norm()
    self.qk_norm = qk_norm
    # gpt-oss attention sinks: one learned logit per query head in the
    # softmax denominator (zeros at init, as gpt-oss; ``sinks`` there too).
    self.sinks = nnx.Param(jnp.zeros((num_heads,), param_dtype)) if (
        sink_logits) else None
    position.init_params(self, num_heads=num_heads, rngs=rngs,
                         param_dtype=param_dtype)
    if temperature is not None:
      temperature.init_params(self, num_heads=num_heads, rngs=rngs,
                              param_dtype=param_dtype)

  def attend(self, q: Array, k: Array, v: Array, q_positions: Array,
             k_positions: Array, *, segment_ids=None, rope_q_positions=None,
             rope_k_positions=None, explicit: bool = True,
             return_residuals: bool = False) -> Array:
    """Attention of projected heads; keys and queries not yet rotated.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] (a KV cache holds keys before RoPE).
      q_positions, k_positions: int [B, T] / [B, S] absolute positions (the
        mask and the relative biases use them).
      rope_q_positions, rope_k_positions: positions RoPE rotates with, when
        they differ (StreamingLLM re-positions keys by cache slot).
      explicit: pass the positions to the attention call (False: the default
        bottom-right alignment, which lets every implementation serve).
      return_residuals: also return the log-sum-exp, float32 [B, N, T].
    Returns:
      [B, T, N, H] before the output projection (and the lse).
    """
    rope_q = q_positions if rope_q_positions is None else rope_q_positions
    rope_k = k_positions if rope_k_positions is None else rope_k_positions
    p = self.position
    if self.qk_norm:   # before RoPE, as Qwen3 / OLMo 2
      q, k = self.q_norm(q), self.k_norm(k)
    q, k, far = p.rotate(self, q, k, rope_q, rope_k)
    scales = []
    if self.length_scaling is not None:
      scales.append(positional.length_logit_scale(
          q_positions, self.length_scaling)[..., None])
    if self.temperature is not None:
      scales.append(self.temperature.scale(self, q_positions))
    for scale in scales:        # [B, T, 1] or [B, T, N]
      q = q * scale[..., None].astype(q.dtype)
      if far:
        far["far_query"] = far["far_query"] * scale[..., None].astype(
            q.dtype)
    # The implementation chosen at call time (core.use_implementation) wins
    # over the one this layer was built with.
    implementation = core.current_implementation() or self.implementation
    # A position_bias is evaluated per tile where the implementation can
    # (xla_chunked, pallas_gpu, pallas_tpu), else materialised by dispatch; it is computed from
    # the call's positions, which equal q_positions / k_positions (the
    # default alignment is only used when they coincide).
    pos_bias = p.position_bias(self)
    return core.dot_product_attention(
        q, k, v, mask=self.mask, segment_ids=segment_ids,
        alibi_slopes=p.alibi_slopes(self.num_heads),
        bias=None if pos_bias is not None else p.bias(
            self, q_positions, k_positions),
        position_bias=pos_bias,
        logits_soft_cap=self.logits_soft_cap,
        implementation=implementation,
        query_positions=q_positions if explicit else None,
        key_positions=k_positions if explicit else None,
        return_residuals=return_residuals,
        sink_logits=None if self.sinks is None else self.sinks[...], **far)

  def __call__(self, x: Array, *, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None) -> Array:
    b, t, _ = x.shape
    explicit = positions is not None
    given = positions
    positions = _once(("positions", b, t), (given,), lambda: jnp.broadcast_to(
        jnp.asarray(jnp.arange(t) if given is None else given, jnp.int32),
        (b, t)))
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    out = self.attend(q, k, v, positions, positions, segment_ids=segment_ids,
                      explicit=explicit)
    return self.o_proj(out)
