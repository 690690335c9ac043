"""The nnx Attention layer on its own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax import attention
from extrapolax.attention import layer as L
from extrapolax.attention import masks, rope
from tests.attention import oracle

D = 32
SCHEMES = [L.NoPE(), L.Rope(), L.Rope(layout="interleaved",
                                      partial_rotary_factor=0.5),
           L.Rope(rope_scaling={"rope_type": "linear", "factor": 2.0}),
           L.Alibi(), L.T5Bias(num_buckets=8, max_distance=16), L.Kerple(),
           L.Fire(hidden=8)]


def make(position=L.NoPE(), **kwargs):
  kwargs.setdefault("num_kv_heads", 2)
  return L.Attention(D, 4, position=position, rngs=nnx.Rngs(0), **kwargs)


def x_of(b=2, t=13, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, t, D))


def test_matches_a_hand_written_forward_with_rope():
  layer = make(L.Rope(base=500.0))
  x = x_of()
  got = layer(x)
  wq = np.asarray(layer.q_proj.kernel[...])        # [D, N, H]
  wk = np.asarray(layer.k_proj.kernel[...])        # [D, K, H]
  wv = np.asarray(layer.v_proj.kernel[...])
  wo = np.asarray(layer.o_proj.kernel[...])        # [N, H, D]
  xn = np.asarray(x, np.float64)
  q, k, v = (np.einsum("btd,dnh->btnh", xn, w) for w in (wq, wk, wv))
  inv_freq, _ = rope.rope_frequencies(8, base=500.0)
  pos = np.arange(x.shape[1])
  q = np.asarray(rope.apply_rope(jnp.asarray(q, jnp.float32), pos, inv_freq))
  k = np.asarray(rope.apply_rope(jnp.asarray(k, jnp.float32), pos, inv_freq))
  out, _, _ = oracle.forward_and_grad(oracle.Case(q=q, k=k, v=v,
                                                  mask=masks.Causal()))
  want = np.einsum("btnh,nhd->btd", out, wo)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("position", SCHEMES, ids=repr)
def test_packed_row_equals_documents_alone(position):
  layer = make(position)
  lengths = [5, 1, 9, 4]
  docs = [x_of(1, n, seed=i) for i, n in enumerate(lengths)]
  packed = jnp.concatenate(docs, axis=1)
  seg = np.repeat(np.arange(len(lengths)), lengths)[None]
  pos = np.concatenate([np.arange(n) for n in lengths])[None]
  got = layer(packed, positions=pos, segment_ids=seg)
  want = jnp.concatenate([layer(d) for d in docs], axis=1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5,
                             atol=2e-6)


@pytest.mark.parametrize("position", SCHEMES, ids=repr)
def test_causal_and_learned_parameters_get_gradients(position):
  layer = make(position)
  x = x_of(1, 10)
  # Output row 4 depends on no later input row.
  grad_x = jax.grad(lambda x: layer(x)[0, 4].sum())(x)
  assert (np.asarray(grad_x)[0, 5:] == 0).all()
  assert (np.abs(np.asarray(grad_x)[0, :5]).sum(-1) > 0).all()
  grads = nnx.grad(lambda m: (m(x) ** 2).sum())(layer)
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
  assert leaves
  for path, g in leaves:
    assert np.isfinite(np.asarray(g)).all(), path
    assert np.abs(np.asarray(g)).sum() > 0, f"no gradient for {path}"


@pytest.mark.parametrize("position", [L.Rope(), L.Alibi()], ids=repr)
def test_implementations_agree_inside_the_layer(position):
  x = x_of(2, 21)
  dense = make(position, mask=masks.Lambda(2, 5), implementation="xla")(x)
  chunked = make(position, mask=masks.Lambda(2, 5),
                 implementation=attention.XlaChunked(8, 8))(x)
  np.testing.assert_allclose(np.asarray(dense), np.asarray(chunked),
                             rtol=1e-5, atol=1e-6)


def test_grouped_query_parameter_shapes():
  layer = make(num_kv_heads=1)
  assert layer.q_proj.kernel[...].shape == (D, 4, 8)
  assert layer.k_proj.kernel[...].shape == (D, 1, 8)
  assert layer.o_proj.kernel[...].shape == (4, 8, D)


def test_self_extend_with_group_one_is_plain_rope():
  x = x_of(1, 20)
  plain = make(L.Rope())(x)
  extended = make(L.Rope(self_extend=(1, 6)))(x)
  np.testing.assert_allclose(np.asarray(plain), np.asarray(extended),
                             rtol=1e-5, atol=1e-6)
  # With real grouping, rows whose keys are all inside the window agree and
  # later rows change.
  grouped = np.asarray(make(L.Rope(self_extend=(4, 6)))(x))
  np.testing.assert_allclose(grouped[0, :6], np.asarray(plain)[0, :6],
                             rtol=1e-5, atol=1e-6)
  assert np.abs(grouped[0, 6:] - np.asarray(plain)[0, 6:]).max() > 1e-4


def test_distance_ceiling_rescores_only_far_sinks():
  x = x_of(1, 24)
  mask = masks.Lambda(2, 6)
  plain = np.asarray(make(L.Rope(), mask=mask)(x))
  ceiling = np.asarray(make(L.Rope(distance_ceiling=6), mask=mask)(x))
  # Rows 0..5 see the sinks inside the window: unchanged.
  np.testing.assert_allclose(ceiling[0, :6], plain[0, :6], rtol=1e-5,
                             atol=1e-6)
  assert np.abs(ceiling[0, 7:] - plain[0, 7:]).max() > 1e-4


def test_length_scaling_is_identity_inside_training_length():
  x = x_of(1, 16)
  plain = np.asarray(make(L.Rope())(x))
  scaled = np.asarray(make(L.Rope(), length_scaling=8)(x))
  np.testing.assert_allclose(scaled[0, :8], plain[0, :8], rtol=1e-5, atol=1e-6)
  assert np.abs(scaled[0, 8:] - plain[0, 8:]).max() > 1e-5


def test_learned_position_embedding_cannot_extrapolate():
  emb = L.LearnedPositionEmbedding(16, 4, rngs=nnx.Rngs(0))
  assert emb(jnp.arange(16)).shape == (16, 4)
  with pytest.raises(ValueError, match="position 16 is past the learned table"):
    emb(jnp.arange(17))
  traced = jax.jit(emb.__call__)(jnp.arange(20))
  assert np.isnan(np.asarray(traced)[16:]).all()
  assert np.isfinite(np.asarray(traced)[:16]).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
    (dict(position="ropee"), "position must be one of .* got 'ropee' \\(did you mean 'rope'"),
    (dict(position=3), "position must be a PositionScheme"),
    (dict(position=L.Rope(distance_ceiling=4)), "needs a Lambda mask"),
    (dict(length_scaling=1), "length_scaling must be >= 2, got 1"),
    (dict(position=L.Rope(rope_scaling={"rope_type": "linear"})), "factor"),
])
def test_layer_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layout="gptj"), "layout must be one of"),
    (dict(self_extend=(0, 4)), "self_extend group_size must be >= 1, got 0"),
    (dict(self_extend=(2, 4), distance_ceiling=8), "choose one"),
])
def test_rope_scheme_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    L.Rope(**kwargs)
