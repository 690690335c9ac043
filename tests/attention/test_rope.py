"""Goldens, properties and bad input for extrapolax.attention.rope (no torch).

Axis legend: B batch, T query length, N heads, H head dim, R rotary dims.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from extrapolax.attention import rope


def _freqs(head_dim, **kwargs):
  inv_freq, attention_scaling = rope.rope_frequencies(head_dim, **kwargs)
  assert isinstance(attention_scaling, float)
  assert inv_freq.dtype == jnp.float32
  return np.asarray(inv_freq), attention_scaling


def _close(actual, expected, rtol=1e-6, atol=0.0):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                             rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# Frequencies: goldens.


def test_rope_types_registry():
  assert set(rope.ROPE_TYPES) == {
      "default", "linear", "dynamic", "ntk", "yarn", "llama3", "longrope",
      "proportional"}


def test_default_golden():
  inv_freq, scaling = _freqs(8)
  assert inv_freq.shape == (4,)
  _close(inv_freq, [1.0, 0.1, 0.01, 0.001])
  assert scaling == 1.0


def test_default_base_and_rope_theta_key():
  _close(_freqs(4, base=100.0)[0], [1.0, 0.1])
  # transformers 5 keeps the base in the dict as rope_theta.
  _close(_freqs(4, rope_scaling={"rope_type": "default",
                                 "rope_theta": 100.0})[0], [1.0, 0.1])
  # An empty dict is plain RoPE, as in transformers.
  _close(_freqs(8, rope_scaling={})[0], [1.0, 0.1, 0.01, 0.001])


def test_partial_rotary_golden():
  # rot_dim = int(16 * 0.25) = 4: exponents over rot_dim, not head_dim.
  inv_freq, _ = _freqs(16, base=100.0, partial_rotary_factor=0.25)
  _close(inv_freq, [1.0, 0.1])
  inv_freq, _ = _freqs(16, base=100.0,
                       rope_scaling={"partial_rotary_factor": 0.25})
  _close(inv_freq, [1.0, 0.1])
  # Consistent duplicates are fine.
  inv_freq, _ = _freqs(16, base=100.0, partial_rotary_factor=0.25,
                       rope_scaling={"partial_rotary_factor": 0.25,
                                     "rope_theta": 100.0})
  _close(inv_freq, [1.0, 0.1])


def test_linear_golden():
  inv_freq, scaling = _freqs(
      8, rope_scaling={"rope_type": "linear", "factor": 4.0})
  _close(inv_freq, [0.25, 0.025, 0.0025, 0.00025])
  assert scaling == 1.0


def test_legacy_type_key_is_rope_type():
  legacy = _freqs(8, rope_scaling={"type": "linear", "factor": 2.0})
  modern = _freqs(8, rope_scaling={"rope_type": "linear", "factor": 2.0})
  both = _freqs(8, rope_scaling={"type": "linear", "rope_type": "linear",
                                 "factor": 2.0})
  _close(legacy[0], [0.5, 0.05, 0.005, 0.0005])
  np.testing.assert_array_equal(legacy[0], modern[0])
  np.testing.assert_array_equal(legacy[0], both[0])


def test_ntk_golden():
  # rot_dim 4: base' = base * factor ** (4 / 2) = 100 * 4 = 400.
  inv_freq, scaling = _freqs(
      4, base=100.0, rope_scaling={"rope_type": "ntk", "factor": 2.0})
  _close(inv_freq, [1.0, 1.0 / 20.0])
  assert scaling == 1.0
  # rot_dim 8, base 10000, factor 3: base' = 10000 * 3 ** (8 / 6).
  inv_freq, _ = _freqs(8, rope_scaling={"rope_type": "ntk", "factor": 3.0})
  new_base = 10000.0 * 3.0**(8 / 6)
  _close(inv_freq, [new_base**(-i / 8) for i in (0, 2, 4, 6)])


def test_dynamic_golden():
  scaling_dict = {"rope_type": "dynamic", "factor": 2.0}
  # seq_len <= max_position_embeddings (or None): unscaled.
  for seq_len in (None, 1, 64):
    inv_freq, scaling = _freqs(4, base=100.0, rope_scaling=scaling_dict,
                               max_position_embeddings=64, seq_len=seq_len)
    _close(inv_freq, [1.0, 0.1])
    assert scaling == 1.0
  # seq_len = 2M: ratio = 2 * 2 - 1 = 3; base' = 100 * 3 ** (4 / 2) = 900.
  inv_freq, _ = _freqs(4, base=100.0, rope_scaling=scaling_dict,
                       max_position_embeddings=64, seq_len=128)
  _close(inv_freq, [1.0, 1.0 / 30.0])


def test_yarn_golden():
  # head_dim 8, base 10000, L = 4096, factor 4:
  # corr_dim(r) = 8 * ln(4096 / (2 pi r)) / (2 ln 10000);
  # corr_dim(32) = 1.309 -> floor 1, corr_dim(1) = 2.814 -> ceil 3;
  # ramp over i = 0..3 = clip((i - 1) / 2) = [0, 0, 0.5, 1].
  scaling_dict = {"rope_type": "yarn", "factor": 4.0,
                  "original_max_position_embeddings": 4096}
  inv_freq, scaling = _freqs(8, rope_scaling=scaling_dict)
  _close(inv_freq, [1.0, 0.1, 0.01 * (0.5 / 4 + 0.5), 0.001 / 4])
  _close(scaling, 0.1 * math.log(4.0) + 1.0)
  _close(scaling, 1.1386294361)

  # truncate=False: the ramp uses the unrounded correction dims.
  def corr_dim(r):
    return 8 * math.log(4096 / (2 * math.pi * r)) / (2 * math.log(10000.0))
  low, high = corr_dim(32), corr_dim(1)
  assert 1.30 < low < 1.31 and 2.81 < high < 2.82
  ramp2 = (2 - low) / (high - low)
  inv_freq, _ = _freqs(8, rope_scaling={**scaling_dict, "truncate": False})
  _close(inv_freq, [1.0, 0.1, 0.01 * (ramp2 / 4 + 1 - ramp2), 0.001 / 4])

  # Explicit attention_factor wins; mscale / mscale_all_dim ratio otherwise.
  _, scaling = _freqs(8, rope_scaling={**scaling_dict,
                                       "attention_factor": 0.5})
  assert scaling == 0.5
  _, scaling = _freqs(8, rope_scaling={**scaling_dict, "mscale": 2.0,
                                       "mscale_all_dim": 1.0})
  _close(scaling, (0.2 * math.log(4) + 1) / (0.1 * math.log(4) + 1))


def test_yarn_original_length_falls_back_to_max_positions():
  explicit = _freqs(8, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 4096})
  fallback = _freqs(8, rope_scaling={"rope_type": "yarn", "factor": 4.0},
                    max_position_embeddings=4096)
  np.testing.assert_array_equal(explicit[0], fallback[0])
  # factor None: max_position_embeddings / original (DeepSeek style).
  derived = _freqs(8, rope_scaling={"rope_type": "yarn", "factor": None,
                                    "original_max_position_embeddings": 1024},
                   max_position_embeddings=4096)
  _close(derived[1], 0.1 * math.log(4.0) + 1.0)


def test_llama3_golden():
  # head_dim 8, base 10000: inv0 = [1, .1, .01, .001],
  # wavelen = 2 pi / inv0 = [6.3, 62.8, 628.3, 6283.2].
  # L = 1000, low_freq_factor 1 -> low_wl 1000; high_freq_factor 4 ->
  # high_wl 250; factor 8.
  # i = 0, 1: wavelen < 250, kept. i = 3: wavelen > 1000, divided by 8.
  # i = 2: smooth = (1000 / 628.3 - 1) / 3 = 0.19718,
  #        inv = (1 - smooth) * 0.01 / 8 + smooth * 0.01 = 0.0029754.
  inv_freq, scaling = _freqs(8, rope_scaling={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 1000})
  smooth = (10.0 / (2 * math.pi) - 1.0) / 3.0
  _close(inv_freq, [1.0, 0.1, (1 - smooth) * 0.01 / 8 + smooth * 0.01,
                    0.001 / 8])
  _close(inv_freq[2], 0.0029753521, rtol=1e-6)
  assert scaling == 1.0


def test_longrope_golden():
  short, long = [1.0, 2.0], [4.0, 8.0]
  scaling_dict = {"rope_type": "longrope", "short_factor": short,
                  "long_factor": long, "original_max_position_embeddings": 16}
  kwargs = dict(base=100.0, rope_scaling=scaling_dict,
                max_position_embeddings=64)
  for seq_len in (None, 1, 16):
    inv_freq, scaling = _freqs(4, seq_len=seq_len, **kwargs)
    _close(inv_freq, [1.0, 0.1 / 2.0])
  _close(scaling, math.sqrt(1 + math.log(64 / 16) / math.log(16)))
  inv_freq, _ = _freqs(4, seq_len=17, **kwargs)
  _close(inv_freq, [1.0 / 4.0, 0.1 / 8.0])
  # factor given: it, not max_position_embeddings / L, sets the scaling.
  _, scaling = _freqs(4, seq_len=17, base=100.0, rope_scaling={
      **scaling_dict, "factor": 2.0}, max_position_embeddings=64)
  _close(scaling, math.sqrt(1 + math.log(2.0) / math.log(16)))
  _, scaling = _freqs(4, base=100.0, rope_scaling={
      **scaling_dict, "attention_factor": 1.5}, max_position_embeddings=64)
  assert scaling == 1.5


@pytest.mark.parametrize("scaling_dict", [
    {"rope_type": "dynamic", "factor": 3.0},
    {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
     "long_factor": [2.0, 4.0, 8.0, 16.0]},
])
def test_traced_seq_len_matches_eager(scaling_dict):
  kwargs = dict(base=500.0, rope_scaling=scaling_dict,
                max_position_embeddings=32)

  @jax.jit
  def traced(seq_len):
    inv_freq, _ = rope.rope_frequencies(8, seq_len=seq_len, **kwargs)
    return inv_freq

  results = {}
  for seq_len in (5, 32, 33, 100, 1000):
    eager = _freqs(8, seq_len=seq_len, **kwargs)[0]
    jitted = np.asarray(traced(jnp.int32(seq_len)))
    _close(jitted, eager, rtol=1e-6)
    results[seq_len] = jitted
  # The seq_len dependence is live under jit: up to M = 32 nothing changes,
  # past it the frequencies drop.
  np.testing.assert_array_equal(results[5], results[32])
  assert np.all(results[33][1:] < results[32][1:])
  if scaling_dict["rope_type"] == "dynamic":  # keeps growing with seq_len.
    assert np.all(results[1000][1:] < results[100][1:])
  else:  # longrope: one long set for every seq_len > L.
    np.testing.assert_array_equal(results[33], results[1000])


# ----------------------------------------------------------------------------
# Frequencies: bad input.


@pytest.mark.parametrize("kwargs, match", [
    (dict(rope_scaling={"rope_type": "xpos"}), "'xpos'"),
    (dict(rope_scaling={"type": "su", "short_factor": [1.0]}), "'su'"),
    (dict(rope_scaling={"rope_type": "linear"}), "'factor'"),
    (dict(rope_scaling={"type": "dynamic"}, max_position_embeddings=8),
     "'factor'"),
    (dict(rope_scaling={"rope_type": "ntk"}), "'factor'"),
    (dict(rope_scaling={"rope_type": "yarn",
                        "original_max_position_embeddings": 8}), "'factor'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8}),
     "'low_freq_factor'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "max_position_embeddings"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
     "original_max_position_embeddings"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
     "original_max_position_embeddings"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
                        "long_factor": [1.0] * 4}),
     "original_max_position_embeddings"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 3,
                        "long_factor": [1.0] * 4},
          max_position_embeddings=8), "'short_factor'.*length.*4"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
                        "long_factor": [1.0] * 5},
          max_position_embeddings=8), "'long_factor'.*length.*4"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4},
          max_position_embeddings=8), "'long_factor'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "fator": 3}),
     "'fator'"),
    (dict(rope_scaling={"factor": 2.0}), "'factor'.*'default' was assumed"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0,
                        "original_max_position_embeddings": 4},
          max_position_embeddings=8), "'original_max_position_embeddings'"),
    (dict(rope_scaling={"rope_type": "linear", "type": "dynamic",
                        "factor": 2.0}), "'linear'.*'dynamic'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0.0}), "factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": "2"}), "'2'"),
    (dict(rope_scaling={"rope_theta": 500.0}, base=100.0), "500.0.*100.0"),
    (dict(rope_scaling={"partial_rotary_factor": 0.5},
          partial_rotary_factor=0.25), "0.5.*0.25"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                        "original_max_position_embeddings": 8}),
     "high_freq_factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "truncate": "no",
                        "original_max_position_embeddings": 8}), "'no'"),
    (dict(base=1.0), "base"),
    (dict(partial_rotary_factor=1.5), "1.5"),
    (dict(max_position_embeddings=0), "max_position_embeddings.*0"),
    (dict(rope_scaling=[("rope_type", "linear")]), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0},
          max_position_embeddings=8, seq_len=np.array([1, 2])), "seq_len"),
])
def test_bad_scaling_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    rope.rope_frequencies(8, **kwargs)


@pytest.mark.parametrize("head_dim, partial, match", [
    (6, 0.5, r"= 3 "),        # odd rot_dim
    (7, 1.0, r"= 7 "),
    (8, 0.1, r"= 0 "),
    (0, 1.0, "head_dim.*0"),
    (8.0, 1.0, "head_dim.*8.0"),
])
def test_bad_rot_dim_raises(head_dim, partial, match):
  with pytest.raises(ValueError, match=match):
    rope.rope_frequencies(head_dim, partial_rotary_factor=partial)


@pytest.mark.parametrize("rope_type", ["ntk", "dynamic"])
def test_base_change_needs_rot_dim_above_two(rope_type):
  with pytest.raises(ValueError, match="rot_dim=2"):
    rope.rope_frequencies(2, rope_scaling={"rope_type": rope_type,
                                           "factor": 2.0},
                          max_position_embeddings=8, seq_len=16)


# ----------------------------------------------------------------------------
# apply_rope: goldens.


@pytest.mark.parametrize("layout", rope.ROPE_LAYOUTS)
def test_apply_rope_two_dim_golden(layout):
  # A 2-dim head is one pair in both layouts: rotation by angle p * 0.5.
  x = jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, -2.0]).reshape(1, 3, 1, 2)
  positions = jnp.array([1, 2, 0])
  out = rope.apply_rope(x, positions, jnp.array([0.5]), layout=layout)
  expected = [[math.cos(0.5), math.sin(0.5)],
              [-math.sin(1.0), math.cos(1.0)],
              [3.0, -2.0]]  # position 0: identity.
  _close(out.reshape(3, 2), expected, atol=1e-6)


def test_apply_rope_four_dim_golden_both_layouts():
  inv_freq = jnp.array([1.0, 0.25])
  x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
  pos = jnp.array([2.0])  # angles 2.0 and 0.5.
  c0, s0, c1, s1 = (math.cos(2.0), math.sin(2.0), math.cos(0.5),
                    math.sin(0.5))
  # half: pairs (0, 2) by angle 2.0 and (1, 3) by angle 0.5.
  half = rope.apply_rope(x, pos, inv_freq, layout="half").reshape(4)
  _close(half, [1 * c0 - 3 * s0, 2 * c1 - 4 * s1,
                3 * c0 + 1 * s0, 4 * c1 + 2 * s1], atol=1e-6)
  # interleaved: pairs (0, 1) by angle 2.0 and (2, 3) by angle 0.5.
  inter = rope.apply_rope(x, pos, inv_freq, layout="interleaved").reshape(4)
  _close(inter, [1 * c0 - 2 * s0, 2 * c0 + 1 * s0,
                 3 * c1 - 4 * s1, 4 * c1 + 3 * s1], atol=1e-6)


def test_rope_cos_sin_golden_and_scaling():
  cos, sin = rope.rope_cos_sin(jnp.array([[0, 3]]), jnp.array([1.0, 0.5]),
                               attention_scaling=2.0)
  assert cos.shape == sin.shape == (1, 2, 2)
  assert cos.dtype == sin.dtype == jnp.float32
  _close(cos[0], 2 * np.cos([[0.0, 0.0], [3.0, 1.5]]), atol=1e-6)
  _close(sin[0], 2 * np.sin([[0.0, 0.0], [3.0, 1.5]]), atol=1e-6)


@pytest.mark.parametrize("layout", rope.ROPE_LAYOUTS)
def test_attention_scaling_scales_rotated_dims_only(layout):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 10)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 100, size=(2, 5)))
  inv_freq, _ = rope.rope_frequencies(10, partial_rotary_factor=0.8)
  plain = rope.apply_rope(x, positions, inv_freq, layout=layout)
  scaled = rope.apply_rope(x, positions, inv_freq, layout=layout,
                           attention_scaling=1.5)
  _close(scaled[..., :8], 1.5 * plain[..., :8], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(scaled[..., 8:], x[..., 8:])
  # A rotation preserves the norm of the rotated dims.
  _close(jnp.linalg.norm(plain[..., :8], axis=-1),
         jnp.linalg.norm(x[..., :8], axis=-1), rtol=1e-5)


# ----------------------------------------------------------------------------
# apply_rope: properties.


@settings(max_examples=20, deadline=None, database=None)
@given(layout=st.sampled_from(rope.ROPE_LAYOUTS),
       m=st.integers(0, 1000), n=st.integers(0, 1000),
       shift=st.integers(1, 1000), seed=st.integers(0, 2**16))
def test_scores_depend_only_on_relative_position(layout, m, n, shift, seed):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  inv_freq, _ = rope.rope_frequencies(16, base=100.0)

  def score(q_pos, k_pos):
    q_rot = rope.apply_rope(q, jnp.array([q_pos]), inv_freq, layout=layout)
    k_rot = rope.apply_rope(k, jnp.array([k_pos]), inv_freq, layout=layout)
    return float(jnp.sum(q_rot * k_rot))

  # Angles are float32 products of positions up to 2000: allow ~1e-4 rad.
  assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-3,
                                      abs=5e-3)


@pytest.mark.parametrize("layout", rope.ROPE_LAYOUTS)
def test_relative_position_batched(layout):
  """Whole-sequence version: score(i, j) is a function of i - j only."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
  inv_freq, _ = rope.rope_frequencies(8, base=50.0)
  length = 12
  positions = jnp.arange(length)
  q_rot = rope.apply_rope(jnp.tile(q, (1, length, 1, 1)), positions,
                          inv_freq, layout=layout)
  k_rot = rope.apply_rope(jnp.tile(k, (1, length, 1, 1)), positions,
                          inv_freq, layout=layout)
  scores = np.asarray(jnp.einsum("btnh,bsnh->nts", q_rot, k_rot))
  for offset in range(-length + 1, length):
    diagonal = np.diagonal(scores, offset=offset, axis1=1, axis2=2)
    _close(diagonal, np.broadcast_to(diagonal[:, :1], diagonal.shape),
           rtol=1e-4, atol=1e-4)
  # ... and it does depend on i - j (RoPE is not a no-op).
  assert not np.allclose(scores[:, 0, 0], scores[:, 0, 1], atol=1e-3)
  assert not np.allclose(scores[:, 5, 0], scores[:, 0, 5], atol=1e-3)


