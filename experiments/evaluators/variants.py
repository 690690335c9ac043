"""Inference-time variants of a trained model, and their record labels.

A variant is a ``DecoderLM`` built from a changed ``ModelConfig`` (a RoPE
scaling, another mask, an inference transform such as LM-Infinite's distance
ceiling or Self-Extend) that runs the *same* parameters: the new model's
structure comes from ``nnx.eval_shape`` (no weights are initialised) and the
trained state is merged into it. Only changes that keep the parameter tree
are allowed; anything else raises.

Which implementation runs attention is not a variant: choose it at call
time with ``extrapolax.attention.use_implementation`` (and a mesh with
``jax.set_mesh``), with no rebuild.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
from flax import nnx

from extrapolax.attention import masks as masks_lib
from extrapolax.attention import rope as rope_lib
from extrapolax.models import AttentionSpec, DecoderLM, ModelConfig

__all__ = ["rebuild", "with_spec", "with_rope_scaling", "with_mask",
           "rope_scaling_dict", "describe", "labels_for", "ROPE_SCALINGS"]

# The zero-shot scalings the sweep knows how to parameterise from a factor.
ROPE_SCALINGS = rope_lib.ZERO_SHOT_SCALINGS


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
  """A Hugging Face rope_scaling dict for ``method`` at ``factor``
  (``attention.rope.zero_shot_scaling``; ``"none"`` gives None)."""
  return rope_lib.zero_shot_scaling(method, factor, train_len)


def with_spec(model: DecoderLM, change: Callable[[AttentionSpec],
                                                 AttentionSpec], *,
              only_rope: bool = False) -> DecoderLM:
  """``model`` with every layer's spec (every RoPE layer's with
  ``only_rope``) passed through ``change``, same weights.

  The variant is built from the changed specs; nothing is set on built
  layers. Changes that alter the parameter tree raise.
  """
  return rebuild(model, _map_specs(model.config, change, only_rope=only_rope))


def with_rope_scaling(model: DecoderLM, rope_scaling: Optional[Mapping],
                      *, train_len: int) -> DecoderLM:
  """Every RoPE layer with ``rope_scaling`` (a HF dict or None), same weights.

  ``train_len`` becomes the layers' max_position_embeddings (what dynamic
  NTK scales against).
  """
  return with_spec(model, lambda s: s.with_rope_scaling(rope_scaling,
                                                        train_len),
                   only_rope=True)


def with_mask(model: DecoderLM, mask: str, *, window: Optional[int] = None,
              num_sinks: Optional[int] = None,
              distance_ceiling: Optional[int] = None,
              self_extend: Optional[tuple[int, int]] = None,
              string: Optional[tuple[int, int]] = None,
              p_rope: Optional[float] = None,
              truncated_basis: Optional[tuple[float, float, float]] = None,
              **mask_args) -> DecoderLM:
  """Every layer with another mask at inference (same weights).

  Args:
    model: a DecoderLM.
    mask: a registered mask name or text (``attention.masks.names()``:
      "causal", "sliding_window", "lambda", "chunked", "prefix_lm", or one a
      user registered), e.g. ``"lambda(num_sinks=4, window=64)"``.
    window, num_sinks: fill those parameters when the mask takes them and
      the text does not give them (the sweeps' shared settings).
    distance_ceiling: LM-Infinite's ceiling on the RoPE layers (needs a
      lambda mask): sink keys past the band are scored at this distance.
    self_extend: (group_size, window): Self-Extend on the RoPE layers.
    string: (shift, local_window): STRING on the RoPE layers.
    p_rope, truncated_basis: p-RoPE's fraction / Giraffe's (a, b, rho) on
      the RoPE layers (training-free frequency changes).
    **mask_args: further mask parameters by name.
  """
  name, params = masks_lib.parse(mask)
  accepted = masks_lib.parameters(name)
  for key, value in (("window", window), ("num_sinks", num_sinks)):
    if value is not None and key in accepted:
      params.setdefault(key, value)
  params.update(mask_args)
  masks_lib.from_name(name, **params)       # a bad mask fails here
  change = lambda s: s.replace(mask=name, mask_args=params or None)
  variant_config = _map_specs(model.config, change, only_rope=False)
  transforms = {k: v for k, v in (("distance_ceiling", distance_ceiling),
                                  ("self_extend", self_extend),
                                  ("string", string), ("p_rope", p_rope),
                                  ("truncated_basis", truncated_basis))
                if v is not None}
  if transforms:
    if not any(s.position == "rope" for s in variant_config.attention):
      raise ValueError(f"{sorted(transforms)} need RoPE layers; the model "
                       f"has none (positions: "
                       f"{sorted({s.position for s in variant_config.attention})})")
    variant_config = _map_specs(
        variant_config, lambda s: dataclasses.replace(s, **transforms),
        only_rope=True)
  return rebuild(model, variant_config)


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
  mask = "+".join(_distinct(s.mask_label() for s in specs))
  ceilings = _distinct(s.distance_ceiling for s in specs
                       if s.distance_ceiling is not None)
  if ceilings:
    mask += f"+ceiling({ceilings[0]})"
  extends = _distinct(tuple(s.self_extend) for s in specs
                      if s.self_extend is not None)
  if extends:
    mask += f"+self_extend({extends[0][0]}, {extends[0][1]})"
  for field in ("string", "p_rope", "truncated_basis"):
    values = _distinct(s_ for s_ in (getattr(s, field) for s in specs)
                       if s_ is not None)
    if values:
      args = values[0] if isinstance(values[0], tuple) else (values[0],)
      mask += f"+{field}({', '.join(str(a) for a in args)})"
  return dict(pe=pe, scaling=scaling, scale=scale, mask=mask)


def labels_for(model, train_len: int,
               labels: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """The record fields every evaluator shares, ``labels`` overriding.

  Defaults: model = pe, seed = step = None, plus :func:`describe`.
  """
  out = describe(model)
  out.update(model=out["pe"], train_len=int(train_len), seed=None, step=None)
  allowed = {"model", "pe", "scaling", "scale", "mask", "seed", "step",
             "variant", "train_len", "train_min_len", "base"}
  extra = set(labels or {}) - allowed
  if extra:
    raise ValueError(f"unknown label fields {sorted(extra)}; allowed: "
                     f"{sorted(allowed)}")
  out.update(labels or {})
  return out
