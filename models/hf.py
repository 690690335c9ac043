"""Hugging Face checkpoint import: Llama, Mistral, Qwen2, Qwen3 and Phi-3.

``load_hf(path)`` reads a folder written by transformers' ``save_pretrained``
(``config.json`` plus ``model.safetensors`` or sharded safetensors with
``model.safetensors.index.json``) and returns a :class:`DecoderLM` whose
logits match transformers' (eager attention, float32) to float32 rounding.
``config_from_hf(config_dict)`` is the config half on its own.

What is matched, read from transformers 5 (and compatible with the
transformers 4 ``rope_scaling`` + top-level ``rope_theta`` layout):

* RoPE: half-split layout over the whole head, ``rope_theta`` (inside
  ``rope_parameters`` / ``rope_scaling`` or top level, default 10000) and
  every scaling type ``extrapolax.attention.rope_frequencies`` accepts, with
  ``max_position_embeddings`` as the fallback for a missing
  ``original_max_position_embeddings`` and as dynamic NTK's reference length;
  cos and sin are multiplied by the method's attention scaling.
* Attention: grouped-query heads, ``head_dim`` (explicit, else
  ``hidden_size // num_attention_heads``), logit scale ``1 / sqrt(head_dim)``.
  Sliding windows: key j is visible to query i iff ``0 <= i - j < window``.
  Mistral puts ``sliding_window`` (default 4096, ``null`` for none) on every
  layer. Qwen2 uses it only when ``use_sliding_window`` is true, on the layers
  ``layer_types`` marks ``sliding_attention`` (default: layers
  ``>= max_window_layers``). Qwen2 has q/k/v biases and no o_proj bias.
  Qwen3: Qwen2's windows, Llama's ``attention_bias``, and QK-norm (an
  RMSNorm with ``rms_norm_eps`` over each head's q and k before RoPE).
  Phi-3: fused ``qkv_proj`` (q, k, v rows) and ``gate_up_proj`` (gate, up
  rows), split on load; ``partial_rotary_factor`` (top level or in the rope
  dict: the first ``int(head_dim * factor)`` dims rotate, half-split, the
  rest pass through); the legacy rope names "su" and "yarn" mean longrope
  (as Phi3Config reads them); ``sliding_window`` (null: none) on every
  layer; dropout keys are inert.
* Missing config keys take the transformers config class's default
  (e.g. Mistral's ``num_key_value_heads`` is 8, its ``sliding_window`` 4096).

Anything the model here cannot express raises ``ValueError`` naming it:
another ``model_type``, ``hidden_act`` other than silu, Llama's
``mlp_bias``, ``partial_rotary_factor`` != 1 outside Phi-3, quantized
checkpoints. config.json keys that
neither change the forward pass nor are read here (and are not null) trigger
a warning naming them. Tensors are checked by name and shape: a missing,
unexpected or misshapen tensor raises (the rotary ``inv_freq`` buffers old
checkpoints carry are recomputed, so they are skipped on purpose).

Weight layout (torch ``nn.Linear`` weights are ``[out, in]``)::

  model.embed_tokens.weight [V, D]         -> embed.embedding [V, D]
  ...self_attn.q_proj.weight [N*H, D]      -> attn.q_proj.kernel [D, N, H]
  ...self_attn.{k,v}_proj.weight [K*H, D]  -> attn.{k,v}_proj.kernel [D, K, H]
  ...self_attn.{q,k,v}_proj.bias           -> attn.{q,k,v}_proj.bias [., H]
  ...self_attn.o_proj.weight [D, N*H]      -> attn.o_proj.kernel [N, H, D]
  ...self_attn.{q,k}_norm.weight [H]       -> attn.{q,k}_norm.scale (Qwen3)
  ...mlp.{gate,up}_proj.weight [F, D]      -> mlp.{gate,up}.kernel [D, F]
  ...self_attn.qkv_proj.weight [(N+2K)*H, D] -> q, k, v rows (Phi-3)
  ...mlp.gate_up_proj.weight [2F, D]       -> gate, up rows (Phi-3)
  ...mlp.down_proj.weight [D, F]           -> mlp.down.kernel [F, D]
  ...input_layernorm.weight                -> attn_norm.scale
  ...post_attention_layernorm.weight       -> mlp_norm.scale
  model.norm.weight                        -> final_norm.scale
  lm_head.weight [V, D]                    -> lm_head.kernel [D, V] (untied)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import AttentionSpec, ModelConfig
from .transformer import DecoderLM

__all__ = ["SUPPORTED_MODEL_TYPES", "KEEP", "build_model", "config_from_hf",
           "load_hf", "weight_map"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


class _Keep:
  """Sentinel type: keep the checkpoint's own RoPE scaling."""

  def __repr__(self):
    return "<keep the checkpoint's rope scaling>"


