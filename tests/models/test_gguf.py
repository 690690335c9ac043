"""load_gguf: GGUF files written here with gguf.GGUFWriter from tiny random
transformers models, checked against transformers' own GGUF loading of the
same file (and, in float32, against the original model), plus the errors.

Tolerance: max|ours - theirs| / max|theirs| <= 1e-4 in float32 (both sides
dequantize the same blocks exactly; what is left is float32 rounding).
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from extrapolax.models import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
from extrapolax.models import load_gguf  # pylint: disable=g-import-not-at-top

Q = gguf.GGMLQuantizationType
RTOL = 1e-4
# Widths multiple of 256, the K-quants' block.
SMALL = dict(vocab_size=128, hidden_size=256, intermediate_size=512,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64,
             initializer_range=0.2, rms_norm_eps=1e-5)
# name -> (model type, config overrides, matrix types cycled over tensors)
CASES = {
    "llama_f32": ("llama", {}, ("F32",)),
    "llama_mixed": ("llama", {}, ("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                  "Q5_1", "BF16")),
    "llama_kquants_tied": ("llama", dict(tie_word_embeddings=True),
                           ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K")),
    "qwen2_q8_tied": ("qwen2", dict(tie_word_embeddings=True),
                      ("Q8_0", "F16")),
    # QK-norm tensors (attn_{q,k}_norm), unpermuted q/k as llama.cpp writes.
    # head_dim 128 = hidden / heads: transformers' GGUF reader keeps Qwen3's
    # default head_dim (128) whatever the file says.
    "qwen3_q8": ("qwen3", dict(num_attention_heads=2, num_key_value_heads=1,
                               head_dim=128), ("Q8_0", "F16")),
}
# K-quant block bytes and the offsets of their float16 scales (d, dmin).
_K_BLOCKS = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)),
             "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)),
             "Q6_K": (210, (208,))}


def _hf_model(model_type, overrides, seed=0):
  torch.manual_seed(seed)
  name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[model_type]
  config = getattr(transformers, name + "Config")(**dict(SMALL, **overrides))
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = getattr(transformers, name + "ForCausalLM")(config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif pname.endswith(".bias"):
        p.copy_(0.5 * torch.randn_like(p))
  return model


def _permute(w, heads):
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
  return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _random_kquant(shape, kind, rng):
  size, scales = _K_BLOCKS[kind]
  rows, cols = shape
  raw = rng.randint(0, 256, (rows, cols // 256, size)).astype(np.uint8)
  for i, offset in enumerate(scales):
    value = np.array([0.02 if i == 0 else 0.01], np.float16).view(np.uint8)
    raw[..., offset:offset + 2] = value
  return raw.reshape(rows, -1)


def _encode(w, kind, rng):
  """(data, raw_dtype) for GGUFWriter.add_tensor."""
  if kind == "F32":
    return w.astype(np.float32), None
  if kind == "F16":
    return w.astype(np.float16), None
  if kind in _K_BLOCKS:   # gguf cannot quantize K-quants: random blocks
    return _random_kquant(w.shape, kind, rng), Q[kind]
  return gguf.quants.quantize(w.astype(np.float32), Q[kind]), Q[kind]


_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
          "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
_BLOCK = {"input_layernorm.weight": "attn_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.o_proj.weight": "attn_output.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}
for _p in "qkv":
  _BLOCK[f"self_attn.{_p}_proj.weight"] = f"attn_{_p}.weight"
  _BLOCK[f"self_attn.{_p}_proj.bias"] = f"attn_{_p}.bias"
  _BLOCK[f"self_attn.{_p}_norm.weight"] = f"attn_{_p}_norm.weight"


def _gguf_name(name):
  if name in _NAMES:
    return _NAMES[name]
  _, _, i, rest = name.split(".", 3)
  return f"blk.{i}.{_BLOCK[rest]}"


def write_gguf(path, model, kinds, *, arch=None, extra=None, seed=0):
  """model (transformers) -> a llama.cpp-style GGUF file at path."""
  cfg = model.config
  arch = arch or cfg.model_type
  rng = np.random.RandomState(seed)
  writer = gguf.GGUFWriter(os.fspath(path), arch)
  writer.add_name(f"tiny-{arch}")
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or
                                  cfg.rope_parameters["rope_theta"]))
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  for key, value in (extra or {}).items():
    writer.add_key_value(key.format(arch=arch), *value)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  if cfg.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  i = 0
  for name, w in state.items():
    if arch == "llama" and "q_proj" in name:
      w = _permute(w, cfg.num_attention_heads)
    elif arch == "llama" and "k_proj" in name:
      w = _permute(w, cfg.num_key_value_heads)
    if w.ndim == 1:
      data, raw = w.astype(np.float32), None
    else:
      data, raw = _encode(w, kinds[i % len(kinds)], rng)
      i += 1
    writer.add_tensor(_gguf_name(name), data, raw_dtype=raw)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def _tokens(t=24, seed=0):
  return np.random.RandomState(seed).randint(0, SMALL["vocab_size"], (2, t))


def _ours(model, tokens):
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens)))


def _theirs(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _assert_close(got, want, rtol=RTOL):
  assert got.shape == want.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= rtol, f"relative error {err:.3g}"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      model_type, overrides, kinds = CASES[name]
      model = _hf_model(model_type, overrides)
      path = tmp_path_factory.mktemp(name) / "model.gguf"
      cache[name] = (write_gguf(path, model, kinds), model)
    return cache[name]
  return get


def _transformers_gguf(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path),
      dtype=torch.float32, attn_implementation="eager")
  return model.eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers_gguf(written, name):
  path, _ = written(name)
  tokens = _tokens()
  _assert_close(_ours(load_gguf(path), tokens),
                _theirs(_transformers_gguf(path), tokens))


def test_float32_file_equals_the_original_model(written):
  # Independent of transformers' GGUF reader: undoing llama.cpp's Q/K
  # permutation must give back the model the file was written from.
  path, model = written("llama_f32")
  tokens = _tokens()
  _assert_close(_ours(load_gguf(path), tokens), _theirs(model, tokens))


def test_config_from_metadata(written, tmp_path):
  path, _ = written("qwen2_q8_tied")
  cfg = gguf_lib.config_from_gguf(path)
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads,
          cfg.per_head_dim, cfg.mlp_dim, cfg.max_len) == (2, 256, 4, 2, 64,
                                                          512, 64)
  assert cfg.tie_embeddings and cfg.qkv_bias and not cfg.out_bias
  assert cfg.norm_eps == pytest.approx(1e-5)
  model = _hf_model("llama", {})
  yarn = write_gguf(tmp_path / "yarn.gguf", model, ("F32",), extra={
      "{arch}.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING),
      "{arch}.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32),
      "{arch}.rope.scaling.original_context_length": (
          16, gguf.GGUFValueType.UINT32),
      "{arch}.attention.sliding_window": (8, gguf.GGUFValueType.UINT32)})
  cfg = gguf_lib.config_from_gguf(yarn)
  spec = cfg.attention[0]
  assert dict(spec.rope_scaling) == {
      "rope_type": "yarn", "factor": 4.0,
      "original_max_position_embeddings": 16}
  assert (spec.mask, spec.window) == ("sliding_window", 8)
  assert gguf_lib.config_from_gguf(
      yarn, rope_scaling=None).attention[0].rope_scaling is None


def test_rope_scaling_override_and_bfloat16(written):
  path, _ = written("llama_mixed")
  model = load_gguf(path, dtype="bfloat16", rope_scaling={
      "rope_type": "linear", "factor": 2.0})
  assert model.config.dtype == "bfloat16"
  assert dict(model.config.attention[0].rope_scaling) == {
      "rope_type": "linear", "factor": 2.0}
  assert model.embed.embedding[...].dtype == jnp.bfloat16


def test_unsupported_architecture_raises(tmp_path):
  path = write_gguf(tmp_path / "m.gguf", _hf_model("llama", {}), ("F32",),
                    arch="gpt2")
  with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
    load_gguf(path)


def test_unknown_tensor_type_raises(tmp_path):
  model = _hf_model("llama", {})
  path = tmp_path / "m.gguf"
  write_gguf(path, model, ("F32",))
  # Rewrite one matrix as IQ4_NL (gguf reads it; load_gguf does not).
  reader = gguf.GGUFReader(os.fspath(path))
  writer = gguf.GGUFWriter(os.fspath(tmp_path / "iq.gguf"), "llama")
  for key, field in reader.fields.items():
    if not key.startswith("GGUF.") and key != "general.architecture":
      kind = field.types[0]
      sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
      writer.add_key_value(key, field.contents(), kind, sub_type=sub)
  for t in reader.tensors:
    data = np.asarray(t.data)
    if t.name == "blk.0.ffn_up.weight":
      raw = np.zeros((512, 256 // 32 * 18), np.uint8)
      writer.add_tensor(t.name, raw, raw_dtype=Q.IQ4_NL)
    else:
      writer.add_tensor(t.name, data)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="'blk.0.ffn_up.weight' has type "
                     "IQ4_NL"):
    load_gguf(tmp_path / "iq.gguf")


def test_truncated_file_raises(written, tmp_path):
  path, _ = written("llama_mixed")
  data = open(path, "rb").read()
  for cut in (100, len(data) - 1000):
    short = tmp_path / f"short{cut}.gguf"
    short.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="GGUF"):
      load_gguf(short)


def test_missing_tensor_and_bad_arguments(written, tmp_path):
  path, _ = written("llama_f32")
  with pytest.raises(ValueError, match="dtype must be"):
    load_gguf(path, dtype="float16")
  with pytest.raises(ValueError, match="no GGUF file"):
    load_gguf(tmp_path / "absent.gguf")
  reader = gguf.GGUFReader(os.fspath(path))
  writer = gguf.GGUFWriter(os.fspath(tmp_path / "m.gguf"), "llama")
  for key, field in reader.fields.items():
    if not key.startswith("GGUF.") and key != "general.architecture":
      writer.add_key_value(key, field.contents(), field.types[0])
  for t in reader.tensors:
    if t.name != "blk.1.attn_k.weight":
      writer.add_tensor(t.name, np.asarray(t.data))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="lacks tensor"):
    load_gguf(tmp_path / "m.gguf")
