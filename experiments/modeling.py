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

from extrapolax.models import AttentionSpec, DecoderLM, ModelConfig

# The position encodings a config may name, and what each means here.
PE_CHOICES = ("nope", "sinusoidal", "learned", "rope", "alibi", "t5",
              "kerple", "fire")
ABSOLUTE_PES = ("sinusoidal", "learned")
MASK_CHOICES = ("causal", "sliding_window", "lambda")
DTYPE_CHOICES = ("float32", "bfloat16")

# Every field config.model may hold, with its default when absent.
MODEL_FIELDS: dict[str, Any] = {
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
    "mask": "causal",
    "window": None,            # sliding_window and lambda masks
    "num_sinks": 0,            # lambda mask
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
  placeholders = {"vocab_size": int, "num_kv_heads": int, "head_dim": int,
                  "rope_scaling": object, "window": int,
                  "implementation": str}
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
    raise ValueError(f"config.{name}={value!r} is not one of {allowed}")


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
  _choice("model.pe", pe, PE_CHOICES)
  _choice("model.mask", mask, MASK_CHOICES)
  _choice("model.dtype", fields["dtype"], DTYPE_CHOICES)
  train_len = config.train_len
  if isinstance(train_len, bool) or not isinstance(train_len, int) or (
      train_len < 1):
    raise ValueError(f"config.train_len={train_len!r} must be an integer "
                     ">= 1")
  rope_scaling = _rope_scaling(fields["rope_scaling"])
  if rope_scaling is not None and pe != "rope":
    raise ValueError(f"config.model.rope_scaling={rope_scaling!r} needs "
                     f"pe='rope', got pe={pe!r}")
  if mask == "causal" and fields["window"] is not None:
    raise ValueError(f"config.model.window={fields['window']!r} needs mask "
                     "'sliding_window' or 'lambda', got mask='causal'")
  if mask != "lambda" and fields["num_sinks"]:
    raise ValueError(f"config.model.num_sinks={fields['num_sinks']!r} needs "
                     f"mask='lambda', got mask={mask!r}")
  if mask in ("sliding_window", "lambda") and fields["window"] is None:
    raise ValueError(f"config.model.mask={mask!r} needs config.model.window "
                     "(an integer >= 1), got None")
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
        t5_num_buckets=fields["t5_num_buckets"],
        t5_max_distance=fields["t5_max_distance"])
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


def create_model(config, rngs: nnx.Rngs, *,
                 vocab_size: Optional[int] = None) -> DecoderLM:
  """A DecoderLM with fresh weights from ``rngs``."""
  return DecoderLM(model_config(config, vocab_size=vocab_size), rngs=rngs)
