"""Model hyperparameters: frozen dataclasses with a JSON round trip.

``AttentionSpec`` says what one layer's attention computes (position scheme,
mask, window) in plain JSON-able fields; ``ModelConfig.attention`` is a
pattern of specs cycled over the layers, so hybrids (RoPE / NoPE interleaved,
local / global alternating) are one tuple.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any, Mapping, Optional

from extrapolax.attention import layer as attn_layer
from extrapolax.attention import masks

POSITIONS = ("nope", "rope", "alibi", "t5", "kerple", "fire")
MASKS = ("causal", "sliding_window", "lambda", "chunked")
ABSOLUTE = ("none", "sinusoidal", "learned")
DTYPES = ("float32", "bfloat16")


def _choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _positive_int(name, value, minimum=1):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < minimum):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """One layer's attention semantics.

  Attributes:
    position: one of POSITIONS.
    rope_base, rope_scaling, partial_rotary_factor, rope_layout: RoPE
      settings (rope_scaling is a Hugging Face dict, verbatim).
    rope_max_position_embeddings: what dynamic/yarn/llama3 scalings read when
      the dict has no original_max_position_embeddings.
    mask: one of MASKS; ``window`` for sliding_window and lambda,
      ``num_sinks`` for lambda, ``chunk`` for chunked (causal within chunks).
    logits_soft_cap: None or c > 0.
    length_scaling: None, or the training length for log(n)/log(L) scaling.
    t5_num_buckets, t5_max_distance: T5 bias settings.
  """
  position: str = "rope"
  rope_base: float = 10000.0
  rope_scaling: Optional[Mapping[str, Any]] = None
  rope_max_position_embeddings: Optional[int] = None
  partial_rotary_factor: float = 1.0
  rope_layout: str = "half"
  mask: str = "causal"
  window: Optional[int] = None
  num_sinks: int = 0
  chunk: Optional[int] = None
  logits_soft_cap: Optional[float] = None
  length_scaling: Optional[int] = None
  t5_num_buckets: int = 32
  t5_max_distance: int = 128

  def __post_init__(self):
    _choice("position", self.position, POSITIONS)
    _choice("mask", self.mask, MASKS)
    if self.mask in ("sliding_window", "lambda"):
      _positive_int(f"window (mask {self.mask!r})", self.window)
    elif self.window is not None:
      raise ValueError(f"window={self.window} is only used by the "
                       f"sliding_window and lambda masks, not {self.mask!r}")
    if self.mask == "chunked":
      _positive_int("chunk", self.chunk)
    elif self.chunk is not None:
      raise ValueError(f"chunk={self.chunk} is only used by the chunked mask")
    _positive_int("num_sinks", self.num_sinks, 0)
    if self.num_sinks and self.mask != "lambda":
      raise ValueError(f"num_sinks={self.num_sinks} is only used by the "
                       f"lambda mask, not {self.mask!r}")
    rope_only = dict(rope_scaling=None, partial_rotary_factor=1.0,
                     rope_layout="half", rope_max_position_embeddings=None)
    if self.position != "rope":
      for name, default in rope_only.items():
        if getattr(self, name) != default:
          raise ValueError(f"{name}={getattr(self, name)!r} needs "
                           f"position='rope', got {self.position!r}")

  def to_position(self):
    """The attention layer's position scheme object."""
    if self.position == "rope":
      return attn_layer.Rope(
          base=self.rope_base, rope_scaling=self.rope_scaling,
          max_position_embeddings=self.rope_max_position_embeddings,
          partial_rotary_factor=self.partial_rotary_factor,
          layout=self.rope_layout)
    return {
        "nope": attn_layer.NoPE(),
        "alibi": attn_layer.Alibi(),
        "t5": attn_layer.T5Bias(num_buckets=self.t5_num_buckets,
                                max_distance=self.t5_max_distance),
        "kerple": attn_layer.Kerple(),
        "fire": attn_layer.Fire(),
    }[self.position]

  def to_mask(self) -> masks.Mask:
    return {
        "causal": lambda: masks.Causal(),
        "sliding_window": lambda: masks.SlidingWindow(self.window),
        "lambda": lambda: masks.Lambda(self.num_sinks, self.window),
        "chunked": lambda: masks.Causal() & masks.Chunked(self.chunk),
    }[self.mask]()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only LM: pre-norm RMSNorm, SwiGLU MLP, grouped-query attention.

  Attributes:
    attention: specs cycled over the layers (layer i uses
      ``attention[i % len(attention)]``).
    qkv_bias: biases on the q/k/v projections (Qwen2, Llama attention_bias).
    out_bias: a bias on the output projection (Llama attention_bias).
    absolute: absolute position embeddings added to the token embeddings.
    max_len: the training length (the learned table's size).
    dtype: compute dtype; parameters are ``param_dtype``.
  """
  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  mlp_dim: int = 512
  tie_embeddings: bool = True
  qkv_bias: bool = False
  out_bias: bool = False
  absolute: str = "none"
  max_len: int = 256
  attention: tuple[AttentionSpec, ...] = (AttentionSpec(),)
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  implementation: Optional[str] = None

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads",
                 "mlp_dim", "max_len"):
      _positive_int(name, getattr(self, name))
    kv = self.kv_heads
    _positive_int("num_kv_heads", kv)
    if self.num_heads % kv:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={kv}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by "
                       f"num_heads={self.num_heads}; set head_dim")
    _choice("absolute", self.absolute, ABSOLUTE)
    _choice("dtype", self.dtype, DTYPES)
    _choice("param_dtype", self.param_dtype, DTYPES)
    attention = tuple(self.attention)
    if not attention or not all(isinstance(a, AttentionSpec)
                                for a in attention):
      raise ValueError("attention must be a non-empty tuple of AttentionSpec, "
                       f"got {self.attention!r}")
    object.__setattr__(self, "attention", attention)
    for spec in attention:
      if spec.position == "rope":   # bad rope_scaling fails here, not later
        spec.to_position().frequencies(self.per_head_dim)

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def per_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def layer_spec(self, i: int) -> AttentionSpec:
    return self.attention[i % len(self.attention)]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
    data = dict(data)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
    specs = []
    for spec in data.pop("attention", [{}]):
      bad = set(spec) - {f.name for f in dataclasses.fields(AttentionSpec)}
      if bad:
        raise ValueError(f"unknown AttentionSpec fields {sorted(bad)}")
      specs.append(AttentionSpec(**spec))
    return cls(attention=tuple(specs), **data)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))