KEEP = _Keep()

# The transformers config classes' defaults, used when config.json omits a
# key (transformers 5.x, configuration_{llama,mistral,qwen2}.py).
_COMMON_DEFAULTS = dict(
    hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
    head_dim=None)
_DEFAULTS = {
    "llama": dict(
        _COMMON_DEFAULTS, vocab_size=32000, hidden_size=4096,
        intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None,
        max_position_embeddings=2048, attention_bias=False, mlp_bias=False),
    "mistral": dict(
        _COMMON_DEFAULTS, vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=4096 * 32, sliding_window=4096,
        layer_types=None),
    "qwen2": dict(
        _COMMON_DEFAULTS, vocab_size=151936, hidden_size=4096,
        intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=32768, use_sliding_window=False,
        sliding_window=4096, max_window_layers=28, layer_types=None),
    # Qwen3: Qwen2's windows, no default q/k/v bias, q/k RMSNorm per head.
    "qwen3": dict(
        _COMMON_DEFAULTS, vocab_size=151936, hidden_size=4096,
        intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128,
        max_position_embeddings=32768, use_sliding_window=False,
        sliding_window=4096, max_window_layers=28, layer_types=None,
        attention_bias=False),
    # Phi-3: fused qkv_proj / gate_up_proj, partial rotary, longrope ("su").
    "phi3": dict(
        _COMMON_DEFAULTS, vocab_size=32064, hidden_size=3072,
        intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None,
        max_position_embeddings=4096, rms_norm_eps=1e-5,
        sliding_window=None),
}
# Keys read here besides the per-model ones above.
_ROPE_KEYS = frozenset({"rope_theta", "rope_scaling", "rope_parameters",
                        "partial_rotary_factor",
                        "original_max_position_embeddings"})
# Keys that do not change the forward pass of an inference model.
_INERT_KEYS = frozenset({
    "model_type", "architectures", "transformers_version", "torch_dtype",
    "dtype", "_name_or_path", "name_or_path", "bos_token_id", "eos_token_id",
    "pad_token_id", "use_cache", "initializer_range", "attention_dropout",
    "pretraining_tp", "output_attentions", "output_hidden_states",
    "return_dict", "tokenizer_class", "is_decoder", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "add_cross_attention", "tie_encoder_decoder", "use_return_dict",
    "resid_pdrop", "embd_pdrop"})
_ATTENTION_TYPES = ("full_attention", "sliding_attention")
# Scaling types that read original_max_position_embeddings.
_USES_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
# Non-persistent buffers some older checkpoints still carry; recomputed here.
_IGNORED_TENSOR = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"config.json {name!r} must be an integer >= {minimum}, "
                     f"got {value!r}")
  return value


def _rotary_fraction(where: str, value, model_type: str) -> float:
  """The rotary fraction; only Phi-3 (of the families read here) applies
  one below 1 (transformers' Phi3 rotates the first ``int(head_dim *
  factor)`` dims, half-split, and passes the rest through)."""
  if value is None:
    return 1.0
  if model_type == "phi3":
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 < value <= 1):
      raise ValueError(f"{where} partial_rotary_factor must be in (0, 1], "
                       f"got {value!r}")
    return float(value)
  if value != 1:
    raise ValueError(
        f"{where} partial_rotary_factor={value!r} is not supported: "
        "transformers' Llama/Mistral/Qwen2 rotate the whole head (the default "
        "rope ignores the factor); only 1.0 is accepted")
  return 1.0


