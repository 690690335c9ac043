"""Learned attention sinks (gpt-oss ``sinks``, ``sink_logits=``).

Query head n adds exp(sink_n) to its softmax denominator; the sink takes no
value: p_ij = exp(s_ij) / (exp(sink_n) + sum_j exp(s_ij)), o_i = sum_j p_ij
v_j, lse_i = log(exp(sink_n) + sum_j exp(s_ij)). xla and xla_chunked are held
to a float64 NumPy reference written here (forward, lse and the gradients of
q, k, v and the sinks, derived by hand), on random inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from extrapolax.attention import core, masks
from extrapolax.attention import layer as attn_layer
from extrapolax.attention.xla_chunked import XlaChunked
from tests.attention import suite
from extrapolax.models import AttentionSpec, DecoderLM, ModelConfig
from extrapolax.models.generate import CachePolicy, generate


def reference(q, k, v, sinks, visible, d_out, d_lse):
  """float64 (out, lse, dq, dk, dv, dsinks) for loss = <out, d_out> +
  <lse, d_lse>; ``visible`` bool [B, T, S] (shared by heads); sinks [N] or
  None."""
  q, k, v, d_out, d_lse = (np.asarray(x, np.float64)
                           for x in (q, k, v, d_out, d_lse))
  b, t, n, h = q.shape
  g = n // k.shape[2]
  kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # [B, S, N, H]
  s = np.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(h)
  s = np.where(visible[:, None], s, -np.inf)
  sink = (np.full(n, -np.inf) if sinks is None
          else np.asarray(sinks, np.float64))[None, :, None]       # [1, N, 1]
  m = np.maximum(s.max(-1), sink)
  m = np.where(np.isfinite(m), m, 0.0)
  total = np.exp(s - m[..., None]).sum(-1) + np.exp(sink - m)
  with np.errstate(divide="ignore"):
    lse = np.where(total > 0, m + np.log(total), -np.inf)         # [B, N, T]
  lse_safe = np.where(np.isfinite(lse), lse, 0.0)
  p = np.exp(s - lse_safe[..., None])                              # 0 masked
  out = np.einsum("bnts,bsnh->btnh", p, vr)
  dp = np.einsum("btnh,bsnh->bnts", d_out, vr)
  delta = np.einsum("btnh,btnh->bnt", d_out, out) - d_lse
  ds = p * (dp - delta[..., None]) / np.sqrt(h)
  dq = np.einsum("bnts,bsnh->btnh", ds, kr)
  fold = lambda x: x.reshape(x.shape[:2] + (-1, g) + x.shape[3:]).sum(3)
  dk = fold(np.einsum("bnts,btnh->bsnh", ds, q))
  dv = fold(np.einsum("bnts,btnh->bsnh", p, d_out))
  d_sinks = None
  if sinks is not None:
    p_sink = np.exp(sink - lse_safe)
    d_sinks = -(p_sink * delta).sum(axis=(0, 2))
  return out, lse, dq, dk, dv, d_sinks


def visibility(mask, t, s, q_seg=None, kv_seg=None, b=2):
  qp = np.arange(s - t, s)[:, None]
  kp = np.arange(s)[None, :]
  vis = np.ones((t, s), bool)
  if mask is not None:
    vis = np.asarray(mask(jnp.asarray(qp), jnp.asarray(kp)))
  vis = np.broadcast_to(vis, (b, t, s))
  if q_seg is not None:
    vis = vis & (np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None])
  return vis


def inputs(t, s, n, kh, h=8, b=2, seed=0):
  r = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)
  return (f(b, t, n, h), f(b, s, kh, h), f(b, s, kh, h), 2.0 * f(n),
          f(b, t, n, h), f(b, n, t))


SEG_Q = np.array([[0] * 7 + [1] * 9 + [2] * 8, [0] * 12 + [1] * 12])
SEG_KV = SEG_Q.copy()
MASKED_Q = np.array([[0] * 10 + [9] * 4 + [1] * 10, [0] * 24])  # id 9: no key
CASES = {
    "none_mha": dict(mask=None, t=24, s=24, n=4, kh=4),
    "causal_gqa": dict(mask=masks.Causal(), t=24, s=24, n=4, kh=2),
    "window_gqa": dict(mask=masks.SlidingWindow(5), t=24, s=24, n=6, kh=2),
    "causal_t_lt_s": dict(mask=masks.Causal(), t=10, s=24, n=4, kh=1),
    "packed_causal": dict(mask=masks.Causal(), t=24, s=24, n=4, kh=2,
                          seg=(SEG_Q, SEG_KV)),
    "masked_row": dict(mask=masks.Causal(), t=24, s=24, n=4, kh=2,
                       seg=(MASKED_Q, SEG_KV)),
}
IMPLS = {"xla": "xla",
         "chunked": XlaChunked(block_q=8, block_k=8),
         "chunked_device": XlaChunked(block_q=8, block_k=16,
                                      schedule="device"),
         # Interpret mode on the CPU, the suite's small per-pass blocks.
         "pallas_gpu": suite.PALLAS_GPU,
         "pallas_tpu": suite.PALLAS_TPU}


def run(impl, case, q, k, v, sinks, d_out, d_lse):
  seg = case.get("seg")
  seg = None if seg is None else tuple(jnp.asarray(x) for x in seg)

  def f(q, k, v, sinks):
    return core.dot_product_attention(
        q, k, v, mask=case["mask"], segment_ids=seg, sink_logits=sinks,
        implementation=impl, return_residuals=True)

  (out, lse), vjp = jax.vjp(f, q, k, v, sinks)
  return (out, lse) + vjp((d_out, d_lse))


# Without sinks every implementation meets the oracle in
# test_implementations.py (these masks, GQA, T < S, packed and empty rows
# included), so the cases here all carry sinks.
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(impl, name):
  case = CASES[name]
  q, k, v, sinks, d_out, d_lse = inputs(case["t"], case["s"], case["n"],
                                        case["kh"], seed=len(name))
  seg = case.get("seg")
  vis = visibility(case["mask"], case["t"], case["s"],
                   *(seg if seg is not None else ()))
  want = reference(q, k, v, sinks, vis, d_out, d_lse)
  got = run(IMPLS[impl], case, q, k, v, sinks, d_out, d_lse)
  for label, g, w in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got,
                         want):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) or label == "lse", label
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4, err_msg=label)
  lse = np.asarray(got[1])
  if name == "masked_row":
    rows = MASKED_Q[0] == 9
    out = np.asarray(got[0])[0, rows]
    np.testing.assert_array_equal(out, 0.0)      # sees no key: zeros
    np.testing.assert_allclose(lse[0][:, rows],   # lse = the sink itself
                               np.broadcast_to(np.asarray(sinks)[:, None],
                                               (case["n"], rows.sum())),
                               rtol=1e-6)
  # The sink really changes the result (the reference checks by how much).
  base = reference(q, k, v, None, vis, d_out, d_lse)[0]
  assert np.abs(np.asarray(got[0]) - base).max() > 1e-2


def test_very_negative_sinks_equal_no_sinks():
  q, k, v, _, _, _ = inputs(16, 16, 4, 2)
  for impl in ("xla", XlaChunked(block_q=8, block_k=8)):
    with_ = core.dot_product_attention(
        q, k, v, mask=masks.Causal(), sink_logits=jnp.full(4, -1e4),
        implementation=impl)
    without = core.dot_product_attention(q, k, v, mask=masks.Causal(),
                                         implementation=impl)
    np.testing.assert_array_equal(np.asarray(with_), np.asarray(without))


def test_chunked_under_jit_with_traced_sinks():
  q, k, v, sinks, _, _ = inputs(16, 16, 4, 2)
  impl = XlaChunked(block_q=8, block_k=8)
  f = jax.jit(lambda s: core.dot_product_attention(
      q, k, v, mask=masks.Causal(), sink_logits=s, implementation=impl))
  want = core.dot_product_attention(q, k, v, mask=masks.Causal(),
                                    sink_logits=sinks, implementation="xla")
  np.testing.assert_allclose(np.asarray(f(sinks)), np.asarray(want),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinks,match", [
    (jnp.zeros(3), r"sink_logits must have shape \(4,\)"),
    (jnp.zeros((1, 4)), r"sink_logits must have shape \(4,\)"),
    (jnp.zeros(4, jnp.int32), "sink_logits must be a floating array"),
    (jnp.array([0.0, jnp.inf, 0.0, 0.0]), "sink_logits must be finite"),
])
def test_bad_sink_logits_raise_one_line(sinks, match):
  q, k, v, _, _, _ = inputs(8, 8, 4, 2)
  with pytest.raises(ValueError, match=match):
    core.dot_product_attention(q, k, v, sink_logits=sinks)


@pytest.mark.parametrize("impl", ["cudnn"])
def test_kernels_without_sinks_refuse_explicitly(impl):
  q, k, v, sinks, _, _ = inputs(8, 8, 4, 2)
  with pytest.raises(NotImplementedError,
                     match=f"{impl} does not take sink_logits"):
    core.dot_product_attention(q, k, v, sink_logits=sinks,
                               implementation=impl)


def test_auto_falls_through_to_an_implementation_with_sinks(monkeypatch):
  # pallas_gpu (interpret mode on the CPU) would serve this request without
  # sinks; with sinks auto skips it and runs xla_chunked.
  monkeypatch.setitem(core._AUTO_ORDER, jax.default_backend(),
                      ("pallas_gpu", "xla_chunked"))
  q, k, v, sinks, _, _ = inputs(8, 8, 4, 2)
  got = core.dot_product_attention(q, k, v, mask=masks.Causal(),
                                   sink_logits=sinks)
  want = core.dot_product_attention(q, k, v, mask=masks.Causal(),
                                    sink_logits=sinks, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)


def test_layer_and_spec_flags():
  layer = attn_layer.Attention(16, 4, num_kv_heads=2, sink_logits=True,
                               rngs=nnx.Rngs(0))
  assert layer.sinks[...].shape == (4,)
  assert attn_layer.Attention(16, 4, rngs=nnx.Rngs(0)).sinks is None
  with pytest.raises(ValueError, match="sink_logits must be a bool"):
    attn_layer.Attention(16, 4, sink_logits=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="sink_logits must be a bool"):
    AttentionSpec(sink_logits="yes")


def _random_sinks(model, seed=0):
  r = np.random.default_rng(seed)
  count = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, attn_layer.Attention) and node.sinks is not None:
      node.sinks[...] = jnp.asarray(2.0 * r.normal(size=node.sinks.shape),
                                    node.sinks[...].dtype)
      count += 1
  return count


def test_tiny_model_trains_a_step_and_decodes_like_the_forward():
  config = ModelConfig(
      attention=(AttentionSpec(sink_logits=True),
                 AttentionSpec(mask="sliding_window", window=5,
                               sink_logits=True)),
      vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
      mlp_dim=64, max_len=32)
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  assert _random_sinks(model) == 2
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 64)

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  optimizer = optax.adam(1e-2)
  state = optimizer.init(params)
  before, grads = jax.value_and_grad(loss)(params)
  sink_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
                if "sinks" in jax.tree_util.keystr(path)]
  assert len(sink_grads) == 2
  for g in sink_grads:
    assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).max() > 0
  updates, state = optimizer.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  assert float(loss(params)) < float(before)
  model = nnx.merge(graphdef, params)
  want = np.asarray(model(tokens))
  for kwargs in (dict(use_prefill=False), {}):
    _, got, _ = generate(model, tokens, 1, policy=CachePolicy.full(21),
                         return_logits=True, **kwargs)
    np.testing.assert_allclose(np.asarray(got)[:, :20], want, rtol=2e-4,
                               atol=2e-4, err_msg=str(kwargs))
  # The sinks matter: zeroing them changes the logits.
  for _, node in nnx.iter_graph(model):
    if isinstance(node, attn_layer.Attention):
      node.sinks[...] = jnp.full(node.sinks.shape, -1e4)
  assert np.abs(np.asarray(model(tokens)) - want).max() > 1e-3


def test_experiment_config_field_builds_sinks():
  from extrapolax.experiments import modeling  # experiments layer, test only
  import ml_collections
  config = ml_collections.ConfigDict(dict(
      model=modeling.default_model_config(), train_len=16))
  assert not modeling.model_config(config).attention[0].sink_logits
  config.model.sink_logits = True
  assert modeling.model_config(config).attention[0].sink_logits
  config.model.preset = "rope-tiny"     # a preset sets its own attention
  with pytest.raises(ValueError, match="config.model.sink_logits=True"):
    modeling.model_config(config)


def test_an_implementation_that_does_not_declare_sinks_is_refused():
  class Plain(core.Implementation):
    name = "plain"

    def __call__(self, request):
      return core.dot_product_attention(
          request.query, request.key, request.value, implementation="xla",
          return_residuals=True)

  q, k, v, sinks, _, _ = inputs(8, 8, 4, 2)
  core.dot_product_attention(q, k, v, implementation=Plain())  # serves
  with pytest.raises(NotImplementedError,
                     match="plain does not take sink_logits"):
    core.dot_product_attention(q, k, v, sink_logits=sinks,
                               implementation=Plain())
  with core.use_implementation(Plain()):
    with pytest.raises(NotImplementedError, match="plain does not take"):
      core.dot_product_attention(q, k, v, sink_logits=sinks)


# Every case on the ring; all_gather (which shares the ring's sink handling
# at the final normalisation) on the hardest one, a row that sees no key.
@pytest.mark.parametrize("name,strategy", [
    ("causal_gqa", "ring"), ("window_gqa", "ring"), ("packed_causal", "ring"),
    ("masked_row", "ring"), ("masked_row", "all_gather")])
def test_context_parallel_matches_float64_reference(name, strategy):
  """Sinks on the context-parallel path (4 sequence shards x 2 head shards
  of the 8 host devices): forward, lse and every gradient, the sinks'
  included, against the same float64 reference."""
  from extrapolax.attention.context_parallel import ContextParallel  # pylint: disable=g-import-not-at-top
  case = CASES[name]
  q, k, v, sinks, d_out, d_lse = inputs(case["t"], case["s"], case["n"],
                                        case["kh"], seed=len(name))
  seg = case.get("seg")
  vis = visibility(case["mask"], case["t"], case["s"],
                   *(seg if seg is not None else ()))
  want = reference(q, k, v, sinks, vis, d_out, d_lse)
  mesh = jax.make_mesh((1, 4, 2), ("data", "context", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  impl = ContextParallel("xla", strategy=strategy, mesh=mesh)
  # Under jit: run eagerly, shard_map dispatches op by op (10 s a case).
  got = jax.jit(lambda *a: run(impl, case, *a))(q, k, v, sinks, d_out,
                                                d_lse)
  for label, g, w in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got,
                         want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-4, atol=2e-4,
                               err_msg=label)
