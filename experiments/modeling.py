"""config.model (an ml_collections ConfigDict) -> extrapolax.models.ModelConfig.

The experiment configs name a model by a handful of research knobs: ``pe``
(the position encoding), ``mask``, ``window``, ``num_sinks``, ``rope_scaling``
and the sizes. This module is the one place that turns them into the library's
``ModelConfig`` (every layer gets the same ``AttentionSpec``) and builds the
``DecoderLM``. ``pe="sinusoidal"`` and ``pe="learned"`` are absolute
embeddings added to the token embeddings, with no position signal inside
attention (``position="nope"``); the others are attention position schemes.
The model's ``max_len`` (the learned table's size, the rope scalings' original
length) is the config's ``train_len``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import ml_collections
from flax import nnx

from extrapolax.attention import layer as attn_layer
from extrapolax.attention import masks as masks_lib
from extrapolax.common import checks
from extrapolax.models import AttentionSpec, DecoderLM, ModelConfig
from extrapolax.models import config as config_lib

# Absolute embeddings a config may name as its pe (added to the token
# embeddings; attention then has no position scheme).
ABSOLUTE_PES = ("sinusoidal", "learned")
DTYPE_CHOICES = config_lib.DTYPES


def pe_choices() -> tuple[str, ...]:
  """Every pe a config may name: the absolute embeddings, then every
  registered attention position scheme (``attention.layer``)."""
  return ABSOLUTE_PES + attn_layer.position_names()


def mask_choices() -> tuple[str, ...]:
  """Every mask name (``attention.masks``); a config gives it as text with
  its parameters, e.g. ``"lambda(num_sinks=4, window=64)"``."""
  return masks_lib.names()


# Snapshots for listing (tests parametrise over them); validation reads the
# registries through the functions above, so later registrations count.
PE_CHOICES = pe_choices()
MASK_CHOICES = mask_choices()

# Every field config.model may hold, with its default when absent.
MODEL_FIELDS: dict[str, Any] = {
    "preset": None,            # a zoo preset ("alibi-tiny"): its architecture
    "pe": "rope",
    "vocab_size": None,        # None: the tokenizer's (256 for "byte")
    "d_model": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": None,      # None: num_heads (no grouping)
    "head_dim": None,          # None: d_model // num_heads
    "mlp_dim": 192,
    "tie_embeddings": True,
    "rope_base": 10000.0,
    "rope_scaling": None,      # None, a Hugging Face dict, or its JSON text
    "mask": "causal",          # a mask name or text: "lambda(num_sinks=4, window=64)"
    "window": None,            # shorthand: the mask's window parameter
    "num_sinks": 0,            # shorthand: the lambda mask's num_sinks
    "logits_soft_cap": None,   # c > 0: c * tanh(logits / c)
    "length_scaling": None,    # log(n)/log(L) logit scaling with L = this
    "sink_logits": False,      # gpt-oss learned attention sinks (per head)
    "t5_num_buckets": 32,
    "t5_max_distance": 128,
    "dtype": "float32",        # compute dtype; parameters stay float32
    "implementation": None,    # attention implementation (None: automatic)
}


def default_model_config() -> ml_collections.ConfigDict:
  """A config.model with every field at its default.

  None-valued fields are typed placeholders, so command-line overrides
  (``--config.model.window=64``) parse to the right type.
  """
  placeholders = {"preset": str, "vocab_size": int, "num_kv_heads": int, "head_dim": int,
                  "rope_scaling": object, "window": int,
                  "implementation": str, "logits_soft_cap": float,
                  "length_scaling": int}
  fields = {}
  for name, default in MODEL_FIELDS.items():
    if default is None:
      fields[name] = ml_collections.config_dict.placeholder(
          placeholders[name])
    else:
      fields[name] = default
  return ml_collections.ConfigDict(fields)


def _choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"config.{name}={value!r} is not one of {allowed}"
                     f"{checks.close_matches(value, allowed)}")


def _rope_scaling(value) -> Optional[dict]:
  """None, a mapping, or JSON text of one -> None or a plain dict."""
  if value is None or value == "" or value == "none":
    return None
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise ValueError(f"config.model.rope_scaling={value!r} is not a JSON "
                       "object (e.g. '{\"rope_type\": \"linear\", "
                       f"\"factor\": 4.0}}'): {e}") from e
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ValueError(f"config.model.rope_scaling={value!r} must be None or a "
                     "Hugging Face rope_scaling dict")
  return dict(value)


def _model_fields(config) -> dict[str, Any]:
  """config.model as a plain dict with defaults filled in; unknown keys raise."""
  model = config.model
  model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
  unknown = sorted(set(model) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f"unknown config.model field(s) {unknown}; allowed: "
                     f"{sorted(MODEL_FIELDS)}")
  return {**MODEL_FIELDS, **model}


def _scheme_settings(position: str, fields) -> dict[str, Any]:
  """The config's settings of the scheme's own fields (t5_*): only the
  scheme that reads them gets them, so a default elsewhere is no error."""
  reads = attn_layer.position_class(position).spec_fields
  return {k: fields[k] for k in ("t5_num_buckets", "t5_max_distance")
          if k in reads}


def model_config(config, *, vocab_size: Optional[int] = None) -> ModelConfig:
  """The ModelConfig the experiment config describes.

  Args:
    config: a ConfigDict with ``model`` (fields in MODEL_FIELDS) and
      ``train_len`` (the model's max_len).
    vocab_size: used when config.model.vocab_size is None (the trainer passes
      the tokenizer's); 256 (bytes) when both are None.

  Raises:
    ValueError: naming the bad field and value (pe, mask, dtype, sizes,
      window/num_sinks combinations, rope_scaling).
  """
  fields = _model_fields(config)
  pe, mask = fields["pe"], fields["mask"]
  _choice("model.pe", pe, pe_choices())
  _choice("model.dtype", fields["dtype"], DTYPE_CHOICES)
  train_len = config.train_len
  if isinstance(train_len, bool) or not isinstance(train_len, int) or (
      train_len < 1):
    raise ValueError(f"config.train_len={train_len!r} must be an integer "
                     ">= 1")
  if fields["preset"] is not None:
    return _preset_config(fields, train_len, vocab_size)
  rope_scaling = _rope_scaling(fields["rope_scaling"])
  if rope_scaling is not None and pe != "rope":
    raise ValueError(f"config.model.rope_scaling={rope_scaling!r} needs "
                     f"pe='rope', got pe={pe!r}")
  vocab = fields["vocab_size"] or vocab_size or 256
  position = "nope" if pe in ABSOLUTE_PES else pe
  try:
    spec = AttentionSpec(
        position=position, rope_base=float(fields["rope_base"]),
        rope_scaling=rope_scaling,
        # dynamic / yarn / llama3 scale relative to the training length
        rope_max_position_embeddings=(
            train_len if rope_scaling is not None else None),
        mask=mask, window=fields["window"],
        num_sinks=fields["num_sinks"],
        logits_soft_cap=fields["logits_soft_cap"],
        length_scaling=fields["length_scaling"],
        sink_logits=fields["sink_logits"],
        **_scheme_settings(position, fields))
    return ModelConfig(
        vocab_size=vocab, d_model=fields["d_model"],
        num_layers=fields["num_layers"], num_heads=fields["num_heads"],
        num_kv_heads=fields["num_kv_heads"], head_dim=fields["head_dim"],
        mlp_dim=fields["mlp_dim"], tie_embeddings=fields["tie_embeddings"],
        absolute=pe if pe in ABSOLUTE_PES else "none", max_len=train_len,
        attention=(spec,), dtype=fields["dtype"],
        implementation=fields["implementation"])
  except ValueError as e:
    raise ValueError(f"bad config.model: {e}") from e


# With a preset, these fields may stay at their defaults or repeat the
# preset's value; the attention fields are the preset's alone.
_PRESET_SIZES = ("vocab_size", "d_model", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "mlp_dim", "tie_embeddings")
_PRESET_ATTENTION = ("mask", "window", "num_sinks", "rope_base",
                     "rope_scaling", "logits_soft_cap", "length_scaling",
                     "sink_logits",
                     "t5_num_buckets", "t5_max_distance")


def _preset_config(fields, train_len: int,
                   vocab_size: Optional[int]) -> ModelConfig:
  """config.model.preset: the zoo preset's ModelConfig at max_len=train_len
  (``zoo.config``), with the config's dtype and implementation. A size or
  attention field set to something else than its default and the preset's
  value raises (nothing is silently ignored)."""
  from extrapolax.models import zoo  # pylint: disable=import-outside-toplevel
  preset = fields["preset"]
  _choice("model.preset", preset, zoo.names())
  cfg = zoo.config(preset, max_len=train_len, dtype=fields["dtype"],
                   implementation=fields["implementation"])
  spec = cfg.attention[0]
  own_pe = cfg.absolute if cfg.absolute != "none" else spec.position
  preset_values = {name: getattr(cfg, name) for name in _PRESET_SIZES}
  preset_values["num_kv_heads"] = cfg.kv_heads
  preset_values["head_dim"] = cfg.d_model // cfg.num_heads if (
      cfg.head_dim is None) else cfg.head_dim
  preset_values["pe"] = own_pe
  for name in _PRESET_SIZES + ("pe",):
    value = fields[name]
    if value not in (MODEL_FIELDS[name], preset_values[name]):
      raise ValueError(
          f"config.model.{name}={value!r} disagrees with "
          f"config.model.preset={preset!r} ({name}={preset_values[name]!r}); "
          "leave it at its default or drop the preset")
  for name in _PRESET_ATTENTION:
    if fields[name] != MODEL_FIELDS[name]:
      raise ValueError(
          f"config.model.{name}={fields[name]!r}: with config.model.preset="
          f"{preset!r} the preset sets the attention; leave it at "
          f"{MODEL_FIELDS[name]!r}")
  vocab = fields["vocab_size"] or vocab_size or cfg.vocab_size
  if vocab != cfg.vocab_size:
    raise ValueError(f"config.model.preset={preset!r} has vocab_size "
                     f"{cfg.vocab_size}; the tokenizer gives {vocab}")
  return cfg


def create_model(config, rngs: nnx.Rngs, *,
                 vocab_size: Optional[int] = None) -> DecoderLM:
  """A DecoderLM with fresh weights from ``rngs``."""
  return DecoderLM(model_config(config, vocab_size=vocab_size), rngs=rngs)
