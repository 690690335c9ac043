"""extrapolax.models: the decoder LM and its configuration.

KV-cache generation, the model zoo, checkpoints and Hugging Face import land
with the rest of the models issue (see README.md in this folder).
"""

from .config import AttentionSpec, ModelConfig
from .transformer import DecoderLM, num_params
from .generate import CachePolicy, decode_step, generate, init_cache
from .hf import config_from_hf, load_hf
from . import zoo
