"""load_hf: logits parity with transformers (Llama, Mistral, Qwen2, Qwen3,
Phi-3) and errors.

Each case builds a tiny random transformers model on CPU, saves it with
save_pretrained (safetensors), loads it with load_hf and compares logits on
random tokens: max|ours - theirs| / max|theirs| <= 1e-4 in float32.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from extrapolax.models import hf  # pylint: disable=g-import-not-at-top

T = 40          # test length; > every sliding window and scaled context below
RTOL = 1e-4
SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64,
             initializer_range=0.2)
LONGROPE = {
    "rope_type": "longrope", "factor": 4.0,
    "original_max_position_embeddings": 16,
    "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5],
    "long_factor": [1.0, 1.3, 1.8, 2.5, 3.5, 4.5, 6.0, 8.0]}
YARN = {"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 16}

# Phi3Config's special tokens default to 32000, outside the tiny vocabulary.
PHI3_TOKENS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)

# name -> (model type, config overrides, test lengths)
CASES = {
    "llama": ("llama", {}, (T,)),
    "llama_tied_theta": ("llama", dict(tie_word_embeddings=True,
                                       rope_theta=500000.0), (T,)),
    "llama_linear": ("llama", dict(rope_scaling={
        "rope_type": "linear", "factor": 2.0}), (T,)),
    # T = 40 > max_position_embeddings = 16: the NTK base grows with length.
    "llama_dynamic": ("llama", dict(max_position_embeddings=16, rope_scaling={
        "rope_type": "dynamic", "factor": 2.0}), (12, T)),
    "llama_yarn_tied": ("llama", dict(tie_word_embeddings=True,
                                      rope_scaling=dict(YARN),
                                      rope_theta=20000.0), (T,)),
    # Wavelengths 6.3 (kept), 19.9 (smoothed), >= 62.8 (divided by factor).
    "llama_llama3": ("llama", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
                     (T,)),
    # Short factors up to length 16, long factors past it.
    "llama_longrope": ("llama", dict(rope_scaling=dict(LONGROPE)),
                       (12, T)),
    "llama_attention_bias": ("llama", dict(attention_bias=True), (T,)),
    "mistral_window": ("mistral", dict(sliding_window=16, head_dim=24), (T,)),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True), (T,)),
    "qwen2_window": ("qwen2", dict(num_hidden_layers=3, use_sliding_window=True,
                                   sliding_window=16, max_window_layers=1),
                     (T,)),
    # QK-norm (RMSNorm per head before RoPE), head_dim != hidden / heads.
    "qwen3": ("qwen3", dict(head_dim=24), (T,)),
    "qwen3_window_bias": ("qwen3", dict(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=16,
        max_window_layers=1, attention_bias=True), (T,)),
    # Phi-3: fused qkv_proj and gate_up_proj.
    "phi3": ("phi3", dict(PHI3_TOKENS), (T,)),
    # Phi-3 with half the head rotating, the legacy "su" name for longrope
    # (short factors to 16 tokens, long past it; the factor 64 / 16 from
    # max_position_embeddings) and a sliding window.
    "phi3_su_partial_window": ("phi3", dict(
        PHI3_TOKENS, partial_rotary_factor=0.5,
        original_max_position_embeddings=16,
        sliding_window=24, rope_scaling={
            "type": "su", "short_factor": [1.0, 1.2, 1.6, 2.5],
            "long_factor": [1.0, 1.8, 3.5, 8.0]}), (12, T)),
    # Gemma 2: GeGLU, sandwich norms with (1 + w), sqrt(d) embeddings,
    # local (window 16) / global layers, soft caps small enough to bite, and
    # query_pre_attn_scalar != head_dim.
    "gemma2": ("gemma2", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=16,
        num_hidden_layers=3, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0), (T,)),
    "gemma2_untied_bias_nocap": ("gemma2", dict(
        head_dim=24, query_pre_attn_scalar=24, sliding_window=16,
        tie_word_embeddings=False, attention_bias=True,
        attn_logit_softcapping=None, final_logit_softcapping=None), (T,)),
    # Gemma 3: QK-norm, 2 local layers per global one, local base 1e4 and a
    # linearly scaled global base.
    "gemma3": ("gemma3_text", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=12,
        num_hidden_layers=3, sliding_window_pattern=3,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0,
                               "rope_theta": 50000.0},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": 10000.0}}), (T,)),
}
_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
            "qwen3": "Qwen3", "phi3": "Phi3", "gemma2": "Gemma2",
            "gemma3_text": "Gemma3Text"}


def _hf_config(model_type, **overrides):
  cls = getattr(transformers, _CLASSES[model_type] + "Config")
  return cls(**dict(SMALL, **overrides))


def _hf_model(config, state_dict=None, seed=0):
  """A random (or given-weights) eager float32 CausalLM, norms and biases
  randomised too so that their mapping is tested."""
  torch.manual_seed(seed)
  cls = getattr(transformers, type(config).__name__.replace(
      "TextConfig", "Config").replace("Config", "ForCausalLM"))
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = cls(config).eval()
  if state_dict is not None:
    model.load_state_dict(state_dict)
    return model
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.5 * torch.randn_like(p))
  return model


def _tokens(t, seed=0):
  return np.random.RandomState(seed).randint(0, SMALL["vocab_size"], (2, t))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _our_logits(model, tokens):
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens)))


def _assert_close(got, want):
  assert got.shape == want.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= RTOL, f"relative error {err:.3g}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (folder, HF model); each case built and saved once."""
  cache = {}

  def get(name):
    if name not in cache:
      model_type, overrides, _ = CASES[name]
      model = _hf_model(_hf_config(model_type, **overrides))
      folder = tmp_path_factory.mktemp(name)
      model.save_pretrained(folder)
      cache[name] = (folder, model)
    return cache[name]
  return get


