"""Context-parallel attention with relative biases (``position_bias``).

ContextParallel passes a T5 / Kerple / FIRE bias to each device's call with
that shard pair's global positions: evaluated per tile by xla_chunked, or
materialised as the pair's [L, L] block (ring) for an inner implementation
that does not take it; never the global [T, T] matrix. Checked against the
float64 oracle given the dense bias (test_context_parallel's meshes and
inputs: B = 2, T = 64, 8 host devices): forward, lse and the gradients of q,
k, v and of every bias parameter (the oracle's dense bias gradient chained
through the bias function), so a parameter gradient summed over the context
axis twice, or not at all, fails.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from flax import nnx

from extrapolax import attention
from extrapolax.attention import core
from extrapolax.attention import layer as attn_layer
from extrapolax.attention import context_parallel as cp
from extrapolax.attention import masks
from extrapolax.attention.xla_chunked import XlaChunked
from tests.attention import oracle
from tests.attention.suite import TOLERANCE, assert_close
from tests.attention.test_context_parallel import B, T, make_case, mesh_of
from tests.attention.test_relative_bias import make_bias

N = 4                                    # make_bias's heads; make_case's n
CHUNKED = XlaChunked(block_q=8, block_k=8)


def run(case, pb, implementation):
  """(out, lse, (dq, dk, dv, dpb)) and the oracle's, one jit for ours."""
  rng = np.random.default_rng(99)
  d_out = rng.normal(size=case.q.shape[:3] + (case.v.shape[-1],))
  d_lse = rng.normal(size=(B, N, T))
  segs = None if case.q_seg is None else (case.q_seg, case.kv_seg)

  def f(q, k, v, pb):
    return attention.dot_product_attention(
        q, k, v, mask=case.mask, segment_ids=segs, position_bias=pb,
        implementation=implementation, return_residuals=True,
        query_positions=case.q_pos, key_positions=case.k_pos)

  def loss(*args):
    out, lse = f(*args)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out * d_out) + jnp.sum(lse * d_lse)

  args = tuple(jnp.asarray(x, jnp.float32) for x in (case.q, case.k, case.v))
  (out, lse), grads = jax.jit(lambda *a: (
      f(*a), jax.grad(loss, argnums=(0, 1, 2, 3))(*a)))(*args, pb)

  qp, kp = case.positions()
  dense, dense_vjp = jax.vjp(lambda p: p.tile(jnp.asarray(qp),
                                              jnp.asarray(kp)), pb)
  ocase = dataclasses.replace(case, bias=np.asarray(dense, np.float64))
  o_out, o_lse, o_grads = oracle.forward_and_grad(ocase, d_out, d_lse)
  (o_dpb,) = dense_vjp(jnp.asarray(o_grads["bias"], jnp.float32))
  return (out, lse, grads), (o_out, o_lse, [o_grads[x] for x in "qkv"]
                             + [o_dpb])


def check(case, pb, implementation):
  (out, lse, grads), (o_out, o_lse, o_grads) = run(case, pb, implementation)
  tol = TOLERANCE[jnp.float32]
  assert_close(out, o_out, tol["fwd"], "out")
  assert_close(lse, o_lse, tol["fwd"], "lse")
  for name, got, want in zip("qkv", grads[:3], o_grads[:3]):
    assert_close(got, want, tol["grad"], f"d{name}")
  got_leaves = jax.tree.leaves(grads[3])
  want_leaves = jax.tree.leaves(o_grads[3])
  assert len(got_leaves) == len(want_leaves) == len(pb.param_names)
  for name, g, w in zip(pb.param_names, got_leaves, want_leaves):
    w = np.asarray(w, np.float64)
    assert np.abs(w).max() > 0, name          # the check has teeth
    assert_close(g, w, tol["grad"], f"d {name}")


KINDS = ("t5", "kerple_log", "fire")


@pytest.mark.parametrize("inner", [pytest.param(CHUNKED, id="per_tile"),
                                   pytest.param("xla", id="dense_pair")])
@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
@pytest.mark.parametrize("kind", KINDS)
def test_causal_matches_oracle(kind, strategy, inner):
  case = make_case(11, mask=masks.Causal())
  impl = attention.ContextParallel(inner, strategy=strategy,
                                   mesh=mesh_of("c8"))
  check(case, make_bias(kind, key=2), impl)


# id: (mesh, make_case arguments, bias kinds).
CASES = {
    # Lambda's sinks sent apart from the ring (plan.sinks = 5), the window
    # ringed over three shards.
    "lambda-sinks-c8": ("c8", dict(mask=masks.Lambda(5, 12)), KINDS),
    # Heads split over "tensor": each device holds its heads' parameters
    # (T5's table columns, Kerple's r1/r2, FIRE's output layer).
    "causal-heads-split-tp": ("tp", dict(mask=masks.Causal()), KINDS),
    # Batch split over "data"; packed documents whose positions restart.
    "packed-doc-positions-dp": ("dp", dict(mask=masks.Causal(), docs=13,
                                           doc_positions=True), ("t5",)),
}


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
@pytest.mark.parametrize("case_id, kind", [
    (case_id, kind) for case_id, (_, _, kinds) in CASES.items()
    for kind in kinds])
