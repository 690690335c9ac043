"""Query temperatures: per-head and position-dependent softmax scales.

A temperature multiplies each query (and so its logits) by a factor that
may depend on the head and on the query's position, before attention; every
implementation therefore runs it (it changes q, not the kernel). Each one is
a small frozen dataclass registered by name, like the position schemes:

* ``head_scale`` (Wang et al. 2024, "Length Generalization of Causal
  Transformers without Position Encoding"): a learned scale per head,
  ``softmax(lambda_h q.k / sqrt(H))``; the paper tunes these per-head
  temperatures to extend NoPE models. ``init`` is lambda's start (1: plain
  attention).
* ``ssmax`` (Scalable-Softmax, Nakanishi 2025): ``softmax(s_h log(n) q.k /
  sqrt(H))`` with ``s_h`` learned per head and ``n`` the number of keys the
  query sees. We take ``n = position + 1`` (a causal query's keys; with a
  window or chunk mask the count is smaller, and this stays
  position + 1, as the issue's definition). ``init`` is s's start: our
  choice 0.25 (about 1 / log 64, scale 1 at 64 keys), not the paper's.
* ``llama4`` (Llama 4's attention temperature tuning, transformers'
  ``Llama4TextAttention`` with ``attn_temperature_tuning``): ``q *
  (log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1)``, Llama 4 runs it
  on its NoPE layers (floor_scale 8192, attn_scale 0.1); no parameters.

``scale(layer, q_positions)`` returns float32 ``[B, T, N]`` or ``[B, T, 1]``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from extrapolax.common import checks

__all__ = ["Temperature", "HeadScale", "SSMax", "Llama4Temperature",
           "register_temperature", "temperature_names",
           "temperature_from_name"]


class Temperature:
  """Base of the query temperatures (frozen dataclasses of settings)."""
  name: ClassVar[str] = ""

  def init_params(self, layer, *, num_heads: int, rngs: nnx.Rngs,
                  param_dtype) -> None:
    del layer, num_heads, rngs, param_dtype

  def scale(self, layer, q_positions: jax.Array) -> jax.Array:
    raise NotImplementedError


_TEMPERATURES: dict[str, type] = {}


def register_temperature(cls):
  """Class decorator: names a Temperature subclass by its ``name``."""
  if not (isinstance(cls, type) and issubclass(cls, Temperature)
          and cls.name):
    raise ValueError(f"register_temperature takes a Temperature subclass "
                     f"with a name, got {cls!r}")
  _TEMPERATURES[cls.name] = cls
  return cls


def temperature_names() -> tuple[str, ...]:
  return tuple(_TEMPERATURES)


def temperature_from_name(name: str, **params) -> Temperature:
  """The named temperature with ``params``; unknown names/params raise."""
  return checks.build_registered("temperature", _TEMPERATURES, name, params)


def _log_n(q_positions):
  """log(number of keys a causal query sees) = log(position + 1)."""
  return jnp.log1p(jnp.asarray(q_positions, jnp.float32))


@register_temperature
@dataclasses.dataclass(frozen=True)
class HeadScale(Temperature):
  """A learned temperature per head (NoPE's head-based scale)."""
  name: ClassVar[str] = "head_scale"
  init: float = 1.0

  def __post_init__(self):
    checks.check_number("head_scale init", self.init, positive=True)

  def init_params(self, layer, *, num_heads, rngs, param_dtype):
    del rngs
    layer.head_scale = nnx.Param(jnp.full((num_heads,), self.init,
                                          param_dtype))

  def scale(self, layer, q_positions):
    b, t = q_positions.shape
    return jnp.broadcast_to(layer.head_scale[...].astype(jnp.float32),
                            (b, t, layer.num_heads))


@register_temperature
@dataclasses.dataclass(frozen=True)
class SSMax(Temperature):
  """Scalable-Softmax: ``s_h * log(position + 1)``, s learned per head."""
  name: ClassVar[str] = "ssmax"
  init: float = 0.25

  def __post_init__(self):
    checks.check_number("ssmax init", self.init, positive=True)

  def init_params(self, layer, *, num_heads, rngs, param_dtype):
    del rngs
    layer.ssmax_s = nnx.Param(jnp.full((num_heads,), self.init, param_dtype))

  def scale(self, layer, q_positions):
    s = layer.ssmax_s[...].astype(jnp.float32)
    return _log_n(q_positions)[..., None] * s


@register_temperature
@dataclasses.dataclass(frozen=True)
class Llama4Temperature(Temperature):
  """Llama 4: ``log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1``."""
  name: ClassVar[str] = "llama4"
  floor_scale: int = 8192
  attn_scale: float = 0.1

  def __post_init__(self):
    checks.check_int("llama4 floor_scale", self.floor_scale, 1)
    checks.check_number("llama4 attn_scale", self.attn_scale)

  def scale(self, layer, q_positions):
    del layer
    p = jnp.asarray(q_positions, jnp.float32)
    out = jnp.log1p(jnp.floor((p + 1.0) / self.floor_scale)) * (
        self.attn_scale) + 1.0
    return out[..., None]
