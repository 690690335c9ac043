"""extrapolax.attention: position encodings, masks and dot_product_attention.

Plain functions on ``jax.Array``; the one Flax piece is ``layer.Attention``.

Context parallelism (``context_parallel``): for sequences too long for one
device, ``ContextParallel`` splits the T queries and keys of a self-attention
call into contiguous shards over a mesh axis named ``"context"`` and either
passes key/value shards around a ring (``strategy="ring"``, memory linear in
the shard; the number of ring steps is cut statically for windowed masks and
Lambda's sinks travel apart) or all-gathers them (``"all_gather"``). Each
device runs an ordinary implementation on its shard with global positions,
so every mask, segment ids, ALiBi, soft cap and the far query work, forward
and backward. Under ``with jax.set_mesh(mesh):`` with a "context" axis of
size > 1, ``implementation=None`` tries it first::

  mesh = jax.make_mesh((2, 4), ("data", "context"))
  with jax.set_mesh(mesh):
    out = jax.jit(functools.partial(dot_product_attention,
                                    mask=masks.Causal()))(q, k, v)

``context_parallel_attention(q, k, v, mesh=mesh, ...)`` is the explicit form.
Not served (NotImplementedError; auto falls through): T != S, T not a
multiple of the axis size, a dense bias over keys (T5, Kerple, FIRE).

Relative biases per tile (``relative_bias``): ``T5BucketBias``,
``KerpleBias``, ``FireBias`` and ``AlibiBias`` compute the bias of any
(query position, key position) tile from their learned parameters; passed as
``dot_product_attention(..., position_bias=...)``, xla_chunked and the
Pallas kernels evaluate them per block (forward and backward, parameter
gradients included: memory linear in length) and the other implementations
get them materialised.
"""

from . import masks
from .core import (AttentionRequest, Implementation, current_implementation,
                   dot_product_attention, implementations,
                   register_implementation, use_implementation)
from .masks import (Causal, Chunked, Dilated, GlobalTokens, Lambda, PerHead,
                    PrefixLM, SlidingWindow, Strided, classify_blocks)
from .xla import Xla
from .xla_chunked import XlaChunked
from .cudnn import Cudnn
from .pallas import PallasGpu, PallasTpu
from . import context_parallel
from .context_parallel import (ContextParallel, context_parallel_attention,
                               ring_plan, ring_steps)
from . import relative_bias
from .relative_bias import (AlibiBias, FireBias, KerpleBias, RelativeBias,
                            T5BucketBias)
from . import layer, positional
from .layer import (Alibi, Attention, Fire, Kerple, LearnedPositionEmbedding,
                    NoPE, Rope, T5Bias)
from .positional import (alibi_bias, alibi_slopes, fire_bias,
                         kerple_log_bias, length_logit_scale,
                         randomized_positions, relative_positions,
                         self_extend_positions, sinusoidal_embedding, t5_bias,
                         t5_relative_bucket)
from . import rope
from .rope import (ROPE_LAYOUTS, ROPE_TYPES, apply_rope, rope_cos_sin,
                   rope_frequencies)
from . import rope_remaps, rope_scaling, temperature
from .rope_remaps import (p_rope_frequencies, spread_bases, string_distance,
                          truncated_basis)
from .temperature import (HeadScale, Llama4Temperature, SSMax, Temperature,
                          register_temperature, temperature_names)