@pytest.mark.parametrize("rot_dim, head_dim", [(8, 8), (6, 10)])
def test_half_and_interleaved_differ_by_a_permutation(rot_dim, head_dim):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 7, 3, head_dim)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 1000, size=(2, 7)))
  inv_freq = jnp.asarray(rng.uniform(0.001, 1.0, size=rot_dim // 2),
                         jnp.float32)
  # Interleaved pair (2i, 2i + 1) sits at (i, i + R/2) in the half layout.
  to_half = np.concatenate([np.arange(0, rot_dim, 2),
                            np.arange(1, rot_dim, 2),
                            np.arange(rot_dim, head_dim)])
  to_interleaved = np.argsort(to_half)
  interleaved = rope.apply_rope(x, positions, inv_freq, layout="interleaved")
  half = rope.apply_rope(x[..., to_half], positions, inv_freq, layout="half")
  _close(half[..., to_interleaved], interleaved, atol=1e-6)
  # Without the permutation they differ.
  assert not np.allclose(
      rope.apply_rope(x, positions, inv_freq, layout="half"), interleaved,
      atol=1e-3)


@pytest.mark.parametrize("layout", rope.ROPE_LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_partial_rotary_passes_tail_and_keeps_dtype(layout, dtype):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 4, 2, 12)), dtype)
  positions = jnp.asarray([3, 1, 4, 1])
  inv_freq, _ = rope.rope_frequencies(12, partial_rotary_factor=0.5)
  assert inv_freq.shape == (3,)
  out = rope.apply_rope(x, positions, inv_freq, layout=layout)
  assert out.dtype == dtype and out.shape == x.shape
  np.testing.assert_array_equal(np.asarray(out[..., 6:], np.float32),
                                np.asarray(x[..., 6:], np.float32))
  # The rotated dims match a float32 computation, rounded once to dtype.
  reference = rope.apply_rope(x.astype(jnp.float32), positions, inv_freq,
                              layout=layout)
  np.testing.assert_array_equal(
      np.asarray(out[..., :6], np.float32),
      np.asarray(reference[..., :6].astype(dtype), np.float32))
  assert not np.allclose(np.asarray(out[..., :6], np.float32),
                         np.asarray(x[..., :6], np.float32), atol=1e-2)


