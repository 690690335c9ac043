"""Relative biases evaluated per tile inside the Pallas kernels.

* ``kernel_tile`` (the in-kernel form: selects and static loops over packed
  per-head scalars, ``pallas_kernels/bias_params.py``) equals ``tile`` for
  every head over distances past T5's max_distance, both signs, and its
  parameters' gradient (through the packing) equals ``tile``'s.
* ``pallas_gpu`` (and ``pallas_tpu``: every type causal, T5 in every
  scenario) in interpret mode, per bias type, equal
  the float64 oracle given the dense bias: out, lse, dq, dk, dv and every
  bias parameter's gradient (the oracle's dense bias gradient chained
  through the bias function), GQA (N=4 over K=2), with a causal mask, a
  two-sided window with packed segments and restarting positions, and
  T != S without a mask (bidirectional T5's future buckets).
* The kernels get the bias unmaterialised: the request that reaches them
  carries ``position_bias`` and ``bias`` None, and no [T, S] array appears
  outside the kernels (the ``xla`` path's jaxpr has one: the check has
  teeth).
* Lowering for the hardware from this CPU: Pallas -> Triton IR
  (jax.export for cuda) and Pallas -> Mosaic (jax.export for tpu), every
  bias type, forward and backward: JAX's lowering rules accept the
  in-kernel bias and its VJP. Triton's and Mosaic's own compilers do not
  run here.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extrapolax.attention import core, masks
from extrapolax.attention import pallas as pallas_impl
from extrapolax.attention import relative_bias as rb
from extrapolax.attention.pallas import PallasGpu, PallasTpu
from extrapolax.pallas_kernels import bias_params, flash_tpu

from .suite import PALLAS_GPU, PALLAS_TPU
from .test_relative_bias import (B, H, K, KINDS, N, check_against_oracle,
                                 make_bias, random_qkv)

EXACT = ("t5", "t5_bidirectional", "alibi")   # selects / one product


def _kernel_tiles(pb, qp, kp):
  """[N, T, S] from kernel_tile, head by head, through the packed rows."""
  layout = bias_params.BiasLayout.of(pb, lanes=16, power_of_2=True)
  rows = layout.pack(pb)
  return jnp.stack([layout.tile(rows[h], qp[:, None], kp[None, :])
                    for h in range(pb.num_heads)])


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_tile_equals_tile(kind):
  pb = make_bias(kind)
  # Distances from -300 to 300: both signs, past max_distance (20).
  qp = jnp.arange(0, 300, 7, dtype=jnp.int32)
  kp = jnp.arange(0, 300, 5, dtype=jnp.int32)
  want = pb.tile(qp[None], kp[None])[0]
  got = _kernel_tiles(pb, qp, kp)
  if kind in EXACT:
    np.testing.assert_array_equal(got, want)
  else:
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
  weight = jax.random.normal(jax.random.key(2), want.shape)
  g_want = jax.grad(lambda p: jnp.sum(weight * p.tile(qp[None], kp[None])[0])
                    )(pb)
  g_got = jax.grad(lambda p: jnp.sum(weight * _kernel_tiles(p, qp, kp)))(pb)
  for name in pb.param_names:
    w, g = getattr(g_want, name), getattr(g_got, name)
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert np.abs(np.asarray(w)).max() > 0, name
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * np.abs(
        np.asarray(w)).max(), err_msg=name)


def _case(scenario, key=1):
  """(q, k, v, call kwargs, oracle kwargs)."""
  q, k, v = random_qkv(scenario, key)
  call, case = {}, {}
  if scenario == "causal":
    call["mask"] = case["mask"] = masks.Causal()
  elif scenario == "window_packed":
    window = masks.SlidingWindow(left=6, right=3)
    counts = ([13, 11, 8], [13, 19])
    seg = np.stack([np.repeat(np.arange(len(c)), c) for c in counts]
                   ).astype(np.int32)
    pos = np.stack([np.concatenate([np.arange(n) for n in c])
                    for c in counts]).astype(np.int32)
    call.update(mask=window, segment_ids=seg, query_positions=pos,
                key_positions=pos)
    case.update(mask=window, q_seg=seg, kv_seg=seg, q_pos=pos, k_pos=pos)
  return q, k, v, call, case


# Every bias kind in every scenario on pallas_gpu; on pallas_tpu (the same
# bias code, kernel_tile, behind another kernel) every kind causal and T5
# in every scenario, to keep CI's time down.
ORACLE_CASES = [
    pytest.param(kind, scenario, impl, id=f"{kind}-{scenario}-{name}")
    for name, impl in (("pallas_gpu", PALLAS_GPU), ("pallas_tpu", PALLAS_TPU))
    for scenario in ("causal", "window_packed", "t_ne_s")
    for kind in KINDS
    if name == "pallas_gpu" or scenario == "causal" or kind == "t5"]


@pytest.mark.parametrize("kind, scenario, implementation", ORACLE_CASES)
def test_kernels_match_oracle(kind, scenario, implementation):
  check_against_oracle(make_bias(kind), _case(scenario), implementation)


def _arrays_ending_in(jaxpr, shape):
  """Avals (outside pallas_call bodies) whose trailing dims are ``shape``."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        dims = getattr(var.aval, "shape", ())
        if tuple(dims[-len(shape):]) == shape:
          found.append((eqn.primitive.name, dims))
      if eqn.primitive.name == "pallas_call":
        continue
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
  walk(jaxpr.jaxpr)
  return found


