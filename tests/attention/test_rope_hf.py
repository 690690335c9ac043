"""extrapolax.attention.rope against Hugging Face transformers on the CPU.

Frequencies: every rope type transformers ships is compared with its
``ROPE_INIT_FUNCTIONS`` entry (``default`` with the model's
``compute_default_rope_parameters``), both when we are given the user-style
dict (base and partial_rotary_factor as arguments) and when we are given the
dict transformers standardized into ``config.rope_parameters``.

Rotation: ``apply_rope`` against Llama's and GPT-NeoX's ``apply_rotary_pos_emb``
(half layout, full and partial rotary) and GPT-J's (interleaved layout).

Axis legend: B batch, T query length, N heads, H head dim.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from transformers import modeling_rope_utils
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.gptj import modeling_gptj
from transformers.models.llama import modeling_llama

from extrapolax.attention import rope
# pylint: enable=g-import-not-at-top,wrong-import-position

_HEAD_DIM = 32
_NUM_HEADS = 2
_MAX_POSITIONS = 256
# transformers 5 keeps rope settings in config.rope_parameters; 4.x in
# config.rope_scaling plus top-level rope_theta / partial_rotary_factor.
# (Only the transformers 5 branch has been run.)
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def _hf_config(scaling, theta, partial, config_class=None):
  config_class = config_class or transformers.LlamaConfig
  kwargs = dict(hidden_size=_HEAD_DIM * _NUM_HEADS,
                num_attention_heads=_NUM_HEADS, head_dim=_HEAD_DIM,
                max_position_embeddings=_MAX_POSITIONS)
  if config_class is transformers.GPTNeoXConfig:
    kwargs.pop("head_dim")
  scaling = copy.deepcopy(scaling)  # transformers edits the dict in place.
  if _TRANSFORMERS_5:
    scaling.update(rope_theta=theta, partial_rotary_factor=partial)
    return config_class(rope_parameters=scaling, **kwargs)
  return config_class(rope_scaling=scaling or None, rope_theta=theta,
                      partial_rotary_factor=partial, **kwargs)


def _hf_frequencies(config, rope_type, seq_len):
  if rope_type == "default" and _TRANSFORMERS_5:
    # transformers 5 has no "default" entry; GPT-NeoX's honours
    # partial_rotary_factor (Llama's ignores it).
    rotary = modeling_gpt_neox.GPTNeoXRotaryEmbedding
    inv_freq, attention_factor = rotary.compute_default_rope_parameters(config)
  else:
    fn = modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, attention_factor = fn(config, None, seq_len=seq_len)
  return inv_freq.numpy(), attention_factor


def _hf_rope_dict(config):
  if _TRANSFORMERS_5:
    return copy.deepcopy(config.rope_parameters)
  return copy.deepcopy(config.rope_scaling)


_ROT = _HEAD_DIM // 2  # inv_freq length at partial_rotary_factor 1.0.
_SHORT = list(np.linspace(1.0, 1.5, _ROT))
_LONG = list(np.linspace(1.0, 24.0, _ROT))
_YARN = {"rope_type": "yarn", "factor": 4.0,
         "original_max_position_embeddings": 64}
_LONGROPE = {"rope_type": "longrope", "short_factor": _SHORT,
             "long_factor": _LONG, "original_max_position_embeddings": 64}

# (name, scaling dict at partial 1.0, seq_lens to try, theta)
_CASES = [
    ("default", {}, [None], 10000.0),
    ("default_theta", {"rope_type": "default"}, [None], 500000.0),
    ("linear", {"rope_type": "linear", "factor": 4.0}, [None], 10000.0),
    ("linear_legacy_type", {"type": "linear", "factor": 2.5}, [None], 100.0),
    ("dynamic", {"rope_type": "dynamic", "factor": 2.0},
     [None, 10, _MAX_POSITIONS, _MAX_POSITIONS + 1, 4 * _MAX_POSITIONS,
      100_000], 10000.0),
    ("yarn", _YARN, [None], 10000.0),
    ("yarn_legacy_type", {"type": "yarn", "factor": 8.0,
                          "original_max_position_embeddings": 32},
     [None], 10000.0),
    ("yarn_attention_factor", {**_YARN, "attention_factor": 0.8}, [None],
     10000.0),
    ("yarn_mscale", {**_YARN, "factor": 40.0, "mscale": 0.707,
                     "mscale_all_dim": 1.0}, [None], 10000.0),
    ("yarn_mscale_equal", {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
     [None], 10000.0),
    ("yarn_mscale_zero", {**_YARN, "mscale": 0.0, "mscale_all_dim": 1.0},
     [None], 10000.0),
    ("yarn_mscale_only", {**_YARN, "mscale": 0.707}, [None], 10000.0),
    ("yarn_no_truncate", {**_YARN, "truncate": False}, [None], 10000.0),
    # Correction range past the ramp's end (dim // 2) and past dim - 1.
    ("yarn_long_original", {**_YARN, "original_max_position_embeddings": 4096},
     [None], 500.0),
    ("yarn_high_clamped", {**_YARN, "original_max_position_embeddings": 1024},
     [None], 10.0),
    ("yarn_betas", {**_YARN, "beta_fast": 8, "beta_slow": 2}, [None],
     50000.0),
    ("yarn_factor_none", {**_YARN, "factor": None}, [None], 10000.0),
    ("yarn_no_original", {"rope_type": "yarn", "factor": 2.0}, [None],
     10000.0),
    ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}, [None], 500000.0),
    ("llama3_wide", {"rope_type": "llama3", "factor": 32.0,
                     "low_freq_factor": 0.5, "high_freq_factor": 8.0,
                     "original_max_position_embeddings": 128}, [None],
     10000.0),
    ("longrope", _LONGROPE, [None, 1, 64, 65, 1000], 10000.0),
    ("longrope_factor", {**_LONGROPE, "factor": 3.0}, [10, 100], 10000.0),
    ("longrope_attention_factor", {**_LONGROPE, "attention_factor": 1.25},
     [10, 100], 10000.0),
    ("longrope_both", {**_LONGROPE, "factor": 3.0, "attention_factor": 0.9},
     [100], 10000.0),
    ("longrope_no_original", {"rope_type": "longrope", "short_factor": _SHORT,
                              "long_factor": _LONG},
     [10, _MAX_POSITIONS + 1], 10000.0),
]


def _scale_lists(scaling, partial):
  """Truncates longrope factor lists to rot_dim // 2 entries."""
  scaling = copy.deepcopy(scaling)
  for key in ("short_factor", "long_factor"):
    if key in scaling:
      scaling[key] = scaling[key][:int(_HEAD_DIM * partial) // 2]
  return scaling


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("name, scaling, seq_lens, theta", _CASES,
                         ids=[case[0] for case in _CASES])
def test_frequencies_match_transformers(name, scaling, seq_lens, theta,
                                        partial):
  del name
  scaling = _scale_lists(scaling, partial)
  config = _hf_config(scaling, theta, partial)
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  standardized = _hf_rope_dict(config)
  for seq_len in seq_lens:
    hf_inv_freq, hf_factor = _hf_frequencies(config, rope_type, seq_len)
    assert hf_inv_freq.shape == (int(_HEAD_DIM * partial) // 2,)
    ours = rope.rope_frequencies(
        _HEAD_DIM, base=theta, rope_scaling=scaling,
        max_position_embeddings=_MAX_POSITIONS, seq_len=seq_len,
        partial_rotary_factor=partial)
    # The dict exactly as transformers stores it (rope_theta, rope_type,
    # partial_rotary_factor and, for yarn / llama3 / longrope,
    # original_max_position_embeddings filled in).
    verbatim = rope.rope_frequencies(
        _HEAD_DIM, rope_scaling=standardized,
        max_position_embeddings=_MAX_POSITIONS, seq_len=seq_len)
    for inv_freq, factor in (ours, verbatim):
      assert inv_freq.dtype == jnp.float32
      np.testing.assert_allclose(np.asarray(inv_freq), hf_inv_freq,
                                 rtol=1e-6, err_msg=f"seq_len={seq_len}")
      assert isinstance(factor, float)
      np.testing.assert_allclose(factor, hf_factor, rtol=1e-6)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("scaling", [
    {"rope_type": "dynamic", "factor": 3.0}, _LONGROPE,
], ids=["dynamic", "longrope"])
def test_traced_seq_len_matches_transformers(scaling):
  config = _hf_config(scaling, 10000.0, 1.0)

  @jax.jit
  def frequencies(seq_len):
    return rope.rope_frequencies(
        _HEAD_DIM, rope_scaling=scaling,
        max_position_embeddings=_MAX_POSITIONS, seq_len=seq_len)[0]

  for seq_len in (3, 64, 65, _MAX_POSITIONS, _MAX_POSITIONS + 7, 5000):
    hf_inv_freq, _ = _hf_frequencies(config, scaling["rope_type"], seq_len)
    np.testing.assert_allclose(np.asarray(frequencies(jnp.int32(seq_len))),
                               hf_inv_freq, rtol=1e-6,
                               err_msg=f"seq_len={seq_len}")


# ----------------------------------------------------------------------------
# The rotation.


def _random_inputs(seed, batch=2, length=9, heads=3, head_dim=_HEAD_DIM,
                   max_position=4096):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
  # Explicit, unsorted, repeated position ids, as packed rows produce.
  positions = rng.integers(0, max_position, size=(batch, length))
  return x, positions


def _ours(x, positions, inv_freq, **kwargs):
  return np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(positions),
                                    jnp.asarray(inv_freq), **kwargs))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("scaling", [
    {}, {"rope_type": "linear", "factor": 2.0}, _YARN,
    {**_YARN, "attention_factor": 0.7},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
], ids=["default", "linear", "yarn", "yarn_attention_factor", "llama3"])
def test_half_layout_matches_llama(scaling):
  config = _hf_config(scaling, 10000.0, 1.0)
  rotary = modeling_llama.LlamaRotaryEmbedding(config)
  x, positions = _random_inputs(0)
  q = torch.from_numpy(x).transpose(1, 2)  # HF layout [B, N, T, H].
  cos, sin = rotary(q, torch.from_numpy(positions))
  hf, _ = modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)
  hf = hf.transpose(1, 2).numpy()

  # The rotation alone, fed transformers' own inv_freq and scaling.
  hf_inv_freq = rotary.inv_freq.numpy()
  ours = _ours(x, positions, hf_inv_freq,
               attention_scaling=rotary.attention_scaling)
  np.testing.assert_allclose(ours, hf, atol=1e-5)

  # End to end with our frequencies: they may differ from transformers' by an
  # ulp, which a position of up to 4096 turns into ~4096 * 1e-7 rad.
  inv_freq, scaling_factor = rope.rope_frequencies(
      _HEAD_DIM, rope_scaling=scaling, max_position_embeddings=_MAX_POSITIONS)
  assert scaling_factor == pytest.approx(rotary.attention_scaling, rel=1e-6)
  ours = _ours(x, positions, inv_freq, attention_scaling=scaling_factor)
  np.testing.assert_allclose(ours, hf, atol=5e-3)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("partial", [0.25, 0.5, 1.0])
