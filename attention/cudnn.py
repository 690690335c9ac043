"""cuDNN flash attention through ``jax.nn.dot_product_attention``.

Serves only what cuDNN's fused kernel expresses: a CUDA GPU, float16/bfloat16,
head_dim a multiple of 8 up to 128, no mask or ``Causal()`` or
``SlidingWindow(w)`` with T == S (jax aligns its causal mask top-left, which
equals ours only then), an optional dense bias, and the default positions.
Anything else raises NotImplementedError, so automatic dispatch falls through.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import core
from . import masks as masks_lib


def _unsupported(request: core.AttentionRequest):
  """Why cuDNN cannot serve ``request``, or None."""
  b, t, s, n, k, h, hv = request.shape_info
  if jax.default_backend() != "gpu":
    return f"needs a CUDA GPU (backend is {jax.default_backend()!r})"
  if request.query.dtype not in (jnp.float16, jnp.bfloat16):
    return f"needs float16 or bfloat16, got {request.query.dtype}"
  if not (request.query.dtype == request.key.dtype == request.value.dtype):
    return "needs query, key and value of one dtype"
  if h != hv or h % 8 or h > 128:
    return f"needs head_dim a multiple of 8 up to 128 (got {h}, value {hv})"
  if request.mask is not None and not isinstance(
      request.mask, (masks_lib.Causal, masks_lib.SlidingWindow)):
    return f"cannot express mask {request.mask}"
  if isinstance(request.mask, masks_lib.SlidingWindow) and request.mask.right:
    return f"runs causal windows only, got {request.mask}"
  if request.mask is not None and t != s:
    return "aligns causal masks top-left; needs T == S with a mask"
  for name in ("q_segment_ids", "alibi_slopes", "logits_soft_cap",
               "far_query"):
    if getattr(request, name) is not None:
      return f"does not support {name}"
  if request.explicit_positions:
    return "does not support explicit positions"
  return None


class Cudnn(core.Implementation):
  """jax.nn.dot_product_attention(implementation="cudnn")."""
  name = "cudnn"

  def __call__(self, request: core.AttentionRequest):
    why = _unsupported(request)
    if why is not None:
      raise NotImplementedError(f"cudnn {why}")
    mask = request.mask
    window = None
    if isinstance(mask, masks_lib.SlidingWindow):
      window = (mask.left, 0)
    out, lse = jax.nn.dot_product_attention(
        request.query, request.key, request.value, bias=request.bias,
        scale=request.scale, is_causal=mask is not None,
        local_window_size=window, implementation="cudnn",
        return_residual=True)
    return out, jnp.swapaxes(lse.astype(jnp.float32), 1, 2)


core.register_implementation("cudnn", Cudnn)
