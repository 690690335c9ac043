"""Hugging Face config.json -> ModelConfig (the config half of ``hf``).

Each family's defaults, RoPE settings, layer windows and refusals; the
module docstring of ``extrapolax.models.hf`` says what is matched.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional

from .config import AttentionSpec, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3",
                         "gemma2", "gemma3_text")
_GEMMA = ("gemma2", "gemma3_text")


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
    # Gemma 2: GeGLU, sandwich norms, (1 + w) RMSNorm, scaled embeddings,
    # attention and final logit soft caps, alternating local/global layers.
    "gemma2": dict(
        _COMMON_DEFAULTS, vocab_size=256000, hidden_size=2304,
        intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, hidden_act=None,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
        tie_word_embeddings=True, attention_bias=False,
        query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        use_bidirectional_attention=None),
    # Gemma 3 (text): Gemma 2 without soft caps, with QK-norm (1 + w), 5
    # local layers per global one, and a RoPE base per layer type.
    "gemma3_text": dict(
        _COMMON_DEFAULTS, vocab_size=262208, hidden_size=2304,
        intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, hidden_act=None,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131072, tie_word_embeddings=True,
        attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
        layer_types=None, sliding_window_pattern=None,
        _sliding_window_pattern=None,   # what save_pretrained writes
        final_logit_softcapping=None, attn_logit_softcapping=None,
        use_bidirectional_attention=False, rope_local_base_freq=None),
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


def _gemma3_rope(hf: Mapping[str, Any], rope_scaling) -> dict:
  """Gemma 3's RoPE per layer type, as Gemma3TextConfig reads it:
  ``rope_parameters`` keyed by "full_attention" / "sliding_attention"
  (transformers 5), or the older top-level ``rope_theta`` (global, default
  1e6), ``rope_local_base_freq`` (local, default 1e4) and ``rope_scaling``
  (global layers only). A ``rope_scaling`` argument replaces the global
  layers' scaling; the local layers keep theirs."""
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and set(params) <= set(_ATTENTION_TYPES):
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
  else:
    full, local = dict(hf.get("rope_scaling") or params or {}), {}
  full.setdefault("rope_theta", hf.get("rope_theta") or 1e6)
  local.setdefault("rope_theta", hf.get("rope_local_base_freq") or 1e4)
  top = {k: hf[k] for k in ("original_max_position_embeddings",) if k in hf}
  return {
      "full_attention": _rope_settings(dict(top, rope_parameters=full),
                                       rope_scaling, "gemma3_text"),
      "sliding_attention": _rope_settings({"rope_parameters": local}, KEEP,
                                          "gemma3_text")}


def _check_layer_types(layer_types, num_layers: int) -> None:
  if not isinstance(layer_types, (list, tuple)) or len(layer_types) != (
      num_layers) or any(t not in _ATTENTION_TYPES for t in layer_types):
    raise ValueError(
        f"config.json layer_types must list {num_layers} entries from "
        f"{_ATTENTION_TYPES}, got {layer_types!r}")


def _layer_masks(hf: Mapping[str, Any], model_type: str,
                 num_layers: int) -> list[Optional[int]]:
  """Per layer: the sliding window, or None for full causal attention."""
  if model_type == "llama":
    return [None] * num_layers
  window = hf["sliding_window"]
  if model_type in _GEMMA:
    # Gemma2Config: layer_types default alternates, local first; Gemma 3's
    # has sliding_window_pattern - 1 local layers per global one.
    pattern = 2 if model_type == "gemma2" else _int(
        "sliding_window_pattern", hf["sliding_window_pattern"] or hf[
            "_sliding_window_pattern"] or 6)
    layer_types = hf["layer_types"] or [
        "sliding_attention" if (i + 1) % pattern else "full_attention"
        for i in range(num_layers)]
    _check_layer_types(layer_types, num_layers)
    if "sliding_attention" in layer_types:
      _int("sliding_window", window)
    return [window if t == "sliding_attention" else None for t in layer_types]
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
  _check_layer_types(layer_types, num_layers)
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
  if model_type == "gpt_oss":
    raise ValueError(
        "model_type 'gpt_oss': its mixture-of-experts MLP is not supported "
        "(the model here has one dense MLP); hf.attention_from_hf imports its "
        "attention layers (learned sinks, local/global, YaRN)")
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

  gemma = model_type in _GEMMA
  if gemma:
    if hf["hidden_activation"] != "gelu_pytorch_tanh":
      raise ValueError(
          f"hidden_activation={hf['hidden_activation']!r} is not supported "
          "(Gemma here: gelu_pytorch_tanh, the tanh GELU)")
    if hf["use_bidirectional_attention"]:
      raise ValueError("use_bidirectional_attention=True is not supported "
                       "(a decoder LM: causal attention only)")
    soft_caps = {}
    for name in ("attn_logit_softcapping", "final_logit_softcapping",
                 "query_pre_attn_scalar"):
      value = hf[name]
      if value is not None and (isinstance(value, bool) or not isinstance(
          value, (int, float)) or value <= 0):
        raise ValueError(f"config.json {name} must be a number > 0 or null, "
                         f"got {value!r}")
      soft_caps[name] = value
    if soft_caps["query_pre_attn_scalar"] is None:
      raise ValueError("config.json query_pre_attn_scalar must be set")
  elif hf["hidden_act"] not in ("silu", "swish"):
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

  windows = _layer_masks(hf, model_type, num_layers)
  if model_type == "gemma3_text":
    ropes = _gemma3_rope(hf_config, rope_scaling)
    rope = [ropes["full_attention" if w is None else "sliding_attention"]
            for w in windows]
  else:
    rope = [_rope_settings(hf_config, rope_scaling, model_type)] * num_layers
  specs = tuple(
      AttentionSpec(position="rope", rope_base=theta,
                    rope_scaling=scaling,
                    rope_max_position_embeddings=max_positions,
                    mask="causal" if w is None else "sliding_window",
                    window=w,
                    qk_norm=model_type in ("qwen3", "gemma3_text"),
                    partial_rotary_factor=fraction,
                    logits_soft_cap=(soft_caps["attn_logit_softcapping"]
                                     if gemma else None))
      for w, (theta, scaling, fraction) in zip(windows, rope))
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
        max_len=max_positions, attention=specs, norm_eps=float(eps),
        mlp_activation="gelu_tanh" if gemma else "silu", post_norms=gemma,
        scale_embeddings=gemma,
        final_logit_soft_cap=(soft_caps["final_logit_softcapping"]
                              if gemma else None))
  except ValueError as e:
    raise ValueError(f"config.json (model_type {model_type!r}) does not make "
                     f"a valid model: {e}") from e