def _rope_settings(hf: Mapping[str, Any], rope_scaling,
                   model_type: str = "llama") -> tuple[float, Any, float]:
  """(rope_theta, rope_scaling dict or None, partial_rotary_factor) as
  transformers would use them."""
  legacy, current = hf.get("rope_scaling"), hf.get("rope_parameters")
  for name, value in (("rope_scaling", legacy), ("rope_parameters", current)):
    if value is not None and not isinstance(value, Mapping):
      raise ValueError(f"config.json {name!r} must be a dict or null, got "
                       f"{value!r}")
  if legacy and current:
    strip = lambda d: {k: v for k, v in d.items() if k != "rope_theta"}
    if strip(legacy) != strip(current):
      raise ValueError(
          f"config.json has both rope_scaling={dict(legacy)!r} and "
          f"rope_parameters={dict(current)!r}, and they disagree")
  params = dict(legacy or current or {})
  top_theta = hf.get("rope_theta")
  theta = params.pop("rope_theta", None)
  if theta is None:
    theta = 10000.0 if top_theta is None else top_theta
  elif top_theta is not None and top_theta != theta:
    raise ValueError(f"config.json rope_theta={top_theta!r} disagrees with "
                     f"the rope dict's rope_theta={theta!r}")
  fraction = _rotary_fraction("config.json", hf.get("partial_rotary_factor"),
                              model_type)
  inner = params.pop("partial_rotary_factor", None)
  if inner is not None:   # Phi3Config: the dict's value wins (setdefault)
    fraction = _rotary_fraction("config.json rope dict", inner, model_type)

  if not isinstance(rope_scaling, _Keep):
    if rope_scaling is not None and not isinstance(rope_scaling, Mapping):
      raise ValueError("rope_scaling must be a dict, None (no scaling) or "
                       f"left out (keep the checkpoint's), got "
                       f"{rope_scaling!r}")
    params = dict(rope_scaling or {})
    if params.get("rope_theta") is not None:
      theta = params.pop("rope_theta")
    params.pop("rope_theta", None)
    inner = params.pop("partial_rotary_factor", None)
    if inner is not None:
      fraction = _rotary_fraction("rope_scaling", inner, model_type)

  rope_type = params.get("rope_type") or params.get("type") or "default"
  if model_type == "phi3" and (rope_type in ("su", "yarn") or params.get(
      "type") in ("su", "yarn") and rope_type == "longrope"):
    # Phi3Config's backward compatibility: both old names mean longrope
    # (its saved config.json keeps the old "type" beside "rope_type").
    params.pop("type", None)
    params["rope_type"] = rope_type = "longrope"
  top_original = hf.get("original_max_position_embeddings")
  if top_original is not None:
    if rope_type not in _USES_ORIGINAL_MAX:
      if model_type != "phi3":   # Phi3Config always writes it (4096)
        warnings.warn(
            f"config.json original_max_position_embeddings={top_original!r} "
            f"is not used by rope_type {rope_type!r}", stacklevel=3)
    else:
      # transformers (standardize_rope_params) lets the top-level key win
      # over the checkpoint's dict; we refuse a silent disagreement there,
      # and an explicit rope_scaling argument wins.
      inner = params.get("original_max_position_embeddings")
      if inner is None:
        params["original_max_position_embeddings"] = top_original
      elif isinstance(rope_scaling, _Keep) and inner != top_original:
        raise ValueError(
            f"config.json original_max_position_embeddings={top_original!r} "
            f"disagrees with the rope dict's {inner!r}")
  if isinstance(theta, bool) or not isinstance(theta, (int, float)):
    raise ValueError(f"rope_theta must be a number, got {theta!r}")
  if set(params) <= {"rope_type", "type"} and rope_type == "default":
    params = None
  return float(theta), params, fraction