def test_half_layout_partial_matches_gpt_neox(partial):
  config = _hf_config({"rope_type": "default"}, 10000.0, partial,
                      config_class=transformers.GPTNeoXConfig)
  rotary = modeling_gpt_neox.GPTNeoXRotaryEmbedding(config)
  x, positions = _random_inputs(1)
  q = torch.from_numpy(x).transpose(1, 2)
  cos, sin = rotary(q, torch.from_numpy(positions))
  hf, _ = modeling_gpt_neox.apply_rotary_pos_emb(q, q, cos, sin)
  hf = hf.transpose(1, 2).numpy()
  hf_inv_freq = rotary.inv_freq.numpy()
  assert hf_inv_freq.shape == (int(_HEAD_DIM * partial) // 2,)
  ours = _ours(x, positions, hf_inv_freq)
  np.testing.assert_allclose(ours, hf, atol=1e-5)
  rot_dim = 2 * hf_inv_freq.shape[0]
  np.testing.assert_array_equal(ours[..., rot_dim:], x[..., rot_dim:])


@pytest.mark.parametrize("rotary_dim", [8, 16, _HEAD_DIM])
def test_interleaved_layout_matches_gptj(rotary_dim):
  x, positions = _random_inputs(2)
  table = modeling_gptj.create_sinusoidal_positions(4096, rotary_dim)
  # As GPTJAttention.forward: gather [sin | cos] rows by position id.
  sincos = table[torch.from_numpy(positions)]
  sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
  x_torch = torch.from_numpy(x)  # GPT-J rotates in [B, T, N, H].
  rotated = modeling_gptj.apply_rotary_pos_emb(
      x_torch[..., :rotary_dim], sin, cos)
  hf = torch.cat([rotated, x_torch[..., rotary_dim:]], dim=-1).numpy()
  # GPT-J's inv_freq, as create_sinusoidal_positions computes it.
  gptj_inv_freq = (1.0 / (10000**(
      torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))).numpy()
  ours = _ours(x, positions, gptj_inv_freq, layout="interleaved")
  np.testing.assert_allclose(ours, hf, atol=1e-5)
  # With our own frequencies (full rotary_dim of a rotary_dim-sized head).
  inv_freq, _ = rope.rope_frequencies(rotary_dim)
  np.testing.assert_allclose(np.asarray(inv_freq), gptj_inv_freq, rtol=1e-6)
  # ... and the half layout is a different rotation of the same dims.
  assert not np.allclose(_ours(x, positions, gptj_inv_freq), hf, atol=1e-2)


@pytest.mark.parametrize("partial", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("factor", [None, 2.0])
def test_proportional_matches_transformers(partial, factor):
  """transformers' "proportional" (Gemma 4's p-RoPE): frequencies over the
  whole head, the lowest (1 - p) of them zero, divided by the factor."""
  scaling = {"rope_type": "proportional"}
  if factor is not None:
    scaling["factor"] = factor
  config = _hf_config(scaling, 10000.0, partial)
  hf_inv_freq, hf_factor = (
      modeling_rope_utils.ROPE_INIT_FUNCTIONS["proportional"](config, None))
  hf_inv_freq = hf_inv_freq.numpy()
  assert hf_inv_freq.shape == (_HEAD_DIM // 2,)
  for ours in (rope.rope_frequencies(_HEAD_DIM, base=10000.0,
                                     rope_scaling=scaling,
                                     partial_rotary_factor=partial),
               rope.rope_frequencies(_HEAD_DIM,
                                     rope_scaling=_hf_rope_dict(config))):
    np.testing.assert_allclose(np.asarray(ours[0]), hf_inv_freq, rtol=1e-6)
    assert ours[1] == hf_factor == 1.0
  zeros = _HEAD_DIM // 2 - int(partial * _HEAD_DIM // 2)
  assert (hf_inv_freq == 0).sum() == zeros   # the NoPE pairs
