"""llama.cpp GGUF import: Llama (and Mistral, which llama.cpp files as llama),
Qwen2 and Qwen3 (QK-norm: ``blk.N.attn_{q,k}_norm.weight``) files.

``load_gguf(path)`` reads a ``.gguf`` file with the ``gguf`` package (the
``gguf`` extra), dequantizes every tensor with ``gguf.quants.dequantize`` and
returns a :class:`DecoderLM`. It does not map anything into the model itself:
the metadata becomes a transformers-style config dict for
``hf.config_from_hf`` and the tensors are renamed to transformers' names for
``hf.weight_map`` / ``hf.build_model``, so a GGUF and the Hugging Face folder
it was converted from give the same model.

Metadata read (``{a}`` is ``general.architecture``)::

  {a}.context_length                 -> max_position_embeddings
  {a}.embedding_length               -> hidden_size
  {a}.feed_forward_length            -> intermediate_size
  {a}.block_count                    -> num_hidden_layers
  {a}.attention.head_count(_kv)      -> num_attention_heads / num_key_value_heads
  {a}.attention.key_length           -> head_dim (default hidden / heads)
  {a}.attention.layer_norm_rms_epsilon -> rms_norm_eps
  {a}.rope.freq_base                 -> rope_theta (default 10000)
  {a}.rope.scaling.type / .factor / .original_context_length / .attn_factor
  / .yarn_beta_fast / .yarn_beta_slow -> rope_scaling (none, linear, yarn)
  {a}.attention.sliding_window       -> a Mistral-style window on every layer
  no ``output.weight`` tensor        -> tied embeddings

llama.cpp's converter permutes the rows of the Llama Q and K projections
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``: per head, rows
``(2, H/2)`` become ``(H/2, 2)``, so its interleaved-pair RoPE sees the
half-split pairs). ``load_gguf`` undoes that, so the model here uses the
half-split layout of the transformers checkpoint. Qwen2 and Qwen3 files are
not permuted (llama.cpp runs them with NeoX-style RoPE).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from . import hf
from .config import ModelConfig
from .transformer import DecoderLM

__all__ = ["ARCHITECTURES", "TENSOR_TYPES", "KEEP", "config_from_gguf",
           "load_gguf", "read_metadata", "write_random_llama",
           "CHATML_TEMPLATE"]

KEEP = hf.KEEP
# general.architecture -> the transformers model_type it reads as.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Architectures whose Q/K rows llama.cpp permutes for its own RoPE layout.
_PERMUTED = ("llama",)
# The ggml tensor types load_gguf dequantizes (tested); others raise.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ROPE_SCALINGS = ("none", "linear", "yarn")

# llama.cpp tensor names -> transformers names.
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",      # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading GGUF files needs the gguf package: "
                      "pip install 'extrapolax[gguf]'") from e
  return gguf


def _reader(path: str):
  """A GGUFReader, with a damaged or foreign file raised as ValueError."""
  gguf = _gguf()
  if not os.path.isfile(path):
    raise ValueError(f"no GGUF file at {path!r}")
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
    raise ValueError(f"{path!r} is not a readable GGUF file (truncated or "
                     f"not GGUF): {type(e).__name__}: {e}") from e


def read_metadata(path, *, skip_prefix: tuple[str, ...] = ()) -> dict:
  """A GGUF file's metadata as plain Python values (key -> value).

  Keys starting with one of ``skip_prefix`` are left out (the tokenizer's
  arrays are large).
  """
  reader = _reader(os.fspath(path))
  return {k: f.contents() for k, f in reader.fields.items()
          if not k.startswith(("GGUF.",) + tuple(skip_prefix))}


def _number(meta: Mapping[str, Any], key: str, default=None, kind=float):
  value = meta.get(key, default)
  if value is None:
    raise ValueError(f"GGUF metadata lacks {key!r}")
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"GGUF metadata {key!r} must be a number, got {value!r}")
  return kind(value)


def _rope_scaling(meta: Mapping[str, Any], arch: str) -> Optional[dict]:
  """llama.cpp's rope scaling keys as a transformers rope_scaling dict."""
  p = f"{arch}.rope."
  kind = meta.get(p + "scaling.type")
  factor = meta.get(p + "scaling.factor")
  if kind is None and meta.get(p + "scale_linear") is not None:
    kind, factor = "linear", meta[p + "scale_linear"]   # older files
  if kind is None or kind == "none":
    return None
  if kind not in ROPE_SCALINGS:
    raise ValueError(f"GGUF {p}scaling.type={kind!r} is not supported; "
                     f"supported: {ROPE_SCALINGS}")
  factor = _number(meta, p + "scaling.factor", factor)
  if factor == 1.0 and kind == "linear":
    return None
  scaling = {"rope_type": kind, "factor": factor}
  if kind == "yarn":
    original = meta.get(p + "scaling.original_context_length")
    if original is not None:
      scaling["original_max_position_embeddings"] = int(original)
    for ours, theirs in (("beta_fast", "scaling.yarn_beta_fast"),
                         ("beta_slow", "scaling.yarn_beta_slow")):
      if meta.get(p + theirs) is not None:
        scaling[ours] = float(meta[p + theirs])
    attn_factor = meta.get(p + "scaling.attn_factor")
    if attn_factor is not None and attn_factor != 1.0:
      # llama.cpp multiplies YaRN's 0.1 ln(s) + 1 by attn_factor;
      # transformers' attention_factor replaces it.
      scaling["attention_factor"] = float(attn_factor) * (
          0.1 * np.log(factor) + 1.0)
  return scaling


