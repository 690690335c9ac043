"""Per-head RoPE bases, p-RoPE, Giraffe's truncated basis, STRING and the
query temperatures (head_scale, ssmax, llama4), against the float64 oracle.

The reference side is written from the papers' formulas in float64 NumPy
(frequencies, rotation, the temperature), then handed to the oracle; the
gradients with respect to the un-rotated q and k and to the learned
temperature follow by the chain rule (a rotation's transpose is the rotation
by the opposite angle).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax import attention
from extrapolax.attention import layer as L
from extrapolax.attention import masks, rope_remaps
from extrapolax.attention import temperature as T
from tests.attention import oracle, suite

B, SEQ, N, K, H = 2, 24, 4, 2, 8


def _np_inv_freq(base, rot_dim):
  return base ** (-np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)


def _np_rotate(x, pos, inv_freq):
  """Half-layout RoPE in float64: x [B, T, N, H], pos [B, T], inv_freq
  [N, R/2] (per head)."""
  r = 2 * inv_freq.shape[-1]
  ang = pos[:, :, None, None].astype(np.float64) * inv_freq[None, None]
  cos, sin = np.cos(ang), np.sin(ang)
  x1, x2, rest = x[..., :r // 2], x[..., r // 2:r], x[..., r:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


# name -> (position scheme, temperature, per-KV-head float64 frequencies,
#          STRING (shift, local) or None, scale(pos [B, T], params) [B, T, N])
_BASES = (50.0, 5000.0)
_INV = _np_inv_freq(10000.0, H)
METHODS = {
    "per_head_bases": (
        L.Rope(base=_BASES), None,
        np.stack([_np_inv_freq(b, H) for b in _BASES]), None, None),
    "p_rope": (
        L.Rope(p_rope=0.5), None,
        np.stack([np.where(np.arange(H // 2) < 2, _INV, 0.0)] * K), None,
        None),
    "truncated_basis": (
        L.Rope(truncated_basis=(0.005, 0.05, 0.02)), None,
        np.stack([np.where(_INV >= 0.05, _INV,
                           np.where(_INV > 0.005, 0.02, 0.0))] * K), None,
        None),
    "string": (L.Rope(string=(8, 2)), None, np.stack([_INV] * K), (8, 2),
               None),
    "string_per_head": (L.Rope(base=_BASES, string=(5, 0)), None,
                        np.stack([_np_inv_freq(b, H) for b in _BASES]),
                        (5, 0), None),
    "ssmax": (L.NoPE(), T.SSMax(), None, None,
              lambda pos, s: np.log(pos + 1.0)[..., None] * s),
    "head_scale": (L.Rope(), T.HeadScale(), np.stack([_INV] * K), None,
                   lambda pos, s: np.broadcast_to(s, pos.shape + (N,))),
    "llama4": (L.NoPE(), T.Llama4Temperature(floor_scale=4, attn_scale=0.3),
               None, None,
               lambda pos, s: np.broadcast_to(
                   (np.log(np.floor((pos + 1.0) / 4) + 1) * 0.3 + 1)[..., None],
                   pos.shape + (N,))),
}
_PARAM = {"ssmax": "ssmax_s", "head_scale": "head_scale"}


def _layer(name):
  scheme, temperature, *_ = METHODS[name]
  layer = L.Attention(N * H, N, num_kv_heads=K, head_dim=H, position=scheme,
                      temperature=temperature, mask=masks.Causal(),
                      rngs=nnx.Rngs(0))
  if name in _PARAM:   # learned temperatures away from their start
    getattr(layer, _PARAM[name])[...] = jnp.asarray([0.4, 0.9, 1.3, 0.7])
  return layer


def _inputs(seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (B, SEQ, N, H))
  k = jax.random.normal(keys[1], (B, SEQ, K, H))
  v = jax.random.normal(keys[2], (B, SEQ, K, H))
  d_out = jax.random.normal(keys[3], (B, SEQ, N, H))
  d_lse = jax.random.normal(keys[4], (B, N, SEQ))
  # Packed rows: row 1 holds two documents (positions restart).
  pos = np.stack([np.arange(SEQ), np.r_[np.arange(10), np.arange(SEQ - 10)]])
  return q, k, v, d_out, d_lse, pos.astype(np.int32)


def _reference(name, layer, q, k, v, pos, d_out, d_lse):
  """Oracle out, lse and grads (q, k, v, learned temperature) in float64."""
  _, _, kv_freq, string, scale_fn = METHODS[name]
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  q_freq = None if kv_freq is None else np.repeat(kv_freq, N // K, axis=0)
  rot = (lambda x, p, f: x) if kv_freq is None else _np_rotate
  param = None if name not in _PARAM else np.asarray(
      getattr(layer, _PARAM[name])[...], np.float64)
  scale = np.ones((B, SEQ, N)) if scale_fn is None else scale_fn(
      pos.astype(np.float64), param)
  rq, rk = rot(q, pos, q_freq), rot(k, pos, kv_freq)
  case = oracle.Case(q=rq * scale[..., None], k=rk, v=v, mask=masks.Causal(),
                     q_pos=pos, k_pos=pos)
  far_pos = None
  if string is not None:
    far_pos = pos - string[0] + string[1]
    rfq = rot(q, far_pos, q_freq)
    case.far_q, case.far_k, case.far_window = (rfq * scale[..., None], rk,
                                               string[0])
  seg = np.stack([np.zeros(SEQ, int), (np.arange(SEQ) >= 10).astype(int)])
  case.q_seg = case.kv_seg = seg
  out, lse, g = oracle.forward_and_grad(case, d_out, d_lse)
  # Chain rule back through the scale and the rotations.
  unrot = lambda x, p, f: rot(x, -p, f)
  dq = unrot(g["q"] * scale[..., None], pos, q_freq)
  dk = unrot(g["k"], pos, kv_freq)
  d_scale = np.einsum("btnh,btnh->btn", g["q"], rq)
  if string is not None:
    dq = dq + unrot(g["far_q"] * scale[..., None], far_pos, q_freq)
    dk = dk + unrot(g["far_k"], pos, kv_freq)
    d_scale = d_scale + np.einsum("btnh,btnh->btn", g["far_q"], rfq)
  d_param = None
  if name == "ssmax":
    d_param = (d_scale * np.log(pos + 1.0)[..., None]).sum((0, 1))
  elif name == "head_scale":
    d_param = d_scale.sum((0, 1))
  return out, lse, dict(q=dq, k=dk, v=g["v"], param=d_param), seg


def _run(name, layer, implementation, q, k, v, pos, seg, d_out, d_lse):
  graphdef, state = nnx.split(layer)

  def f(q, k, v, state):
    model = nnx.merge(graphdef, state)
    with attention.use_implementation(implementation):
      return model.attend(q, k, v, pos, pos, segment_ids=seg,
                          return_residuals=True)

  (out, lse), vjp = jax.vjp(f, q, k, v, state)
  dq, dk, dv, dstate = vjp((d_out, jnp.where(jnp.isfinite(lse), d_lse, 0.)))
  d_param = None
  if name in _PARAM:
    d_param = getattr(dstate, _PARAM[name])[...]
  return out, lse, dict(q=dq, k=dk, v=dv, param=d_param)


def _implementations(name):
  if name.startswith("string"):     # the far pairs run inside the kernels
    return suite.IMPLEMENTATIONS
  return suite.IMPLEMENTATIONS[:2]  # q/k changes only: any implementation


@pytest.mark.parametrize("name,implementation", [
    pytest.param(n, i.values[0], id=f"{n}-{i.id}")
    for n in METHODS for i in _implementations(n)])
def test_method_matches_the_oracle(name, implementation):
  layer = _layer(name)
  q, k, v, d_out, d_lse, pos = _inputs()
  want_out, want_lse, want, seg = _reference(name, layer, q, k, v, pos,
                                             d_out, d_lse)
  out, lse, got = _run(name, layer, implementation, q, k, v, pos,
                       jnp.asarray(seg), d_out, d_lse)
  tol = suite.TOLERANCE[jnp.float32]
  suite.assert_close(out, want_out, tol["fwd"], f"{name} out")
  suite.assert_close(lse, want_lse, tol["fwd"], f"{name} lse")
  for key in ("q", "k", "v", "param"):
    if want[key] is not None:
      suite.assert_close(got[key], want[key], tol["grad"], f"{name} d{key}")


# ----------------------------------------------------------------------------
# Each change changes only what it should.


def _attend(scheme, temperature=None, seed=1, **kwargs):
  layer = L.Attention(N * H, N, num_kv_heads=K, head_dim=H, position=scheme,
                      temperature=temperature, rngs=nnx.Rngs(0), **kwargs)
  q, k, v, *_ = _inputs(seed)
  pos = np.arange(SEQ, dtype=np.int32)[None].repeat(B, 0)
  return np.asarray(layer.attend(q, k, v, pos, pos))


def test_equal_per_head_bases_equal_one_base():
  np.testing.assert_array_equal(_attend(L.Rope(base=(500.0, 500.0))),
                                _attend(L.Rope(base=500.0)))
  assert np.abs(_attend(L.Rope(base=(500.0, 50.0)))
                - _attend(L.Rope(base=500.0))).max() > 1e-3


def test_p_rope_ends_are_rope_and_nope():
  np.testing.assert_array_equal(_attend(L.Rope(p_rope=1.0)),
                                _attend(L.Rope()))
  np.testing.assert_allclose(_attend(L.Rope(p_rope=0.0)), _attend(L.NoPE()),
                             rtol=1e-6, atol=1e-6)


def test_p_rope_zeroes_the_lowest_frequencies():
  inv = jnp.asarray([1.0, 0.1, 0.01, 0.001])
  np.testing.assert_allclose(rope_remaps.p_rope_frequencies(inv, 0.5),
                             [1.0, 0.1, 0.0, 0.0], rtol=1e-7)
  np.testing.assert_allclose(rope_remaps.p_rope_frequencies(inv, 0.8),
                             [1.0, 0.1, 0.01, 0.0], rtol=1e-7)  # int(3.2)


def test_partial_rotary_factor_one_is_full_rope():
  np.testing.assert_array_equal(_attend(L.Rope(partial_rotary_factor=1.0)),
                                _attend(L.Rope()))
  # 0.5: only the first half of each head rotates (GPT-NeoX / Phi; the
  # frequencies against transformers are in test_rope_hf.py).
  q = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  inv, _ = L.Rope(partial_rotary_factor=0.5).frequencies(8)
  out = attention.apply_rope(q, jnp.arange(5), inv)
  np.testing.assert_array_equal(out[..., 4:], q[..., 4:])
  assert np.abs(out[0, 1:, :, :4] - q[0, 1:, :, :4]).max() > 1e-3


def test_truncated_basis_golden():
  # head_dim 8, base 10000: theta = 1, 0.1, 0.01, 0.001.
  got = rope_remaps.truncated_basis(jnp.asarray(_INV, jnp.float32), a=0.005,
                                    b=0.05, rho=0.02)
  np.testing.assert_allclose(got, [1.0, 0.1, 0.02, 0.0], rtol=1e-6)
  inv, _ = L.Rope(truncated_basis=(0.005, 0.05, 0.02)).frequencies(8)
  np.testing.assert_allclose(inv, [1.0, 0.1, 0.02, 0.0], rtol=1e-6)


def test_string_distance_golden_and_near_pairs_unchanged():
  # shift 4, local window 1: 0 1 2 3 | 4->1 5->2 ... (the paper's
  # P[m][n] - S + W for m - n >= S).
  got = rope_remaps.string_distance(np.arange(10), shift=4, local_window=1)
  np.testing.assert_array_equal(got, [0, 1, 2, 3, 1, 2, 3, 4, 5, 6])
  # Rows whose keys are all nearer than the shift are plain RoPE; later
  # rows change.
  plain, shifted = _attend(L.Rope()), _attend(L.Rope(string=(8, 2)))
  np.testing.assert_array_equal(shifted[:, :8], plain[:, :8])
  assert np.abs(shifted[:, 8:] - plain[:, 8:]).max() > 1e-4


def test_temperatures_at_their_identity_are_plain():
  np.testing.assert_array_equal(_attend(L.Rope(), T.HeadScale()),
                                _attend(L.Rope()))
  # Llama 4: positions below floor_scale - 1 keep scale 1.
  tuned = _attend(L.NoPE(), T.Llama4Temperature(floor_scale=8))
  np.testing.assert_array_equal(tuned[:, :7], _attend(L.NoPE())[:, :7])
  assert np.abs(tuned[:, 7:] - _attend(L.NoPE())[:, 7:]).max() > 1e-4


def test_llama4_scale_matches_transformers_formula():
  pos = jnp.asarray([[0, 1, 6, 7, 8, 100, 8190, 8191]])
  got = T.Llama4Temperature().scale(None, pos)[0, :, 0]
  want = np.log1p(np.floor((np.asarray(pos[0]) + 1.0) / 8192)) * 0.1 + 1.0
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[-2] == 1.0 and got[-1] > 1.0


def test_per_head_inv_freq_rows_equal_one_row():
  x = jax.random.normal(jax.random.key(2), (2, 6, 3, 8))
  inv = jnp.asarray(_INV, jnp.float32)
  np.testing.assert_array_equal(
      attention.apply_rope(x, jnp.arange(6), jnp.stack([inv] * 3)),
      attention.apply_rope(x, jnp.arange(6), inv))


@pytest.mark.parametrize("kwargs,match", [
    (dict(position=L.Rope(base=(10.0, 20.0, 30.0))),
     r"one per key/value head \(num_kv_heads=2\), got 3"),
    (dict(temperature="sssmax"), r"temperature must be one of .*'ssmax'"),
])
def test_layer_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    L.Attention(N * H, N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0),
                **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(string=(4, 4)), "local_window=4 must be < shift=4"),
    (dict(string=(4, 1), self_extend=(2, 4)), "choose one"),
    (dict(p_rope=1.5), r"p_rope fraction must be in \[0, 1\], got 1.5"),
    (dict(truncated_basis=(0.1, 0.01, 0.0)), "0 <= a < b"),
    (dict(base=()), "non-empty tuple"),
])
def test_rope_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    L.Rope(**kwargs)


def test_temperature_errors():
  with pytest.raises(ValueError, match="has no parameter 'floor'"):
    T.temperature_from_name("llama4", floor=3)
  with pytest.raises(ValueError, match="ssmax init must be a finite number > 0, got 0.0"):
    T.SSMax(init=0.0)
