"""The shared suite: every implementation against the float64 numpy oracle.

Forward output, log-sum-exp and the gradients of every float input, on random
inputs (never zeros): odd lengths, T != S, grouped-query, every mask and
combinations, random packed segment layouts, ALiBi, dense biases of several
broadcast shapes, soft cap, explicit positions, the far (distance-ceiling)
query, float32 and bfloat16.
"""

import zlib

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax import attention
from extrapolax.attention import masks
from tests.attention import oracle
from tests.attention.suite import (IMPLEMENTATIONS, NO_DENSE_BIAS, TOLERANCE,
                                   assert_close, skip_unserved)


def packed_segments(rng, batch, length, mean_len):
  """Random document layout per row: ids 0, 1, 2, ... in contiguous runs."""
  rows = []
  for _ in range(batch):
    ids, doc = [], 0
    while len(ids) < length:
      ids += [doc] * max(1, int(rng.exponential(mean_len)))
      doc += 1
    rows.append(ids[:length])
  return np.asarray(rows, np.int32)


def make_case(seed, *, b=2, t=21, s=None, n=4, k=2, h=8, hv=None, mask=None,
              packed=None, alibi=False, bias_shape=None, soft_cap=None,
              far_window=None, explicit_positions=False, scale=None):
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  hv = h if hv is None else hv
  case = oracle.Case(
      q=rng.normal(size=(b, t, n, h)), k=rng.normal(size=(b, s, k, h)),
      v=rng.normal(size=(b, s, k, hv)), mask=mask, scale=scale,
      soft_cap=soft_cap)
  if packed is not None:
    kv_seg = packed_segments(rng, b, s, packed)
    case.kv_seg = kv_seg
    case.q_seg = kv_seg[:, s - t:] if t <= s else np.concatenate(
        [np.full((b, t - s), -1, np.int32), kv_seg], axis=1)
  if alibi:
    # Power-of-two ALiBi slopes, jittered so that heads differ more.
    case.slopes = 2.0 ** (-8.0 * np.arange(1, n + 1) / n) * rng.uniform(
        0.5, 2.0, size=(n,))
  if bias_shape is not None:
    case.bias = rng.normal(size=bias_shape)
  if far_window is not None:
    case.far_q = rng.normal(size=case.q.shape)
    case.far_k = rng.normal(size=case.k.shape)
    case.far_window = far_window
  if explicit_positions:
    # A rolling-buffer-like layout: keys out of order, queries after them.
    case.k_pos = np.stack([rng.permutation(s) for _ in range(b)]).astype(
        np.int32)
    case.q_pos = (np.arange(t) + rng.integers(0, s, size=(b, 1))).astype(
        np.int32)
  return case


def run(case, implementation, dtype=jnp.float32, grads=True):
  """Runs ``implementation`` on ``case``; returns out, lse and gradients."""
  rng = np.random.default_rng(1234)
  b, t, n, _ = case.q.shape
  hv = case.v.shape[-1]
  d_out = rng.normal(size=(b, t, n, hv))
  d_lse = rng.normal(size=(b, n, t))
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  diff = dict(q=cast(case.q), k=cast(case.k), v=cast(case.v),
              far_q=cast(case.far_q), far_k=cast(case.far_k),
              slopes=None if case.slopes is None else jnp.asarray(
                  case.slopes, jnp.float32),
              bias=cast(case.bias))
  diff = {name: x for name, x in diff.items() if x is not None}
  segs = None if case.q_seg is None else (case.q_seg, case.kv_seg)

  def f(d):
    return attention.dot_product_attention(
        d["q"], d["k"], d["v"], mask=case.mask, segment_ids=segs,
        alibi_slopes=d.get("slopes"), bias=d.get("bias"), scale=case.scale,
        logits_soft_cap=case.soft_cap, implementation=implementation,
        return_residuals=True, query_positions=case.q_pos,
        key_positions=case.k_pos, far_query=d.get("far_q"),
        far_key=d.get("far_k"), far_window=case.far_window)

  def loss(d):
    out, lse = f(d)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return (jnp.sum(out.astype(jnp.float32) * d_out)
            + jnp.sum(lse * d_lse))

  # One compilation per case: eager op-by-op dispatch costs far more.
  (out, lse), g = jax.jit(
      lambda d: (f(d), jax.grad(loss)(d) if grads else None))(diff)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert lse.shape == (b, n, t)
  want_out, want_lse, want_g = oracle.forward_and_grad(
      case, d_out if grads else None, d_lse)
  return (out, lse, g), (want_out, want_lse, want_g)


