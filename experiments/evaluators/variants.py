"""Inference-time variants of a trained model, and their record labels.

A variant is a ``DecoderLM`` built from a changed ``ModelConfig`` (another
attention implementation, a RoPE scaling, another mask) that runs the *same*
parameters: the new model's structure comes from ``nnx.eval_shape`` (no
weights are initialised) and the trained state is merged into it. Only
changes that keep the parameter tree are allowed; anything else raises.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
from flax import nnx

from extrapolax.attention import layer as attn_layer
from extrapolax.models import DecoderLM, ModelConfig

__all__ = ["rebuild", "with_implementation", "with_rope_scaling",
           "with_mask", "rope_scaling_dict", "describe", "labels_for",
           "ROPE_SCALINGS"]

# The zero-shot scalings the sweep knows how to parameterise from a factor.
ROPE_SCALINGS = ("linear", "dynamic", "ntk", "yarn", "llama3")


def rebuild(model: DecoderLM, config: ModelConfig) -> DecoderLM:
  """A DecoderLM for ``config`` holding ``model``'s parameters (shared)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  state = nnx.state(model)
  if _structure(abstract_state) != _structure(state):
    raise ValueError("the new config changes the parameter tree (only "
                     "attention semantics and the implementation may "
                     f"change): {model.config} -> {config}")
  return nnx.merge(graphdef, state)


def _structure(state) -> list:
  """Paths, shapes and dtypes of an nnx state (for comparing trees)."""
  return sorted((jax.tree_util.keystr(path), tuple(leaf.shape),
                 str(leaf.dtype))
                for path, leaf in jax.tree_util.tree_leaves_with_path(state))


def with_implementation(model: DecoderLM,
                        implementation: Optional[str]) -> DecoderLM:
  """The model on another attention implementation (None: keep it)."""
  if implementation is None or model.config.implementation == implementation:
    return model
  variant = rebuild(model, model.config.replace(implementation=implementation))
  # Settings that live on the built layers, not in the config (with_mask's
  # distance ceiling), carry over unchanged.
  for old, new in zip(model.blocks, variant.blocks):
    ceiling = getattr(old.attn.position, "distance_ceiling", None)
    if ceiling is not None:
      new.attn.position = dataclasses.replace(new.attn.position,
                                              distance_ceiling=ceiling)
  return variant


def _map_specs(config: ModelConfig, change, *, only_rope: bool):
  specs = []
  touched = False
  for spec in config.attention:
    if only_rope and spec.position != "rope":
      specs.append(spec)
    else:
      specs.append(change(spec))
      touched = True
  if not touched:
    raise ValueError("the model has no RoPE layer to scale (positions: "
                     f"{sorted({s.position for s in config.attention})})")
  return config.replace(attention=tuple(specs))


def rope_scaling_dict(method: str, factor: float,
                      train_len: int) -> Optional[dict[str, Any]]:
  """A Hugging Face rope_scaling dict for ``method`` at ``factor``.

  ``train_len`` is the original context (yarn/llama3's
  original_max_position_embeddings; dynamic reads it as
  max_position_embeddings from the spec). llama3 uses Llama 3.1's
  low_freq_factor 1 and high_freq_factor 4. ``"none"`` gives None.
  """
  if method == "none":
    return None
  if method not in ROPE_SCALINGS:
    raise ValueError(f"rope scaling method must be one of "
                     f"{('none',) + ROPE_SCALINGS}, got {method!r}")
  if not factor > 0:
    raise ValueError(f"rope scaling factor must be > 0, got {factor!r}")
  scaling = {"rope_type": method, "factor": float(factor)}
  if method in ("yarn", "llama3"):
    scaling["original_max_position_embeddings"] = int(train_len)
  if method == "llama3":
    scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
  return scaling


def with_rope_scaling(model: DecoderLM, rope_scaling: Optional[Mapping],
                      *, train_len: int) -> DecoderLM:
  """Every RoPE layer with ``rope_scaling`` (a HF dict or None), same weights.

  ``train_len`` becomes the layers' max_position_embeddings (what dynamic
  NTK scales against).
  """
  scaling = None if rope_scaling is None else dict(rope_scaling)
  needs_max = scaling is not None and scaling.get(
      "rope_type", scaling.get("type")) == "dynamic"
  config = _map_specs(model.config, lambda s: dataclasses.replace(
      s, rope_scaling=scaling,
      rope_max_position_embeddings=int(train_len) if needs_max else None),
                      only_rope=True)
  return rebuild(model, config)