def hf_config_from_gguf(meta: Mapping[str, Any], tensor_names=()) -> dict:
  """The transformers config.json equivalent of a GGUF's metadata."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported GGUF architecture {arch!r}; load_gguf "
                     f"reads {tuple(ARCHITECTURES)}")
  a = arch + "."
  integer = lambda k, d=None: _number(meta, a + k, d, int)
  hidden = integer("embedding_length")
  heads = integer("attention.head_count")
  kv_heads = integer("attention.head_count_kv", heads)
  head_dim = integer("attention.key_length", hidden // max(heads, 1))
  if integer("attention.value_length", head_dim) != head_dim:
    raise ValueError(f"GGUF {a}attention.value_length differs from "
                     f"key_length {head_dim}; not supported")
  rotary = integer("rope.dimension_count", head_dim)
  if rotary != head_dim:
    raise ValueError(f"GGUF {a}rope.dimension_count={rotary} != head_dim "
                     f"{head_dim}: partial rotary is not supported")
  names = set(tensor_names)
  vocab = meta.get(a + "vocab_size")
  if vocab is None:
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else None
  config = dict(
      model_type=ARCHITECTURES[arch], hidden_size=hidden,
      intermediate_size=integer("feed_forward_length"),
      num_hidden_layers=integer("block_count"), num_attention_heads=heads,
      num_key_value_heads=kv_heads, head_dim=head_dim,
      max_position_embeddings=integer("context_length"),
      rms_norm_eps=_number(meta, a + "attention.layer_norm_rms_epsilon"),
      rope_theta=_number(meta, a + "rope.freq_base", 10000.0),
      rope_scaling=_rope_scaling(meta, arch),
      tie_word_embeddings="output.weight" not in names)
  if vocab is not None:
    config["vocab_size"] = int(vocab)
  window = meta.get(a + "attention.sliding_window")
  if arch == "llama":
    bias = any(n.endswith(".attn_q.bias") for n in names)
    config["attention_bias"] = bias
    if window:     # Mistral: a window on every layer
      config.update(model_type="mistral", sliding_window=int(window))
      config.pop("attention_bias")
      if bias:
        raise ValueError("GGUF llama file with a sliding window and "
                         "attention biases: not supported")
  if arch == "qwen3":
    config["attention_bias"] = any(n.endswith(".attn_q.bias") for n in names)
  if arch != "llama" and window:
    raise ValueError(f"GGUF {a}attention.sliding_window={window!r} is not "
                     f"supported for architecture {arch!r}")
  return config


def config_from_gguf(path, *, rope_scaling=KEEP) -> ModelConfig:
  """The ModelConfig a GGUF file describes (no tensor data is read)."""
  reader = _reader(os.fspath(path))
  meta = {k: f.contents() for k, f in reader.fields.items()
          if not k.startswith(("GGUF.", "tokenizer."))}
  names = [t.name for t in reader.tensors]
  return hf.config_from_hf(hf_config_from_gguf(meta, names),
                           rope_scaling=rope_scaling)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's ``permute``: rows per head (H/2, 2) -> (2, H/2)."""
  shape = w.shape
  return (w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:])
          .swapaxes(1, 2).reshape(shape))