def test_positions_1d_broadcast_over_batch_and_explicit_ids():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 5, 2, 8)), jnp.float32)
  inv_freq, _ = rope.rope_frequencies(8)
  packed = jnp.array([0, 1, 2, 0, 1])  # two packed segments.
  shared = rope.apply_rope(x, packed, inv_freq)
  per_row = rope.apply_rope(x, jnp.tile(packed, (3, 1)), inv_freq)
  np.testing.assert_array_equal(shared, per_row)
  # Token 3 restarts at position 0, i.e. it is not rotated at all.
  np.testing.assert_array_equal(shared[:, 3], x[:, 3])
  _close(shared[:, 4], rope.apply_rope(x[:, 4:5], jnp.array([1]),
                                       inv_freq)[:, 0], atol=0)
  # Float positions equal int positions.
  _close(rope.apply_rope(x, packed.astype(jnp.float32), inv_freq), shared,
         atol=0)


def test_large_positions_use_float32_angles():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(1, 3, 1, 8)).astype(np.float32)
  positions = np.array([999_999, 1_000_000, 1_000_001], np.int32)
  inv_freq, _ = rope.rope_frequencies(8, base=10000.0)
  out = np.asarray(rope.apply_rope(x, positions, inv_freq))
  # Reference: float32 angle positions * inv_freq, then exact trig.
  angles = (positions.astype(np.float32)[:, None] *
            np.asarray(inv_freq)).astype(np.float64)
  cos, sin = np.cos(angles), np.sin(angles)
  x1, x2 = x[0, :, 0, :4], x[0, :, 0, 4:]
  expected = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  _close(out[0, :, 0], expected, atol=2e-5)


