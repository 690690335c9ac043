"""Context-parallel attention (ring and all-gather) against the float64 oracle.

Eight host CPU devices (tests/conftest.py) on meshes with data, fsdp, tensor
and context axes. Every case checks the forward output, the log-sum-exp and
the gradients of every float input (q, k, v, ALiBi slopes, far q/k, a
per-query bias) of a random projection loss, on random normal inputs, for
both strategies. The inner implementation is the dense "xla" (fast to
compile) except where the default (auto, xla_chunked on the CPU) is the
point. Shapes: B = 2, T = 64, so L = 8 per device on a context axis of 8 and
16 on one of 4.
"""

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax import attention
from extrapolax.attention import context_parallel as cp
from extrapolax.attention import masks
from tests.attention import oracle
from tests.attention.suite import TOLERANCE, assert_close

B, T, H = 2, 64, 8
AXES = ("data", "fsdp", "tensor", "context")
MESHES = {
    "c8": ((1, 1, 1, 8), AXES),
    "dp": ((2, 1, 1, 4), AXES),
    "tp": ((1, 1, 2, 4), AXES),
    "fsdp": ((1, 2, 1, 4), AXES),
    # No fsdp or tensor axis: both are optional.
    "data_context": ((2, 4), ("data", "context")),
}
_mesh_cache = {}


def mesh_of(name):
  if name not in _mesh_cache:
    shape, names = MESHES[name]
    _mesh_cache[name] = jax.make_mesh(shape, names,
                                      axis_types=(AxisType.Auto,) * len(names))
  return _mesh_cache[name]