@pytest.fixture
def base(saved, tmp_path):
  """A private copy of the plain Llama folder, to edit."""
  folder = tmp_path / "llama"
  shutil.copytree(saved("llama")[0], folder)
  return folder


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(saved, name):
  folder, reference = saved(name)
  model = hf.load_hf(folder)
  for t in CASES[name][2]:
    tokens = _tokens(t, seed=t)
    _assert_close(_our_logits(model, tokens), _hf_logits(reference, tokens))


def test_configs_read_as_transformers_does(saved):
  config = hf.load_hf(saved("qwen2_window")[0]).config
  assert [config.layer_spec(i).mask for i in range(3)] == [
      "causal", "sliding_window", "sliding_window"]
  assert config.layer_spec(1).window == 16 and config.qkv_bias
  mistral = hf.load_hf(saved("mistral_window")[0]).config
  assert (mistral.head_dim, mistral.kv_heads, mistral.layer_spec(0).window,
          mistral.qkv_bias, mistral.tie_embeddings) == (24, 2, 16, False,
                                                        False)
  tied = hf.load_hf(saved("llama_tied_theta")[0]).config
  assert tied.tie_embeddings and tied.layer_spec(0).rope_base == 500000.0
  assert tied.layer_spec(0).rope_scaling is None
  assert tied.layer_spec(0).rope_max_position_embeddings == 64


def test_phi3_config_and_fused_tensors(saved, tmp_path):
  folder, _ = saved("phi3_su_partial_window")
  spec = hf.load_hf(folder).config.layer_spec(0)
  assert spec.partial_rotary_factor == 0.5 and spec.window == 24
  assert spec.rope_scaling["rope_type"] == "longrope"
  # The fused tensors are checked whole: a wrong row count names them.
  copy = tmp_path / "phi3"
  shutil.copytree(saved("phi3")[0], copy)
  name = "model.layers.0.self_attn.qkv_proj.weight"
  _edit_tensors(copy, lambda t: t.update({name: t[name][:-16]}))
  with pytest.raises(ValueError, match=r"qkv_proj\.weight' has shape "
                     r"\(112, 64\), expected \(128, 64\)"):
    hf.load_hf(copy)
  with pytest.raises(ValueError, match=r"partial_rotary_factor must be in"):
    hf.config_from_hf(dict(LLAMA_DICT, model_type="phi3",
                           partial_rotary_factor=1.5))