def check(case, implementation, dtype=jnp.float32, grads=True):
  (out, lse, g), (want_out, want_lse, want_g) = run(
      case, implementation, dtype, grads)
  tol = TOLERANCE[dtype]
  assert_close(out, want_out, tol["fwd"], "out")
  assert_close(lse, want_lse, tol["fwd"], "lse")
  if grads:
    for name, grad in g.items():
      assert np.isfinite(np.asarray(grad, np.float32)).all(), name
      assert_close(grad, want_g[name], tol["grad"], f"d{name}")


# Each scenario: (id, make_case kwargs). Chosen to cover every mask, the
# combinations, every optional input, and T != S both ways.
SCENARIOS = [
    ("none", dict()),
    ("causal", dict(mask=masks.Causal())),
    ("causal_T<S", dict(t=13, s=41, mask=masks.Causal())),
    ("causal_T>S_empty_rows", dict(t=29, s=17, mask=masks.Causal())),
    ("window", dict(t=37, mask=masks.SlidingWindow(5))),
    ("window_1", dict(t=19, mask=masks.SlidingWindow(1))),
    ("lambda", dict(t=43, mask=masks.Lambda(3, 7))),
    ("lambda_no_sinks", dict(t=23, s=40, mask=masks.Lambda(0, 9))),
    ("chunked_causal", dict(t=35, mask=masks.Causal() & masks.Chunked(8))),
    ("chunked_bidir", dict(t=30, mask=masks.Chunked(7))),
    ("prefix_lm", dict(t=27, mask=masks.PrefixLM(10))),
    ("window_or_chunk", dict(
        t=41, mask=masks.Causal() & (masks.SlidingWindow(4) |
                                     masks.Chunked(16)))),
    ("lambda_and_window", dict(
        t=33, mask=masks.Lambda(2, 12) & masks.SlidingWindow(20))),
    ("packed_causal", dict(t=47, mask=masks.Causal(), packed=6)),
    ("packed_short_docs", dict(t=33, mask=masks.Causal(), packed=1.5)),
    ("packed_long_doc", dict(t=40, mask=masks.Causal(), packed=60)),
    ("packed_T<S", dict(t=11, s=38, mask=masks.Causal(), packed=8)),
    ("packed_window", dict(t=39, mask=masks.SlidingWindow(6), packed=10)),
    ("packed_no_mask", dict(t=25, packed=7)),
    ("alibi_causal", dict(t=31, n=6, k=3, mask=masks.Causal(), alibi=True)),
    ("alibi_bidir", dict(t=22, n=4, k=4, alibi=True)),
    ("bias_full", dict(t=18, s=26, mask=masks.Causal(), bias_shape=(2, 4, 18, 26))),
    ("bias_heads", dict(t=23, bias_shape=(1, 4, 23, 23))),
    ("bias_keys", dict(t=17, s=30, mask=masks.Causal(), bias_shape=(2, 1, 1, 30))),
    ("bias_3d", dict(t=20, bias_shape=(4, 1, 20))),
    ("soft_cap", dict(t=29, mask=masks.Causal(), soft_cap=2.0, scale=1.5)),
    ("far_lambda", dict(t=45, mask=masks.Lambda(3, 8), far_window=8)),
    ("far_causal_selfextend", dict(t=36, mask=masks.Causal(), far_window=5,
                                   alibi=True, soft_cap=3.0)),
    ("explicit_positions", dict(t=7, s=33, mask=masks.SlidingWindow(12),
                                explicit_positions=True)),
    ("mqa_head_dims", dict(t=26, n=6, k=1, h=16, hv=12, mask=masks.Causal())),
    ("everything", dict(t=38, s=44, n=6, k=2, mask=masks.Lambda(4, 10),
                        packed=12, alibi=True, bias_shape=(1, 6, 38, 44),
                        soft_cap=5.0, far_window=10)),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name,kwargs", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_matches_oracle_float32(implementation, name, kwargs):
  skip_unserved(implementation, "bias_shape" in kwargs)
  check(make_case(zlib.crc32(name.encode()), **kwargs), implementation)


BF16_SCENARIOS = ["causal", "lambda", "packed_causal", "alibi_causal",
                  "soft_cap", "far_lambda"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", BF16_SCENARIOS)
def test_matches_oracle_bfloat16(implementation, name):
  kwargs = dict(SCENARIOS)[name]
  case = make_case(zlib.crc32(name.encode()) + 1, **kwargs)
  # The oracle sees the same bf16-rounded inputs the implementation sees.
  for field in ("q", "k", "v", "far_q", "far_k"):
    x = getattr(case, field)
    if x is not None:
      setattr(case, field, np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64))
  check(case, implementation, dtype=jnp.bfloat16)


_MASKS = st.sampled_from([
    None, masks.Causal(), masks.SlidingWindow(3), masks.SlidingWindow(11),
    masks.Lambda(2, 5), masks.Lambda(0, 4), masks.Causal() & masks.Chunked(6),
    masks.PrefixLM(5), masks.Chunked(9) | masks.SlidingWindow(4)])


_SHAPES = dict(
    b=st.integers(1, 2), t=st.integers(1, 40), s=st.integers(1, 40),
    k=st.integers(1, 2), g=st.integers(1, 3), h=st.sampled_from([4, 8]),
    mask=_MASKS, packed=st.one_of(st.none(), st.floats(1.0, 30.0)),
    alibi=st.booleans(), seed=st.integers(0, 2**16))
_XLA = [p for p in IMPLEMENTATIONS if not isinstance(p.values[0], NO_DENSE_BIAS)]
_KERNELS = [p for p in IMPLEMENTATIONS if isinstance(p.values[0], NO_DENSE_BIAS)]


def _hypothesis_case(implementation, b, t, s, k, g, h, mask, packed, alibi,
                     seed):
  case = make_case(seed, b=b, t=t, s=s, n=k * g, k=k, h=h, mask=mask,
                   packed=packed, alibi=alibi)
  check(case, implementation)


# Every example compiles a new shape. The dense oracle path and the
# host-listed 8x16 blocks (ragged blocks, skipping) run the profile's count;
# the other block layouts (16x8, pairs listed on the device, the default
# one-block-at-test-sizes) half of it, at least 6.
_HALF = ("xla_chunked-16x8", "xla_chunked-8x16-device", "xla_chunked-default")


@pytest.mark.parametrize("implementation",
                         [p for p in _XLA if p.id not in _HALF])
@hypothesis.given(**_SHAPES)
def test_hypothesis_shapes_and_segments(implementation, **kwargs):
  _hypothesis_case(implementation, **kwargs)


@pytest.mark.parametrize("implementation", [p for p in _XLA if p.id in _HALF])
@hypothesis.settings(max_examples=max(
    6, hypothesis.settings().max_examples // 2))
@hypothesis.given(**_SHAPES)
def test_hypothesis_other_block_layouts(implementation, **kwargs):
  _hypothesis_case(implementation, **kwargs)


# Interpret-mode kernels compile every new shape (seconds each): fewer
# examples: a quarter of the profile's count, at least 6.
@pytest.mark.parametrize("implementation", _KERNELS)
@hypothesis.settings(max_examples=max(
    6, hypothesis.settings().max_examples // 4))
@hypothesis.given(**_SHAPES)
def test_hypothesis_kernels(implementation, **kwargs):
  _hypothesis_case(implementation, **kwargs)


def test_scenario_names_are_unique():
  names = [name for name, _ in SCENARIOS]
  assert len(names) == len(set(names))