@pytest.mark.parametrize("implementation", [
    pytest.param(PALLAS_GPU, id="pallas_gpu"),
    pytest.param(PALLAS_TPU, id="pallas_tpu")])
def test_kernels_get_the_bias_unmaterialised(implementation, monkeypatch):
  t, s = 40, 56
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (B, t, N, H))
  k = jax.random.normal(ks[1], (B, s, K, H))
  v = jax.random.normal(ks[2], (B, s, K, H))
  pb = make_bias("t5")

  def loss(impl, q, k, v, pb):
    return jnp.sum(core.dot_product_attention(
        q, k, v, position_bias=pb, mask=masks.Causal(),
        implementation=impl) ** 2)

  dense = jax.make_jaxpr(jax.grad(lambda *a: loss("xla", *a),
                                  argnums=(0, 3)))(q, k, v, pb)
  assert _arrays_ending_in(dense, (t, s))      # the dense path has them
  seen = []
  run = pallas_impl._run          # pylint: disable=protected-access

  def spy(module, static_kwargs, request):
    seen.append(request)
    return run(module, static_kwargs, request)

  monkeypatch.setattr(pallas_impl, "_run", spy)
  monkeypatch.setattr(core, "with_dense_position_bias",
                      lambda request: pytest.fail("densified"))
  tiled = jax.make_jaxpr(jax.grad(lambda *a: loss(implementation, *a),
                                  argnums=(0, 3)))(q, k, v, pb)
  assert seen and all(r.bias is None and isinstance(
      r.position_bias, type(pb)) for r in seen)
  assert not _arrays_ending_in(tiled, (t, s)), _arrays_ending_in(
      tiled, (t, s))


@dataclasses.dataclass(frozen=True)
class _NoKernelTile(rb.RelativeBias):
  """ALiBi's values with no kernel_tile: the kernels must refuse it."""
  slopes: jax.Array
  param_names = ("slopes",)
  head_axes = (0,)

  @property
  def num_heads(self):
    return self.slopes.shape[0]

  def tile(self, q_pos, k_pos):
    return rb.AlibiBias(self.slopes).tile(q_pos, k_pos)


jax.tree_util.register_dataclass(_NoKernelTile, data_fields=["slopes"],
                                 meta_fields=[])


def test_bias_without_kernel_tile_is_refused():
  pb = _NoKernelTile(jnp.ones(N))
  q, kv = jnp.ones((1, 16, N, H)), jnp.ones((1, 16, K, H))
  with pytest.raises(NotImplementedError, match="defines no kernel_tile"):
    core.dot_product_attention(q, kv, kv, position_bias=pb,
                               implementation=PALLAS_GPU)
  # Automatic dispatch falls through (to a path that evaluates it).
  want = core.dot_product_attention(q, kv, kv, position_bias=rb.AlibiBias(
      jnp.ones(N)), implementation="xla")
  got = core.dot_product_attention(q, kv, kv, position_bias=pb)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def _loss_for_export(impl, pb, t=256, h=64):
  ks = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(ks[0], (1, t, N, h), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, t, K, h), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, t, K, h), jnp.bfloat16)
  seg = jnp.asarray(np.repeat([0, 1], [t // 2 + 5, t // 2 - 5]))[None]

  def grads(q, k, v, pb):
    def loss(q, k, v, pb):
      out, lse = core.dot_product_attention(
          q, k, v, position_bias=pb, mask=masks.Causal(), segment_ids=seg,
          implementation=impl, return_residuals=True)
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, pb)
  return jax.jit(grads), (q, k, v, pb)


@pytest.mark.parametrize("kind", ("t5_bidirectional", "kerple_power", "fire",
                                  "alibi"))
def test_lowers_to_triton_ir(kind):
  """Pallas -> Triton IR for a GPU (forward, dq, dk/dv): the in-kernel
  bias and its VJP pass JAX's Triton lowering rules (Triton's own
  compilation to PTX runs only on a GPU)."""
  f, args = _loss_for_export(PallasGpu(interpret=False), make_bias(kind))
  exported = jax.export.export(
      f, platforms=["cuda"], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call(
              "__gpu$xla.gpu.triton")])(*args)
  assert exported.mlir_module().count("stablehlo.custom_call @__gpu$xla."
                                      "gpu.triton") == 3


@pytest.mark.parametrize("kind", ("t5_bidirectional", "kerple_power", "fire",
                                  "alibi"))
def test_lowers_to_mosaic(kind, monkeypatch):
  """Pallas -> Mosaic for a TPU (forward, dq, dk/dv), as
  test_flash_tpu.test_lowers_for_tpu (Mosaic's layout passes and
  compilation need a TPU)."""
  from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                      lambda: tpu_info.get_tpu_info_for_chip(
                          tpu_info.ChipVersion.TPU_V5E, 1))
  tpu_info.get_tpu_info.cache_clear()
  impl = PallasTpu(block_sizes=flash_tpu.BlockSizes(128, 128, 128, 128, 128,
                                                    128), interpret=False)
  f, args = _loss_for_export(impl, make_bias(kind))
  try:
    exported = jax.export.export(f, platforms=["tpu"])(*args)
  finally:
    tpu_info.get_tpu_info.cache_clear()
  assert exported.mlir_module().count("tpu_custom_call") == 3
