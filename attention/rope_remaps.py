"""Training-free changes to RoPE's frequencies and positions.

Plain functions on arrays; the ``Rope`` position scheme (layer.py) applies
them, and ``AttentionSpec`` fields (models/config.py) name them.

Frequencies (``inv_freq`` float32 ``[R/2]``, highest frequency first, as
:func:`rope.rope_frequencies` returns it):

* :func:`p_rope_frequencies` (p-RoPE, Barbero et al. 2024, "Round and Round
  We Go! What makes Rotary Positional Encodings useful?"): the fraction ``p``
  of highest frequencies keeps rotating, the lowest ``1 - p`` are set to 0 (a
  zero frequency is the identity: those dims carry no position, NoPE). As in
  the paper's and Gemma's code, the kept frequencies are the ones plain
  RoPE has (exponents over the full rotary width), so ``p = 1`` is RoPE.
* :func:`truncated_basis` (Giraffe, Pal et al. 2023): ``theta_i`` stays when
  ``theta_i >= b``, becomes the fixed ``rho`` when ``a < theta_i < b`` and 0
  when ``theta_i <= a`` (the paper's truncated basis, eq. 5).
* :func:`spread_bases`: one RoPE base per head, log-evenly spread between two
  bases (HARPE: Head-Adaptive RoPE, one base per head); ``Rope(base=(...))``
  takes any per-head tuple.

Positions:

* :func:`string_far_positions` / :func:`string_distance` (STRING, An et al.
  2024, "Why Does the Effective Context Length of LLMs Fall Short?"): pairs
  at distance ``d = i - j >= shift`` are scored at distance ``d - shift +
  local_window``; nearer pairs are unchanged. The reference code
  (HKUNLP/STRING, ``string_for_llama.py``) runs a sliding-window flash
  attention call with the plain rotation and a second call over the far
  keys with the query rotated at ``i - shift + local_window``, merged by
  log-sum-exp; here the same two scores are one call's near / far pairs
  (``far_query`` of ``dot_product_attention``, the Self-Extend machinery).
  One difference: the reference's window call also covers distance
  ``shift`` itself (flash ``window_size=(shift, 0)``), so that pair is in
  both calls; here it is far only, as the paper's formula says.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from extrapolax.common import checks

__all__ = ["p_rope_frequencies", "truncated_basis", "spread_bases",
           "string_far_positions", "string_distance", "check_string"]


def p_rope_frequencies(inv_freq, fraction: float) -> jax.Array:
  """``inv_freq`` with only its ``int(fraction * R/2)`` highest frequencies.

  Args:
    inv_freq: ``[R/2]`` (or ``[N, R/2]``), highest frequency first.
    fraction: p in [0, 1]; 1 is RoPE, 0 is NoPE on every dim.
  """
  fraction = checks.check_number("p_rope fraction", fraction)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"p_rope fraction must be in [0, 1], got {fraction!r}")
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  keep = int(fraction * inv_freq.shape[-1])
  return jnp.where(jnp.arange(inv_freq.shape[-1]) < keep, inv_freq, 0.0)


def check_truncation(a, b, rho) -> tuple[float, float, float]:
  """Giraffe's (a, b, rho) as floats; 0 <= a < b, rho >= 0."""
  a = checks.check_number("truncated_basis a", a)
  b = checks.check_number("truncated_basis b", b)
  rho = checks.check_number("truncated_basis rho", rho)
  if not 0.0 <= a < b:
    raise ValueError(f"truncated_basis needs 0 <= a < b, got a={a!r}, "
                     f"b={b!r}")
  if rho < 0:
    raise ValueError(f"truncated_basis rho must be >= 0, got {rho!r}")
  return a, b, rho


def truncated_basis(inv_freq, *, a: float, b: float, rho: float) -> jax.Array:
  """Giraffe's truncated basis: theta if theta >= b, rho if a < theta < b,
  else 0 (same shape as ``inv_freq``)."""
  a, b, rho = check_truncation(a, b, rho)
  theta = jnp.asarray(inv_freq, jnp.float32)
  return jnp.where(theta >= b, theta, jnp.where(theta > a, rho, 0.0))


def spread_bases(num_heads: int, low: float, high: float) -> tuple[float, ...]:
  """``num_heads`` RoPE bases from ``low`` to ``high``, evenly in log base
  (one head when ``num_heads == 1`` gets ``low``)."""
  num_heads = checks.check_int("num_heads", num_heads, 1)
  low = checks.check_number("low", low)
  high = checks.check_number("high", high)
  if not 1 < low <= high:
    raise ValueError(f"bases need 1 < low <= high, got low={low!r}, "
                     f"high={high!r}")
  return tuple(float(x) for x in np.exp(np.linspace(
      math.log(low), math.log(high), num_heads)))


def check_string(string) -> tuple[int, int]:
  """STRING's (shift, local_window) as ints: shift >= 1, 0 <= local_window
  < shift (otherwise far pairs would move further, not nearer)."""
  if isinstance(string, (str, bytes)) or len(string) != 2:
    raise ValueError(f"string must be (shift, local_window), got {string!r}")
  shift = checks.check_int("string shift", string[0], 1)
  local = checks.check_int("string local_window", string[1], 0)
  if local >= shift:
    raise ValueError(f"string local_window={local} must be < shift={shift} "
                     "(far pairs move to distance d - shift + local_window)")
  return shift, local


def string_far_positions(q_positions, *, shift: int, local_window: int):
  """The positions STRING rotates queries with for their far keys:
  ``i - shift + local_window`` (keys keep ``j``). int32, same shape."""
  shift, local_window = check_string((shift, local_window))
  return jnp.asarray(q_positions, jnp.int32) - (shift - local_window)


def string_distance(distance, *, shift: int, local_window: int):
  """STRING's effective relative distance: ``d`` below ``shift``, ``d -
  shift + local_window`` from it on (int32, same shape)."""
  shift, local_window = check_string((shift, local_window))
  d = jnp.asarray(distance, jnp.int32)
  return jnp.where(d >= shift, d - shift + local_window, d)
