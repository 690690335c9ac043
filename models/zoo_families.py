"""The zoo's preset families: what each preset's attention computes.

A family is a function of the training length L giving the layers'
``AttentionSpec`` pattern (cycled over the layers), plus the labels its
``zoo.Info`` record carries. ``zoo`` combines each family with each size.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from extrapolax.attention import rope as rope_lib
from extrapolax.attention import rope_remaps

from .config import AttentionSpec

SCALE_FACTOR = 4.0      # rope scalings stretch the training length 4x
NUM_SINKS = 4           # rope-lambda's sink tokens


# ----------------------------------------------------------------------------
# Families: what each preset's attention computes, as a function of the
# training length L.


def _scaled(rope_type: str):
  """A zero-shot rope scaling (factor SCALE_FACTOR relative to L)."""

  def transform(spec: AttentionSpec, train_len: int) -> AttentionSpec:
    return spec.with_rope_scaling(
        rope_lib.zero_shot_scaling(rope_type, SCALE_FACTOR, train_len),
        train_len)

  return transform


def _lambda_mask(spec: AttentionSpec, train_len: int) -> AttentionSpec:
  return dataclasses.replace(spec, mask="lambda", num_sinks=NUM_SINKS,
                             window=train_len)


@dataclasses.dataclass(frozen=True)
class Family:
  position: str
  description: str
  attention: Callable[[int], tuple[AttentionSpec, ...]] = (
      lambda _: (AttentionSpec(),))
  absolute: str = "none"
  scaling: str = "none"
  mask: Callable[[int], str] = lambda _: "causal"
  zero_shot: Optional[Callable[[AttentionSpec, int], AttentionSpec]] = None
  shipped: bool = True       # the tiny size ships trained weights

  def specs(self, train_len: int) -> tuple[AttentionSpec, ...]:
    if self.zero_shot is not None:
      return (self.zero_shot(AttentionSpec(), train_len),)
    return self.attention(train_len)


def _irope(train_len: int) -> tuple[AttentionSpec, ...]:
  """Llama 4: NoPE every 4th layer (transformers' no_rope_layer_interval),
  chunked attention on the RoPE layers, temperature tuning on the NoPE ones
  (Llama 4's chunk and floor_scale are both 8192)."""
  chunk = max(train_len // 4, 1)
  local = AttentionSpec(mask="chunked", chunk=chunk, qk_norm=True)
  global_ = AttentionSpec(position="nope", temperature="llama4",
                          temperature_args={"floor_scale": chunk,
                                            "attn_scale": 0.1})
  return (local, local, local, global_)


def _gemma3(train_len: int) -> tuple[AttentionSpec, ...]:
  """Gemma 3: 5 local layers to 1 global, local base 10k, global 1M."""
  local = AttentionSpec(mask="sliding_window", window=max(train_len // 4, 1),
                        rope_base=10000.0, qk_norm=True)
  return (local,) * 5 + (AttentionSpec(rope_base=1e6, qk_norm=True),)


def _only(position: str):
  return lambda _: (AttentionSpec(position=position),)


def _zero_shot(description: str, transform, scaling: str = "none", **kw):
  return Family("rope", f"rope model run with {description} (zero-shot)",
                 scaling=scaling, zero_shot=transform, **kw)


FAMILIES: dict[str, Family] = {
    "nope": Family("nope", "no position signal but the causal mask",
                    _only("nope")),
    "sinusoidal": Family("sinusoidal", "sinusoidal absolute embeddings "
                          "(Vaswani et al.), nope attention", _only("nope"),
                          absolute="sinusoidal"),
    "learned": Family("learned", "learned absolute table of train_len rows "
                       "(cannot run past it), nope attention", _only("nope"),
                       absolute="learned"),
    "rope": Family("rope", "rotary embeddings, base 10000"),
    "alibi": Family("alibi", "ALiBi distance penalties, the paper's slopes",
                     _only("alibi")),
    "t5": Family("t5", "T5 learned bucketed relative bias (32 buckets, max "
                  "distance 128)", _only("t5")),
    "kerple": Family("kerple", "Kerple log kernel bias, learned per head",
                      _only("kerple")),
    "fire": Family("fire", "FIRE: per-head MLP of the log-normalised "
                    "distance", _only("fire")),
    "rope-window": Family(
        "rope", "rope trained with a sliding window of train_len / 2",
        lambda n: (AttentionSpec(mask="sliding_window", window=n // 2),),
        mask=lambda n: f"sliding_window({n // 2})"),
    "hybrid": Family(
        "rope+nope", "rope and nope layers interleaved (rope first)",
        lambda _: (AttentionSpec(), AttentionSpec(position="nope"))),
    "rope-linear": _zero_shot("linear position interpolation, factor 4",
                              _scaled("linear"), "linear"),
    "rope-dynamic": _zero_shot("dynamic NTK scaling, factor 4",
                               _scaled("dynamic"), "dynamic"),
    "rope-ntk": _zero_shot("static NTK-aware base scaling, factor 4",
                           _scaled("ntk"), "ntk"),
    "rope-yarn": _zero_shot("YaRN, factor 4", _scaled("yarn"), "yarn"),
    "rope-llama3": _zero_shot(
        "Llama 3 frequency scaling, factor 4", _scaled("llama3"), "llama3"),
    "rope-lambda": _zero_shot(
        f"LM-Infinite's Lambda mask ({NUM_SINKS} sinks, window train_len)",
        _lambda_mask, mask=lambda n: f"lambda(sinks={NUM_SINKS}, window={n})"),
    # Hybrids of released models (scaled to the preset's length) and the
    # methods of recent papers; no shipped weights.
    "irope": Family(
        "rope+nope", "Llama 4's iRoPE: 3 RoPE layers with chunked attention "
        "(chunk train_len / 4, QK-norm) then 1 NoPE layer with attention "
        "temperature tuning (floor_scale = the chunk)", _irope,
        mask=lambda n: f"chunked({max(n // 4, 1)})+causal", shipped=False),
    "gemma3": Family(
        "rope", "Gemma 3: 5 sliding-window layers (window train_len / 4, "
        "base 10000) then 1 global layer (base 1e6), QK-norm", _gemma3,
        mask=lambda n: f"sliding_window({max(n // 4, 1)})+causal",
        shipped=False),
    "rope-sinks": Family(
        "rope", "RoPE with gpt-oss learned attention sinks (one logit per "
        "query head in the softmax denominator, no value)",
        lambda _: (AttentionSpec(sink_logits=True),), shipped=False),
    "qk-norm": Family(
        "rope", "RoPE with QK-norm (Qwen3 / OLMo 2: RMSNorm on each head's "
        "q and k before RoPE)", lambda _: (AttentionSpec(qk_norm=True),),
        shipped=False),
    "harpe": Family(
        "rope", "HARPE: one RoPE base per key/value head (2), log-spread "
        "from 100 to 1e6", lambda _: (AttentionSpec(
            rope_base=rope_remaps.spread_bases(2, 100.0, 1e6)),),
        shipped=False),
    "p-rope": Family(
        "rope", "p-RoPE (Barbero et al.): the highest 3/4 of the "
        "frequencies rotate, the rest are NoPE dims",
        lambda _: (AttentionSpec(p_rope=0.75),), shipped=False),
    "ssmax": Family(
        "nope", "NoPE with Scalable-Softmax (s_h log n, s learned per head)",
        lambda _: (AttentionSpec(position="nope", temperature="ssmax"),),
        shipped=False),
    "head-scale": Family(
        "nope", "NoPE with a learned temperature per head (Wang et al. "
        "2024)", lambda _: (AttentionSpec(position="nope",
                                         temperature="head_scale"),),
        shipped=False),
}
