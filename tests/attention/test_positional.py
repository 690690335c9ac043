"""Tests for extrapolax.attention.positional."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax.attention import positional as pe


def _np(x):
  return np.asarray(jax.device_get(x))


# ALiBi slopes and bias.


def _reference_get_slopes(n):
  """The rule of ofirpress/attention_with_linear_biases ``get_slopes``.

  Written independently in its start/ratio form (not the implementation's
  closed form), so the two computations can disagree if either is wrong.
  """

  def power_of_2(m):
    start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
    return [start * start ** i for i in range(m)]

  if math.log2(n).is_integer():
    return power_of_2(n)
  closest = 2 ** math.floor(math.log2(n))
  return power_of_2(closest) + _reference_get_slopes(2 * closest)[0::2][
      :n - closest]


@pytest.mark.parametrize("n, expected", [
    (8, [2.0 ** -h for h in range(1, 9)]),
    (6, [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]),
    (12, [2.0 ** -h for h in range(1, 9)]
     + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]),
    (1, [2.0 ** -8]),
    (2, [2.0 ** -4, 2.0 ** -8]),
    (3, [2.0 ** -4, 2.0 ** -8, 2.0 ** -2]),
])
def test_alibi_slopes_goldens(n, expected):
  slopes = pe.alibi_slopes(n)
  assert slopes.dtype == jnp.float32
  assert slopes.shape == (n,)
  np.testing.assert_allclose(_np(slopes), expected, rtol=1e-7, atol=0)


def test_alibi_slopes_match_reference_for_many_head_counts():
  for n in range(1, 41):
    np.testing.assert_allclose(
        _np(pe.alibi_slopes(n)), _reference_get_slopes(n), rtol=1e-6,
        err_msg=f"num_heads={n}")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_alibi_slopes_rejects_bad_head_count(bad):
  with pytest.raises(ValueError, match=r"num_heads must be .*>= 1, got"):
    pe.alibi_slopes(bad)


def test_alibi_bias_golden():
  q, k = pe.default_positions(2, 3)   # q = [1, 2], k = [0, 1, 2]
  bias = pe.alibi_bias(jnp.array([0.5, 0.25]), q, k)
  assert bias.shape == (2, 2, 3) and bias.dtype == jnp.float32
  distance = np.array([[1, 0, 1], [2, 1, 0]], np.float32)
  np.testing.assert_array_equal(_np(bias[0]), -0.5 * distance)
  np.testing.assert_array_equal(_np(bias[1]), -0.25 * distance)


def test_alibi_bias_properties():
  slopes = pe.alibi_slopes(4)
  q, k = pe.default_positions(6, 6)
  bias = _np(pe.alibi_bias(slopes, q, k))
  rel = _np(pe.relative_positions(6, 6))
  for h in range(4):
    np.testing.assert_array_equal(np.diag(bias[h]), 0.0)
    # Causal part equals -m * (i - j); strictly decreasing with distance.
    causal = rel >= 0
    np.testing.assert_allclose(bias[h][causal],
                               -_np(slopes)[h] * rel[causal], rtol=1e-6)
    for i in range(6):
      row = bias[h, i, :i + 1][::-1]   # distance 0, 1, ..., i
      assert np.all(np.diff(row) < 0)
    np.testing.assert_array_equal(bias[h], bias[h].T)   # bidirectional use


def test_alibi_bias_batched_matches_per_row():
  slopes = pe.alibi_slopes(3)
  # Packed rows: positions restart at 0 in each document.
  q = jnp.array([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
  bias = pe.alibi_bias(slopes, q, q)
  assert bias.shape == (2, 3, 5, 5)
  for b in range(2):
    np.testing.assert_array_equal(_np(bias[b]),
                                  _np(pe.alibi_bias(slopes, q[b], q[b])))
  # Shared 1-D key positions broadcast over the batch.
  shared = pe.alibi_bias(slopes, q, jnp.arange(5))
  assert shared.shape == (2, 3, 5, 5)
  np.testing.assert_array_equal(_np(shared[1]), _np(bias[1]))


def test_alibi_bias_large_positions_exact():
  # i - j is formed in int32 before the float cast: no cancellation.
  q = jnp.array([2 ** 26 + 3], jnp.int32)
  k = jnp.array([2 ** 26], jnp.int32)
  np.testing.assert_array_equal(_np(pe.alibi_bias(jnp.ones(1), q, k)), -3.0)


def test_alibi_bias_rejects_bad_shapes():
  q, k = pe.default_positions(3, 3)
  with pytest.raises(ValueError, match=r"slopes must have shape \[num_heads\]"):
    pe.alibi_bias(jnp.ones((2, 2)), q, k)
  with pytest.raises(ValueError,
                     match=r"q_positions must have shape.*\(1, 2, 3\)"):
    pe.alibi_bias(jnp.ones(2), jnp.zeros((1, 2, 3), jnp.int32), k)
  with pytest.raises(ValueError, match=r"same batch size.*\(2, 3\).*\(3, 3\)"):
    pe.alibi_bias(jnp.ones(2), jnp.zeros((2, 3), jnp.int32),
                  jnp.zeros((3, 3), jnp.int32))
  with pytest.raises(ValueError, match="integer or float dtype, got bool"):
    pe.alibi_bias(jnp.ones(2), jnp.ones(3, bool), k)


# Relative / default positions.


def test_default_and_relative_positions_goldens():
  q, k = pe.default_positions(2, 4)
  assert q.dtype == jnp.int32 and k.dtype == jnp.int32
  np.testing.assert_array_equal(_np(q), [2, 3])
  np.testing.assert_array_equal(_np(k), [0, 1, 2, 3])
  rel = pe.relative_positions(2, 4)
  assert rel.dtype == jnp.int32
  np.testing.assert_array_equal(_np(rel), [[2, 1, 0, -1], [3, 2, 1, 0]])
  np.testing.assert_array_equal(_np(pe.relative_positions(3, 3)),
                                [[0, -1, -2], [1, 0, -1], [2, 1, 0]])
  # Decoding one token against a cache of 5: the query sits at position 4.
  np.testing.assert_array_equal(_np(pe.relative_positions(1, 5)),
                                [[4, 3, 2, 1, 0]])


@pytest.mark.parametrize("q_len, kv_len, name", [(-1, 3, "q_len"),
                                                 (3, -2, "kv_len"),
                                                 (2.0, 3, "q_len")])
def test_positions_reject_bad_lengths(q_len, kv_len, name):
  with pytest.raises(ValueError, match=f"{name} must be"):
    pe.relative_positions(q_len, kv_len)
  with pytest.raises(ValueError, match=f"{name} must be"):
    pe.default_positions(q_len, kv_len)


# T5 relative buckets and bias.


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance",
                         [(32, 128), (16, 64), (8, 20), (64, 1000), (6, 40)])
def test_t5_bucket_matches_transformers(bidirectional, num_buckets,
                                        max_distance):
  torch = pytest.importorskip("torch")
  t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
  rel = np.concatenate([np.arange(-1200, 1201),
                        [-100000, -4097, 4097, 100000]]).astype(np.int64)
  expected = t5.T5Attention._relative_position_bucket(
      torch.tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance).numpy()
  got = pe.t5_relative_bucket(jnp.asarray(rel, jnp.int32),
                              bidirectional=bidirectional,
                              num_buckets=num_buckets,
                              max_distance=max_distance)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(_np(got), expected)


def test_t5_bucket_goldens():
  rel = jnp.array([0, -1, 1, -7, -8, -16, -127, -128, -1000, 1000, 8, 16])
  # Bidirectional, 32 buckets, 128: max_exact 8; bucket(-16) = 8 +
  # int(log(2) / log(16) * 8) = 10; future keys are offset by 16.
  np.testing.assert_array_equal(
      _np(pe.t5_relative_bucket(rel)),
      [0, 1, 17, 7, 8, 10, 15, 15, 15, 31, 24, 26])
  # Causal: max_exact 16; bucket(-32) = 16 + int(log(2) / log(8) * 16) = 21,
  # bucket(-64) = 16 + int(2/3 * 16) = 26; future keys share bucket 0.
  rel = jnp.array([0, -1, 5, -7, -16, -32, -64, -127, -128, -10 ** 6])
  np.testing.assert_array_equal(
      _np(pe.t5_relative_bucket(rel, bidirectional=False)),
      [0, 1, 0, 7, 16, 21, 26, 31, 31, 31])


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (10, 50)])
def test_t5_bucket_monotone_and_saturating(num_buckets, max_distance):
  d = jnp.arange(0, 3 * max_distance)
  # Bidirectional: past side in [0, half), future side in [half, num_buckets).
  half = num_buckets // 2
  past = _np(pe.t5_relative_bucket(-d, num_buckets=num_buckets,
                                   max_distance=max_distance))
  future = _np(pe.t5_relative_bucket(d[1:], num_buckets=num_buckets,
                                     max_distance=max_distance))
  assert np.all(np.diff(past) >= 0) and np.all(np.diff(future) >= 0)
  assert past.min() == 0 and past.max() == half - 1
  # Distance 0 is on the past side, so the future side starts at half + 1.
  assert future.min() == half + 1 and future.max() == num_buckets - 1
  assert np.all(past[max_distance:] == half - 1)
  assert np.all(future[max_distance - 1:] == num_buckets - 1)
  # Every bucket is used up to saturation.
  assert set(past.tolist()) == set(range(half))
  # Causal: the past uses all num_buckets; the future is bucket 0.
  causal = _np(pe.t5_relative_bucket(-d, bidirectional=False,
                                     num_buckets=num_buckets,
                                     max_distance=max_distance))
  assert np.all(np.diff(causal) >= 0)
  assert causal.max() == num_buckets - 1
  assert np.all(causal[max_distance:] == num_buckets - 1)
  assert np.all(_np(pe.t5_relative_bucket(
      d, bidirectional=False, num_buckets=num_buckets,
      max_distance=max_distance)) == 0)


def test_t5_bias_golden():
  num_buckets, heads = 32, 2
  table = (100 * jnp.arange(heads)[None, :]
           + jnp.arange(num_buckets)[:, None]).astype(jnp.float32)
  q, k = pe.default_positions(3, 3)
  bias = pe.t5_bias(table, q, k, bidirectional=True, num_buckets=32,
                    max_distance=128)
  assert bias.shape == (2, 3, 3) and bias.dtype == jnp.float32
  # bucket(j - i): 0 -> 0, -1 -> 1, -2 -> 2, +1 -> 17, +2 -> 18.
  buckets = np.array([[0, 17, 18], [1, 0, 17], [2, 1, 0]], np.float32)
  np.testing.assert_array_equal(_np(bias[0]), buckets)
  np.testing.assert_array_equal(_np(bias[1]), buckets + 100)
  causal = pe.t5_bias(table, q, k, bidirectional=False, num_buckets=32,
                      max_distance=128)
  np.testing.assert_array_equal(
      _np(causal[1]), np.array([[0, 0, 0], [1, 0, 0], [2, 1, 0]]) + 100.0)


def test_t5_bias_batched_and_bottom_right():
  table = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
  q, k = pe.default_positions(2, 40)   # q = [38, 39]
  bias = _np(pe.t5_bias(table, q, k, bidirectional=False, num_buckets=16,
                        max_distance=64))
  rel = _np(pe.relative_positions(2, 40))
  buckets = _np(pe.t5_relative_bucket(-rel, bidirectional=False,
                                      num_buckets=16, max_distance=64))
  np.testing.assert_array_equal(bias, np.moveaxis(table[buckets], -1, 0))
  qb = jnp.stack([q, q - 30])
  kb = jnp.stack([k, k - 30])
  batched = _np(pe.t5_bias(table, qb, kb, bidirectional=False, num_buckets=16,
                           max_distance=64))
  assert batched.shape == (2, 3, 2, 40)
  np.testing.assert_array_equal(batched[0], bias)
  np.testing.assert_array_equal(batched[1], bias)   # shift invariant


def test_t5_rejects_bad_arguments():
  with pytest.raises(ValueError, match="num_buckets must be >= 4, got 3"):
    pe.t5_relative_bucket(jnp.arange(3), num_buckets=3)
  with pytest.raises(ValueError, match="num_buckets must be >= 2, got 1"):
    pe.t5_relative_bucket(jnp.arange(3), bidirectional=False, num_buckets=1)
  with pytest.raises(ValueError, match="max_distance must be >= 9, got 8"):
    pe.t5_relative_bucket(jnp.arange(3), num_buckets=32, max_distance=8)
  with pytest.raises(ValueError, match="integer dtype, got float32"):
    pe.t5_relative_bucket(jnp.arange(3.0))
  with pytest.raises(ValueError, match="bidirectional must be a bool"):
    pe.t5_relative_bucket(jnp.arange(3), bidirectional="yes")
  q, k = pe.default_positions(3, 3)
  with pytest.raises(ValueError,
                     match=r"num_buckets=32, num_heads\], got \(16, 2\)"):
    pe.t5_bias(jnp.zeros((16, 2)), q, k, bidirectional=True, num_buckets=32,
               max_distance=128)
  with pytest.raises(ValueError,
                     match="q_positions must have an integer dtype"):
    pe.t5_bias(jnp.zeros((32, 2)), q.astype(jnp.float32), k,
               bidirectional=True, num_buckets=32, max_distance=128)


# Kerple.


def test_kerple_log_bias_golden():
  q, k = pe.default_positions(1, 3)   # q = [2], distances 2, 1, 0
  bias = pe.kerple_log_bias(jnp.array([1.0, 2.0]), jnp.array([1.0, 0.5]),
                            q, k)
  assert bias.shape == (2, 1, 3) and bias.dtype == jnp.float32
  np.testing.assert_allclose(_np(bias[0, 0]), [-math.log(3), -math.log(2), 0],
                             rtol=1e-6)
  np.testing.assert_allclose(_np(bias[1, 0]),
                             [-2 * math.log(2), -2 * math.log(1.5), 0],
                             rtol=1e-6)


def test_kerple_log_bias_properties():
  r1 = jnp.array([0.5, 1.0, 3.0])
  r2 = jnp.array([0.1, 1.0, 7.0])
  q, k = pe.default_positions(20, 20)
  bias = _np(pe.kerple_log_bias(r1, r2, q, k))
  assert bias.shape == (3, 20, 20)
  for h in range(3):
    np.testing.assert_array_equal(np.diag(bias[h]), 0.0)
    np.testing.assert_array_equal(bias[h], bias[h].T)
    row = bias[h, -1, ::-1]   # distance 0 .. 19
    assert np.all(np.diff(row) < 0)
  # Log decay: more slowly than ALiBi's linear decay far away.
  far = bias[:, -1, 0] / bias[:, -1, -10]
  assert np.all(far < 19 / 9)
  batched = pe.kerple_log_bias(r1, r2, jnp.stack([q, q]), k)
  assert batched.shape == (2, 3, 20, 20)
  np.testing.assert_array_equal(_np(batched[1]), bias)


def test_kerple_rejects_bad_shapes():
  q, k = pe.default_positions(2, 2)
  with pytest.raises(ValueError,
                     match=r"r1 and r2 must have the same shape.*\(3,\)"):
    pe.kerple_log_bias(jnp.ones(2), jnp.ones(3), q, k)
  with pytest.raises(ValueError,
                     match=r"r2 must have shape \[num_heads\], got \(\)"):
    pe.kerple_log_bias(jnp.ones(2), 1.0, q, k)


# FIRE.


def _linear_mlp(weights):
  w = jnp.asarray(weights, jnp.float32)
  return lambda x: x * w   # [..., 1] -> [..., N]


def test_fire_bias_golden_below_threshold():
  q, k = pe.default_positions(3, 3)   # i, j in 0..2, all below L = 2 or at it
  bias = pe.fire_bias(_linear_mlp([1.0, -2.0]), 1.0, 2.0, q, k)
  assert bias.shape == (2, 3, 3) and bias.dtype == jnp.float32
  l2, l3 = math.log(2), math.log(3)
  # Normaliser psi(max(i, 2)) = log 3 for every row; future keys -> 0.
  expected = np.array([[0, 0, 0], [l2 / l3, 0, 0], [1, l2 / l3, 0]])
  np.testing.assert_allclose(_np(bias[0]), expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(_np(bias[1]), -2 * expected, rtol=1e-5,
                             atol=1e-7)


def test_fire_bias_golden_above_threshold():
  bias = pe.fire_bias(_linear_mlp([1.0]), 0.5, 4.0, jnp.array([10]),
                      jnp.array([0, 5, 10]))
  norm = math.log(0.5 * 10 + 1)   # i = 10 > L = 4
  np.testing.assert_allclose(
      _np(bias[0, 0]), [1.0, math.log(0.5 * 5 + 1) / norm, 0.0], rtol=1e-5)


def test_fire_bias_uses_abs_of_parameters_and_eps():
  q, k = pe.default_positions(4, 6)
  mlp = _linear_mlp([1.0])
  pos = pe.fire_bias(mlp, 0.3, 3.0, q, k)
  neg = pe.fire_bias(mlp, -0.3, -3.0, q, k)
  np.testing.assert_array_equal(_np(pos), _np(neg))
  # i = L = 0: the normaliser is eps alone, and the bias stays finite.
  zero = pe.fire_bias(mlp, 1.0, 0.0, jnp.array([0, 1]), jnp.array([0, 1]))
  assert np.all(np.isfinite(_np(zero)))
  bigger_eps = pe.fire_bias(mlp, 1.0, 0.0, jnp.array([1]), jnp.array([0]),
                            eps=1.0)
  np.testing.assert_allclose(_np(bigger_eps)[0, 0, 0],
                             math.log(2) / (math.log(2) + 1), rtol=1e-6)


def test_fire_bias_progressive_interpolation_properties():
  # With an identity MLP the bias is the normalised distance itself: in
  # [0, 1] on causal pairs, increasing with distance, 1 at j = 0 once i >= L.
  q, k = pe.default_positions(64, 64)
  nd = _np(pe.fire_bias(_linear_mlp([1.0]), 0.1, 16.0, q, k))[0]
  rel = _np(pe.relative_positions(64, 64))
  assert np.all(nd >= 0) and np.all(nd[rel >= 0] <= 1 + 1e-6)
  np.testing.assert_array_equal(nd[rel < 0], 0.0)   # future keys: distance 0
  for i in range(1, 64):
    assert np.all(np.diff(nd[i, :i + 1][::-1]) > 0)
  np.testing.assert_allclose(nd[16:, 0], 1.0, rtol=1e-5)
  assert np.all(nd[:16, 0] < 1.0)
  # Extrapolation: a query at 1000 still maps its whole context into [0, 1].
  far = _np(pe.fire_bias(_linear_mlp([1.0]), 0.1, 16.0, jnp.array([1000]),
                         jnp.arange(1001)))
  assert far.max() <= 1 + 1e-6 and abs(far[0, 0, 0] - 1) < 1e-5


def test_fire_bias_real_mlp_batched_and_differentiable():
  rng = np.random.default_rng(1)
  w1 = rng.normal(size=(1, 8)).astype(np.float32)
  w2 = rng.normal(size=(8, 3)).astype(np.float32)

  def mlp(x):
    return jax.nn.relu(x @ w1) @ w2

  q = jnp.array([[0, 1, 2, 3], [5, 6, 7, 8]])
  bias = pe.fire_bias(mlp, 0.1, 2.0, q, q)
  assert bias.shape == (2, 3, 4, 4)
  np.testing.assert_allclose(_np(bias[1]),
                             _np(pe.fire_bias(mlp, 0.1, 2.0, q[1], q[1])),
                             rtol=1e-6)

  def loss(c, threshold):
    return jnp.sum(pe.fire_bias(mlp, c, threshold, q[1], q[1]) ** 2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(0.1, 20.0)
  assert all(np.isfinite(_np(g)) and _np(g) != 0 for g in grads)


def test_fire_rejects_bad_arguments():
  q, k = pe.default_positions(2, 2)
  mlp = _linear_mlp([1.0])
  with pytest.raises(ValueError, match=r"c must be a scalar, got shape \(2,\)"):
    pe.fire_bias(mlp, jnp.ones(2), 1.0, q, k)
  with pytest.raises(ValueError,
                     match=r"threshold must be a scalar, got shape \(1,\)"):
    pe.fire_bias(mlp, 1.0, jnp.ones(1), q, k)
  with pytest.raises(ValueError,
                     match="eps must be a finite number > 0, got 0.0"):
    pe.fire_bias(mlp, 1.0, 1.0, q, k, eps=0.0)
  with pytest.raises(ValueError, match="mlp must be callable"):
    pe.fire_bias(None, 1.0, 1.0, q, k)
  with pytest.raises(ValueError,
                     match=r"mlp must map .*returned shape \(2, 2\)"):
    pe.fire_bias(lambda x: x[..., 0], 1.0, 1.0, q, k)


# Sinusoidal.


def test_sinusoidal_golden_against_paper_formula():
  dim, positions = 16, np.arange(64)
  expected = np.zeros((64, dim))
  for i in range(dim // 2):
    expected[:, 2 * i] = np.sin(positions / 10000 ** (2 * i / dim))
    expected[:, 2 * i + 1] = np.cos(positions / 10000 ** (2 * i / dim))
  got = pe.sinusoidal_embedding(jnp.asarray(positions), dim)
  assert got.shape == (64, dim) and got.dtype == jnp.float32
  np.testing.assert_allclose(_np(got), expected, atol=2e-5)
  np.testing.assert_array_equal(_np(got[0]), [0.0, 1.0] * (dim // 2))
  np.testing.assert_allclose(_np(got[1, :2]), [math.sin(1), math.cos(1)],
                             rtol=1e-6)
  other_base = pe.sinusoidal_embedding(jnp.array([3]), 4, base=100.0)
  np.testing.assert_allclose(
      _np(other_base[0]),
      [math.sin(3), math.cos(3), math.sin(0.3), math.cos(0.3)], rtol=1e-6)


def test_sinusoidal_dot_product_depends_only_on_offset():
  emb = _np(pe.sinusoidal_embedding(jnp.arange(300), 64))
  for offset in (0, 1, 7, 50):
    dots = np.sum(emb[:200] * emb[offset:200 + offset], axis=-1)
    np.testing.assert_allclose(dots, dots[0], atol=2e-4)
  # ... and differs between offsets.
  assert abs(np.dot(emb[10], emb[11]) - np.dot(emb[10], emb[60])) > 1


def test_sinusoidal_shapes_and_errors():
  assert pe.sinusoidal_embedding(jnp.zeros((2, 3), jnp.int32), 8).shape == (
      2, 3, 8)
  assert pe.sinusoidal_embedding(jnp.array(5.5), 4).shape == (4,)
  with pytest.raises(ValueError, match="dim must be even, got 7"):
    pe.sinusoidal_embedding(jnp.arange(3), 7)
  with pytest.raises(ValueError, match="dim must be >= 2, got 0"):
    pe.sinusoidal_embedding(jnp.arange(3), 0)
  with pytest.raises(ValueError,
                     match="base must be a finite number > 0, got -1.0"):
    pe.sinusoidal_embedding(jnp.arange(3), 4, base=-1.0)


# Randomized positions.


def test_randomized_positions_basic_properties():
  key = jax.random.key(0)
  pos = pe.randomized_positions(key, 16, 1024, batch_shape=(4, 64))
  assert pos.shape == (4, 64, 16) and pos.dtype == jnp.int32
  p = _np(pos)
  assert np.all(np.diff(p, axis=-1) > 0)   # sorted, distinct
  assert p.min() >= 0 and p.max() < 1024
  rows = p.reshape(-1, 16)
  assert len({tuple(row) for row in rows.tolist()}) == 256   # rows differ
  # Deterministic per key, different across keys.
  np.testing.assert_array_equal(
      p, _np(pe.randomized_positions(key, 16, 1024, batch_shape=(4, 64))))
  other = _np(pe.randomized_positions(jax.random.key(1), 16, 1024,
                                      batch_shape=(4, 64)))
  assert not np.array_equal(p, other)
  # Large values are reached: the model sees positions far beyond 16.
  assert rows[:, -1].max() > 1010 and np.median(rows[:, -1]) > 900
  # Uniform subsets: each eighth of the range holds an eighth of the draws
  # (4096 draws, sd about 0.005).
  fractions = np.bincount(rows.reshape(-1) // 128, minlength=8) / rows.size
  np.testing.assert_allclose(fractions, 1 / 8, atol=0.025)
  full = _np(pe.randomized_positions(jax.random.key(0), 5, 5))
  np.testing.assert_array_equal(full, np.arange(5))


def test_randomized_positions_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError,
                     match=r"seq_len must be <= max_len \(8\), got seq_len=9"):
    pe.randomized_positions(key, 9, 8)
  with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
    pe.randomized_positions(key, 0, 8)
  with pytest.raises(ValueError,
                     match="batch_shape entry must be >= 0, got -2"):
    pe.randomized_positions(key, 2, 8, batch_shape=(-2,))


# Self-Extend.


def _self_extend_distance(i, j, group_size, window):
  """The relative distance Self-Extend's attention applies to pair (i, j)."""
  far_q, _ = pe.self_extend_positions(jnp.asarray(i), group_size=group_size,
                                      window=window)
  _, far_k = pe.self_extend_positions(jnp.asarray(j), group_size=group_size,
                                      window=window)
  rel = np.asarray(i)[:, None] - np.asarray(j)[None, :]
  grouped = _np(far_q)[:, None] - _np(far_k)[None, :]
  return np.where(rel < window, rel, grouped), rel