def _layer_masks(hf: Mapping[str, Any], model_type: str,
                 num_layers: int) -> list[Optional[int]]:
  """Per layer: the sliding window, or None for full causal attention."""
  if model_type == "llama":
    return [None] * num_layers
  window = hf["sliding_window"]
  if model_type == "phi3":   # Phi3Model: one window on every layer, or none
    if window is not None:
      _int("sliding_window", window)
    return [window] * num_layers
  if model_type == "mistral":
    if window is not None:
      _int("sliding_window", window)
    layer_types = hf.get("layer_types")
    everywhere = ["full_attention" if window is None else "sliding_attention"
                  ] * num_layers
    if layer_types is not None and list(layer_types) != everywhere:
      raise ValueError(
          f"config.json layer_types={layer_types!r} is not supported for "
          "model_type 'mistral': transformers' MistralModel ignores it and "
          f"applies sliding_window={window!r} to every layer")
    return [window] * num_layers
  # qwen2 / qwen3: Qwen2Config.__post_init__ (Qwen3Config's is the same).
  if not hf["use_sliding_window"]:
    window = None
  layer_types = hf["layer_types"]
  if layer_types is None:
    max_window_layers = hf["max_window_layers"]
    if window is not None:
      _int("max_window_layers", max_window_layers, 0)
    layer_types = [
        "sliding_attention" if window is not None and i >= max_window_layers
        else "full_attention" for i in range(num_layers)]
  if not isinstance(layer_types, (list, tuple)) or len(layer_types) != (
      num_layers) or any(t not in _ATTENTION_TYPES for t in layer_types):
    raise ValueError(
        f"config.json layer_types must list {num_layers} entries from "
        f"{_ATTENTION_TYPES}, got {layer_types!r}")
  if "sliding_attention" in layer_types:
    if window is None:
      raise ValueError(
          "config.json layer_types has sliding_attention layers but no "
          "sliding window (use_sliding_window is false or sliding_window is "
          "null)")
    _int("sliding_window", window)
  return [window if t == "sliding_attention" else None for t in layer_types]


def config_from_hf(hf_config: Mapping[str, Any], *,
                   rope_scaling=KEEP) -> ModelConfig:
  """A ``ModelConfig`` equivalent to a Llama / Mistral / Qwen2 / Qwen3 /
  Phi-3 config.json (Qwen3: QK-norm, ``AttentionSpec(qk_norm=True)``;
  Phi-3: ``AttentionSpec(partial_rotary_factor=...)``).

  Args:
    hf_config: the parsed config.json.
    rope_scaling: left out, the checkpoint's RoPE scaling; None, plain RoPE;
      a Hugging Face rope_scaling dict (e.g. ``{"rope_type": "yarn",
      "factor": 4.0, "original_max_position_embeddings": 4096}``), used
      instead of the checkpoint's. A ``rope_theta`` in the dict replaces the
      checkpoint's base; otherwise the checkpoint's base is kept.

  Returns:
    The ModelConfig (float32; ``load_hf`` sets dtype and implementation).

  Raises:
    ValueError: for an unsupported model_type or feature, or a bad value.
  """
  if not isinstance(hf_config, Mapping):
    raise ValueError(f"hf_config must be a dict, got {type(hf_config)}")
  model_type = hf_config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r}; load_hf reads "
                     f"{SUPPORTED_MODEL_TYPES}")
  if hf_config.get("quantization_config") is not None:
    raise ValueError("quantized checkpoints are not supported (config.json "
                     "has quantization_config)")
  defaults = _DEFAULTS[model_type]
  known = set(defaults) | _ROPE_KEYS | _INERT_KEYS
  unknown = sorted(k for k, v in hf_config.items()
                   if v is not None and k not in known)
  if unknown:
    warnings.warn(f"config.json keys {unknown} are not read by load_hf "
                  f"(model_type {model_type!r}); check they do not change the "
                  "model", stacklevel=2)
  hf = {k: hf_config.get(k, v) for k, v in defaults.items()}

  if hf["hidden_act"] not in ("silu", "swish"):
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported "
                     "(the MLP here is SwiGLU: silu only)")
  if hf.get("mlp_bias"):
    raise ValueError("mlp_bias=True is not supported (the MLP here has no "
                     "biases)")
  d_model = _int("hidden_size", hf["hidden_size"])
  num_heads = _int("num_attention_heads", hf["num_attention_heads"])
  kv_heads = hf["num_key_value_heads"]
  kv_heads = num_heads if kv_heads is None else _int("num_key_value_heads",
                                                     kv_heads)
  if num_heads % kv_heads:
    raise ValueError(f"config.json num_attention_heads={num_heads} is not a "
                     f"multiple of num_key_value_heads={kv_heads}")
  head_dim = hf["head_dim"]
  if head_dim:   # transformers: `getattr(config, "head_dim", None) or ...`
    _int("head_dim", head_dim)
  elif d_model % num_heads:
    raise ValueError(f"config.json hidden_size={d_model} is not divisible by "
                     f"num_attention_heads={num_heads} and head_dim is unset")
  else:
    head_dim = d_model // num_heads
  num_layers = _int("num_hidden_layers", hf["num_hidden_layers"])
  max_positions = _int("max_position_embeddings",
                       hf["max_position_embeddings"])
  eps = hf["rms_norm_eps"]
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
      0 < eps < 1):
    raise ValueError(f"config.json rms_norm_eps must be in (0, 1), got "
                     f"{eps!r}")
  tied = hf["tie_word_embeddings"]
  if not isinstance(tied, bool):
    raise ValueError(f"config.json tie_word_embeddings must be a bool, got "
                     f"{tied!r}")

  theta, scaling, fraction = _rope_settings(hf_config, rope_scaling,
                                           model_type)
  windows = _layer_masks(hf, model_type, num_layers)
  specs = tuple(
      AttentionSpec(position="rope", rope_base=theta,
                    rope_scaling=scaling,
                    rope_max_position_embeddings=max_positions,
                    mask="causal" if w is None else "sliding_window",
                    window=w, qk_norm=model_type == "qwen3",
                    partial_rotary_factor=fraction)
      for w in windows)
  if all(s == specs[0] for s in specs):
    specs = specs[:1]
  try:
    return ModelConfig(
        vocab_size=_int("vocab_size", hf["vocab_size"]), d_model=d_model,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=kv_heads,
        head_dim=head_dim,
        mlp_dim=_int("intermediate_size", hf["intermediate_size"]),
        tie_embeddings=tied,
        # Qwen2: q/k/v biases; Llama/Mistral attention_bias: q/k/v and o.
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias")),
        out_bias=model_type != "qwen2" and bool(hf.get("attention_bias")),
        max_len=max_positions, attention=specs, norm_eps=float(eps))
  except ValueError as e:
    raise ValueError(f"config.json (model_type {model_type!r}) does not make "
                     f"a valid model: {e}") from e


