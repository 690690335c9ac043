"""Rotary position embeddings (RoPE) and the Hugging Face RoPE scalings.

Axis legend: B batch, T query length, N heads, H head dim, R rotary dims
(R = 2 * len(inv_freq) <= H; the remaining H - R dims pass through).

Two pieces:

* :func:`rope_frequencies` turns a head size and a Hugging Face style
  ``rope_scaling`` dict into ``(inv_freq, attention_scaling)``, the same pair
  that transformers' ``ROPE_INIT_FUNCTIONS`` (and the per-model
  ``compute_default_rope_parameters``) return for the same config.
* :func:`apply_rope` rotates ``[B, T, N, H]`` queries or keys by explicit
  positions, in the Hugging Face / Llama half-split layout (pairs
  ``(i, i + R/2)``) or the GPT-J interleaved layout (pairs ``(2i, 2i + 1)``).

The ``rope_scaling`` dict is accepted verbatim as transformers writes it
(``config.rope_scaling`` in transformers 4, ``config.rope_parameters`` in
transformers 5). Key policy:

* ``rope_type`` or the legacy ``type`` names the method (``default`` when
  neither is given); if both are present they must agree.
* ``rope_theta`` in the dict sets the base; ``partial_rotary_factor`` in the
  dict sets the rotary fraction. Each may also be given as the keyword
  argument; passing a non-default keyword value that disagrees with the dict
  raises (we cannot tell an explicit default from an omitted one, so a
  keyword left at its default simply yields to the dict).
* Every other key must be one the method uses; anything else raises
  ``ValueError`` instead of being ignored (transformers only logs a warning).
  In particular ``original_max_position_embeddings`` is rejected for
  ``dynamic``: transformers scales dynamic NTK relative to
  ``max_position_embeddings`` and never reads it.
* A key whose value is ``None`` counts as absent (transformers reads
  optional keys with ``dict.get``), with one exception copied from
  transformers: yarn's ``factor`` must be present, and ``None`` there means
  ``max_position_embeddings / original_max_position_embeddings``
  (DeepSeek-V3 style). yarn's ``truncate`` follows transformers' truthiness,
  so ``None`` turns truncation off.

``proportional`` (transformers' newest type, Gemma 4's p-RoPE) is the one
method whose frequencies span the whole head whatever the rotary fraction:
the fraction sets how many of the ``H / 2`` pairs get a non-zero frequency
(the rest stay unrotated), so its ``inv_freq`` is ``[H / 2]``.

``seq_len`` only matters for ``dynamic`` and ``longrope``; it may be a traced
JAX scalar, so those two methods compute their seq_len-dependent part with
``jnp`` ops. All other work is done once in float64 NumPy and rounded to a
float32 ``jax.Array`` at the end. ``attention_scaling`` is always a Python
float.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ROPE_TYPES",
    "ROPE_LAYOUTS",
    "ZERO_SHOT_SCALINGS",
    "zero_shot_scaling",
    "rope_frequencies",
    "rope_cos_sin",
    "apply_rope",
]

_DEFAULT_BASE = 10000.0
_DEFAULT_PARTIAL_ROTARY_FACTOR = 1.0
# Keys every rope type accepts; handled by rope_frequencies itself.
_COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta",
                          "partial_rotary_factor"})
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class _RopeInputs:
  """What a rope-type function receives, already validated."""
  rope_type: str
  params: Mapping[str, Any]
  base: float
  rot_dim: int
  max_position_embeddings: Optional[int]
  seq_len: Any  # None, a Python int or a (possibly traced) JAX scalar.


@dataclasses.dataclass(frozen=True)
class _RopeMethod:
  compute: Callable[[_RopeInputs], tuple[Any, float]]
  required: frozenset[str]
  optional: frozenset[str]


# ----------------------------------------------------------------------------
# Value checks.


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(inputs: _RopeInputs, key: str, default=_MISSING, *,
            positive: bool = False) -> Any:
  """Reads rope_scaling[key] as a real number (None counts as absent)."""
  value = inputs.params.get(key)
  if value is None:
    if default is _MISSING:
      raise ValueError(
          f"rope_type {inputs.rope_type!r} requires rope_scaling[{key!r}]; "
          f"got {dict(inputs.params)!r}")
    return default
  if not _is_real(value) or not math.isfinite(value):
    raise ValueError(
        f"rope_scaling[{key!r}] must be a finite number; got {value!r}")
  if positive and value <= 0:
    raise ValueError(f"rope_scaling[{key!r}] must be > 0; got {value!r}")
  return float(value)


def _require_max_positions(inputs: _RopeInputs) -> int:
  if inputs.max_position_embeddings is None:
    raise ValueError(
        f"rope_type {inputs.rope_type!r} requires max_position_embeddings "
        "(the model's context length); got None")
  return inputs.max_position_embeddings


def _original_max_positions(inputs: _RopeInputs) -> int:
  """original_max_position_embeddings, falling back as transformers does."""
  value = inputs.params.get("original_max_position_embeddings")
  if value is None:
    # transformers' standardize_rope_params() copies max_position_embeddings
    # into the dict when the key is absent.
    if inputs.max_position_embeddings is None:
      raise ValueError(
          f"rope_type {inputs.rope_type!r} requires "
          "rope_scaling['original_max_position_embeddings'] or, as a "
          "fallback, max_position_embeddings; got neither")
    return inputs.max_position_embeddings
  if not _is_int(value) or value <= 0:
    raise ValueError(
        "rope_scaling['original_max_position_embeddings'] must be a positive "
        f"int; got {value!r}")
  return int(value)


def _require_rot_dim_above_two(inputs: _RopeInputs) -> None:
  if inputs.rot_dim <= 2:
    raise ValueError(
        f"rope_type {inputs.rope_type!r} changes the base with exponent "
        "rot_dim / (rot_dim - 2) and needs rot_dim > 2; got rot_dim="
        f"{inputs.rot_dim}")


def _default_inv_freq(base: float, rot_dim: int) -> np.ndarray:
  """inv_freq[i] = base ** (-2i / rot_dim), float64 [rot_dim // 2]."""
  exponents = np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim
  return 1.0 / base**exponents


# ----------------------------------------------------------------------------
# One function per rope type. Each returns (inv_freq, attention_factor) with
# inv_freq a float64 NumPy array or a float32 JAX array of shape [rot_dim/2].


def _default(inputs: _RopeInputs):
  return _default_inv_freq(inputs.base, inputs.rot_dim), 1.0


def _linear(inputs: _RopeInputs):
  factor = _number(inputs, "factor", positive=True)
  return _default_inv_freq(inputs.base, inputs.rot_dim) / factor, 1.0


def _ntk(inputs: _RopeInputs):
  """Static NTK-aware scaling: base' = base * factor ** (d / (d - 2))."""
  factor = _number(inputs, "factor", positive=True)
  _require_rot_dim_above_two(inputs)
  dim = inputs.rot_dim
  base = inputs.base * factor**(dim / (dim - 2))
  return _default_inv_freq(base, dim), 1.0


def _dynamic(inputs: _RopeInputs):
  """Dynamic NTK (transformers' `dynamic`), traceable in seq_len.

  With l = max(seq_len, M) and M = max_position_embeddings, transformers uses
  base' = base * (factor * l / M - (factor - 1)) ** (d / (d - 2)). We write
  the same thing as inv_freq0[i] * ratio ** (-2i / (d - 2)), which keeps the
  large base out of the float32 power.
  """
  factor = _number(inputs, "factor", positive=True)
  max_positions = _require_max_positions(inputs)
  _require_rot_dim_above_two(inputs)
  inv_freq = _default_inv_freq(inputs.base, inputs.rot_dim)
  if inputs.seq_len is None:  # transformers: seq_len defaults to M, ratio 1.
    return inv_freq, 1.0
  length = jnp.maximum(jnp.asarray(inputs.seq_len, jnp.float32),
                       jnp.float32(max_positions))
  ratio = factor * length / max_positions - (factor - 1.0)
  exponents = np.arange(0, inputs.rot_dim, 2) / (inputs.rot_dim - 2)
  scale = jnp.power(ratio, -jnp.asarray(exponents, jnp.float32))
  return jnp.asarray(inv_freq, jnp.float32) * scale, 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inputs: _RopeInputs):
  """YaRN as transformers >= 4.57 computes it (ramp over the index i)."""
  params = inputs.params
  dim, base = inputs.rot_dim, inputs.base
  if "factor" not in params:
    raise ValueError(
        "rope_type 'yarn' requires rope_scaling['factor'] (set it to None to "
        "use max_position_embeddings / original_max_position_embeddings); "
        f"got {dict(params)!r}")
  original = _original_max_positions(inputs)
  if params["factor"] is None:
    if inputs.max_position_embeddings is None:
      raise ValueError(
          "rope_type 'yarn' with rope_scaling['factor'] = None derives the "
          "factor from max_position_embeddings, which is None")
    factor = inputs.max_position_embeddings / original
  else:
    factor = _number(inputs, "factor", positive=True)

  attention_factor = _number(inputs, "attention_factor", None)
  mscale = _number(inputs, "mscale", None)
  mscale_all_dim = _number(inputs, "mscale_all_dim", None)
  if attention_factor is None:
    if mscale and mscale_all_dim:  # truthiness, as transformers.
      attention_factor = (_yarn_mscale(factor, mscale) /
                          _yarn_mscale(factor, mscale_all_dim))
    else:
      attention_factor = _yarn_mscale(factor)

  # transformers: `get("beta_fast") or 32`, so 0 also means the default.
  beta_fast = _number(inputs, "beta_fast", None) or 32.0
  beta_slow = _number(inputs, "beta_slow", None) or 1.0
  truncate = params.get("truncate", True)
  if truncate is not None and not isinstance(truncate, bool):
    raise ValueError(
        f"rope_scaling['truncate'] must be a bool; got {truncate!r}")

  def correction_dim(num_rotations):
    return (dim * math.log(original / (num_rotations * 2 * math.pi)) /
            (2 * math.log(base)))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp.
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low),
                 0.0, 1.0)
  inv_freq = _default_inv_freq(base, dim)
  # ramp = 0: keep (extrapolate); ramp = 1: divide by factor (interpolate).
  inv_freq = inv_freq / factor * ramp + inv_freq * (1.0 - ramp)
  return inv_freq, float(attention_factor)


