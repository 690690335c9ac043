"""extrapolax.models: the decoder LM, KV-cache generation, the zoo, HF and
GGUF import, tokenizers.

See README.md in this folder.
"""

from .config import AttentionSpec, ModelConfig
from .transformer import DecoderLM, num_params
from .generate import (CachePolicy, complete, decode_step, generate,
                       init_cache)
from .hf import config_from_hf, load_hf
from .gguf import load_gguf
from .tokenizer import Tokenizer, load_tokenizer
from . import zoo