def test_gemma2_config(saved):
  config = hf.load_hf(saved("gemma2")[0]).config
  assert [config.layer_spec(i).window for i in range(3)] == [16, None, 16]
  assert config.post_norms and config.scale_embeddings
  assert config.mlp_activation == "gelu_tanh"
  assert config.final_logit_soft_cap == 3.0
  assert config.layer_spec(0).logits_soft_cap == 5.0
  gemma3 = hf.load_hf(saved("gemma3")[0]).config
  specs = [gemma3.layer_spec(i) for i in range(3)]
  assert [s.window for s in specs] == [12, 12, None]
  assert [s.rope_base for s in specs] == [10000.0, 10000.0, 50000.0]
  assert specs[2].rope_scaling["factor"] == 2.0 and specs[0].qk_norm
  assert specs[0].rope_scaling is None
  with pytest.raises(ValueError, match="hidden_activation='gelu'"):
    hf.config_from_hf(dict(LLAMA_DICT, model_type="gemma2", head_dim=16,
                           hidden_activation="gelu"))


def test_both_config_layouts(saved, tmp_path):
  """transformers 4 (rope_scaling + top-level rope_theta) and transformers 5
  (rope_parameters with rope_theta inside) config.json load the same."""
  folder, reference = saved("llama_yarn_tied")
  config = json.loads((folder / "config.json").read_text())
  rope = dict(config.pop("rope_parameters", None) or
              config.pop("rope_scaling"))
  theta = rope.pop("rope_theta", None) or config.pop("rope_theta")
  assert theta == 20000.0
  old = dict(config, rope_theta=theta,
             rope_scaling=dict(rope, type=rope.pop("rope_type")))
  new = dict(config, rope_parameters=dict(rope, rope_type="yarn",
                                          rope_theta=theta))
  tokens = _tokens(T)
  want = _hf_logits(reference, tokens)
  for name, layout in (("old", old), ("new", new)):
    shutil.copytree(folder, tmp_path / name)
    (tmp_path / name / "config.json").write_text(json.dumps(layout))
    _assert_close(_our_logits(hf.load_hf(tmp_path / name), tokens), want)


def test_rope_scaling_override(saved, tmp_path):
  """YaRN x4 put on an unscaled checkpoint = transformers with that config;
  None takes it off again."""
  folder, plain = saved("llama")
  yarn_hf = _hf_model(_hf_config("llama", rope_scaling=dict(YARN)),
                      state_dict=plain.state_dict())
  tokens = _tokens(T)
  want = _hf_logits(yarn_hf, tokens)
  got = _our_logits(hf.load_hf(folder, rope_scaling=dict(YARN)), tokens)
  _assert_close(got, want)
  assert np.abs(want - _hf_logits(plain, tokens)).max() > 1e-2  # it matters
  yarn_hf.save_pretrained(tmp_path / "yarn")
  unscaled = hf.load_hf(tmp_path / "yarn", rope_scaling=None)
  assert unscaled.config.layer_spec(0).rope_scaling is None
  _assert_close(_our_logits(unscaled, tokens), _hf_logits(plain, tokens))


def test_sharded_checkpoint(saved, tmp_path):
  _, reference = saved("llama")
  reference.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("*.safetensors"))) > 2
  tokens = _tokens(T)
  _assert_close(_our_logits(hf.load_hf(tmp_path), tokens),
                _hf_logits(reference, tokens))


def _edit_tensors(folder, edit):
  file = os.path.join(folder, "model.safetensors")
  tensors = safetensors_numpy.load_file(file)
  edit(tensors)
  safetensors_numpy.save_file(tensors, file, metadata={"format": "pt"})


def test_wrong_shape_raises(base):
  def edit(t):
    t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64),
                                                            np.float32)
  _edit_tensors(base, edit)
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj"
                     r"\.weight' has shape \(16, 64\), expected \(32, 64\)"):
    hf.load_hf(base)


