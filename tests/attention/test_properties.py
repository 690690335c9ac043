"""Properties every implementation has, whatever the inputs.

* The gradient across every forbidden (query, key) pair is exactly zero.
* A query row that sees no key gives zeros, lse -inf and finite gradients.
* jit equals no-jit.
* Automatic dispatch picks a working implementation and falls through.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax import attention
from extrapolax.attention import core, masks
from tests.attention import oracle
from tests.attention.suite import IMPLEMENTATIONS, assert_close
from tests.attention.test_implementations import make_case, packed_segments


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mask", [masks.Causal(), masks.Lambda(2, 5),
                                  masks.Causal() & masks.Chunked(6)], ids=str)
def test_zero_gradient_across_forbidden_pairs(implementation, mask):
  b, t, n, k, h = 2, 24, 2, 1, 4
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(2, b, t, k, h)), jnp.float32)
  seg = packed_segments(rng, b, t, 7)
  # Each output row projected on fixed random weights over (head, dim): a
  # pair's gradient through the projection is zero exactly where every
  # entry's is (barring a measure-zero cancellation), and the Jacobian needs
  # B * T cotangents instead of B * T * N * H.
  weights = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)

  def out_of(key, value):
    out = attention.dot_product_attention(
        q, key, value, mask=mask, segment_ids=seg, alibi_slopes=jnp.ones(n),
        implementation=implementation)
    return jnp.einsum("btnh,nh->bt", out, weights)

  # d out[b, t] / d key[b', s] and d value[b', s] for every pair.
  jac_k, jac_v = jax.jit(jax.jacrev(out_of, argnums=(0, 1)))(kv[0], kv[1])
  for jac in (jac_k, jac_v):
    per_pair = np.abs(np.asarray(jac)).sum(axis=(4, 5))  # [B, T, B, S]
    assert np.isfinite(per_pair).all()
    for bq in range(b):
      for bk in range(b):
        pairs = per_pair[bq, :, bk, :]
        if bq != bk:
          assert (pairs == 0).all(), "gradient crosses batch rows"
          continue
        vis = oracle.visible(mask, np.arange(t)[:, None], np.arange(t)[None])
        vis &= seg[bq][:, None] == seg[bq][None, :]
        assert (pairs[~vis] == 0).all(), "gradient through a forbidden pair"
        # The value gradient of a visible pair is a softmax weight: > 0.
        if jac is jac_v:
          assert (pairs[vis] > 0).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rows_that_see_nothing(implementation):
  # T > S with a causal mask: the first T - S queries sit before every key;
  # and a query whose segment id no key has.
  b, t, s, n, h = 1, 12, 7, 2, 4
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
             for shape in ((b, t, n, h), (b, s, n, h), (b, s, n, h)))
  q_seg = np.zeros((b, t), np.int32)
  q_seg[0, -1] = 5            # the last query's document has no key
  kv_seg = np.zeros((b, s), np.int32)

  def f(q, k, v):
    return attention.dot_product_attention(
        q, k, v, mask=masks.Causal(), segment_ids=(q_seg, kv_seg),
        implementation=implementation, return_residuals=True)

  out, lse = jax.jit(f)(q, k, v)
  empty = np.zeros(t, bool)
  empty[:t - s] = True
  empty[-1] = True
  assert (np.asarray(out)[0, empty] == 0).all()
  assert np.isneginf(np.asarray(lse)[0][:, empty]).all()
  assert np.isfinite(np.asarray(lse)[0][:, ~empty]).all()
  assert (np.abs(np.asarray(out)[0, ~empty]).sum(-1) > 0).all()
  grads = jax.jit(jax.grad(lambda *a: f(*a)[0].sum(), argnums=(0, 1, 2)))(
      q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  assert (np.asarray(grads[0])[0, empty] == 0).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_equals_no_jit(implementation):
  case = make_case(7, t=19, s=23, mask=masks.Lambda(2, 6), packed=5,
                   alibi=True)
  args = (jnp.asarray(case.q, jnp.float32), jnp.asarray(case.k, jnp.float32),
          jnp.asarray(case.v, jnp.float32))

  def f(q, k, v):
    return attention.dot_product_attention(
        q, k, v, mask=case.mask, segment_ids=(case.q_seg, case.kv_seg),
        alibi_slopes=jnp.asarray(case.slopes, jnp.float32),
        implementation=implementation)

  eager = f(*args)
  jitted = jax.jit(f)(*args)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted),
                             rtol=1e-6, atol=1e-6)


def _qkv(t=16, s=16):
  rng = np.random.default_rng(2)
  return [jnp.asarray(rng.normal(size=(1, n, 2, 8)), jnp.float32)
          for n in (t, s, s)]


def _first_two():
  q, k, v = _qkv()
  request = core.make_request(q, k, v, mask=masks.Causal())
  return tuple(core._auto_candidates(request))[:2]


def test_auto_matches_oracle():
  q, k, v = _qkv()
  auto = attention.dot_product_attention(q, k, v, mask=masks.Causal())
  want, _, _ = oracle.forward_and_grad(oracle.Case(
      q=np.asarray(q), k=np.asarray(k), v=np.asarray(v), mask=masks.Causal()))
  assert_close(auto, want, 2e-5, "auto")
  if jax.default_backend() == "cpu":
    assert _first_two() == ("xla_chunked", "xla")


def test_auto_falls_through(monkeypatch):
  """An implementation raising NotImplementedError hands over to the next."""
  first, second = _first_two()
  tried = []

  class Refuses(core.Implementation):
    name = "refuses"

    def __call__(self, request):
      tried.append(self.name)
      raise NotImplementedError("not today")

  monkeypatch.setitem(core._REGISTRY, first, Refuses)
  q, k, v = _qkv()
  out = attention.dot_product_attention(q, k, v, mask=masks.Causal())
  assert tried == ["refuses"]
  want, _, _ = oracle.forward_and_grad(oracle.Case(
      q=np.asarray(q), k=np.asarray(k), v=np.asarray(v), mask=masks.Causal()))
  assert_close(out, want, 2e-5, f"fell through to {second}")
  # Nothing left: a clear NotImplementedError listing every refusal.
  for name in core._AUTO_ORDER[jax.default_backend()]:
    monkeypatch.setitem(core._REGISTRY, name, Refuses)
  with pytest.raises(NotImplementedError, match="not today"):
    attention.dot_product_attention(q, k, v)


def test_auto_never_picks_dense_for_long_sequences(monkeypatch):
  monkeypatch.setattr(core, "DENSE_AUTO_LIMIT", 100)
  q, k, v = _qkv()
  request = core.make_request(q, k, v, mask=masks.Causal())
  assert "xla" not in core._auto_candidates(request)
  assert "xla_chunked" in core._auto_candidates(request)


def test_explicit_unavailable_implementation_raises():
  if jax.default_backend() == "gpu":
    pytest.skip("cuDNN is available here")
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="cudnn"):
    attention.dot_product_attention(q, k, v, implementation="cudnn")


@pytest.mark.parametrize("name", ["pallas_gpu", "pallas_tpu"])
def test_kernels_refuse_a_dense_bias(name):
  q, k, v = _qkv()
  bias = jnp.ones((1, 1, q.shape[1], k.shape[1]))
  with pytest.raises(NotImplementedError, match=f"{name} does not take"):
    attention.dot_product_attention(q, k, v, bias=bias, implementation=name)


def test_registered_names():
  assert set(attention.implementations()) >= {
      "xla", "xla_chunked", "cudnn", "pallas_gpu", "pallas_tpu"}


@pytest.mark.gpu
def test_cudnn_matches_oracle_on_gpu():
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 256, 4, 64)), jnp.bfloat16)
             for _ in range(3))
  for mask in (None, masks.Causal(), masks.SlidingWindow(64)):
    got = attention.dot_product_attention(q, k, v, mask=mask,
                                          implementation="cudnn")
    want = attention.dot_product_attention(q, k, v, mask=mask,
                                           implementation="xla")
    assert_close(got, np.asarray(want, np.float32), 2e-2, f"cudnn {mask}")
