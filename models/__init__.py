"""extrapolax.models: the decoder LM, KV-cache generation, the zoo, HF import.

See README.md in this folder.
"""

from .config import AttentionSpec, ModelConfig
from .transformer import DecoderLM, num_params
from .generate import CachePolicy, decode_step, generate, init_cache
from .hf import config_from_hf, load_hf
from . import zoo