def test_self_extend_golden():
  far_q, far_k = pe.self_extend_positions(jnp.arange(20), group_size=4,
                                          window=8)
  assert far_q.dtype == jnp.int32 and far_k.dtype == jnp.int32
  np.testing.assert_array_equal(_np(far_k), np.arange(20) // 4)
  np.testing.assert_array_equal(_np(far_q), np.arange(20) // 4 + 6)
  # Batched positions keep their shape.
  q2, k2 = pe.self_extend_positions(jnp.array([[0, 9], [16, 17]]),
                                    group_size=3, window=5)
  np.testing.assert_array_equal(_np(k2), [[0, 3], [5, 5]])
  np.testing.assert_array_equal(_np(q2), [[4, 7], [9, 9]])   # + 5 - 5 // 3


@pytest.mark.parametrize("group_size, window", [(4, 8), (8, 64), (1, 10),
                                                (3, 8), (5, 7)])
def test_self_extend_distance_properties(group_size, window):
  n = 200
  dist, rel = _self_extend_distance(np.arange(n), np.arange(n), group_size,
                                    window)
  for i in range(n):
    row = dist[i, :i + 1][::-1]   # true distance 0 .. i
    assert np.all(np.diff(row) >= 0), (i, row)
    if i >= window:
      if window % group_size == 0:
        # Continuous: neighbour distances end at window - 1, grouped start
        # at exactly window.
        assert row[window] == window and row[window - 1] == window - 1
      else:
        assert row[window] in (window, window + 1)
  causal = rel >= 0
  assert dist[causal].max() <= (n - 1) // group_size + window
  if window % group_size == 0:
    assert np.all(dist[causal] <= rel[causal])   # never stretches a distance
  np.testing.assert_array_equal(dist[causal & (rel < window)],
                                rel[causal & (rel < window)])


def test_self_extend_group_size_one_is_identity():
  d, rel = _self_extend_distance(np.arange(50), np.arange(50), 1, 10)
  np.testing.assert_array_equal(d[rel >= 0], rel[rel >= 0])


def test_self_extend_errors():
  with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
    pe.self_extend_positions(jnp.arange(4), group_size=0, window=4)
  with pytest.raises(ValueError, match="window must be >= 0, got -1"):
    pe.self_extend_positions(jnp.arange(4), group_size=2, window=-1)
  with pytest.raises(ValueError, match="positions must have an integer dtype"):
    pe.self_extend_positions(jnp.arange(4.0), group_size=2, window=4)


# Length-dependent logit scaling.


def test_length_logit_scale_goldens():
  pos = jnp.array([0, 3, 15])
  np.testing.assert_allclose(
      _np(pe.length_logit_scale(pos, 4, min_scale=None)), [0.0, 1.0, 2.0],
      rtol=1e-6)
  out = pe.length_logit_scale(pos, 4)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(_np(out), [1.0, 1.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(
      _np(pe.length_logit_scale(pos, 4, min_scale=0.5)), [0.5, 1.0, 2.0],
      rtol=1e-6)


def test_length_logit_scale_matches_qwen_logn():
  train = 16
  # Qwen: logn_list[i] = log(i, seq_length) if i > seq_length else 1, indexed
  # by 1-based position i = p + 1.
  expected = [math.log(p + 1, train) if p + 1 > train else 1.0
              for p in range(300)]
  got = pe.length_logit_scale(jnp.arange(300), train)
  np.testing.assert_allclose(_np(got), expected, rtol=1e-6)
  assert pe.length_logit_scale(jnp.zeros((2, 5)), train).shape == (2, 5)


def test_length_logit_scale_errors():
  with pytest.raises(ValueError, match="train_len must be >= 2, got 1"):
    pe.length_logit_scale(jnp.arange(3), 1)
  with pytest.raises(ValueError,
                     match="min_scale must be a finite number, got nan"):
    pe.length_logit_scale(jnp.arange(3), 8, min_scale=float("nan"))


# jit.


def test_biases_under_jit():
  q, k = pe.default_positions(5, 7)
  slopes = pe.alibi_slopes(2)
  table = jnp.arange(64.0).reshape(32, 2)

  def all_biases(q, k, slopes, table):
    return (pe.alibi_bias(slopes, q, k),
            pe.t5_bias(table, q, k, bidirectional=False, num_buckets=32,
                       max_distance=128),
            pe.kerple_log_bias(slopes, slopes, q, k),
            pe.fire_bias(_linear_mlp([1.0, 2.0]), 0.1, 3.0, q, k),
            pe.length_logit_scale(q, 4),
            pe.self_extend_positions(q, group_size=2, window=2)[0])

  eager = all_biases(q, k, slopes, table)
  for a, b in zip(eager, jax.jit(all_biases)(q, k, slopes, table)):
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-6)
