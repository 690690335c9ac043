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