def packed(rng, mean_len):
  """Segment ids [B, T]: documents of random length that cross shards."""
  rows = []
  for _ in range(B):
    ids, doc = [], 0
    while len(ids) < T:
      ids += [doc] * int(rng.integers(mean_len // 2, 2 * mean_len))
      doc += 1
    rows.append(ids[:T])
  return np.asarray(rows, np.int32)


def document_positions(seg):
  """Positions restarting at 0 at every document start."""
  pos = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for t in range(1, seg.shape[1]):
      pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
  return pos


def make_case(seed, *, n=4, k=2, mask=None, docs=None, doc_positions=False,
              alibi=None, soft_cap=None, far_window=None, bias_shape=None):
  rng = np.random.default_rng(seed)
  case = oracle.Case(q=rng.normal(size=(B, T, n, H)),
                     k=rng.normal(size=(B, T, k, H)),
                     v=rng.normal(size=(B, T, k, H)), mask=mask,
                     soft_cap=soft_cap)
  if docs is not None:
    case.q_seg = case.kv_seg = packed(rng, docs)
    if doc_positions:
      case.q_pos = case.k_pos = document_positions(case.q_seg)
  if alibi is not None:
    shape = (n,) if alibi == "shared" else (B, n)
    case.slopes = rng.uniform(0.05, 0.5, size=shape)
  if far_window is not None:
    case.far_q = rng.normal(size=case.q.shape)
    case.far_k = rng.normal(size=case.k.shape)
    case.far_window = far_window
  if bias_shape is not None:
    case.bias = rng.normal(size=bias_shape)
  return case


def run(case, implementation):
  """(out, lse, grads) of ``implementation``, one jit for all three."""
  rng = np.random.default_rng(99)
  d_out = rng.normal(size=case.q.shape[:3] + (case.v.shape[-1],))
  d_lse = rng.normal(size=(B, case.q.shape[2], T))
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  diff = dict(q=f32(case.q), k=f32(case.k), v=f32(case.v),
              slopes=f32(case.slopes), bias=f32(case.bias),
              far_q=f32(case.far_q), far_k=f32(case.far_k))
  diff = {name: x for name, x in diff.items() if x is not None}
  segs = None if case.q_seg is None else (case.q_seg, case.kv_seg)

  def f(d):
    return attention.dot_product_attention(
        d["q"], d["k"], d["v"], mask=case.mask, segment_ids=segs,
        alibi_slopes=d.get("slopes"), bias=d.get("bias"),
        logits_soft_cap=case.soft_cap, implementation=implementation,
        return_residuals=True, query_positions=case.q_pos,
        key_positions=case.k_pos, far_query=d.get("far_q"),
        far_key=d.get("far_k"), far_window=case.far_window)

  def loss(d):
    out, lse = f(d)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out * d_out) + jnp.sum(lse * d_lse)

  (out, lse), grads = jax.jit(lambda d: (f(d), jax.grad(loss)(d)))(diff)
  want = oracle.forward_and_grad(case, d_out, d_lse)
  return (out, lse, grads), want


def check(case, implementation):
  (out, lse, grads), (want_out, want_lse, want_g) = run(case, implementation)
  tol = TOLERANCE[jnp.float32]
  assert_close(out, want_out, tol["fwd"], "out")
  assert_close(lse, want_lse, tol["fwd"], "lse")
  for name, grad in grads.items():
    assert_close(grad, want_g[name], tol["grad"], f"d{name}")
  return out, lse, grads


# id: (mesh, make_case arguments, inner implementation).
CASES = {
    "causal-c8-gqa": ("c8", dict(mask=masks.Causal()), "xla"),
    # Window narrower than a shard (L = 16): R = 2; default inner (auto).
    "window-in-shard-dp": ("dp", dict(mask=masks.SlidingWindow(11),
                                      alibi="shared"), None),
    # Window over three shards (L = 8).
    "window-3-shards-c8": ("c8", dict(mask=masks.SlidingWindow(19)), "xla"),
    # Sinks apart from the ring, window across shards, far q/k, ALiBi.
    "lambda-sinks-far-c8": ("c8", dict(mask=masks.Lambda(5, 12),
                                       far_window=9, alibi="shared"), "xla"),
    # Sinks inside the ring (segment ids), heads split over "tensor".
    "lambda-packed-tp": ("tp", dict(mask=masks.Lambda(3, 10), docs=13),
                         "xla"),
    "chunked-unaligned-fsdp": ("fsdp", dict(mask=masks.Chunked(12)), "xla"),
    # Prefix across shards, MQA (heads replicated: K = 1), soft cap.
    "prefix-mqa-softcap-tp": ("tp", dict(mask=masks.PrefixLM(21), k=1,
                                         soft_cap=5.0), "xla"),
    "combination-c8": ("c8", dict(
        mask=(masks.Causal() & masks.SlidingWindow(10)) | masks.PrefixLM(6),
        alibi="shared", soft_cap=4.0), "xla"),
    # Documents across device boundaries, per-document positions, per-row
    # slopes, batch split over "data".
    "packed-doc-positions-dp": ("dp", dict(mask=masks.Causal(), docs=13,
                                           doc_positions=True,
                                           alibi="per_row"), "xla"),
    # No mask, documents only; a per-query bias [1, N, T, 1] replicated over
    # the batch; a mesh without fsdp or tensor axes.
    "segments-bias-data_context": ("data_context", dict(
        docs=9, bias_shape=(1, 4, T, 1)), "xla"),
}


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_oracle(case_id, strategy):
  mesh_name, kwargs, inner = CASES[case_id]
  case = make_case(len(case_id), **kwargs)
  impl = attention.ContextParallel(inner, strategy=strategy,
                                   mesh=mesh_of(mesh_name))
  check(case, impl)


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_rows_that_see_nothing(strategy):
  """Queries whose document has no key: zeros, lse -inf, finite gradients."""
  case = make_case(7, mask=masks.Causal(), docs=11, alibi="shared")
  q_seg = case.q_seg.copy()
  q_seg[0, 5:9] = 99        # crosses the first shard boundary (L = 8)
  q_seg[1, 40:44] = 77
  case.q_seg = q_seg
  impl = attention.ContextParallel("xla", strategy=strategy,
                                   mesh=mesh_of("c8"))
  out, lse, grads = check(case, impl)
  assert np.all(np.asarray(out)[0, 5:9] == 0)
  assert np.all(np.isneginf(np.asarray(lse)[0, :, 5:9]))
  for g in grads.values():
    assert np.all(np.isfinite(np.asarray(g)))


def test_lambda_plan_sends_sinks_apart():
  plan = attention.ring_plan(masks.Lambda(5, 12), seq_len=T, num_shards=8)
  assert (plan.steps, plan.sinks) == (3, 5)
  # With segment ids the sinks stay in the ring (all 8 steps needed).
  plan = attention.ring_plan(masks.Lambda(3, 10), seq_len=T, num_shards=4,
                             has_segments=True)
  assert (plan.steps, plan.sinks) == (4, 0)


@pytest.mark.parametrize("mask, steps", [
    (masks.Causal(), 8),
    (masks.SlidingWindow(8), 2),          # w <= L
    (masks.SlidingWindow(9), 2),          # reaches one shard back
    (masks.SlidingWindow(10), 3),
    (masks.Chunked(8), 1),                # chunks are shards
    # Bidirectional: a shard sees the next one, ring distance C - 1.
    (masks.Chunked(12), 8),
    (masks.Causal() & masks.Chunked(12), 2),
    (masks.PrefixLM(4), 8),
    (masks.Lambda(0, 8), 2),
    (masks.Lambda(4, 8), 2),              # the sinks go apart
    (masks.Lambda(9, 8), 8),              # more sinks than a shard: ring
    (None, 8),
])
def test_ring_steps(mask, steps):
  assert attention.ring_steps(mask, seq_len=T, num_shards=8) == steps
  # Explicit positions: the geometry is data, every shard is visited.
  assert attention.ring_steps(mask, seq_len=T, num_shards=8,
                              explicit_positions=True) == 8


def _qkv(n=4, k=2, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(B, T, h, H)), jnp.float32)
               for h in (n, k, k))


