"""extrapolax.attention: position encodings, masks and dot_product_attention.

Plain functions on ``jax.Array``; the one Flax piece is ``layer.Attention``.
"""

from . import masks
from .core import (AttentionRequest, Implementation, dot_product_attention,
                   implementations, register_implementation)
from .masks import (Causal, Chunked, Lambda, PrefixLM, SlidingWindow,
                    classify_blocks)
from .xla import Xla
from .xla_chunked import XlaChunked
from .cudnn import Cudnn
from .pallas import PallasGpu, PallasTpu
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