def _llama3(inputs: _RopeInputs):
  factor = _number(inputs, "factor", positive=True)
  low_freq_factor = _number(inputs, "low_freq_factor", positive=True)
  high_freq_factor = _number(inputs, "high_freq_factor", positive=True)
  if high_freq_factor <= low_freq_factor:
    raise ValueError(
        "rope_scaling['high_freq_factor'] must be > "
        f"rope_scaling['low_freq_factor']; got {high_freq_factor!r} <= "
        f"{low_freq_factor!r}")
  original = _original_max_positions(inputs)
  low_freq_wavelen = original / low_freq_factor
  high_freq_wavelen = original / high_freq_factor

  inv_freq = _default_inv_freq(inputs.base, inputs.rot_dim)
  wavelen = 2 * math.pi / inv_freq
  smooth = (original / wavelen - low_freq_factor) / (
      high_freq_factor - low_freq_factor)
  smoothed = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
  is_low_freq = wavelen > low_freq_wavelen
  is_high_freq = wavelen < high_freq_wavelen
  inv_freq = np.where(is_low_freq, inv_freq / factor,
                      np.where(is_high_freq, inv_freq, smoothed))
  return inv_freq, 1.0


def _longrope_factors(inputs: _RopeInputs, key: str) -> np.ndarray:
  value = inputs.params.get(key)
  if value is None:
    raise ValueError(
        f"rope_type 'longrope' requires rope_scaling[{key!r}]; got "
        f"{dict(inputs.params)!r}")
  try:
    factors = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"rope_scaling[{key!r}] must be a list of numbers; got {value!r}"
    ) from e
  expected = inputs.rot_dim // 2
  if factors.shape != (expected,):
    raise ValueError(
        f"rope_scaling[{key!r}] must have length rot_dim // 2 = {expected}; "
        f"got shape {factors.shape}")
  if not np.all(np.isfinite(factors)) or np.any(factors <= 0):
    raise ValueError(
        f"rope_scaling[{key!r}] must hold finite numbers > 0; got {value!r}")
  return factors