# ----------------------------------------------------------------------------
# Weights.


def weight_map(config: ModelConfig) -> dict[str, tuple]:
  """HF name -> (nnx path, HF shape, torch layout -> nnx layout).

  Every tensor ``config`` needs, under its transformers name; the GGUF
  importer renames llama.cpp's tensors into these names and reuses it.
  """
  d, n, k, h = (config.d_model, config.num_heads, config.kv_heads,
                config.per_head_dim)
  f, v = config.mlp_dim, config.vocab_size
  same = lambda w: w
  transpose = lambda w: w.T
  heads_in = lambda m: (lambda w: w.reshape(m, h, d).transpose(2, 0, 1))
  heads_bias = lambda m: (lambda w: w.reshape(m, h))
  heads_out = lambda w: w.reshape(d, n, h).transpose(1, 2, 0)
  out = {"model.embed_tokens.weight": (("embed", "embedding"), (v, d), same),
         "model.norm.weight": (("final_norm", "scale"), (d,), same)}
  if not config.tie_embeddings:
    out["lm_head.weight"] = (("lm_head", "kernel"), (v, d), transpose)
  for i in range(config.num_layers):
    hf, ours = f"model.layers.{i}.", ("blocks", i)
    out[hf + "input_layernorm.weight"] = (ours + ("attn_norm", "scale"),
                                          (d,), same)
    out[hf + "post_attention_layernorm.weight"] = (
        ours + ("mlp_norm", "scale"), (d,), same)
    if config.layer_spec(i).qk_norm:       # Qwen3: RMSNorm per head
      for name in ("q", "k"):
        out[hf + f"self_attn.{name}_norm.weight"] = (
            ours + ("attn", f"{name}_norm", "scale"), (h,), same)
    for name, m in (("q", n), ("k", k), ("v", k)):
      proj = ours + ("attn", f"{name}_proj")
      out[hf + f"self_attn.{name}_proj.weight"] = (proj + ("kernel",),
                                                   (m * h, d), heads_in(m))
      if config.qkv_bias:
        out[hf + f"self_attn.{name}_proj.bias"] = (proj + ("bias",),
                                                   (m * h,), heads_bias(m))
    out[hf + "self_attn.o_proj.weight"] = (
        ours + ("attn", "o_proj", "kernel"), (d, n * h), heads_out)
    if config.out_bias:
      out[hf + "self_attn.o_proj.bias"] = (ours + ("attn", "o_proj", "bias"),
                                           (d,), same)
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
      out[hf + f"mlp.{name}_proj.weight"] = (ours + ("mlp", name, "kernel"),
                                             shape, transpose)
  return out