def _hf_name(name: str, num_layers: int) -> str:
  if name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and (
      int(parts[1]) < num_layers) and parts[2] in _BLOCK_TENSORS:
    return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}"
  if name == "rope_freqs.weight":
    raise ValueError("GGUF tensor 'rope_freqs.weight' (llama.cpp's per-"
                     "frequency RoPE factors, e.g. Llama 3.1 scaling) is not "
                     "supported")
  raise ValueError(f"GGUF tensor {name!r} is not used by a {num_layers}-layer "
                   "llama/qwen2/qwen3 model")


def _dequantize(tensor, path: str) -> np.ndarray:
  gguf = _gguf()
  kind = tensor.tensor_type.name
  if kind not in TENSOR_TYPES:
    raise ValueError(f"GGUF tensor {tensor.name!r} has type {kind}; "
                     f"load_gguf dequantizes {TENSOR_TYPES}")
  try:
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except (ValueError, IndexError, OSError) as e:
    raise ValueError(f"GGUF tensor {tensor.name!r} in {path!r} could not be "
                     f"read (truncated file?): {e}") from e
  return np.asarray(w, np.float32).reshape(tuple(int(d) for d in
                                                 reversed(tensor.shape)))


def load_gguf(path, *, rope_scaling=KEEP, dtype: str = "float32",
              implementation: Optional[str] = None) -> DecoderLM:
  """Loads a llama.cpp GGUF file (llama, mistral, qwen2, qwen3) as a
  DecoderLM.

  Args:
    path: the ``.gguf`` file.
    rope_scaling: left out, the file's RoPE scaling; None removes it; a
      Hugging Face rope_scaling dict replaces it (as ``load_hf``).
    dtype: "float32" or "bfloat16": parameters and compute. Quantized
      tensors are dequantized to float32 first, then cast.
    implementation: the attention implementation (None: auto).

  Returns:
    The DecoderLM; its logits match transformers' loading of the same file.

  Raises:
    ValueError: an unsupported architecture, tensor type or feature; a
      missing, unexpected or misshapen tensor; a truncated file; a bad
      argument. Nothing is returned half-loaded.
  """
  path = os.fspath(path)
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  reader = _reader(path)
  meta = {k: f.contents() for k, f in reader.fields.items()
          if not k.startswith(("GGUF.", "tokenizer.ggml."))}
  tensors = {t.name: t for t in reader.tensors}
  hf_config = hf_config_from_gguf(meta, tensors)
  config = hf.config_from_hf(hf_config, rope_scaling=rope_scaling).replace(
      dtype=dtype, param_dtype=dtype, implementation=implementation)
  expected = hf.weight_map(config)
  renamed = {_hf_name(n, config.num_layers): n for n in tensors}
  missing = sorted(set(expected) - set(renamed))
  if missing:
    raise ValueError(f"GGUF {path!r} lacks tensor(s) {missing[:8]} that its "
                     "metadata needs")
  for hf_name, name in renamed.items():
    if hf_name not in expected:
      raise ValueError(f"GGUF tensor {name!r} is not used by this model")
    want = expected[hf_name][1]
    shape = tuple(int(d) for d in reversed(tensors[name].shape))
    if shape != want:
      raise ValueError(f"GGUF tensor {name!r} has shape {shape}, expected "
                       f"{want} from the metadata")
  jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  permuted = meta["general.architecture"] in _PERMUTED
  values = {}
  for hf_name, (ours, _, layout) in expected.items():
    w = _dequantize(tensors[renamed[hf_name]], path)
    if permuted and ".q_proj." in hf_name:
      w = _unpermute(w, config.num_heads)
    elif permuted and ".k_proj." in hf_name:
      w = _unpermute(w, config.kv_heads)
    values[ours] = jnp.asarray(layout(w), dtype=jdtype)
  return hf.build_model(config, values)


# ----------------------------------------------------------------------------
# A random tiny Llama GGUF: for tests, notebooks and smoke runs of the
# real-model study (no download).

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != "
    "'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


