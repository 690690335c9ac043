"""The Hugging Face RoPE scalings: one frequency method per ``rope_type``.

Axis legend: H head dim, R rotary dims (``inv_freq`` is ``[R/2]``).

Each method turns a ``rope_scaling`` dict into ``(inv_freq,
attention_factor)``, the pair transformers' ``ROPE_INIT_FUNCTIONS`` returns
for the same config; :func:`rope.rope_frequencies` (the public entry point)
checks the head size, base and rotary fraction, then calls the method named
by the dict. ``_ROPE_METHODS`` is the one place a rope_type is defined (its
function and the keys it reads); ``ROPE_TYPES`` lists it.
:func:`zero_shot_scaling` writes the dict of the methods a sweep can put on a
trained model from a factor alone (``ZERO_SHOT_SCALINGS``).

The ``rope_scaling`` dict is accepted verbatim as transformers writes it
(``config.rope_scaling`` in transformers 4, ``config.rope_parameters`` in
transformers 5). Key policy:

* ``rope_type`` or the legacy ``type`` names the method (``default`` when
  neither is given); if both are present they must agree.
* ``rope_theta`` in the dict sets the base; ``partial_rotary_factor`` in the
  dict sets the rotary fraction. Each may also be given as the keyword
  argument of ``rope_frequencies`` (``base``, ``partial_rotary_factor``);
  passing a non-default keyword value that disagrees with the dict
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
``jnp`` ops. All other work is done once in float64 NumPy;
:func:`rope.rope_frequencies` rounds the result to a float32 ``jax.Array``
and ``attention_scaling`` to a Python float.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

__all__ = [
    "ROPE_TYPES",
    "ZERO_SHOT_SCALINGS",
    "zero_shot_scaling",
]

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
# Reading the dict: which method, and only the keys it uses.


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