def _tensor_files(path: str) -> dict[str, str]:
  """Tensor name -> the safetensors file that holds it."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    with open(index) as fh:
      weight_map = json.load(fh).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index} has no weight_map")
    files = sorted(set(weight_map.values()))
  elif os.path.exists(single):
    weight_map, files = None, ["model.safetensors"]
  else:
    other = [n for n in sorted(os.listdir(path))
             if n.endswith((".bin", ".pt", ".pth", ".safetensors"))]
    raise ValueError(
        f"no model.safetensors or model.safetensors.index.json in {path!r}"
        + (f" (found {other}; only safetensors are read)" if other else ""))
  where = {}
  for name in files:
    file = os.path.join(path, name)
    if not os.path.exists(file):
      raise ValueError(f"{index} names shard {name!r}, which is missing")
    with safe_open(file, framework="numpy") as fh:
      for key in fh.keys():
        if key in where:
          raise ValueError(f"tensor {key!r} is in both {where[key]} and "
                           f"{file}")
        where[key] = file
  if weight_map is not None:
    for key, name in weight_map.items():
      if where.get(key) != os.path.join(path, name):
        raise ValueError(f"{index} puts tensor {key!r} in {name!r}, but "
                         f"that shard does not hold it")
  return where


def _list(names, limit=8) -> str:
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return f"{names[:limit]}{more}"


def fused_parts(config: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
  """Phi-3's fused tensors: HF name -> [(unfused HF name, first row, end
  row)]. ``qkv_proj`` stacks q, k, v rows (Phi3Attention slices them in
  that order); ``gate_up_proj`` stacks gate then up (``chunk(2)``)."""
  n, k, h, f = (config.num_heads, config.kv_heads, config.per_head_dim,
                config.mlp_dim)
  out = {}
  for i in range(config.num_layers):
    attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    out[attn + "qkv_proj.weight"] = [
        (attn + "q_proj.weight", 0, n * h),
        (attn + "k_proj.weight", n * h, (n + k) * h),
        (attn + "v_proj.weight", (n + k) * h, (n + 2 * k) * h)]
    out[mlp + "gate_up_proj.weight"] = [(mlp + "gate_proj.weight", 0, f),
                                        (mlp + "up_proj.weight", f, 2 * f)]
  return out


def _read_weights(path: str, config: ModelConfig,
                  cast: Callable[[np.ndarray], jax.Array],
                  fused: bool = False) -> dict:
  """nnx path -> array, every tensor checked by name and shape.

  ``fused``: the checkpoint holds Phi-3's fused tensors (:func:`fused_parts`)
  in place of their parts; each is checked whole and split by rows.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  expected = weight_map(config)
  parts = fused_parts(config) if fused else {}
  d = config.d_model
  for name, pieces in parts.items():   # the fused tensor replaces its parts
    for part, _, _ in pieces:
      del expected[part]
    expected[name] = (None, (pieces[-1][2], d), None)
  where = _tensor_files(path)
  present = set(where)
  missing = set(expected) - present
  unexpected = {n for n in present - set(expected)
                if not _IGNORED_TENSOR.search(n)}
  # A tied checkpoint may still carry lm_head.weight; it must equal the
  # embedding (transformers ties them and never reads it).
  tied_head = config.tie_embeddings and "lm_head.weight" in unexpected
  if tied_head:
    unexpected.discard("lm_head.weight")
  if missing:
    raise ValueError(f"checkpoint {path!r} lacks tensor(s) "
                     f"{_list(missing)} that the config needs")
  if unexpected:
    raise ValueError(f"checkpoint {path!r} has tensor(s) {_list(unexpected)} "
                     "that the config does not use")
  # Check every shape before reading any data.
  with contextlib.ExitStack() as stack:
    handles = {file: stack.enter_context(safe_open(file, framework="numpy"))
               for file in sorted(set(where.values()))}
    names = list(expected) + (["lm_head.weight"] if tied_head else [])
    for name in names:
      shape = tuple(handles[where[name]].get_slice(name).get_shape())
      want = expected.get(name, expected["model.embed_tokens.weight"])[1]
      if shape != want:
        raise ValueError(f"tensor {name!r} has shape {shape}, expected "
                         f"{want} from config.json")
    if tied_head:
      head = handles[where["lm_head.weight"]].get_tensor("lm_head.weight")
      embed = handles[where["model.embed_tokens.weight"]].get_tensor(
          "model.embed_tokens.weight")
      if not np.array_equal(head, embed):
        raise ValueError(
            "tie_word_embeddings is true but tensor 'lm_head.weight' differs "
            "from 'model.embed_tokens.weight'")
    unfused = weight_map(config)
    out = {}
    for name, (ours, _, layout) in expected.items():
      tensor = handles[where[name]].get_tensor(name)
      if name in parts:
        for part, start, stop in parts[name]:
          part_path, _, part_layout = unfused[part]
          out[part_path] = cast(part_layout(tensor[start:stop]))
      else:
        out[ours] = cast(layout(tensor))
    return out