class _Counting(attention.Implementation):
  """The dense path, counting the calls that really run (debug callback)."""
  name = "counting"

  def __init__(self):
    self.calls = []

  def __call__(self, request):
    jax.debug.callback(lambda: self.calls.append(1))
    return attention.Xla()(request)


@pytest.mark.parametrize("mask, pairs", [
    (masks.Causal(), 36),              # 8 * 9 / 2 of the 64 shard pairs
    (masks.SlidingWindow(8), 15),      # the diagonal and the one below
])
def test_empty_shard_pairs_are_skipped(mask, pairs):
  inner = _Counting()
  q = _qkv(n=2, k=2)[0]

  def loss(q):
    return attention.context_parallel_attention(
        q, q, q, mesh=mesh_of("c8"), mask=mask, inner=inner).sum()

  jax.block_until_ready(jax.jit(jax.value_and_grad(loss))(q))
  jax.effects_barrier()
  # Once in the forward, once more in the backward's recomputation.
  assert len(inner.calls) == 2 * pairs


@pytest.mark.parametrize("grad", [False, True])
def test_window_runs_fewer_exchanges_than_causal(grad):
  mesh = mesh_of("c8")
  q = _qkv()[0]

  def exchanges(mask):
    f = lambda q: attention.context_parallel_attention(
        q, q, q, mesh=mesh, mask=mask, inner="xla").sum()
    f = jax.grad(f) if grad else f
    return cp.executed_permutes(jax.jit(f).lower(q).compile().as_text())

  causal, window = exchanges(masks.Causal()), exchanges(masks.SlidingWindow(8))
  # Forward: k, v and key positions, 7 times for Causal and once for the
  # window. Backward: keys and values as one buffer plus positions, and the
  # gradient buffer, per step, and the gradients home once.
  assert causal == (21 + 3 * 7 + 1 if grad else 21), causal
  assert 0 < window <= (3 + 3 + 1 if grad else 3), window
  assert exchanges(masks.Chunked(8)) == 0