def _byte_symbols() -> list[str]:
  """GPT-2's printable stand-in for each byte, in byte order (what a
  byte-level BPE vocabulary spells bytes with)."""
  printable = (set(range(ord("!"), ord("~") + 1))
               | set(range(ord("\xa1"), ord("\xac") + 1))
               | set(range(ord("\xae"), ord("\xff") + 1)))
  out, extra = [], 0
  for b in range(256):
    if b in printable:
      out.append(chr(b))
    else:
      out.append(chr(256 + extra))
      extra += 1
  return out


def write_random_llama(path, *, context: int = 64, d_model: int = 32,
                       layers: int = 2, heads: int = 4, kv_heads: int = 2,
                       ffn: int = 64, seed: int = 0,
                       chat_template: Optional[str] = CHATML_TEMPLATE,
                       tokenizer: str = "gpt2") -> str:
  """Writes a random Llama GGUF at ``path`` and returns the path.

  ``tokenizer="gpt2"``: a 259-token byte-level BPE (the 256 bytes, ``<s>``,
  ``</s>`` and one merge of bytes 0 and 1). ``tokenizer="llama"``: a
  261-token SentencePiece BPE as Llama 2 files have (``<unk>``, ``<s>``,
  ``</s>``, the 256 ``<0xNN>`` byte tokens, ``\u2581`` and
  ``\u2581\u2581``, scored, no merges). Text round-trips with either; with
  a ChatML ``chat_template`` by default. Weights are N(0, 0.3^2) (norm
  scales around 1). ``load_gguf`` / ``load_tokenizer`` read it like a
  released file.
  """
  gguf = _gguf()
  if d_model % heads or heads % kv_heads:
    raise ValueError(f"d_model={d_model} must divide by heads={heads} and "
                     f"heads by kv_heads={kv_heads}")
  if tokenizer not in ("gpt2", "llama"):
    raise ValueError(f"tokenizer={tokenizer!r}; allowed: 'gpt2' (byte-level "
                     "BPE), 'llama' (SentencePiece BPE)")
  rng = np.random.RandomState(seed)
  symbols = _byte_symbols()
  if tokenizer == "gpt2":
    tokens = symbols + ["<s>", "</s>", symbols[0] + symbols[1]]
  else:
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
              + ["\u2581", "\u2581\u2581"])
  head = d_model // heads
  writer = gguf.GGUFWriter(os.fspath(path), "llama")
  writer.add_name("random-llama")
  writer.add_block_count(layers)
  writer.add_context_length(context)
  writer.add_embedding_length(d_model)
  writer.add_feed_forward_length(ffn)
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  writer.add_rope_dimension_count(head)
  writer.add_rope_freq_base(10000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(len(tokens))
  writer.add_tokenizer_model(tokenizer)
  writer.add_token_list(tokens)
  if tokenizer == "gpt2":
    writer.add_tokenizer_pre("default")
    writer.add_token_types([1] * 256 + [3, 3, 1])
    writer.add_token_merges([f"{symbols[0]} {symbols[1]}"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
  else:
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1, 1])
    writer.add_token_scores([0.0] * 259 + [-1.0, -2.0])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
  if chat_template is not None:
    writer.add_chat_template(chat_template)
  w = lambda *shape: (0.3 * rng.randn(*shape)).astype(np.float32)
  writer.add_tensor("token_embd.weight", w(len(tokens), d_model))
  writer.add_tensor("output_norm.weight", 1 + w(d_model))
  writer.add_tensor("output.weight", w(len(tokens), d_model))
  for i in range(layers):
    for name, shape in (("attn_norm", (d_model,)), ("ffn_norm", (d_model,)),
                        ("attn_q", (heads * head, d_model)),
                        ("attn_k", (kv_heads * head, d_model)),
                        ("attn_v", (kv_heads * head, d_model)),
                        ("attn_output", (d_model, heads * head)),
                        ("ffn_gate", (ffn, d_model)),
                        ("ffn_up", (ffn, d_model)),
                        ("ffn_down", (d_model, ffn))):
      value = 1 + w(*shape) if name.endswith("norm") else w(*shape)
      writer.add_tensor(f"blk.{i}.{name}.weight", value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return os.fspath(path)