def load_hf(path, *, rope_scaling=KEEP, dtype: str = "float32",
            implementation: Optional[str] = None) -> DecoderLM:
  """Loads a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Phi-3 folder as
  a DecoderLM.

  Args:
    path: a folder with config.json and model.safetensors (or shards listed
      in model.safetensors.index.json).
    rope_scaling: left out, the checkpoint's RoPE scaling; None removes it;
      a Hugging Face rope_scaling dict replaces it (e.g. YaRN x4 on a model
      trained without it: ``{"rope_type": "yarn", "factor": 4.0,
      "original_max_position_embeddings": 4096}``).
    dtype: "float32" or "bfloat16": parameters and compute.
    implementation: the attention implementation (None: auto).

  Returns:
    The DecoderLM with the checkpoint's weights.

  Raises:
    ValueError: unsupported model or feature; missing, unexpected or
      misshapen tensors; a bad argument.
  """
  path = os.fspath(path)
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise ValueError(f"no config.json in {path!r}")
  with open(config_file) as fh:
    hf_config = json.load(fh)
  config = config_from_hf(hf_config, rope_scaling=rope_scaling).replace(
      dtype=dtype, param_dtype=dtype, implementation=implementation)
  jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  values = _read_weights(path, config,
                         lambda w: jnp.asarray(w, dtype=jdtype),
                         fused=hf_config.get("model_type") == "phi3")
  return build_model(config, values)


def build_model(config: ModelConfig, values: Mapping[tuple, jax.Array]
                ) -> DecoderLM:
  """A DecoderLM of ``config`` holding ``values`` (nnx path -> array).

  Shared by the importers (``load_hf``, ``gguf.load_gguf``): every state
  entry of the model must be given, with its exact shape.
  """
  model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model))
  paths = {tuple(p) for p, _ in flat}
  if paths != set(values):
    raise RuntimeError(  # The model grew or lost state this loader misses.
        f"the importer does not cover the model's state: unfilled "
        f"{_list(paths - set(values))}, unknown {_list(set(values) - paths)}")
  for p, variable in flat:
    want = variable.get_value().shape
    if tuple(want) != values[p].shape:   # a loader bug, not the user's
      raise RuntimeError(f"{p}: loaded {values[p].shape}, model wants {want}")
  nnx.update(model, nnx.from_flat_state(sorted(values.items())))
  return model