def test_memory_does_not_grow_with_ring_steps():
  """XLA's buffer assignment: Causal (8 steps) needs no more than a window
  (2 steps) beyond the shard in flight, and less than all-gathering."""
  mesh = mesh_of("c8")
  t, shard_kv_bytes = 4096, 2 * (4096 // 8) * 2 * 32 * 4
  q = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)

  def temp_bytes(mask, strategy="ring"):
    f = lambda q, k, v: attention.context_parallel_attention(
        q, k, v, mesh=mesh, mask=mask, inner="xla", strategy=strategy).sum()
    compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, q, q).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
      pytest.skip("this jaxlib gives no memory analysis")
    return analysis.temp_size_in_bytes

  causal = temp_bytes(masks.Causal())
  assert causal <= temp_bytes(masks.SlidingWindow(t // 8)) + shard_kv_bytes
  assert causal + 4 * shard_kv_bytes <= temp_bytes(masks.Causal(),
                                                   "all_gather")


def test_ambient_mesh_auto_dispatch_with_sharded_inputs():
  mesh = mesh_of("dp")
  q, k, v = _qkv(seed=3)
  want = attention.dot_product_attention(q, k, v, mask=masks.Causal(),
                                         implementation="xla")
  sharding = NamedSharding(mesh, P("data", "context"))
  q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
  f = jax.jit(lambda q, k, v: attention.dot_product_attention(
      q, k, v, mask=masks.Causal()))
  with jax.set_mesh(mesh):
    out = f(q, k, v)
    text = f.lower(q, k, v).compile().as_text()
    # T = 63 is not a multiple of C = 4: auto falls through (no exchange).
    short = jax.jit(lambda q: attention.dot_product_attention(
        q, q, q, mask=masks.Causal()))
    odd = q[:, :63]
    short_text = short.lower(odd).compile().as_text()
    short_out = short(odd)
  assert cp.executed_permutes(text) > 0     # auto picked context_parallel
  assert_close(out, want, 2e-5, "out")
  assert out.sharding.spec[:2] == ("data", "context")
  assert cp.executed_permutes(short_text) == 0
  want_short = attention.dot_product_attention(
      odd, odd, odd, mask=masks.Causal(), implementation="xla")
  assert_close(short_out, want_short, 2e-5, "T=63")


def test_explicit_axis_types_and_no_mesh_outside():
  mesh = jax.make_mesh((2, 1, 1, 4), AXES,
                       axis_types=(AxisType.Explicit,) * 4)
  q, k, v = _qkv(seed=4)
  want = attention.dot_product_attention(q, k, v, mask=masks.SlidingWindow(5),
                                         implementation="xla")
  with jax.set_mesh(mesh):
    q, k, v = (jax.device_put(x, P("data", "context")) for x in (q, k, v))
    out = jax.jit(lambda q, k, v: attention.context_parallel_attention(
        q, k, v, mask=masks.SlidingWindow(5), inner="xla"))(q, k, v)
  assert_close(out, want, 2e-5, "out")
  # Outside the mesh, auto does not try context_parallel.
  assert "context_parallel" not in attention.core._auto_candidates(  # pylint: disable=protected-access
      attention.core.make_request(q, k, v))


def test_merge_of_two_empty_parts_is_zero_without_nan():
  o = jnp.ones((1, 2, 1, 3))
  lse = jnp.array([[[-jnp.inf, 0.5]]])
  empty = jnp.full((1, 1, 2), -jnp.inf)

  def f(o, lse):
    out, l = cp.merge(o, lse, 2 * o, empty)
    return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0))

  out, l = cp.merge(o, lse, 2 * o, empty)
  assert np.all(np.asarray(out)[0, 0] == 0) and np.isneginf(l[0, 0, 0])
  np.testing.assert_allclose(np.asarray(out)[0, 1], 1.0)
  for g in jax.grad(f, argnums=(0, 1))(o, lse):
    assert np.all(np.isfinite(np.asarray(g)))


def test_errors():
  mesh = mesh_of("c8")
  with pytest.raises(ValueError, match="strategy.*'zigzag'"):
    attention.ContextParallel(strategy="zigzag")
  with pytest.raises(ValueError, match="axis_name.*3"):
    attention.ContextParallel(axis_name=3)
  with pytest.raises(ValueError, match="inner='context_parallel'"):
    attention.ContextParallel("context_parallel")
  with pytest.raises(ValueError, match="batch_axes"):
    attention.ContextParallel(batch_axes=("data", 1))
  q, k, v = _qkv()
  impl = attention.ContextParallel("xla", mesh=mesh)
  with pytest.raises(NotImplementedError, match="T=60.*C=8"):
    attention.dot_product_attention(q[:, :60], k[:, :60], v[:, :60],
                                    implementation=impl)
  with pytest.raises(NotImplementedError, match="T == S"):
    attention.dot_product_attention(q[:, :56], k, v, implementation=impl)
  with pytest.raises(NotImplementedError, match="dense bias.*T5"):
    attention.dot_product_attention(q, k, v, bias=jnp.zeros((1, 1, T, T)),
                                    implementation=impl)
  with pytest.raises(NotImplementedError, match="needs a mesh"):
    attention.dot_product_attention(q, k, v,
                                    implementation="context_parallel")
  with pytest.raises(NotImplementedError, match="no 'seq' axis"):
    attention.dot_product_attention(
        q, k, v, implementation=attention.ContextParallel(
            mesh=mesh, axis_name="seq"))
  with pytest.raises(ValueError, match="inner="):
    attention.context_parallel_attention(q, k, v, mesh=mesh,
                                         implementation="xla")