def test_cases_match_oracle(case_id, kind, strategy):
  mesh_name, kwargs, _ = CASES[case_id]
  case = make_case(len(case_id), **kwargs)
  impl = attention.ContextParallel(CHUNKED, strategy=strategy,
                                   mesh=mesh_of(mesh_name))
  check(case, make_bias(kind, key=3), impl)


class _Recording(attention.Implementation):
  """xla_chunked, recording what each per-device call is given (shapes are
  static, so recording at trace time sees every call)."""
  name = "recording"

  def __init__(self, takes_position_bias):
    self.takes_position_bias = takes_position_bias
    self.seen = []

  def __call__(self, request):
    self.seen.append((None if request.bias is None else request.bias.shape,
                      request.position_bias is not None,
                      request.query_positions.shape,
                      request.key_positions.shape))
    return CHUNKED(request)


@pytest.mark.parametrize("strategy, keys", [("ring", T // 8),
                                            ("all_gather", T)])
def test_bias_is_evaluated_per_shard_pair(strategy, keys):
  """Per tile where the inner implementation takes it; else materialised
  per device call ([L, L] on the ring), never as the global [T, T]."""
  q = jnp.asarray(make_case(5).q, jnp.float32)
  pb = make_bias("t5")
  length = T // 8
  for takes in (True, False):
    inner = _Recording(takes)
    impl = attention.ContextParallel(inner, strategy=strategy,
                                     mesh=mesh_of("c8"))
    jax.jit(jax.grad(lambda q, pb: attention.dot_product_attention(
        q, q, q, mask=masks.Causal(), position_bias=pb,
        implementation=impl).sum(), argnums=(0, 1))).lower(q, pb)
    assert inner.seen
    for bias, has_pb, qp, kp in inner.seen:
      assert (qp[-1], kp[-1]) == (length, keys)
      if takes:
        assert bias is None and has_pb
      else:
        assert bias == (1, N, length, keys) and not has_pb


def test_auto_dispatch_runs_context_parallel_with_a_bias():
  """Under a mesh with a context axis, auto serves a position_bias with
  context_parallel (before, the bias was materialised whole and refused,
  and auto fell through to one unsplit call)."""
  mesh = mesh_of("c8")
  case = make_case(8, mask=masks.Causal())
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (case.q, case.k, case.v))
  pb = make_bias("kerple_log")
  f = jax.jit(lambda q, k, v, pb: attention.dot_product_attention(
      q, k, v, mask=masks.Causal(), position_bias=pb))
  with jax.set_mesh(mesh):
    out = f(q, k, v, pb)
    text = f.lower(q, k, v, pb).compile().as_text()
  assert cp.executed_permutes(text) > 0
  want = attention.dot_product_attention(q, k, v, mask=masks.Causal(),
                                         position_bias=pb,
                                         implementation="xla")
  assert_close(out, np.asarray(want, np.float64), 2e-5, "out")


def test_explicit_axis_types():
  mesh = jax.make_mesh((2, 1, 1, 4), ("data", "fsdp", "tensor", "context"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 4)
  case = make_case(9, mask=masks.SlidingWindow(11))
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (case.q, case.k, case.v))
  pb = make_bias("fire")
  want = attention.dot_product_attention(
      q, k, v, mask=case.mask, position_bias=pb, implementation="xla")
  with jax.set_mesh(mesh):
    q, k, v = (jax.device_put(x, P("data", "context")) for x in (q, k, v))
    out = jax.jit(lambda q, k, v, pb: attention.context_parallel_attention(
        q, k, v, mask=case.mask, position_bias=pb, inner=CHUNKED))(
            q, k, v, pb)
  assert_close(out, np.asarray(want, np.float64), 2e-5, "out")


def test_t5_layer_trains_context_parallel():
  """A T5-bias Attention layer under a mesh with a context axis runs
  context-parallel (auto) and its parameter gradients, the T5 table's
  included, equal the one-device dense ones."""
  layer = attn_layer.Attention(16, N, num_kv_heads=2,
                               position=attn_layer.T5Bias(),
                               rngs=nnx.Rngs(0))
  graph, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(4), (B, T, 16))
  loss = lambda params: jnp.sum(jnp.sin(nnx.merge(graph, params)(x)))
  with core.use_implementation("xla"):
    want = jax.grad(loss)(params)
  grad = jax.jit(jax.grad(loss))
  with jax.set_mesh(mesh_of("c8")):
    got = grad(params)
    text = grad.lower(params).compile().as_text()
  assert cp.executed_permutes(text) > 0
  want, got = dict(nnx.to_flat_state(want)), dict(nnx.to_flat_state(got))
  assert any("t5_table" in str(path) for path in want)
  for path, w in want.items():
    w = np.asarray(w[...], np.float64)
    assert np.abs(w).max() > 0, path
    assert_close(got[path][...], w, 1e-4, str(path))