def with_mask(model: DecoderLM, mask: str, *, window: Optional[int] = None,
              num_sinks: int = 0,
              distance_ceiling: Optional[int] = None) -> DecoderLM:
  """Every layer with another mask at inference (same weights).

  mask: "causal", "sliding_window" (``window`` keys) or "lambda"
  (``num_sinks`` sinks and a ``window``-key band, LM-Infinite).
  distance_ceiling: with "lambda", the RoPE layers score the sink keys past
  the band at this fixed distance (LM-Infinite's ceiling; usually the
  training length). AttentionSpec has no field for it, so it is set on the
  rebuilt model's attention layers.
  """
  if mask not in ("causal", "sliding_window", "lambda"):
    raise ValueError(f"mask must be causal, sliding_window or lambda, got "
                     f"{mask!r}")
  if mask == "causal":
    change = lambda s: dataclasses.replace(s, mask="causal", window=None,
                                           num_sinks=0)
  else:
    change = lambda s: dataclasses.replace(
        s, mask=mask, window=window,
        num_sinks=num_sinks if mask == "lambda" else 0)
  variant = rebuild(model, _map_specs(model.config, change, only_rope=False))
  if distance_ceiling is not None:
    if mask != "lambda":
      raise ValueError(f"distance_ceiling needs mask='lambda', got {mask!r}")
    if distance_ceiling < 0:
      raise ValueError(f"distance_ceiling must be >= 0, got "
                       f"{distance_ceiling}")
    rope_layers = [b.attn for b in variant.blocks
                   if isinstance(b.attn.position, attn_layer.Rope)]
    if not rope_layers:
      raise ValueError("distance_ceiling needs RoPE layers; the model has "
                       "none")
    for attn in rope_layers:
      attn.position = dataclasses.replace(
          attn.position, distance_ceiling=int(distance_ceiling))
  return variant


def _mask_label(spec) -> str:
  if spec.mask == "sliding_window":
    return f"sliding_window({spec.window})"
  if spec.mask == "lambda":
    return f"lambda(sinks={spec.num_sinks}, window={spec.window})"
  if spec.mask == "chunked":
    return f"chunked({spec.chunk})"
  return spec.mask


def _distinct(values):
  out = []
  for v in values:
    if v not in out:
      out.append(v)
  return out


def describe(model_or_config) -> dict[str, Any]:
  """Record labels of a model: pe, scaling, scale and mask.

  pe is the absolute embedding ("sinusoidal", "learned") when there is one,
  else the layers' position schemes joined with "+" ("rope+nope" for a
  hybrid). scaling is the RoPE rope_type ("none" unscaled), scale its factor
  (1.0 unscaled); mask as the zoo writes it ("lambda(sinks=4, window=128)").
  """
  config = getattr(model_or_config, "config", model_or_config)
  specs = [config.layer_spec(i) for i in range(config.num_layers)]
  if config.absolute != "none":
    pe = config.absolute
  else:
    pe = "+".join(_distinct(s.position for s in specs))
  scalings = _distinct(dict(s.rope_scaling) for s in specs
                       if s.position == "rope" and s.rope_scaling)
  if scalings:
    first = scalings[0]
    scaling = first.get("rope_type", first.get("type", "default"))
    factor = first.get("factor")
    scale = 1.0 if factor is None else float(factor)
  else:
    scaling, scale = "none", 1.0
  mask = "+".join(_distinct(_mask_label(s) for s in specs))
  ceilings = _distinct(  # lives on the built layers only, not the config
      getattr(b.attn.position, "distance_ceiling", None)
      for b in getattr(model_or_config, "blocks", ()))
  ceilings = [c for c in ceilings if c is not None]
  if ceilings:
    mask += f"+ceiling({ceilings[0]})"
  return dict(pe=pe, scaling=scaling, scale=scale, mask=mask)


def labels_for(model, train_len: int,
               labels: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """The record fields every evaluator shares, ``labels`` overriding.

  Defaults: model = pe, seed = step = None, plus :func:`describe`.
  """
  out = describe(model)
  out.update(model=out["pe"], train_len=int(train_len), seed=None, step=None)
  allowed = {"model", "pe", "scaling", "scale", "mask", "seed", "step",
             "variant", "train_len", "train_min_len"}
  extra = set(labels or {}) - allowed
  if extra:
    raise ValueError(f"unknown label fields {sorted(extra)}; allowed: "
                     f"{sorted(allowed)}")
  out.update(labels or {})
  return out
