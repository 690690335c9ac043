"""The fused Pallas kernels behind ``dot_product_attention``.

``pallas_gpu`` runs ``extrapolax.pallas_kernels.flash_gpu`` (Pallas, Triton
lowering) and ``pallas_tpu`` runs ``extrapolax.pallas_kernels.flash_tpu``
(Pallas Mosaic TPU). On a machine without that accelerator the same kernel
runs in Pallas interpret mode (slow; for tests). The kernels compute masks,
segment ids, ALiBi, soft cap, the far query and a ``position_bias``
(``relative_bias``: T5, Kerple, FIRE, ALiBi; per tile, with its parameters'
gradients, never materialised) in the kernel; a dense ``bias`` is not
supported (NotImplementedError, so automatic dispatch falls through to an
XLA path).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from . import context_parallel
from . import core


def _unsupported(request: core.AttentionRequest) -> Optional[str]:
  if request.bias is not None:
    return ("does not take a dense bias (ALiBi, masks, segments and soft cap "
            "are computed in the kernel)")
  if request.query.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"needs float32, bfloat16 or float16, got {request.query.dtype}"
  if not (request.query.dtype == request.key.dtype == request.value.dtype):
    return "needs query, key and value of one dtype"
  if request.far_query is not None and not (
      request.far_query.dtype == request.far_key.dtype ==
      request.query.dtype):
    return "needs far_query and far_key in the query dtype"
  pb = request.position_bias
  if pb is not None and not pb.has_kernel_tile():
    return (f"cannot evaluate a {type(pb).__name__} per tile (it defines no "
            "kernel_tile)")
  b, t, s, n, k, h, hv = request.shape_info
  if t == 0 or s == 0:
    return "needs T > 0 and S > 0"
  if max(h, hv) > 256:
    return f"supports head_dim up to 256, got {max(h, hv)}"
  return None


def _run(module, static_kwargs, request: core.AttentionRequest):
  b, t, s, n, k, h, hv = request.shape_info
  static = module.make_static(
      mask=request.mask, scale=request.scale,
      soft_cap=request.logits_soft_cap, far_window=request.far_window,
      has_segments=request.q_segment_ids is not None,
      has_slopes=request.alibi_slopes is not None,
      has_far=request.far_query is not None, q_len=t, kv_len=s,
      num_kv_heads=k, position_bias=request.position_bias, **static_kwargs)
  return module.flash_attention(
      static, request.query, request.key, request.value,
      request.query_positions, request.key_positions, request.q_segment_ids,
      request.kv_segment_ids, request.alibi_slopes, request.far_query,
      request.far_key, position_bias=request.position_bias)


@dataclasses.dataclass(frozen=True)
class _Pallas(core.Implementation):
  """A Pallas back end: ``module`` (a pallas_kernels module) on ``backend``.

  Attributes:
    block_sizes: the module's ``BlockSizes`` or None for the defaults.
    interpret: None (interpret mode exactly when the backend is not the
      kernel's accelerator), or force it on / off.
  """
  block_sizes: Any = None
  interpret: Optional[bool] = None
  backend = "?"
  # Learned sinks join after the kernel: its (out, lse) merged with a
  # zero-value block whose lse is the sink (``context_parallel.add_sinks``);
  # the kernels' backward takes the lse cotangent that merge sends, so q, k,
  # v and the sinks all get exact gradients. One elementwise pass over the
  # output, not a change inside the kernels' loops.
  takes_sink_logits = True
  # A position_bias is evaluated per tile in the kernels (bias_params).
  takes_position_bias = True

  def _module(self):
    raise NotImplementedError

  def _static_kwargs(self, request, blocks, interpret):
    del request
    return dict(block_sizes=blocks, interpret=interpret)

  def __call__(self, request: core.AttentionRequest):
    module = self._module()
    why = _unsupported(request)
    if why is not None:
      raise NotImplementedError(f"{self.name} {why}")
    interpret = self.interpret
    if interpret is None:
      interpret = jax.default_backend() != self.backend
    blocks = self.block_sizes or module.BlockSizes()
    if not isinstance(blocks, module.BlockSizes):
      raise ValueError(f"block_sizes must be a {module.__name__.split('.')[-1]}"
                       f".BlockSizes, got {blocks!r}")
    if not interpret:
      blocks.check_hardware()
    out, lse = _run(module, self._static_kwargs(request, blocks, interpret),
                    request)
    if request.sink_logits is not None:
      out, lse = context_parallel.add_sinks(out, lse, request.sink_logits)
    return out, lse


@dataclasses.dataclass(frozen=True)
class PallasGpu(_Pallas):
  """Pallas flash attention for GPUs (Triton lowering)."""
  name = "pallas_gpu"
  backend = "gpu"

  def _module(self):
    from extrapolax.pallas_kernels import flash_gpu  # pylint: disable=g-import-not-at-top
    return flash_gpu


@dataclasses.dataclass(frozen=True)
class PallasTpu(_Pallas):
  """Pallas flash attention for TPUs (Mosaic)."""
  name = "pallas_tpu"
  backend = "tpu"

  def _module(self):
    from extrapolax.pallas_kernels import flash_tpu  # pylint: disable=g-import-not-at-top
    return flash_tpu

  def _static_kwargs(self, request, blocks, interpret):
    # Default positions: the grid's slot axis shrinks to the busiest row of
    # the mask's static block layout (a window mask visits few key blocks).
    return dict(block_sizes=blocks, interpret=interpret,
                default_positions=not request.explicit_positions)


core.register_implementation("pallas_gpu", PallasGpu)
core.register_implementation("pallas_tpu", PallasTpu)
