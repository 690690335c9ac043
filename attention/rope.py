"""Rotary position embeddings (RoPE), with the Hugging Face RoPE scalings.

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

The scaling methods themselves (``ROPE_TYPES``), the ``rope_scaling`` key
policy and :func:`zero_shot_scaling` live in :mod:`rope_scaling`;
``ROPE_TYPES``, ``ZERO_SHOT_SCALINGS`` and ``zero_shot_scaling`` are
re-exported here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from .rope_scaling import (ROPE_TYPES, ZERO_SHOT_SCALINGS, _ROPE_METHODS,
                           _RopeInputs, _check_keys, _is_int, _is_real,
                           _rope_type, zero_shot_scaling)

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


# ----------------------------------------------------------------------------
# rope_frequencies.


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
      for plain RoPE. See :mod:`rope_scaling` for the key policy and
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
