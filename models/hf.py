"""Hugging Face checkpoint import: Llama, Mistral, Qwen2, Qwen3, Phi-3,
Gemma 2 and Gemma 3 (text).

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
  Gemma 2: GeGLU (``gelu_pytorch_tanh``), sandwich norms
  (``post_attention_layernorm`` is the attention's post-norm,
  ``pre/post_feedforward_layernorm`` the MLP's), RMSNorm scaling by ``1 +
  w`` (folded into the scales on load), embeddings times sqrt(hidden_size),
  ``attn_logit_softcapping`` and ``final_logit_softcapping``, local/global
  layers from ``layer_types`` (default: local first, alternating), and the
  logit scale ``query_pre_attn_scalar ** -0.5`` (folded into q_proj on load,
  or into q_norm's scale with QK-norm: ``config_from_hf`` alone gives a
  model with the usual ``head_dim ** -0.5`` whose weights must absorb
  ``sqrt(head_dim / query_pre_attn_scalar)``).
  Gemma 3 (``gemma3_text``): Gemma 2 without the soft caps (unless set),
  QK-norm with ``1 + w``, ``sliding_window_pattern`` (6: five local layers
  per global one) and a RoPE per layer type: ``rope_parameters`` keyed by
  layer type, or ``rope_theta`` (global, 1e6) / ``rope_local_base_freq``
  (local, 1e4) / ``rope_scaling`` (global layers only).
* Missing config keys take the transformers config class's default
  (e.g. Mistral's ``num_key_value_heads`` is 8, its ``sliding_window`` 4096).

gpt-oss: ``load_hf`` refuses it (its mixture-of-experts MLP); its attention
layers import with ``attention_from_hf(config, tensors, layer)`` (learned
sinks, the 128-key window on alternate layers, YaRN, q/k/v/o biases), equal
to transformers' GptOssAttention.

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
  ...post_attention_layernorm.weight       -> post_attn_norm.scale (Gemma 2)
  ...pre_feedforward_layernorm.weight      -> mlp_norm.scale (Gemma 2)
  ...post_feedforward_layernorm.weight     -> post_mlp_norm.scale (Gemma 2)
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
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from extrapolax.attention import layer as attn_layer

from .config import ModelConfig
from .hf_config import (KEEP, SUPPORTED_MODEL_TYPES, _DEFAULTS, _GEMMA,
                        config_from_hf, gpt_oss_attention)
from .transformer import DecoderLM

__all__ = ["SUPPORTED_MODEL_TYPES", "KEEP", "attention_from_hf",
           "build_model", "config_from_hf", "load_hf", "weight_map"]

# Non-persistent buffers some older checkpoints still carry; recomputed here.
_IGNORED_TENSOR = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


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
    if config.post_norms:   # Gemma 2: sandwich norms, other names
      for name, norm in (("post_attention_layernorm", "post_attn_norm"),
                         ("pre_feedforward_layernorm", "mlp_norm"),
                         ("post_feedforward_layernorm", "post_mlp_norm")):
        out[hf + name + ".weight"] = (ours + (norm, "scale"), (d,), same)
    else:
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
                  fused: bool = False,
                  adjust: Optional[Callable[[tuple, np.ndarray],
                                            np.ndarray]] = None) -> dict:
  """nnx path -> array, every tensor checked by name and shape.

  ``fused``: the checkpoint holds Phi-3's fused tensors (:func:`fused_parts`)
  in place of their parts; each is checked whole and split by rows.
  ``adjust(nnx_path, array)``: applied in float32 before the cast (Gemma's
  folded norm offset and query scale).
  """
  if adjust is None:
    adjust = lambda _, w: w
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  unfused = weight_map(config)
  expected = dict(unfused)
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
    out = {}
    for name, (ours, _, layout) in expected.items():
      tensor = handles[where[name]].get_tensor(name)
      if name in parts:
        for part, start, stop in parts[name]:
          part_path, _, part_layout = unfused[part]
          out[part_path] = cast(adjust(part_path,
                                       part_layout(tensor[start:stop])))
      else:
        out[ours] = cast(adjust(ours, layout(tensor)))
    return out


def _gemma_adjust(config: ModelConfig, query_pre_attn_scalar):
  """Gemma's weights in this model's terms: its RMSNorm scales by ``1 + w``
  (every norm here scales by ``w``), and its logits are ``q.k /
  sqrt(query_pre_attn_scalar)`` where this attention divides by
  ``sqrt(head_dim)``: q_proj absorbs ``sqrt(head_dim / scalar)`` (RoPE and
  the soft cap see the same logits)."""
  q_scale = np.float32((config.per_head_dim / query_pre_attn_scalar) ** 0.5)
  # With QK-norm (Gemma 3) a factor on q_proj would be normalized away: the
  # query norm's scale takes it.
  q_holder = ("attn", "q_norm", "scale") if config.layer_spec(0).qk_norm else (
      "attn", "q_proj", "kernel")

  def adjust(path: tuple, w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float32)
    if path[-1] == "scale":
      w = w + np.float32(1.0)
    if path[-3:] == q_holder:
      w = w * q_scale
    return w
  return adjust


def attention_from_hf(hf_config: Mapping, tensors: Mapping[str, np.ndarray],
                      layer: int, *, rope_scaling=KEEP,
                      implementation: Optional[str] = None
                      ) -> attn_layer.Attention:
  """One gpt-oss attention layer as the library's nnx ``Attention`` (float32).

  gpt-oss's mixture-of-experts MLP has no counterpart here (``load_hf``
  refuses the model); its attention does: learned sinks, a 128-key window
  on alternate layers, YaRN, biases (``hf_config.gpt_oss_attention``).

  Args:
    hf_config: the parsed config.json (model_type "gpt_oss").
    tensors: transformers' tensors by name; those under
      ``model.layers.{layer}.self_attn.`` are read (q/k/v/o weights and
      biases, ``sinks``), others ignored.
    layer: the layer index (its window comes from ``layer_types``).
    rope_scaling, implementation: as ``load_hf``'s.

  Returns:
    ``Attention``: ``module(x, positions=...)`` gives the layer's output
    (o_proj included), as transformers' GptOssAttention.
  """
  dims, specs = gpt_oss_attention(hf_config, rope_scaling=rope_scaling)
  if isinstance(layer, bool) or not isinstance(layer, int) or not (
      0 <= layer < len(specs)):
    raise ValueError(f"layer must be an int in [0, {len(specs)}), got "
                     f"{layer!r}")
  spec = specs[layer]
  d, n, k, h = (dims["d_model"], dims["num_heads"], dims["num_kv_heads"],
                dims["head_dim"])
  module = attn_layer.Attention(
      d, n, num_kv_heads=k, head_dim=h, position=spec.to_position(),
      mask=spec.to_mask(), implementation=implementation, sink_logits=True,
      qkv_bias=dims["bias"], out_bias=dims["bias"], rngs=nnx.Rngs(0))
  prefix = f"model.layers.{layer}.self_attn."
  want = {"q_proj.weight": (n * h, d), "k_proj.weight": (k * h, d),
          "v_proj.weight": (k * h, d), "o_proj.weight": (d, n * h),
          "sinks": (n,)}
  if dims["bias"]:
    want.update({"q_proj.bias": (n * h,), "k_proj.bias": (k * h,),
                 "v_proj.bias": (k * h,), "o_proj.bias": (d,)})
  got = {}
  for name, shape in want.items():
    if prefix + name not in tensors:
      raise ValueError(f"tensors lack {prefix + name!r}")
    w = np.asarray(tensors[prefix + name], np.float32)
    if w.shape != shape:
      raise ValueError(f"tensor {prefix + name!r} has shape {w.shape}, "
                       f"expected {shape} from config.json")
    got[name] = w
  for name, m in (("q", n), ("k", k), ("v", k)):
    proj = getattr(module, f"{name}_proj")
    proj.kernel[...] = jnp.asarray(
        got[f"{name}_proj.weight"].reshape(m, h, d).transpose(2, 0, 1))
    if dims["bias"]:
      proj.bias[...] = jnp.asarray(got[f"{name}_proj.bias"].reshape(m, h))
  module.o_proj.kernel[...] = jnp.asarray(
      got["o_proj.weight"].reshape(d, n, h).transpose(1, 2, 0))
  if dims["bias"]:
    module.o_proj.bias[...] = jnp.asarray(got["o_proj.bias"])
  module.sinks[...] = jnp.asarray(got["sinks"])
  return module


def load_hf(path, *, rope_scaling=KEEP, dtype: str = "float32",
            implementation: Optional[str] = None) -> DecoderLM:
  """Loads a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma 2 /
  Gemma 3 (text) folder as a DecoderLM.

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
  model_type = hf_config.get("model_type")
  adjust = None
  if model_type in _GEMMA:
    adjust = _gemma_adjust(config, hf_config.get(
        "query_pre_attn_scalar",
        _DEFAULTS[model_type]["query_pre_attn_scalar"]))
  values = _read_weights(path, config,
                         lambda w: jnp.asarray(w, dtype=jdtype),
                         fused=model_type == "phi3", adjust=adjust)
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
