"""Relative biases computed per tile (``position_bias=``, relative_bias.py).

* Each bias object's values equal the dense helpers of ``positional`` (T5
  against ``t5_bias``, Kerple-log, FIRE, ALiBi) or the paper's formula
  (Kerple power), at any tile.
* ``dot_product_attention(position_bias=...)`` on xla_chunked (per block)
  and xla (materialised) equals the float64 oracle given the dense bias:
  forward, lse, and gradients of q, k, v and of the bias parameters (the
  oracle's dense bias gradient chained through the bias function), with a
  causal and a window mask, packed segments with restarting positions, and
  T != S; GQA heads.
* Memory: XLA's memory analysis of a T5 layer's forward and backward at 32k
  tokens: per-tile xla_chunked stays under a stated linear bound where the
  dense path's temporaries hold the [N, T, S] logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax.attention import core, masks, positional
from extrapolax.attention import layer as attn_layer
from extrapolax.attention import relative_bias as rb
from extrapolax.attention.xla_chunked import XlaChunked

from . import oracle
from .suite import assert_close

B, N, K, H = 2, 4, 2, 8
TOL = dict(fwd=2e-5, grad=4e-5)


def make_bias(kind, key=0):
  ks = jax.random.split(jax.random.key(key), 6)
  normal = lambda i, shape, s=1.0: s * jax.random.normal(ks[i], shape)
  if kind == "t5":
    return rb.T5BucketBias(normal(0, (16, N)), bidirectional=False,
                           max_distance=20)
  if kind == "t5_bidirectional":
    return rb.T5BucketBias(normal(0, (16, N)), bidirectional=True,
                           max_distance=20)
  if kind in ("kerple_log", "kerple_power"):
    return rb.KerpleBias(0.5 + jax.random.uniform(ks[0], (N,)),
                         0.2 + jax.random.uniform(ks[1], (N,)),
                         variant=kind.split("_")[1])
  if kind == "fire":
    return rb.FireBias(normal(0, (1, 6)), normal(1, (6,)),
                       normal(2, (6, N), 0.5), normal(3, (N,)),
                       jnp.asarray(0.3), jnp.asarray(20.0))
  if kind == "alibi":
    return rb.AlibiBias(positional.alibi_slopes(N))
  raise ValueError(kind)


KINDS = ("t5", "t5_bidirectional", "kerple_log", "kerple_power", "fire",
         "alibi")


def test_values_equal_the_dense_helpers():
  qp = jnp.asarray([[3, 7, 8, 30, 31], [0, 1, 2, 0, 1]], jnp.int32)
  kp = jnp.asarray([[0, 5, 8, 9, 29, 40], [0, 0, 1, 2, 3, 1]], jnp.int32)
  t5 = make_bias("t5")
  np.testing.assert_array_equal(t5.tile(qp, kp), positional.t5_bias(
      t5.table, qp, kp, bidirectional=False, num_buckets=16,
      max_distance=20))
  t5b = make_bias("t5_bidirectional")
  np.testing.assert_array_equal(t5b.tile(qp, kp), positional.t5_bias(
      t5b.table, qp, kp, bidirectional=True, num_buckets=16,
      max_distance=20))
  ker = make_bias("kerple_log")
  np.testing.assert_allclose(ker.tile(qp, kp), positional.kerple_log_bias(
      ker.r1, ker.r2, qp, kp), rtol=1e-6, atol=1e-6)
  fire = make_bias("fire")
  mlp = lambda d: (jax.nn.relu(d @ fire.w_in + fire.b_in) @ fire.w_out
                   + fire.b_out)
  np.testing.assert_allclose(fire.tile(qp, kp), positional.fire_bias(
      mlp, fire.c, fire.threshold, qp, kp), rtol=1e-5, atol=1e-5)
  ali = make_bias("alibi")
  np.testing.assert_array_equal(ali.tile(qp, kp), positional.alibi_bias(
      ali.slopes, qp, kp))
  power = make_bias("kerple_power")
  dist = np.abs(np.asarray(qp)[:, :, None] - np.asarray(kp)[:, None, :])
  want = -(np.asarray(power.r1, np.float64)[None, :, None, None]
           * dist[:, None].astype(np.float64)
           ** np.asarray(power.r2, np.float64)[None, :, None, None])
  np.testing.assert_allclose(power.tile(qp, kp), want, rtol=1e-5, atol=1e-6)
  # A tile is the dense bias's rectangle.
  np.testing.assert_array_equal(t5.tile(qp[:, 1:3], kp[:, 2:5]),
                                t5.tile(qp, kp)[:, :, 1:3, 2:5])


def random_qkv(scenario, key=1):
  """Random q [B, T, N, H], k and v [B, S, K, H]; T != S for "t_ne_s"."""
  t, s = (24, 40) if scenario == "t_ne_s" else (32, 32)
  ks = jax.random.split(jax.random.key(key), 3)
  return (jax.random.normal(ks[0], (B, t, N, H), jnp.float32),
          jax.random.normal(ks[1], (B, s, K, H), jnp.float32),
          jax.random.normal(ks[2], (B, s, K, H), jnp.float32))


def _case(scenario, key=1):
  """(q, k, v, call kwargs, oracle kwargs) for one scenario."""
  q, k, v = random_qkv(scenario, key)
  call, case = {}, {}
  if scenario in ("causal", "t_ne_s"):
    call["mask"] = case["mask"] = masks.Causal()
  elif scenario == "window":
    call["mask"] = case["mask"] = masks.SlidingWindow(7)
  elif scenario == "packed":
    seg = np.repeat(np.array([[0, 1, 2], [0, 1, 1]]), [13, 11, 8],
                    axis=1).astype(np.int32)
    pos = np.stack([np.concatenate([np.arange(n) for n in counts])
                    for counts in ([13, 11, 8], [13, 19])]).astype(np.int32)
    call.update(mask=masks.Causal(), segment_ids=seg, query_positions=pos,
                key_positions=pos)
    case.update(mask=masks.Causal(), q_seg=seg, kv_seg=seg, q_pos=pos,
                k_pos=pos)
  return q, k, v, call, case


def _positions(case, t, s):
  if "q_pos" in case:
    return jnp.asarray(case["q_pos"]), jnp.asarray(case["k_pos"])
  qp, kp = masks.default_positions(t, s)
  return qp[None], kp[None]


IMPLS = [pytest.param("xla", id="xla"),
         pytest.param(XlaChunked(block_q=8, block_k=16), id="chunked-8x16"),
         pytest.param(XlaChunked(block_q=16, block_k=8, schedule="device"),
                      id="chunked-16x8-device")]


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("scenario", ("causal", "window", "packed",
                                      "t_ne_s"))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_oracle(kind, scenario, implementation):
  check_against_oracle(make_bias(kind), _case(scenario), implementation)


def check_against_oracle(pb, scenario_case, implementation):
  """out, lse, dq, dk, dv and every bias parameter's gradient of one
  implementation against the float64 oracle given the dense bias (the
  parameters' gradient: the oracle's dense bias gradient chained through
  the bias function).  ``scenario_case``: (q, k, v, call, oracle kwargs)."""
  q, k, v, call, case = scenario_case
  t, s = q.shape[1], k.shape[1]
  ks = jax.random.split(jax.random.key(7), 2)
  d_out = jax.random.normal(ks[0], q.shape[:3] + (H,))
  d_lse = jax.random.normal(ks[1], (B, N, t))

  def loss(q, k, v, pb):
    out, lse = core.dot_product_attention(
        q, k, v, position_bias=pb, implementation=implementation,
        return_residuals=True, **call)
    return jnp.sum(out * d_out) + jnp.sum(lse * d_lse), (out, lse)

  grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
      q, k, v, pb)
  qp, kp = _positions(case, t, s)
  dense, dense_vjp = jax.vjp(lambda p: p.tile(qp, kp), pb)
  ocase = oracle.Case(q=np.asarray(q), k=np.asarray(k), v=np.asarray(v),
                      bias=np.asarray(dense, np.float64), **case)
  o_out, o_lse, o_grads = oracle.forward_and_grad(
      ocase, np.asarray(d_out), np.asarray(d_lse))
  assert_close(out, o_out, TOL["fwd"], "out")
  assert_close(lse, o_lse, TOL["fwd"], "lse")
  for name, got in zip("qkv", grads[:3]):
    assert_close(got, o_grads[name], TOL["grad"], f"d{name}")
  (want,) = dense_vjp(jnp.asarray(o_grads["bias"], jnp.float32).reshape(
      dense.shape))
  for name in pb.param_names:
    g, w = getattr(grads[3], name), getattr(want, name)
    assert np.abs(np.asarray(w)).max() > 0, name   # the check has teeth
    assert g.shape == w.shape, name
    assert_close(g, np.asarray(w, np.float64), TOL["grad"], f"d {name}")


def test_position_bias_and_dense_bias_add():
  pb = make_bias("t5")
  q, k, v, call, _ = _case("causal")
  extra = jax.random.normal(jax.random.key(3), (1, N, 32, 32))
  qp, kp = masks.default_positions(32, 32)
  want = core.dot_product_attention(
      q, k, v, bias=extra + pb.tile(qp[None], kp[None]),
      implementation="xla", **call)
  got = core.dot_product_attention(
      q, k, v, bias=extra, position_bias=pb,
      implementation=XlaChunked(block_q=8, block_k=8), **call)
  assert_close(got, np.asarray(want, np.float64), TOL["fwd"], "out")


def test_bad_position_bias_raises():
  q, k, v, _, _ = _case("causal")
  with pytest.raises(ValueError, match="position_bias must be a RelativeBias"):
    core.dot_product_attention(q, k, v, position_bias=jnp.ones((N, 32, 32)))
  with pytest.raises(ValueError, match="position_bias has 3 heads"):
    core.dot_product_attention(
        q, k, v, position_bias=rb.AlibiBias(jnp.ones(3)))
  with pytest.raises(ValueError, match="variant"):
    core.dot_product_attention(q, k, v, position_bias=rb.KerpleBias(
        jnp.ones(N), jnp.ones(N), variant="cubic"))
  with pytest.raises(ValueError, match="FireBias.w_out"):
    f = make_bias("fire")
    core.dot_product_attention(q, k, v, position_bias=rb.FireBias(
        f.w_in, f.b_in, f.w_out[:3], f.b_out, f.c, f.threshold))
  with pytest.raises(ValueError, match="floating"):
    core.dot_product_attention(
        q, k, v, position_bias=rb.AlibiBias(jnp.ones(N, jnp.int32)))


@pytest.mark.parametrize("position", ["t5", "kerple", "fire"])
def test_layer_routes_per_tile_and_matches_dense(position):
  """The layer's gradients (bias parameters included) are the same whether
  its bias is computed per tile (xla_chunked) or materialised (xla)."""
  scheme = (attn_layer.Kerple(variant="power") if position == "kerple"
            else attn_layer.position_from_name(position))
  layer = attn_layer.Attention(16, N, num_kv_heads=K, position=scheme,
                               rngs=nnx.Rngs(0))
  graph, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (B, 40, 16))
  pos = jnp.asarray(np.concatenate([np.arange(25), np.arange(15)]))[None]
  seg = jnp.asarray(np.repeat([0, 1], [25, 15]))[None].repeat(B, 0)

  def loss(params, impl):
    with core.use_implementation(impl):
      y = nnx.merge(graph, params)(x, positions=pos.repeat(B, 0),
                                   segment_ids=seg)
    return jnp.sum(jnp.sin(y))

  dense = jax.grad(loss)(params, "xla")
  tiled = jax.grad(loss)(params, XlaChunked(block_q=8, block_k=16))
  flat_d = dict(nnx.to_flat_state(dense))
  names = {"t5": "t5_table", "kerple": "kerple_raw", "fire": "fire_in"}
  assert any(names[position] in str(path) for path in flat_d)
  for path, want in flat_d.items():
    got = dict(nnx.to_flat_state(tiled))[path]
    want = np.asarray(want[...], np.float64)
    assert np.abs(want).max() > 0, path
    assert_close(got[...], want, 1e-4, str(path))


def _layer_temp_bytes(seq_len, implementation):
  layer = attn_layer.Attention(32, 2, head_dim=16,
                               position=attn_layer.T5Bias(),
                               rngs=nnx.Rngs(0))
  graph, params = nnx.split(layer)

  def loss(params, x):
    with core.use_implementation(implementation):
      return jnp.sum(nnx.merge(graph, params)(x) ** 2)

  x = jax.ShapeDtypeStruct((1, seq_len, 32), jnp.float32)
  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_t5_layer_memory_is_linear_at_32k():
  """Forward + backward of a T5-bias layer (2 heads of 16, batch 1):
  xla_chunked's XLA temporaries at T = 32768 stay under 16 MiB + 2 KiB per
  token (measured 51.5 MB; it holds a few [T, N, H] float32 buffers and
  per-block work), and doubling T from 16k at most doubles them; the dense
  path's hold at least the [N, T, T] float32 logits (8 GiB at 32k)."""
  t = 32768
  tiled = _layer_temp_bytes(t, "xla_chunked")
  half = _layer_temp_bytes(t // 2, "xla_chunked")
  assert tiled <= 16 * 2**20 + 2048 * t, tiled
  assert tiled <= 2 * half, (tiled, half)
  dense = _layer_temp_bytes(t, "xla")
  assert dense >= 2 * t * t * 4, dense