def test_apply_rope_jits_with_traced_positions():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 4, 2, 8)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 50, size=(2, 4)))
  inv_freq, scaling = rope.rope_frequencies(
      8, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                       "original_max_position_embeddings": 16})
  fn = jax.jit(lambda x, p: rope.apply_rope(x, p, inv_freq,
                                            attention_scaling=scaling))
  _close(fn(x, positions),
         rope.apply_rope(x, positions, inv_freq, attention_scaling=scaling),
         rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# apply_rope: bad input.


@pytest.mark.parametrize("x_shape, positions, inv_len, kwargs, match", [
    ((1, 2, 1, 4), [0, 1], 2, dict(layout="gptj"), "'gptj'"),
    ((1, 2, 1, 4), [0, 1], 3, {}, "R = 2 \\* len\\(inv_freq\\) = 6"),
    ((1, 2, 1, 4), [0, 1, 2], 2, {}, r"\(3,\)"),
    ((2, 2, 1, 4), [[0, 1]], 2, {}, r"\(1, 2\)"),
    ((2, 4), [0, 1], 2, {}, r"\(2, 4\)"),
])
def test_apply_rope_bad_input_raises(x_shape, positions, inv_len, kwargs,
                                     match):
  x = jnp.zeros(x_shape, jnp.float32)
  with pytest.raises(ValueError, match=match):
    rope.apply_rope(x, jnp.asarray(positions), jnp.ones(inv_len), **kwargs)


def test_apply_rope_rejects_int_x_and_bool_positions():
  with pytest.raises(ValueError, match="int32"):
    rope.apply_rope(jnp.zeros((1, 2, 1, 4), jnp.int32), jnp.arange(2),
                    jnp.ones(2))
  with pytest.raises(ValueError, match="bool"):
    rope.apply_rope(jnp.zeros((1, 2, 1, 4)), jnp.array([True, False]),
                    jnp.ones(2))
  # [N, R/2] is per-head frequencies; three axes are not.
  with pytest.raises(ValueError, match=r"\(2, 1, 1\)"):
    rope.rope_cos_sin(jnp.arange(2), jnp.ones((2, 1, 1)))
  with pytest.raises(ValueError, match=r"per head \[N=1, R/2\]; got shape "
                     r"\(2, 1\)"):
    rope.apply_rope(jnp.zeros((1, 2, 1, 4)), jnp.arange(2), jnp.ones((2, 1)))