def test_missing_tensor_raises(base):
  _edit_tensors(base, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"lacks.*model\.layers\.1\.mlp\.up_"):
    hf.load_hf(base)


def test_unexpected_tensor_raises_and_inv_freq_is_skipped(base):
  def add_inv_freq(t):
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  _edit_tensors(base, add_inv_freq)
  hf.load_hf(base)

  def add_bias(t):
    t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  _edit_tensors(base, add_bias)
  with pytest.raises(ValueError, match=r"o_proj\.bias.*does not use"):
    hf.load_hf(base)


def test_tied_checkpoint_with_lm_head_copy(saved, tmp_path):
  folder = tmp_path / "tied"
  shutil.copytree(saved("llama_tied_theta")[0], folder)
  _edit_tensors(folder, lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  hf.load_hf(folder)
  _edit_tensors(folder, lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"] + 1.0}))
  with pytest.raises(ValueError, match="lm_head.weight' differs"):
    hf.load_hf(folder)


def test_unsupported_model_type_raises(base):
  config = json.loads((base / "config.json").read_text())
  config["model_type"] = "gpt2"
  (base / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
    hf.load_hf(base)


def test_no_safetensors_raises(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(dict(SMALL,
                                                        model_type="llama")))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(ValueError, match="pytorch_model.bin"):
    hf.load_hf(tmp_path)


LLAMA_DICT = dict(SMALL, model_type="llama", rope_theta=10000.0)


@pytest.mark.parametrize("change, message", [
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(rope_scaling={"rope_type": "su", "factor": 2.0}), "'su'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "bogus": 1}),
     "bogus"),
    (dict(rope_theta=5.0, rope_parameters={"rope_theta": 7.0}),
     "rope_theta=5.0 disagrees"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantized"),
    (dict(model_type="qwen2", layer_types=["sliding_attention"] * 2),
     "no sliding window"),
    (dict(model_type="mistral", sliding_window=8,
          layer_types=["full_attention"] * 2), "layer_types"),
])
def test_config_errors(change, message):
  with pytest.raises(ValueError, match=message):
    hf.config_from_hf(dict(LLAMA_DICT, **change))


def test_config_defaults_and_overrides():
  # Missing keys take transformers' class defaults (Mistral: 8 kv heads,
  # window 4096); num_key_value_heads null means "as many as query heads".
  mistral = hf.config_from_hf({"model_type": "mistral", "hidden_size": 64,
                               "num_attention_heads": 8})
  assert mistral.kv_heads == 8 and mistral.layer_spec(0).window == 4096
  llama = hf.config_from_hf(dict(LLAMA_DICT, num_key_value_heads=None))
  assert llama.kv_heads == 4 and llama.attention[0].mask == "causal"
  # Qwen2: the window only with use_sliding_window, from max_window_layers.
  qwen = dict(LLAMA_DICT, model_type="qwen2", num_hidden_layers=4,
              sliding_window=8, max_window_layers=2)
  assert hf.config_from_hf(qwen).attention[0].mask == "causal"
  masks = hf.config_from_hf(dict(qwen, use_sliding_window=True))
  assert [masks.layer_spec(i).window for i in range(4)] == [None, None, 8, 8]
  # An override may carry its own rope_theta; otherwise the base is kept.
  spec = hf.config_from_hf(
      dict(LLAMA_DICT, rope_theta=500000.0),
      rope_scaling={"type": "linear", "factor": 2.0}).attention[0]
  assert spec.rope_base == 500000.0 and spec.rope_scaling["factor"] == 2.0
  spec = hf.config_from_hf(LLAMA_DICT, rope_scaling={
      "rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}).attention[0]
  assert spec.rope_base == 1e6 and "rope_theta" not in spec.rope_scaling
  with pytest.raises(ValueError, match="rope_scaling must be a dict"):
    hf.config_from_hf(LLAMA_DICT, rope_scaling="yarn")
  with pytest.warns(UserWarning, match="'use_mrope'.*not read by load_hf"):
    hf.config_from_hf(dict(LLAMA_DICT, use_mrope=True))


def test_bad_dtype_raises(saved):
  with pytest.raises(ValueError, match="float16"):
    hf.load_hf(saved("llama")[0], dtype="float16")


def test_bfloat16_load(saved):
  folder, reference = saved("llama")
  model = hf.load_hf(folder, dtype="bfloat16")
  assert model.embed.embedding[...].dtype == jnp.bfloat16
  tokens = _tokens(T)
  got, want = _our_logits(model, tokens), _hf_logits(reference, tokens)
  assert np.abs(got - want).max() / np.abs(want).max() < 0.05


@pytest.mark.parametrize("layer", [0, 1])
def test_gpt_oss_attention_matches_transformers(layer):
  """gpt-oss's attention (learned sinks, a window on layer 0, YaRN, biases)
  against transformers' GptOssAttention on random weights; the whole model
  is refused (its MoE MLP)."""
  from transformers.models.gpt_oss import modeling_gpt_oss  # pylint: disable=g-import-not-at-top
  config = transformers.GptOssConfig(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, sliding_window=8,
      max_position_embeddings=256, num_local_experts=2,
      intermediate_size=32, vocab_size=100,
      rope_parameters={"rope_type": "yarn", "factor": 4.0,
                       "beta_fast": 32.0, "beta_slow": 1.0,
                       "truncate": False,
                       "original_max_position_embeddings": 16,
                       "rope_theta": 150000.0})
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(layer)
  theirs = modeling_gpt_oss.GptOssAttention(config, layer).eval()
  with torch.no_grad():
    for p in theirs.parameters():
      p.copy_(0.3 * torch.randn_like(p))
    theirs.sinks.copy_(2.0 * torch.randn_like(theirs.sinks))
  hf_dict = json.loads(config.to_json_string())
  tensors = {f"model.layers.{layer}.self_attn.{name}": p.detach().numpy()
             for name, p in theirs.named_parameters()}
  ours = hf.attention_from_hf(hf_dict, tensors, layer)
  assert getattr(ours.mask, "window", None) == (8 if layer == 0 else None)
  t = 24
  x = np.random.RandomState(layer).normal(size=(2, t, 64)).astype(np.float32)
  rotary = modeling_gpt_oss.GptOssRotaryEmbedding(config)
  pos = torch.arange(t)[None].expand(2, t)
  cos, sin = rotary(torch.tensor(x), pos)
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  visible = (j <= i) & ((i - j < 8) if layer == 0 else True)
  mask = torch.tensor(np.where(visible, 0.0, -np.inf), dtype=torch.float32)
  with torch.no_grad():
    want = theirs(torch.tensor(x), (cos, sin), mask[None, None])[0].numpy()
  got = np.asarray(ours(jnp.asarray(x)))
  _assert_close(got, want)
  with pytest.raises(ValueError, match="mixture-of-experts"):
    hf.config_from_hf(hf_dict)


@pytest.mark.parametrize("name,prompt_len,steps", [
    ("llama_yarn_tied", 14, 12), ("qwen3", 14, 12), ("phi3", 14, 12),
    # Longrope switches factors past 16 tokens; transformers' cache keeps the
    # keys it rotated with the short factors while ours re-rotates every key
    # (as a full forward at that length does), so compare up to 16 tokens.
    ("phi3_su_partial_window", 10, 6), ("gemma2", 14, 12),
    ("gemma3", 14, 12)])
def test_greedy_tokens_match_transformers(saved, name, prompt_len, steps):
  """Greedy decoding through our KV cache picks transformers' tokens
  (past the sliding windows where the case has them)."""
  from extrapolax.models.generate import generate  # pylint: disable=g-import-not-at-top
  folder, reference = saved(name)
  prompt = _tokens(prompt_len, seed=3)
  with torch.no_grad():
    # An explicit all-ones mask: a prompt token equal to the pad id is text.
    ids = torch.tensor(prompt)
    want = reference.generate(ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False).numpy()
  got = np.asarray(generate(hf.load_hf(folder), jnp.asarray(prompt), steps))
  np.testing.assert_array_equal(got, want)
