"""Model hyperparameters: frozen dataclasses with a JSON round trip.

``AttentionSpec`` says what one layer's attention computes (position scheme,
mask, window) in plain JSON-able fields; ``ModelConfig.attention`` is a
pattern of specs cycled over the layers, so hybrids (RoPE / NoPE interleaved,
local / global alternating) are one tuple.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

from extrapolax.attention import layer as attn_layer
from extrapolax.attention import temperature as temperature_lib
from extrapolax.common import checks
from extrapolax.attention import masks

ABSOLUTE = ("none", "sinusoidal", "learned")
DTYPES = ("float32", "bfloat16")
# The gated MLP's activation: SwiGLU (silu) or GeGLU with the tanh GELU
# (Gemma's gelu_pytorch_tanh).
MLP_ACTIVATIONS = ("silu", "gelu_tanh")

# The vocabularies live with their objects: position schemes in
# attention/layer.py, masks in attention/masks.py (both registries, so a
# scheme or mask registered anywhere is accepted here).
position_names = attn_layer.position_names
mask_names = masks.names


def _choice(name, value, allowed):
  checks.check_choice(name, value, allowed)


def _positive_int(name, value, minimum=1):
  checks.check_int(name, value, minimum)


# AttentionSpec fields that are shorthand for a mask's parameters.
_MASK_FIELDS = ("window", "num_sinks", "chunk")


def _scheme_fields() -> dict[str, tuple[str, ...]]:
  """AttentionSpec field -> the position names whose schemes read it."""
  out: dict[str, tuple[str, ...]] = {}
  for name in attn_layer.position_names():
    for field in attn_layer.position_class(name).spec_fields:
      out[field] = out.get(field, ()) + (name,)
  return out


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """One layer's attention semantics, in plain JSON-able fields.

  Attributes:
    position: a registered position scheme name
      (``attention.layer.position_names()``: nope, rope, alibi, t5, kerple,
      fire, ...).
    rope_base, rope_scaling, partial_rotary_factor, rope_layout: RoPE
      settings (rope_scaling is a Hugging Face dict, verbatim); rope_base
      may be a tuple of one base per key/value head (HARPE).
    p_rope: p-RoPE's fraction of (highest) frequencies that rotate.
    truncated_basis: Giraffe's (a, b, rho) truncated frequencies.
    string: (shift, local_window): STRING at inference (RoPE): pairs at
      distance d >= shift are scored at d - shift + local_window.
    rope_max_position_embeddings: what dynamic/yarn/llama3 scalings read when
      the dict has no original_max_position_embeddings.
    self_extend: (group_size, window): Self-Extend at inference (RoPE).
    distance_ceiling: LM-Infinite's distance ceiling (RoPE with a lambda
      mask): sink keys past the window are scored at this distance.
    position_args: further parameters of the position scheme by name.
    mask: a registered mask name (``attention.masks.names()``: causal,
      sliding_window, lambda, chunked, prefix_lm, ...) or its text with
      parameters, ``"lambda(num_sinks=4, window=64)"``.
    window, num_sinks, chunk: shorthand for the mask parameters of those
      names (sliding_window / lambda's window, lambda's num_sinks,
      chunked's chunk).
    mask_args: further mask parameters by name (``{"prefix_len": 8}``).
    logits_soft_cap: None or c > 0.
    length_scaling: None, or the training length for log(n)/log(L) scaling.
    temperature: None or a query temperature name
      (``attention.temperature``: head_scale, ssmax, llama4), with its
      parameters in temperature_args.
    qk_norm: RMSNorm on each head's queries and keys before RoPE (Qwen3,
      OLMo 2 style, learned scale per head dim).
    sink_logits: gpt-oss attention sinks: a learned logit per query head
      (the layer's ``sinks`` parameter, zeros at init) joins the softmax
      denominator and takes no value.
    t5_num_buckets, t5_max_distance: T5 bias settings.

  A field the chosen scheme or mask does not read raises; nothing is
  silently ignored.
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
  self_extend: Optional[tuple[int, int]] = None
  distance_ceiling: Optional[int] = None
  mask_args: Optional[Mapping[str, Any]] = None
  position_args: Optional[Mapping[str, Any]] = None
  string: Optional[tuple[int, int]] = None
  p_rope: Optional[float] = None
  truncated_basis: Optional[tuple[float, float, float]] = None
  temperature: Optional[str] = None
  temperature_args: Optional[Mapping[str, Any]] = None
  qk_norm: bool = False
  sink_logits: bool = False

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    # JSON gives lists; the fields are tuples (so equality survives).
    for name in ("string", "truncated_basis", "rope_base"):
      value = getattr(self, name)
      if isinstance(value, list):
        set_(name, tuple(value))
    if not isinstance(self.qk_norm, bool):
      raise ValueError(f"qk_norm must be a bool, got {self.qk_norm!r}")
    if not isinstance(self.sink_logits, bool):
      raise ValueError(f"sink_logits must be a bool, got "
                       f"{self.sink_logits!r}")
    if self.temperature_args is not None and self.temperature is None:
      raise ValueError(f"temperature_args={self.temperature_args!r} needs a "
                       "temperature")
    self.to_temperature()                            # a known name
    attn_layer.position_class(self.position)        # a known name
    name, parsed = masks.parse(self.mask)
    extra = {}
    given = list(parsed.items()) + list(dict(self.mask_args or {}).items())
    for key, value in given:              # text and mask_args -> fields
      if key in _MASK_FIELDS:
        default = 0 if key == "num_sinks" else None
        if getattr(self, key) not in (default, value):
          raise ValueError(f"mask {self.mask!r} sets {key}={value!r} but "
                           f"{key}={getattr(self, key)!r} is also given")
        set_(key, value)
      elif extra.get(key, value) != value:
        raise ValueError(f"mask {self.mask!r} sets {key}={extra[key]!r} but "
                         f"mask_args gives {key}={value!r}")
      else:
        extra[key] = value
    set_("mask", name)
    set_("mask_args", extra or None)
    accepted = masks.parameters(name)
    for key in _MASK_FIELDS:
      value = getattr(self, key)
      if value is None or (key == "num_sinks" and value == 0
                           and key not in accepted):
        continue
      if key not in accepted:
        takes = (f"its parameters are {tuple(accepted)}" if accepted
                 else "it takes no parameters")
        raise ValueError(f"{key}={value!r} is not a parameter of mask "
                         f"{name!r} ({takes})")
    self.to_mask()                                   # values are valid
    if self.self_extend is not None:
      if (isinstance(self.self_extend, (str, bytes))
          or len(self.self_extend) != 2):
        raise ValueError("self_extend must be (group_size, window), got "
                         f"{self.self_extend!r}")
      set_("self_extend", tuple(self.self_extend))
    if self.logits_soft_cap is not None:
      checks.check_number("logits_soft_cap", self.logits_soft_cap,
                          positive=True)
    if self.length_scaling is not None:
      checks.check_int("length_scaling", self.length_scaling, 2)
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    for field, readers in _scheme_fields().items():
      if field in defaults and getattr(self, field) != defaults[field] and (
          self.position not in readers):
        needs = (f"position={readers[0]!r}" if len(readers) == 1
                 else f"position in {readers}")
        raise ValueError(f"{field}={getattr(self, field)!r} needs {needs}, "
                         f"got {self.position!r}")
    self.to_position()                 # the scheme's values are valid

  def mask_params(self) -> dict[str, Any]:
    """The mask's parameters by name (shorthand fields and mask_args)."""
    accepted = masks.parameters(self.mask)
    params = {k: getattr(self, k) for k in _MASK_FIELDS
              if k in accepted and getattr(self, k) is not None}
    params.update(self.mask_args or {})
    return params

  def to_position(self):
    """The attention layer's position scheme object."""
    cls = attn_layer.position_class(self.position)
    params = {param: getattr(self, field)
              for field, param in cls.spec_fields.items()}
    params.update(self.position_args or {})
    return attn_layer.position_from_name(self.position, **params)

  def to_temperature(self) -> Optional[temperature_lib.Temperature]:
    """The layer's query temperature, or None."""
    if self.temperature is None:
      return None
    return temperature_lib.temperature_from_name(
        self.temperature, **dict(self.temperature_args or {}))

  def to_mask(self) -> masks.Mask:
    return masks.from_name(self.mask, **self.mask_params())

  def mask_label(self) -> str:
    """The mask as records name it: ``"lambda(sinks=4, window=128)"``."""
    return masks.label(self.mask, self.mask_params())

  def with_rope_scaling(self, rope_scaling: Optional[Mapping[str, Any]],
                        train_len: int) -> "AttentionSpec":
    """This spec with ``rope_scaling`` (a HF dict, or None) relative to a
    model trained at ``train_len`` (dynamic NTK reads it as
    max_position_embeddings)."""
    scaling = None if rope_scaling is None else dict(rope_scaling)
    dynamic = scaling is not None and scaling.get(
        "rope_type", scaling.get("type")) == "dynamic"
    return dataclasses.replace(
        self, rope_scaling=scaling,
        rope_max_position_embeddings=int(train_len) if dynamic else None)

  def replace(self, **changes) -> "AttentionSpec":
    """A copy with ``changes``; changing ``mask`` resets the mask's
    parameters (window, num_sinks, chunk, mask_args) unless given."""
    if "mask" in changes:
      for key in _MASK_FIELDS + ("mask_args",):
        changes.setdefault(key, 0 if key == "num_sinks" else None)
    return dataclasses.replace(self, **changes)


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
    mlp_activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma).
    post_norms: Gemma 2/3's sandwich norms: an RMSNorm on the attention
      output and on the MLP output before each residual add.
    scale_embeddings: multiply the token embeddings by sqrt(d_model) (in
      the compute dtype, as Gemma does).
    final_logit_soft_cap: None, or c > 0: logits = c * tanh(logits / c)
      (Gemma 2).
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
  mlp_activation: str = "silu"
  post_norms: bool = False
  scale_embeddings: bool = False
  final_logit_soft_cap: Optional[float] = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  implementation: Optional[str] = None

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads",
                 "mlp_dim", "max_len"):
      _positive_int(name, getattr(self, name))
    if self.head_dim is not None:
      _positive_int("head_dim", self.head_dim)
    checks.check_number("norm_eps", self.norm_eps, positive=True)
    kv = self.kv_heads
    _positive_int("num_kv_heads", kv)
    if self.num_heads % kv:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={kv}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by "
                       f"num_heads={self.num_heads}; set head_dim")
    _choice("absolute", self.absolute, ABSOLUTE)
    _choice("mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
    for name in ("post_norms", "scale_embeddings"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got "
                         f"{getattr(self, name)!r}")
    if self.final_logit_soft_cap is not None:
      checks.check_number("final_logit_soft_cap", self.final_logit_soft_cap,
                          positive=True)
    _choice("dtype", self.dtype, DTYPES)
    _choice("param_dtype", self.param_dtype, DTYPES)
    attention = tuple(self.attention)
    if not attention or not all(isinstance(a, AttentionSpec)
                                for a in attention):
      raise ValueError("attention must be a non-empty tuple of AttentionSpec, "
                       f"got {self.attention!r}")
    object.__setattr__(self, "attention", attention)
    for spec in attention:   # bad scheme settings fail here, not later
      spec.to_position().check(self.per_head_dim, spec.to_mask())
      if isinstance(spec.rope_base, tuple) and len(spec.rope_base) != kv:
        raise ValueError(
            f"rope_base={spec.rope_base!r}: per-head bases need one per "
            f"key/value head (num_kv_heads={kv})")

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