def _proportional(inputs: _RopeInputs):
  """Proportional RoPE (transformers' "proportional", Gemma 4's p-RoPE):
  frequencies over the whole head, ``base ** (-2i / H)`` for the first
  ``int(p * H // 2)`` pairs and 0 (no rotation) for the rest, all divided
  by ``factor`` (default 1). Here ``rot_dim`` is the whole head and ``p``
  comes through ``params['_proportion']`` (see rope_frequencies)."""
  factor = _number(inputs, "factor", 1.0, positive=True)
  head_dim = inputs.rot_dim
  angles = int(inputs.params["_proportion"] * head_dim // 2)
  inv_freq = np.zeros(head_dim // 2, np.float64)
  inv_freq[:angles] = inputs.base ** (
      -np.arange(0, 2 * angles, 2, dtype=np.float64) / head_dim)
  return inv_freq / factor, 1.0


def _longrope(inputs: _RopeInputs):
  """LongRoPE: long_factor when seq_len > original length, else short."""
  short_factor = _longrope_factors(inputs, "short_factor")
  long_factor = _longrope_factors(inputs, "long_factor")
  original = _original_max_positions(inputs)
  attention_factor = _number(inputs, "attention_factor", None)
  if attention_factor is None:
    factor = _number(inputs, "factor", None, positive=True)
    if factor is None:
      if inputs.max_position_embeddings is None:
        raise ValueError(
            "rope_type 'longrope' without rope_scaling['factor'] or "
            "rope_scaling['attention_factor'] derives the factor from "
            "max_position_embeddings, which is None")
      factor = inputs.max_position_embeddings / original
    if factor <= 1.0:
      attention_factor = 1.0
    else:
      attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
  else:
    _number(inputs, "factor", None, positive=True)  # validated, then unused.

  inv_freq = _default_inv_freq(inputs.base, inputs.rot_dim)
  short_inv_freq = inv_freq / short_factor
  if inputs.seq_len is None:
    return short_inv_freq, attention_factor
  is_long = jnp.asarray(inputs.seq_len) > original
  return jnp.where(is_long, jnp.asarray(inv_freq / long_factor, jnp.float32),
                   jnp.asarray(short_inv_freq, jnp.float32)), attention_factor


_ROPE_METHODS: dict[str, _RopeMethod] = {
    "default": _RopeMethod(_default, frozenset(), frozenset()),
    "linear": _RopeMethod(_linear, frozenset({"factor"}), frozenset()),
    "ntk": _RopeMethod(_ntk, frozenset({"factor"}), frozenset()),
    "dynamic": _RopeMethod(_dynamic, frozenset({"factor"}), frozenset()),
    "yarn": _RopeMethod(
        _yarn, frozenset({"factor"}),
        frozenset({"attention_factor", "mscale", "mscale_all_dim", "truncate",
                   "beta_fast", "beta_slow",
                   "original_max_position_embeddings"})),
    "llama3": _RopeMethod(
        _llama3, frozenset({"factor", "low_freq_factor", "high_freq_factor"}),
        frozenset({"original_max_position_embeddings"})),
    "proportional": _RopeMethod(_proportional, frozenset(),
                                frozenset({"factor"})),
    "longrope": _RopeMethod(
        _longrope, frozenset({"short_factor", "long_factor"}),
        frozenset({"factor", "attention_factor",
                   "original_max_position_embeddings"})),
}

ROPE_TYPES: tuple[str, ...] = tuple(_ROPE_METHODS)

# The scalings a sweep can put on a model trained at L from a factor alone.
ZERO_SHOT_SCALINGS: tuple[str, ...] = ("linear", "dynamic", "ntk", "yarn",
                                       "llama3")


def zero_shot_scaling(method: str, factor: float,
                      train_len: int) -> Optional[dict[str, Any]]:
  """The Hugging Face rope_scaling dict of ``method`` at ``factor`` for a
  model trained at ``train_len`` (``"none"`` gives None).

  yarn and llama3 record train_len as original_max_position_embeddings;
  llama3 uses Llama 3.1's low_freq_factor 1 and high_freq_factor 4; dynamic
  reads train_len as the spec's max_position_embeddings
  (``AttentionSpec.with_rope_scaling`` sets it).
  """
  if method == "none":
    return None
  if method not in ZERO_SHOT_SCALINGS:
    raise ValueError(f"rope scaling method must be one of "
                     f"{('none',) + ZERO_SHOT_SCALINGS}, got {method!r}")
  if isinstance(factor, bool) or not isinstance(
      factor, (int, float, np.integer, np.floating)) or not factor > 0:
    raise ValueError(f"rope scaling factor must be > 0, got {factor!r}")
  scaling = {"rope_type": method, "factor": float(factor)}
  if method in ("yarn", "llama3"):
    scaling["original_max_position_embeddings"] = int(train_len)
  if method == "llama3":
    scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
  return scaling


# ----------------------------------------------------------------------------
# rope_frequencies.


def _rope_type(params: Mapping[str, Any]) -> str:
  rope_type = params.get("rope_type")
  legacy_type = params.get("type")
  if rope_type is not None and legacy_type is not None and (
      rope_type != legacy_type):
    raise ValueError(
        f"rope_scaling has rope_type {rope_type!r} and type {legacy_type!r}; "
        "they must agree (type is the legacy name of rope_type)")
  rope_type = rope_type if rope_type is not None else legacy_type
  if rope_type is None:
    rope_type = "default"
  if rope_type not in _ROPE_METHODS:
    raise ValueError(
        f"unknown rope_type {rope_type!r}; expected one of "
        f"{sorted(_ROPE_METHODS)}")
  return rope_type


def _check_keys(rope_type: str, params: Mapping[str, Any]) -> None:
  method = _ROPE_METHODS[rope_type]
  allowed = _COMMON_KEYS | method.required | method.optional
  unknown = sorted(str(k) for k in params if k not in allowed)
  if unknown:
    hint = ""
    if params.get("rope_type") is None and params.get("type") is None:
      hint = " (rope_scaling names no 'rope_type', so 'default' was assumed)"
    raise ValueError(
        f"rope_scaling key(s) {unknown} are not used by rope_type "
        f"{rope_type!r}{hint}; allowed keys: {sorted(allowed)}")
  # Required keys are checked by the method itself, which can name a fallback.


def _from_dict_or_argument(params: Mapping[str, Any], key: str, argument,
                           default: float, argument_name: str):
  """rope_scaling[key] wins over an argument left at its default."""
  value = params.get(key)
  if value is None:
    return argument
  if argument != default and argument != value:
    raise ValueError(
        f"rope_scaling[{key!r}] = {value!r} conflicts with {argument_name}="
        f"{argument!r}; give one of them, or the same value")
  return value


def rope_frequencies(
    head_dim: int,
    *,
    base: float = _DEFAULT_BASE,
    rope_scaling: Optional[Mapping[str, Any]] = None,
    max_position_embeddings: Optional[int] = None,
    seq_len=None,
    partial_rotary_factor: float = _DEFAULT_PARTIAL_ROTARY_FACTOR,
) -> tuple[jax.Array, float]:
  """RoPE inverse frequencies and attention scaling, as transformers does.

  Args:
    head_dim: H, the per-head size.
    base: RoPE theta; ``rope_scaling['rope_theta']`` overrides it.
    rope_scaling: a Hugging Face rope_scaling / rope_parameters dict, or None
      for plain RoPE. See the module docstring for the key policy and
      ``ROPE_TYPES`` for the methods.
    max_position_embeddings: the model's context length. Needed by
      ``dynamic``; the fallback for a missing
      ``original_max_position_embeddings`` (yarn, llama3, longrope); and the
      numerator of the derived factor when yarn's or longrope's factor is
      absent.
    seq_len: current sequence length (largest position + 1). Used only by
      ``dynamic`` and ``longrope``; may be a traced JAX integer scalar.
      None means "not longer than the model's context" (transformers'
      init-time value).
    partial_rotary_factor: fraction of H that is rotated;
      ``rope_scaling['partial_rotary_factor']`` overrides it.

  Returns:
    ``(inv_freq, attention_scaling)``: float32 ``[rot_dim // 2]`` with
    ``rot_dim = int(head_dim * partial_rotary_factor)``, and a Python float
    by which transformers multiplies cos and sin.

  Raises:
    ValueError: for an unknown rope_type, a key the method does not use, a
      missing required value, an odd or zero rot_dim, or out-of-range values.
  """
  if rope_scaling is None:
    rope_scaling = {}
  if not isinstance(rope_scaling, Mapping):
    raise ValueError(
        f"rope_scaling must be a dict or None; got {type(rope_scaling)}")
  params = dict(rope_scaling)
  rope_type = _rope_type(params)
  _check_keys(rope_type, params)

  if not _is_int(head_dim) or head_dim <= 0:
    raise ValueError(f"head_dim must be a positive int; got {head_dim!r}")
  base = _from_dict_or_argument(params, "rope_theta", base, _DEFAULT_BASE,
                                "base")
  if not _is_real(base) or not math.isfinite(base) or base <= 1:
    raise ValueError(f"RoPE base (rope_theta) must be a number > 1; got "
                     f"{base!r}")
  partial_rotary_factor = _from_dict_or_argument(
      params, "partial_rotary_factor", partial_rotary_factor,
      _DEFAULT_PARTIAL_ROTARY_FACTOR, "partial_rotary_factor")
  if not _is_real(partial_rotary_factor) or not (
      0 < partial_rotary_factor <= 1):
    raise ValueError(
        "partial_rotary_factor must be a number in (0, 1]; got "
        f"{partial_rotary_factor!r}")
  rot_dim = int(head_dim * partial_rotary_factor)
  if rope_type == "proportional":
    # The whole head carries frequencies; the fraction only decides how
    # many of them are non-zero.
    rot_dim = head_dim
    params["_proportion"] = float(partial_rotary_factor)
  if rot_dim <= 0 or rot_dim % 2:
    raise ValueError(
        f"rot_dim = int(head_dim * partial_rotary_factor) = int({head_dim} * "
        f"{partial_rotary_factor}) = {rot_dim} must be even and positive")
  if max_position_embeddings is not None and (
      not _is_int(max_position_embeddings) or max_position_embeddings <= 0):
    raise ValueError(
        "max_position_embeddings must be a positive int or None; got "
        f"{max_position_embeddings!r}")
  if seq_len is not None and jnp.ndim(seq_len) != 0:
    raise ValueError(
        f"seq_len must be a scalar; got shape {jnp.shape(seq_len)}")

  inputs = _RopeInputs(
      rope_type=rope_type,
      params=params,
      base=float(base),
      rot_dim=rot_dim,
      max_position_embeddings=(None if max_position_embeddings is None else
                               int(max_position_embeddings)),
      seq_len=seq_len,
  )
  inv_freq, attention_scaling = _ROPE_METHODS[rope_type].compute(inputs)
  return jnp.asarray(inv_freq, jnp.float32), float(attention_scaling)


# ----------------------------------------------------------------------------
# Applying the rotation.


def rope_cos_sin(positions, inv_freq,
                 attention_scaling: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """cos and sin of ``positions * inv_freq``, times attention_scaling.

  Args:
    positions: int or float array of any shape ``[...]``.
    inv_freq: ``[R/2]``, or ``[N, R/2]`` (one set of frequencies per head).
    attention_scaling: multiplies both cos and sin (transformers' convention).

  Returns:
    ``(cos, sin)``, each float32 ``[..., R/2]`` (``[..., N, R/2]`` for
    per-head frequencies). The angle is computed as
    ``positions.astype(float32) * inv_freq`` (as transformers does).
  """
  positions = jnp.asarray(positions)
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  if inv_freq.ndim not in (1, 2):
    raise ValueError(
        f"inv_freq must be [R/2] or per head [N, R/2]; got shape "
        f"{inv_freq.shape}")
  if not (jnp.issubdtype(positions.dtype, jnp.integer) or
          jnp.issubdtype(positions.dtype, jnp.floating)):
    raise ValueError(
        f"positions must be an int or float array; got dtype "
        f"{positions.dtype}")
  pos = positions.astype(jnp.float32)
  angles = pos[..., None] * inv_freq if inv_freq.ndim == 1 else (
      pos[..., None, None] * inv_freq)
  return (jnp.cos(angles) * attention_scaling,
          jnp.sin(angles) * attention_scaling)


def _rotate_half_split(x, cos, sin):
  """Pairs (i, i + R/2): Llama / Hugging Face rotate_half."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate_interleaved(x, cos, sin):
  """Pairs (2i, 2i + 1): GPT-J rotate_every_two."""
  x_even, x_odd = x[..., 0::2], x[..., 1::2]
  rotated = jnp.stack([x_even * cos - x_odd * sin,
                       x_odd * cos + x_even * sin], axis=-1)
  return rotated.reshape(x.shape)


_LAYOUTS: dict[str, Callable[..., jax.Array]] = {
    "half": _rotate_half_split,
    "interleaved": _rotate_interleaved,
}
ROPE_LAYOUTS: tuple[str, ...] = tuple(_LAYOUTS)


def apply_rope(x, positions, inv_freq, *, attention_scaling: float = 1.0,
               layout: str = "half") -> jax.Array:
  """Rotates the first R = 2 * len(inv_freq) dims of each head of x.

  Args:
    x: ``[B, T, N, H]`` queries or keys, any float dtype.
    positions: ``[B, T]`` or ``[T]`` explicit positions (int or float); they
      need not be contiguous (packed segments restart at 0).
    inv_freq: ``[R/2]`` with ``R <= H``, e.g. from :func:`rope_frequencies`,
      or ``[N, R/2]``: head ``n`` rotates with ``inv_freq[n]`` (per-head
      bases, HARPE).
    attention_scaling: multiplies cos and sin (so the rotated dims, not the
      pass-through tail, are scaled), as transformers does.
    layout: ``"half"`` (pairs ``(i, i + R/2)``, Llama / Hugging Face) or
      ``"interleaved"`` (pairs ``(2i, 2i + 1)``, GPT-J).

  Returns:
    Array like x: rotated dims computed in float32 and cast to x.dtype; dims
    ``R:`` passed through unchanged.
  """
  if layout not in _LAYOUTS:
    raise ValueError(
        f"unknown layout {layout!r}; expected one of {sorted(_LAYOUTS)}")
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"x must be [B, T, N, H]; got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must have a float dtype; got {x.dtype}")
  batch, length, heads, head_dim = x.shape
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  if inv_freq.ndim not in (1, 2) or (
      inv_freq.ndim == 2 and inv_freq.shape[0] != heads):
    raise ValueError(
        f"inv_freq must be [R/2] or per head [N={heads}, R/2]; got shape "
        f"{inv_freq.shape}")
  rot_dim = 2 * inv_freq.shape[-1]
  if rot_dim > head_dim:
    raise ValueError(
        f"rotary dims R = 2 * len(inv_freq) = {rot_dim} exceed head dim "
        f"H = {head_dim}")
  positions = jnp.asarray(positions)
  if positions.shape not in ((length,), (batch, length)):
    raise ValueError(
        f"positions must have shape [T] = ({length},) or [B, T] = "
        f"({batch}, {length}) to match x {x.shape}; got {positions.shape}")

  cos, sin = rope_cos_sin(positions, inv_freq, attention_scaling)
  return apply_rope_tables(x, cos, sin, layout=layout,
                           per_head=inv_freq.ndim == 2)


def apply_rope_tables(x, cos, sin, *, layout: str = "half",
                      per_head: bool = False) -> jax.Array:
  """``apply_rope`` from tables ``rope_cos_sin`` made ([T, R/2] or [B, T,
  R/2]; with ``per_head`` [(B,) T, N, R/2]): a model computes them once per
  forward and rotates every layer's queries and keys with them. Arguments
  are not checked (see apply_rope)."""
  rot_dim = 2 * cos.shape[-1]
  if not per_head:
    cos, sin = cos[..., None, :], sin[..., None, :]  # [(B,) T, 1, R/2]
  rotated = _LAYOUTS[layout](x[..., :rot_dim].astype(jnp.float32), cos, sin)
  rotated = rotated.astype(x.dtype)
  if rot_dim == x.shape[-1]:
    return rotated
  return jnp.concatenate([rotated, x[..., rot_dim:]], axis=-1)