# gpt-oss: the attention half (its MoE MLP is refused by config_from_hf).
_GPT_OSS = dict(
    hidden_size=2880, num_hidden_layers=36, head_dim=64,
    num_attention_heads=64, num_key_value_heads=8, sliding_window=128,
    max_position_embeddings=131072, attention_bias=True, layer_types=None)
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                 "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096,
                 "rope_theta": 150000.0}


def gpt_oss_attention(hf_config: Mapping[str, Any], *, rope_scaling=KEEP
                      ) -> tuple[dict, tuple[AttentionSpec, ...]]:
  """gpt-oss's attention layers from its config.json (GptOssConfig's
  defaults for missing keys): ``(dims, specs)`` with dims ``d_model,
  num_heads, num_kv_heads, head_dim, bias`` and one AttentionSpec per layer:
  RoPE (YaRN x32 over 4096 by default, half-split, base 150000), learned
  sinks (``sink_logits=True``), a 128-key sliding window on the layers
  ``layer_types`` marks (default: local first, alternating), q/k/v/o biases
  (``attention_bias``), logit scale ``head_dim ** -0.5``."""
  if not isinstance(hf_config, Mapping) or hf_config.get(
      "model_type") != "gpt_oss":
    raise ValueError("gpt_oss_attention reads a gpt_oss config.json, got "
                     f"model_type {dict(hf_config).get('model_type')!r}")
  hf = {k: hf_config.get(k, v) for k, v in _GPT_OSS.items()}
  d_model = _int("hidden_size", hf["hidden_size"])
  num_heads = _int("num_attention_heads", hf["num_attention_heads"])
  kv_heads = _int("num_key_value_heads", hf["num_key_value_heads"] or
                  num_heads)
  head_dim = _int("head_dim", hf["head_dim"] or d_model // num_heads)
  num_layers = _int("num_hidden_layers", hf["num_hidden_layers"])
  layer_types = hf["layer_types"] or [
      "sliding_attention" if (i + 1) % 2 else "full_attention"
      for i in range(num_layers)]
  _check_layer_types(layer_types, num_layers)
  window = hf["sliding_window"]
  if "sliding_attention" in layer_types:
    _int("sliding_window", window)
  config = dict(hf_config)
  rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or
              _GPT_OSS_ROPE)
  if rope.get("rope_theta") is None:   # GptOssConfig.default_theta
    rope["rope_theta"] = config.get("rope_theta") or 150000.0
  config.update(rope_parameters=rope, rope_scaling=None, rope_theta=None)
  theta, scaling, fraction = _rope_settings(config, rope_scaling, "gpt_oss")
  max_positions = _int("max_position_embeddings",
                       hf["max_position_embeddings"])
  specs = tuple(
      AttentionSpec(position="rope", rope_base=theta, rope_scaling=scaling,
                    rope_max_position_embeddings=max_positions,
                    partial_rotary_factor=fraction,
                    mask=("sliding_window" if t == "sliding_attention"
                          else "causal"),
                    window=window if t == "sliding_attention" else None,
                    sink_logits=True)
      for t in layer_types)
  dims = dict(d_model=d_model, num_heads=num_heads, num_kv_heads=kv_heads,
              head_dim=head_dim, bias=bool(hf["attention_bias"]))
  return dims, specs
